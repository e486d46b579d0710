"""Teacher views: augmented views drawn once, the teacher run once per view, its logits stored.

With augmentation on, plain distillation runs the teacher on every batch of every epoch. Following Fast
Knowledge Distillation (Shen & Xing, ECCV 2022), `distill.teacher_views: K` draws K views (crop box, flip,
colour factors) of every training photo once, seeded, renders each at the teacher's resolution from the
decoded photo, and stores the teacher's logits (fp16, memory-mapped) with the view parameters. Each epoch
then picks one stored view per photo (seeded by epoch) and the student renders that same view at its own
resolution, so teacher and student still see the same crop while the teacher costs nothing after the fill.

A store is keyed by the teacher checkpoint, the augmentation settings, the render and teacher resolutions,
K and the seed, not by the dataset: inside it every photo has a slot of its own, found by a digest of its
decoded pixels, and its K views are drawn from a generator seeded by (seed, that digest). So a photo's
views and logits do not depend on which other photos are trained beside it: adding photos (a bigger
unlabeled folder, a second one) fills only the new photos' views, and a photo that moved or was renamed
keeps its own. The folder holds keys.npy (the slots' digests), params.npy, logits.npy, filled.npy (which
slots are done) and manifest.json. The fill writes its progress after every chunk, so an interrupted fill
continues where it stopped; new slots are appended arrays first and keys.npy last, so a crash while growing
leaves a store that reads as before; a folder that does not check out (an unreadable file, a wrong shape or
dtype, views the seed does not draw, a manifest of another store) is never read: it is rebuilt from
scratch, with a warning.
"""

from __future__ import annotations

import hashlib
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

VERSION = 3  # 3: one slot per photo, found by its pixels' digest (2: one array per dataset, refilled whole)
_PARAMS = 9  # theta (2x3) and three colour factors
_KEY_BYTES = 16
_CHECKED_SLOTS = 256  # stored slots whose draws are checked against the seed on every open


@dataclass
class TeacherViews:
    params: np.ndarray  # (slots, K, 9) float32
    logits: np.ndarray  # (slots, K, classes) float16, memory-mapped
    slots: np.ndarray  # int64 per row of the image store: its photo's slot (-1: not a training row)
    seed: int
    fill: dict | None = None  # this process's fill: the forward pass that ran, views, seconds (None: none)

    @property
    def count(self) -> int:
        return self.params.shape[1]

    def choose(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        """The stored view each row trains on in this epoch (a seeded draw per epoch)."""
        picks = np.random.default_rng([self.seed, epoch]).integers(0, self.count, size=len(self.slots))
        return picks[rows]

    def views(self, rows: np.ndarray, epoch: int) -> tuple[Views, torch.Tensor]:
        """The views of `rows` for this epoch and the teacher's fp32 logits for them."""
        picks, slots = self.choose(rows, epoch), self.slots[rows]
        params = torch.from_numpy(self.params[slots, picks])
        logits = torch.from_numpy(self.logits[slots, picks].astype(np.float32))
        return Views(params[:, :6].reshape(-1, 2, 3), params[:, 6:]), logits

    def all_logits(self, rows: np.ndarray) -> np.ndarray:
        """(rows, K, classes) fp32: every stored view's logits for these rows."""
        return np.asarray(self.logits[self.slots[rows]], dtype=np.float32)


def photo_keys(images, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(rows, 16) uint8: a digest of each row's decoded pixels (what the teacher's views are cut from)."""
    keys = np.empty((len(rows), _KEY_BYTES), np.uint8)
    for start in range(0, len(rows), chunk):
        pixels = np.ascontiguousarray(images[rows[start:start + chunk]])
        for i, photo in enumerate(pixels, start):
            keys[i] = np.frombuffer(hashlib.blake2b(photo.tobytes(), digest_size=_KEY_BYTES).digest(), np.uint8)
    return keys


def draw_photo_views(keys: np.ndarray, count: int, size: int, config: AugmentConfig, seed: int) -> np.ndarray:
    """(photos, K, 9) float32: each photo's K views, drawn from a generator of its own (seed, pixel digest)."""
    params = np.empty((len(keys), count, _PARAMS), np.float32)
    for i, key in enumerate(keys):
        generator = torch.Generator().manual_seed(
            int.from_bytes(hashlib.blake2b(key.tobytes(), digest_size=8, key=seed.to_bytes(8, "little")).digest(),
                           "little") >> 1)
        views = draw_views(count, size, config, generator)
        params[i] = torch.cat([views.theta.reshape(-1, 6), views.color], dim=1).numpy()
    return params


def store_key(teacher_sha256: str, config: AugmentConfig, render_size: int, teacher_size: int, count: int,
              seed: int, scope: str = "") -> str:
    return digest(VERSION, teacher_sha256, asdict(config), render_size, teacher_size, count, seed, scope)[:16]


def _manifest(key: str, inputs: dict, count: int, classes: int) -> dict:
    """What the folder describes itself as (JSON types, so it compares to the file)."""
    return json.loads(json.dumps({"version": VERSION, "key": key, "inputs": inputs, "count": count,
                                  "classes": classes}))


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


def _arrays(folder: Path) -> dict:
    return {"keys": _read(folder / "keys.npy", np.load), "params": _read(folder / "params.npy", np.load),
            "logits": _read(folder / "logits.npy", lambda path: np.load(path, mmap_mode="r")),
            "filled": _read(folder / "filled.npy", np.load)}


def _check(folder: Path, manifest: dict, render_size: int, config: AugmentConfig) -> int:
    """The number of slots in use; raises _Damaged unless the folder is this store's (or not created yet)."""
    stored = _read(folder / "manifest.json", lambda path: json.loads(path.read_text()))
    if stored is not None and stored != manifest:
        fields = [name for name in manifest if stored.get(name) != manifest[name]] or ["extra fields"]
        raise _Damaged(f"manifest.json describes another store ({', '.join(fields)} differ)")
    arrays = _arrays(folder)
    keys = arrays["keys"]
    slots = 0 if keys is None else len(keys)
    count, classes = manifest["count"], manifest["classes"]
    specs = {"keys": ((_KEY_BYTES,), np.uint8), "params": ((count, _PARAMS), np.float32),
             "logits": ((count, classes), np.float16), "filled": ((), np.bool_)}
    for name, (trailing, dtype) in specs.items():
        array = arrays[name]
        if array is None:
            if slots:
                raise _Damaged(f"{name}.npy is missing beside {slots} stored photos")
            continue
        # longer than keys.npy: a growth that stopped before writing keys.npy (the extra slots are unused)
        if array.shape[1:] != trailing or array.dtype != dtype or len(array) < slots:
            raise _Damaged(f"{name}.npy holds {array.dtype} {list(array.shape)}, not {np.dtype(dtype)} "
                           f"[{slots} or more, {', '.join(map(str, trailing))}]".replace(", ]", "]"))
    if slots:
        checked = np.unique(np.linspace(0, slots - 1, min(slots, _CHECKED_SLOTS)).astype(int))
        expected = draw_photo_views(keys[checked], count, render_size, config, manifest["inputs"]["seed"])
        if not np.array_equal(arrays["params"][checked], expected):
            raise _Damaged(f"params.npy is not the views seed {manifest['inputs']['seed']} draws")
    return slots


def _open_folder(folder: Path, manifest: dict, render_size: int, config: AugmentConfig) -> int:
    """Check the store's folder (rebuilt when it fails); its slots in use."""
    try:
        slots = _check(folder, manifest, render_size, config)
    except _Damaged as damage:
        log.warning("teacher views: rebuilding %s from scratch: %s", folder, damage)
        shutil.rmtree(folder)
        slots = 0
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "manifest.json").is_file():
        atomic_write_json(folder / "manifest.json", manifest)
    return slots


def _grow(folder: Path, slots: int, new_keys: np.ndarray, new_params: np.ndarray, classes: int) -> None:
    """Append slots for new photos: every array first, keys.npy last (what makes the slots exist)."""
    total = slots + len(new_keys)
    count = new_params.shape[1]
    grown = np.lib.format.open_memmap(folder / "logits.tmp.npy", mode="w+", dtype=np.float16,
                                      shape=(total, count, classes))
    if slots:
        grown[:slots] = np.load(folder / "logits.npy", mmap_mode="r")[:slots]
    grown.flush()
    del grown
    (folder / "logits.tmp.npy").replace(folder / "logits.npy")
    old = _arrays(folder) if slots else {"params": np.empty((0, count, _PARAMS), np.float32),
                                          "filled": np.empty(0, bool), "keys": np.empty((0, _KEY_BYTES), np.uint8)}
    _save_atomic(folder / "params.npy", np.concatenate([old["params"][:slots], new_params]))
    _save_atomic(folder / "filled.npy", np.concatenate([old["filled"][:slots], np.zeros(len(new_keys), bool)]))
    _save_atomic(folder / "keys.npy", np.concatenate([old["keys"][:slots], new_keys]))


def _slots_of(folder: Path, slots: int, split: Split, manifest: dict, render_size: int,
              config: AugmentConfig) -> np.ndarray:
    """Each store row's slot (-1 outside the split), appending slots for photos the store has not seen."""
    keys = photo_keys(split.images, split.rows)
    stored = np.load(folder / "keys.npy") if slots else np.empty((0, _KEY_BYTES), np.uint8)
    index = {key.tobytes(): slot for slot, key in enumerate(stored)}
    new: dict[bytes, int] = {}
    for key in keys:
        key_bytes = key.tobytes()
        if key_bytes not in index and key_bytes not in new:
            new[key_bytes] = slots + len(new)
    if new:
        new_keys = np.frombuffer(b"".join(new), np.uint8).reshape(-1, _KEY_BYTES)
        log.info("teacher views: %d photos new to %s (%d stored)", len(new), folder, slots)
        _grow(folder, slots, new_keys, draw_photo_views(new_keys, manifest["count"], render_size, config,
                                                         manifest["inputs"]["seed"]), manifest["classes"])
        index.update(new)
    row_slots = np.full(len(split.images), -1, np.int64)
    row_slots[split.rows] = [index[key.tobytes()] for key in keys]
    return row_slots


def _render(split: Split, params: np.ndarray, rows: np.ndarray, slots: np.ndarray, k: int,
            config: AugmentConfig, size: int) -> torch.Tensor:
    """View k of the photos at store rows `rows` (their slots `slots`), rendered at the teacher's size."""
    pixels = torch.from_numpy(np.ascontiguousarray(split.images[rows])).permute(0, 3, 1, 2)
    view = torch.from_numpy(params[slots, k])
    return render_views(pixels, Views(view[:, :6].reshape(-1, 2, 3), view[:, 6:]), config, size)


def _todo(entry: TeacherViews, rows: np.ndarray, filled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The store rows still to fill (one per unfilled slot, in file order) and their slots."""
    slots = entry.slots[rows]
    open_slots, first = np.unique(slots[~filled[slots]], return_index=True)
    todo_rows = rows[~filled[slots]][first]
    order = np.argsort(todo_rows)
    return todo_rows[order], open_slots[order]


def _fill(forward: TeacherForward, split: Split, entry: TeacherViews, config: AugmentConfig, teacher_size: int,
          folder: Path, filled: np.ndarray, batch_size: int) -> None:
    rows, slots = _todo(entry, split.rows, filled)
    chunks = [(rows[start:start + batch_size], slots[start:start + batch_size])
              for start in range(0, len(rows), batch_size)]
    jobs = [(chunk, k) for chunk in chunks for k in range(entry.count)]

    def render(job) -> torch.Tensor:
        (chunk_rows, chunk_slots), k = job
        with torch.inference_mode():
            return _render(split, entry.params, chunk_rows, chunk_slots, k, config, teacher_size)

    # The next views render on a second thread while the teacher runs on these: both release the GIL, so
    # the gaps each leaves in the cores are filled (measured with OpenVINO bf16 on 2 cores: 329 -> 344 views/s).
    with ThreadPoolExecutor(1) as renderer:
        pending = renderer.submit(render, jobs[0]) if jobs else None
        for index, ((_, chunk_slots), k) in enumerate(jobs):
            views = pending.result()
            pending = renderer.submit(render, jobs[index + 1]) if index + 1 < len(jobs) else None
            with torch.inference_mode():
                entry.logits[chunk_slots, k] = forward.run(views).numpy().astype(np.float16)
            if k == entry.count - 1:
                entry.logits.flush()
                filled[chunk_slots] = True  # only after the logits are on disk: a kill re-runs this chunk, no more
                _save_atomic(folder / "filled.npy", filled)
                log.debug("teacher views: %d photos left", int((~filled[entry.slots[split.rows]]).sum()))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def teacher_views(choose_forward: Callable[[torch.Tensor, str | None, int], TeacherForward], teacher_sha256: str,
                  num_classes: int, split: Split, config: AugmentConfig, render_size: int, teacher_size: int,
                  count: int, seed: int, choice_seed: int, cache_root: Path, batch_size: int = 128,
                  scope: str = "") -> TeacherViews:
    """The K stored views of every training photo with the teacher's logits, filled now where missing.

    `seed` draws the views (students of several seeds can share one fill); `choice_seed` picks each
    epoch's view per photo (the student's own seed). `choose_forward(probe, earlier)` gives the teacher's
    forward pass: measured on `probe` (real views at the teacher's size) for `views` views to fill, or the one
    named `earlier` that began this store's fill, so a resumed fill computes exactly what an uninterrupted one
    would have.
    `scope` keeps stores apart that would otherwise be one (doctor's rows, one per forward pass)."""
    key = store_key(teacher_sha256, config, render_size, teacher_size, count, seed, scope)
    folder = cache_root / "teacher-views" / key
    inputs = {"teacher_sha256": teacher_sha256, "augment": asdict(config), "render_size": render_size,
              "teacher_size": teacher_size, "seed": seed, "scope": scope}
    manifest = _manifest(key, inputs, count, num_classes)
    slots = _open_folder(folder, manifest, render_size, config)
    row_slots = _slots_of(folder, slots, split, manifest, render_size, config)
    filled = np.load(folder / "filled.npy")
    entry = TeacherViews(np.load(folder / "params.npy"), np.load(folder / "logits.npy", mmap_mode="r+"), row_slots,
                         seed)
    missing = int(len(np.unique(row_slots[split.rows][~filled[row_slots[split.rows]]])))
    fill = None
    if missing:
        fill = _fill_missing(choose_forward, split, entry, config, teacher_size, folder, filled, batch_size, missing)
    else:
        log.info("teacher views: %d views of %d photos read from %s", count, len(split.rows), folder)
    return TeacherViews(entry.params, np.load(folder / "logits.npy", mmap_mode="r"), row_slots, choice_seed, fill)


def _fill_missing(choose_forward, split: Split, entry: TeacherViews, config: AugmentConfig, teacher_size: int,
                  folder: Path, filled: np.ndarray, batch_size: int, missing: int) -> dict:
    started = time.perf_counter()
    path_file = folder / "forward.txt"  # the forward pass this store's fill began with
    earlier = path_file.read_text().strip() if path_file.is_file() and filled.any() else None
    rows, slots = _todo(entry, split.rows, filled)
    probe = _render(split, entry.params, rows[:32], slots[:32], 0, config, teacher_size)
    forward = choose_forward(probe, earlier, entry.count * missing)
    if earlier is None:
        path_file.write_text(forward.name + "\n")
    done = len(np.unique(entry.slots[split.rows])) - missing
    log.info("teacher views: running the teacher (%s) on %d views of %d photos at %dpx%s (%s)", forward.name,
             entry.count, missing, teacher_size, f" ({done} done before)" if done else "", folder)
    _fill(forward, split, entry, config, teacher_size, folder, filled, batch_size)
    seconds = time.perf_counter() - started
    log.info("teacher views: filled %d views in %.0f s (%.0f views/s, %s)", entry.count * missing, seconds,
             entry.count * missing / seconds, forward.name)
    return {"forward": forward.name, "views": entry.count * missing, "seconds": round(seconds, 2),
            "probe_images_per_s": forward.images_per_s}
