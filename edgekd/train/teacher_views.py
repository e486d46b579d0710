"""Teacher views: augmented views drawn once, the teacher run once per view, its logits stored.

With augmentation on, plain distillation runs the teacher on every batch of every epoch. Following Fast
Knowledge Distillation (Shen & Xing, ECCV 2022), `distill.teacher_views: K` draws K views (crop box, flip,
colour factors) of every training photo once, seeded, renders each at the teacher's resolution from the
decoded photo, and stores the teacher's logits (fp16, memory-mapped) with the view parameters. Each epoch
then picks one stored view per photo (seeded by epoch) and the student renders that same view at its own
resolution, so teacher and student still see the same crop while the teacher costs nothing after the fill.

The entry is keyed by the teacher checkpoint, the decoded images, the augmentation settings, the render
and teacher resolutions, K and the seed. Its folder holds params.npy, logits.npy, filled.npy (which
photos are done) and manifest.json (the key's inputs, the arrays' shapes and dtypes). The fill writes its
progress after every chunk, so an interrupted fill continues where it stopped; a folder that does not
check out (an unreadable file, a wrong shape or dtype, views the seed does not draw, a manifest of another
entry) is never read: it is rebuilt from scratch, with a warning.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgekd.data import Split
from edgekd.data.sources import digest
from edgekd.recipe import AugmentConfig
from edgekd.runs import atomic_write_json
from edgekd.train.augment import Views, draw_views, render_views
from edgekd.train.teacher_forward import TeacherForward

log = logging.getLogger(__name__)

VERSION = 2  # 2: the fused colour jitter renders within 1e-4 of version 1, not bit for bit
_PARAMS = 9  # theta (2x3) and three colour factors


@dataclass
class TeacherViews:
    params: np.ndarray  # (rows of the image store, K, 9) float32
    logits: np.ndarray  # (rows of the image store, K, classes) float16, memory-mapped
    seed: int
    fill: dict | None = None  # this process's fill: the forward pass that ran, views, seconds (None: none)

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


def _manifest(key: str, inputs: dict, rows: int, count: int, classes: int) -> dict:
    """What a complete folder of this entry describes itself as (JSON types, so it compares to the file)."""
    arrays = {"params": ([rows, count, _PARAMS], "float32"), "logits": ([rows, count, classes], "float16"),
              "filled": ([rows], "bool")}
    manifest = {"version": VERSION, "key": key, "inputs": inputs, "rows": rows, "count": count,
                "classes": classes, "arrays": {name: {"shape": shape, "dtype": dtype}
                                               for name, (shape, dtype) in arrays.items()}}
    return json.loads(json.dumps(manifest))


class _Damaged(Exception):
    """Why a folder's files cannot be trusted."""


def _read(path: Path, read):
    """read(path), None when the file is absent; anything unreadable raises _Damaged naming the file."""
    if not path.is_file():
        return None
    try:
        value = read(path)
    except (OSError, ValueError, EOFError) as exc:  # json's decode error is a ValueError
        raise _Damaged(f"{path.name} is unreadable ({exc})") from None
    if path.suffix == ".npy" and not isinstance(value, np.ndarray):  # e.g. an .npz under the .npy name
        raise _Damaged(f"{path.name} is not an array")
    return value


def _check(folder: Path, manifest: dict, params: np.ndarray) -> None:
    """Raise _Damaged unless the folder is this entry's, complete or partly filled (or not yet created)."""
    stored = _read(folder / "manifest.json", lambda path: json.loads(path.read_text()))
    if stored is not None and stored != manifest:
        fields = [name for name in manifest if stored.get(name) != manifest[name]] or ["extra fields"]
        raise _Damaged(f"manifest.json describes another entry ({', '.join(fields)} differ)")
    arrays = {"params": _read(folder / "params.npy", np.load),
              "logits": _read(folder / "logits.npy", lambda path: np.load(path, mmap_mode="r")),
              "filled": _read(folder / "filled.npy", np.load)}
    for name, array in arrays.items():
        spec = manifest["arrays"][name]
        if array is not None and (list(array.shape) != spec["shape"] or array.dtype != spec["dtype"]):
            raise _Damaged(f"{name}.npy holds {array.dtype} {list(array.shape)}, not {spec['dtype']} "
                           f"{spec['shape']}")
    if arrays["params"] is not None and not np.array_equal(arrays["params"], params):
        raise _Damaged(f"params.npy is not the views seed {manifest['inputs']['seed']} draws")
    if arrays["logits"] is None and arrays["filled"] is not None and arrays["filled"].any():
        raise _Damaged("filled.npy marks photos done but there is no logits.npy")


def _open_folder(folder: Path, manifest: dict, params: np.ndarray) -> None:
    """Check the entry's folder, rebuild it when it fails, then create whatever it lacks (manifest last)."""
    try:
        _check(folder, manifest, params)
    except _Damaged as damage:
        log.warning("teacher views: rebuilding %s from scratch: %s", folder, damage)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "params.npy").is_file():
        _save_atomic(folder / "params.npy", params)
    if not (folder / "logits.npy").is_file():
        shape = tuple(manifest["arrays"]["logits"]["shape"])
        np.lib.format.open_memmap(folder / "logits.tmp.npy", mode="w+", dtype=np.float16, shape=shape).flush()
        (folder / "logits.tmp.npy").replace(folder / "logits.npy")
    if not (folder / "manifest.json").is_file():  # a folder from before manifests is adopted once it checks out
        atomic_write_json(folder / "manifest.json", manifest)


def _render(split: Split, entry: TeacherViews, chunk: np.ndarray, k: int, config: AugmentConfig,
            size: int) -> torch.Tensor:
    """View k of the photos at rows `chunk`, rendered at the teacher's size."""
    pixels = torch.from_numpy(np.ascontiguousarray(split.images[chunk])).permute(0, 3, 1, 2)
    params = torch.from_numpy(entry.params[chunk, k])
    return render_views(pixels, Views(params[:, :6].reshape(-1, 2, 3), params[:, 6:]), config, size)


def _fill(forward: TeacherForward, split: Split, entry: TeacherViews, config: AugmentConfig, teacher_size: int,
          folder: Path, filled: np.ndarray, batch_size: int) -> None:
    todo = np.sort(split.rows[~filled[split.rows]])
    chunks = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    jobs = [(chunk, k) for chunk in chunks for k in range(entry.count)]

    def render(job: tuple[np.ndarray, int]) -> torch.Tensor:
        with torch.inference_mode():
            return _render(split, entry, job[0], job[1], config, teacher_size)

    # The next views render on a second thread while the teacher runs on these: both release the GIL, so
    # the gaps each leaves in the cores are filled (measured with OpenVINO bf16 on 2 cores: 329 -> 344 views/s).
    with ThreadPoolExecutor(1) as renderer:
        pending = renderer.submit(render, jobs[0]) if jobs else None
        for index, (chunk, k) in enumerate(jobs):
            views = pending.result()
            pending = renderer.submit(render, jobs[index + 1]) if index + 1 < len(jobs) else None
            with torch.inference_mode():
                entry.logits[chunk, k] = forward.run(views).numpy().astype(np.float16)
            if k == entry.count - 1:
                entry.logits.flush()
                filled[chunk] = True  # only after the logits are on disk: a kill re-runs this chunk, no more
                _save_atomic(folder / "filled.npy", filled)
                log.debug("teacher views: %d / %d photos", int(filled[split.rows].sum()), len(split.rows))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def teacher_views(choose_forward: Callable[[torch.Tensor, str | None], TeacherForward], teacher_sha256: str,
                  num_classes: int, split: Split, store_id: str, config: AugmentConfig, render_size: int,
                  teacher_size: int, count: int, seed: int, choice_seed: int, cache_root: Path,
                  batch_size: int = 128) -> TeacherViews:
    """The K stored views of every training photo with the teacher's logits, filled now where missing.

    `seed` draws the views (students of several seeds can share one fill); `choice_seed` picks each
    epoch's view per photo (the student's own seed). `choose_forward(probe, earlier)` gives the teacher's
    forward pass: measured on `probe` (real views at the teacher's size), or the one named `earlier` that
    began this entry's fill, so a resumed fill computes exactly what an uninterrupted one would have."""
    key = entry_key(teacher_sha256, store_id, config, render_size, teacher_size, count, seed)
    folder = cache_root / "teacher-views" / key
    total = len(split.images)
    inputs = {"teacher_sha256": teacher_sha256, "store_id": store_id, "augment": asdict(config),
              "render_size": render_size, "teacher_size": teacher_size, "seed": seed}
    # Drawing is cheap, and comparing against the draw is what proves params.npy is this seed's.
    params = _draw_all(total, count, render_size, config, seed)
    _open_folder(folder, _manifest(key, inputs, total, count, num_classes), params)
    filled = np.load(folder / "filled.npy") if (folder / "filled.npy").is_file() else np.zeros(total, bool)
    entry = TeacherViews(params, np.load(folder / "logits.npy", mmap_mode="r+"), seed)
    missing = int((~filled[split.rows]).sum())
    fill = None
    if missing:
        fill = _fill_missing(choose_forward, split, entry, config, teacher_size, folder, filled, batch_size, missing)
    else:
        log.info("teacher views: %d views of %d photos read from %s", count, len(split.rows), folder)
    return TeacherViews(entry.params, np.load(folder / "logits.npy", mmap_mode="r"), choice_seed, fill)


def _fill_missing(choose_forward, split: Split, entry: TeacherViews, config: AugmentConfig, teacher_size: int,
                  folder: Path, filled: np.ndarray, batch_size: int, missing: int) -> dict:
    started = time.perf_counter()
    path_file = folder / "forward.txt"  # the forward pass this entry's fill began with
    earlier = path_file.read_text().strip() if path_file.is_file() and filled.any() else None
    probe = _render(split, entry, np.sort(split.rows[~filled[split.rows]])[:32], 0, config, teacher_size)
    forward = choose_forward(probe, earlier)
    path_file.write_text(forward.name + "\n")
    done = len(split.rows) - missing
    log.info("teacher views: running the teacher (%s) on %d views of %d photos at %dpx%s (%s)", forward.name,
             entry.count, missing, teacher_size, f" ({done} done before)" if done else "", folder)
    _fill(forward, split, entry, config, teacher_size, folder, filled, batch_size)
    seconds = time.perf_counter() - started
    log.info("teacher views: filled %d views in %.0f s (%.0f views/s, %s)", entry.count * missing, seconds,
             entry.count * missing / seconds, forward.name)
    return {"forward": forward.name, "views": entry.count * missing, "seconds": round(seconds, 2),
            "probe_images_per_s": forward.images_per_s}
