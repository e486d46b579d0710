"""Teacher logits computed once per dataset, reused by every epoch and every student of that dataset.

Distillation without augmentation feeds the teacher the same pixels every epoch, so its logits never
change: they are computed once (fp32 arithmetic), stored as fp16 in a memory-mapped array beside the
decoded images, and keyed by the teacher checkpoint's hash and the image cache entry (file list, sizes,
mtimes, image size), so a different teacher or dataset gets its own entry.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgekd.data.cache import CachedSplit, DamagedCache, discard
from edgekd.data.sources import digest
from edgekd.errors import CheckpointError

log = logging.getLogger(__name__)


@torch.inference_mode()
def _compute(teacher: torch.nn.Module, images: np.ndarray, out: np.ndarray, device: torch.device,
             batch_size: int) -> None:
    teacher.eval()
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
        logits = teacher(pixels.to(device)).float().cpu().numpy()
        with np.errstate(over="ignore"):  # beyond fp16 becomes inf, which the caller refuses
            out[start:start + batch_size] = logits.astype(np.float16)


def cached_teacher_logits(teacher: torch.nn.Module, teacher_sha256: str, num_classes: int, entry: CachedSplit,
                          device: torch.device, batch_size: int = 256) -> np.ndarray:
    """(N, classes) fp16 logits for every image of a cache entry, in its row order (memory-mapped)."""
    folder = entry.path.parent / "teacher-logits"
    path = folder / f"{entry.path.name}-{digest(teacher_sha256, entry.path.name)[:16]}.npy"
    shape = (len(entry.images), num_classes)
    if path.is_file():
        try:
            return _open(path, shape)
        except DamagedCache as damage:  # never read: computed again
            log.warning("teacher logits %s are damaged (%s): computing them again", path, damage)
            discard(path)
    _build(teacher, entry, path, shape, device, batch_size)
    return _open(path, shape)


def _open(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        logits = np.load(path, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001 (truncated: ValueError; a zip under the name: BadZipFile; ...)
        raise DamagedCache(f"{exc.__class__.__name__}: {exc}") from None
    if not isinstance(logits, np.ndarray) or logits.dtype != np.float16 or logits.shape != shape:
        raise DamagedCache(f"holds {getattr(logits, 'dtype', '?')} {list(getattr(logits, 'shape', []))}, "
                           f"not float16 {list(shape)}")
    return logits


def _build(teacher: torch.nn.Module, entry: CachedSplit, path: Path, shape: tuple[int, int],
           device: torch.device, batch_size: int) -> None:
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        _compute(teacher, entry.images, out, device, batch_size)
        if not np.isfinite(out).all():  # fp16 holds logits up to 65504; past that they would teach NaN
            raise CheckpointError(f"the teacher's logits overflow (NaN or beyond fp16's range) on "
                                  f"{int((~np.isfinite(out)).any(1).sum())} training images",
                                  hint="set distill.cache_teacher_logits: false (the teacher then runs in fp32 "
                                       "on every batch), or use another teacher")
        out.flush()
        del out
        shutil.move(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("teacher logits for %d images computed once in %.1fs and cached (%s)", len(entry.images),
             time.perf_counter() - start, path)
