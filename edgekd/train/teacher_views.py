"""Teacher views: augmented views drawn once, the teacher run once per view, its logits stored.

With augmentation on, plain distillation runs the teacher on every batch of every epoch. Following Fast
Knowledge Distillation (Shen & Xing, ECCV 2022), `distill.teacher_views: K` draws K views (crop box, flip,
colour factors) of every training photo once, seeded, renders each at the teacher's resolution from the
decoded photo, and stores the teacher's logits (fp16, memory-mapped) with the view parameters. Each epoch
then picks one stored view per photo (seeded by epoch) and the student renders that same view at its own
resolution, so teacher and student still see the same crop while the teacher costs nothing after the fill.

The entry is keyed by the teacher checkpoint, the decoded images, the augmentation settings, the render
and teacher resolutions, K and the seed. The fill writes its progress after every chunk, so an
interrupted fill continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgekd.data import Split
from edgekd.data.sources import digest
from edgekd.recipe import AugmentConfig
from edgekd.train.augment import Views, draw_views, render_views

log = logging.getLogger(__name__)

VERSION = 1
_PARAMS = 9  # theta (2x3) and three colour factors


@dataclass
class TeacherViews:
    params: np.ndarray  # (rows of the image store, K, 9) float32
    logits: np.ndarray  # (rows of the image store, K, classes) float16, memory-mapped
    seed: int

    @property
    def count(self) -> int:
        return self.params.shape[1]

    def choose(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        """The stored view each row trains on in this epoch (a seeded draw per epoch)."""
        picks = np.random.default_rng([self.seed, epoch]).integers(0, self.count, size=len(self.params))
        return picks[rows]

    def views(self, rows: np.ndarray, epoch: int) -> tuple[Views, torch.Tensor]:
        """The views of `rows` for this epoch and the teacher's fp32 logits for them."""
        picks = self.choose(rows, epoch)
        params = torch.from_numpy(self.params[rows, picks])
        logits = torch.from_numpy(self.logits[rows, picks].astype(np.float32))
        return Views(params[:, :6].reshape(-1, 2, 3), params[:, 6:]), logits


def _draw_all(rows: int, count: int, size: int, config: AugmentConfig, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919)  # not the epochs' batch seeds
    views = draw_views(rows * count, size, config, generator)
    params = torch.cat([views.theta.reshape(-1, 6), views.color], dim=1)
    return params.reshape(rows, count, _PARAMS).numpy().astype(np.float32)


def entry_key(teacher_sha256: str, store_id: str, config: AugmentConfig, render_size: int, teacher_size: int,
              count: int, seed: int) -> str:
    return digest(VERSION, teacher_sha256, store_id, asdict(config), render_size, teacher_size, count, seed)[:16]


@torch.inference_mode()
def _fill(teacher, split: Split, entry: TeacherViews, config: AugmentConfig, teacher_size: int, folder: Path,
          filled: np.ndarray, batch_size: int, autocast) -> None:
    todo = np.sort(split.rows[~filled[split.rows]])
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        pixels = torch.from_numpy(np.ascontiguousarray(split.images[chunk])).permute(0, 3, 1, 2)
        for k in range(entry.count):
            params = torch.from_numpy(entry.params[chunk, k])
            views = Views(params[:, :6].reshape(-1, 2, 3), params[:, 6:])
            x = render_views(pixels, views, config, teacher_size)
            with autocast():
                entry.logits[chunk, k] = teacher(x).float().numpy().astype(np.float16)
        entry.logits.flush()
        filled[chunk] = True  # only after the logits are on disk: a kill re-runs this chunk, no more
        _save_atomic(folder / "filled.npy", filled)
        log.debug("teacher views: %d / %d photos", start + len(chunk), len(todo))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def teacher_views(teacher: torch.nn.Module, teacher_sha256: str, num_classes: int, split: Split, store_id: str,
                  config: AugmentConfig, render_size: int, teacher_size: int, count: int, seed: int,
                  choice_seed: int, cache_root: Path, autocast, batch_size: int = 128) -> TeacherViews:
    """The K stored views of every training photo with the teacher's logits, filled now where missing.

    `seed` draws the views (students of several seeds can share one fill); `choice_seed` picks each
    epoch's view per photo (the student's own seed)."""
    folder = cache_root / "teacher-views" / entry_key(teacher_sha256, store_id, config, render_size,
                                                      teacher_size, count, seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = len(split.images)
    if not (folder / "params.npy").is_file():
        _save_atomic(folder / "params.npy", _draw_all(total, count, render_size, config, seed))
    if not (folder / "logits.npy").is_file():
        np.lib.format.open_memmap(folder / "logits.tmp.npy", mode="w+", dtype=np.float16,
                                  shape=(total, count, num_classes)).flush()
        (folder / "logits.tmp.npy").replace(folder / "logits.npy")
    filled = np.load(folder / "filled.npy") if (folder / "filled.npy").is_file() else np.zeros(total, bool)
    entry = TeacherViews(np.load(folder / "params.npy"), np.load(folder / "logits.npy", mmap_mode="r+"), seed)
    missing = int((~filled[split.rows]).sum())
    if missing:
        start = time.perf_counter()
        log.info("teacher views: running the teacher on %d views of %d photos at %dpx%s (%s)", count, missing,
                 teacher_size, f" ({len(split.rows) - missing} done before)" if missing < len(split.rows) else "",
                 folder)
        teacher.eval()
        _fill(teacher, split, entry, config, teacher_size, folder, filled, batch_size, autocast)
        log.info("teacher views: filled in %.0fs", time.perf_counter() - start)
    else:
        log.info("teacher views: %d views of %d photos read from %s", count, len(split.rows), folder)
    return TeacherViews(entry.params, np.load(folder / "logits.npy", mmap_mode="r"), choice_seed)


def resize_for(pixels: torch.Tensor, size: int) -> torch.Tensor:
    if pixels.shape[-1] == size:
        return pixels
    return F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 255)
