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

from edgekd.data.cache import CachedSplit
from edgekd.data.sources import digest

log = logging.getLogger(__name__)


@torch.inference_mode()
def _compute(teacher: torch.nn.Module, images: np.ndarray, out: np.ndarray, device: torch.device,
             batch_size: int) -> None:
    teacher.eval()
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
        out[start:start + batch_size] = teacher(pixels.to(device)).float().cpu().numpy().astype(np.float16)


def cached_teacher_logits(teacher: torch.nn.Module, teacher_sha256: str, num_classes: int, entry: CachedSplit,
                          device: torch.device, batch_size: int = 256) -> np.ndarray:
    """(N, classes) fp16 logits for every image of a cache entry, in its row order (memory-mapped)."""
    folder = entry.path.parent / "teacher-logits"
    path = folder / f"{entry.path.name}-{digest(teacher_sha256, entry.path.name)[:16]}.npy"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                            shape=(len(entry.images), num_classes))
            _compute(teacher, entry.images, out, device, batch_size)
            out.flush()
            del out
            shutil.move(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("teacher logits for %d images computed once in %.1fs and cached (%s)", len(entry.images),
                 time.perf_counter() - start, path)
    return np.load(path, mmap_mode="r")
