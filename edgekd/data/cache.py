"""Decode once: every image is decoded and resized a single time into a memory-mapped uint8 array.

A cache entry is a folder `<cache root>/<split>-<size>px-<key>/` holding `images.npy` (N, S, S, 3),
`labels.npy` (N,) and `index.json` (the kept ids and the skipped files with reasons). The key hashes the
listed inputs (paths, sizes, mtimes, labels), the image size and the resize method, so a changed dataset
gets a new entry and an unchanged one is never decoded again. Entries are built in a temporary folder
and renamed into place, so a crash never leaves a half-written cache behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgekd.data.sources import SplitSource, digest
from edgekd.errors import DataError
from edgekd.runtime.preprocess import RESIZE_METHOD, ImageDecodeError, load_rgb, resize_rgb

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class CachedSplit:
    name: str
    images: np.ndarray  # (N, S, S, 3) uint8, memory-mapped read-only
    labels: np.ndarray | None
    ids: list[str]
    skipped: list[dict]  # [{"id": ..., "reason": ...}] files that could not be decoded
    path: Path


def default_cache_root() -> Path:
    return Path(os.environ.get("EDGEKD_CACHE") or Path.home() / ".cache" / "edgekd")


def cache_key(source: SplitSource, image_size: int) -> str:
    return digest(CACHE_VERSION, RESIZE_METHOD, image_size, source.fingerprint)[:16]


def cached_split(source: SplitSource, image_size: int, cache_root: Path, workers: int = 0) -> CachedSplit:
    """The decoded split, from the cache when present, otherwise decoded now and cached."""
    folder = cache_root / f"{source.name}-{image_size}px-{cache_key(source, image_size)}"
    if os.path.lexists(folder / "index.json"):
        try:
            return _open(folder, source.name, image_size)
        except DamagedCache as damage:  # never read: set aside and decoded again
            log.warning("decode cache %s is damaged (%s): decoding it again", folder, damage)
            discard(folder)
    try:
        _build(source, image_size, folder, workers)
    except OSError as exc:
        raise DataError(f"cannot write the decode cache under {folder.parent}: {exc.strerror or exc}",
                        hint="set data.cache_dir (or EDGEKD_CACHE) to a folder with room that you can write") from None
    return _open(folder, source.name, image_size)


class DamagedCache(Exception):
    """Why a cache entry's files cannot be trusted."""


def discard(path: Path) -> None:
    """Move a damaged cache file or folder out of the way (renamed first: a reader holding it open keeps its
    copy), then delete it."""
    aside = path.with_name(f".{path.name}.damaged-{os.getpid()}")
    try:
        os.replace(path, aside)
    except OSError:
        aside = path
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _open(folder: Path, name: str, image_size: int) -> CachedSplit:
    """The entry's arrays, each checked against index.json; DamagedCache when any does not fit."""
    index = _read_index(folder / "index.json", image_size)
    rows = len(index["ids"])
    for file in ("images.npy", *(["labels.npy"] if index["labeled"] else [])):
        if not (folder / file).is_file():  # missing, or a FIFO or folder under the name: never opened
            raise DamagedCache(f"{file} is not a file")
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy") if index["labeled"] else None
    except Exception as exc:  # noqa: BLE001 (truncated: ValueError; a zip under the name: BadZipFile; ...)
        raise DamagedCache(f"{exc.__class__.__name__}: {exc}") from None
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape != (rows, image_size,
                                                                                          image_size, 3):
        raise DamagedCache(f"images.npy is not {rows} uint8 images of {image_size}px")
    if labels is not None and (not isinstance(labels, np.ndarray) or labels.shape != (rows,)
                               or labels.dtype.kind not in "iu"):
        raise DamagedCache(f"labels.npy is not {rows} integer labels")
    skipped = index["skipped"]
    if skipped:
        log.warning("%s: %d unreadable image(s) were skipped when the cache was built (listed in %s)",
                    name, len(skipped), folder / "index.json")
    return CachedSplit(name, images, labels, index["ids"], skipped, folder)


def _read_index(path: Path, image_size: int) -> dict:
    if not path.is_file():
        raise DamagedCache("index.json is not a file")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DamagedCache(f"index.json is unreadable ({exc.__class__.__name__})") from None
    if not isinstance(index, dict):
        raise DamagedCache("index.json is not a mapping")
    shape = {"ids": list, "skipped": list, "labeled": bool, "image_size": int}
    for key, kind in shape.items():
        if not isinstance(index.get(key), kind):
            raise DamagedCache(f"index.json's {key} is {index.get(key)!r}")
    if index["image_size"] != image_size or not all(isinstance(i, str) for i in index["ids"]):
        raise DamagedCache("index.json describes another entry")
    return index


def _decode_file(path: Path, size: int) -> np.ndarray | str:
    try:
        return load_rgb(path, size)
    except ImageDecodeError as exc:
        return str(exc)


def _decoded(source: SplitSource, size: int, workers: int):
    """Yield each image as a (size, size, 3) array, or the reason it could not be decoded."""
    if source.pixels is not None:
        for pixels in source.pixels:
            yield resize_rgb(Image.fromarray(pixels), size)
    elif workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            yield from pool.map(_decode_file, source.paths, [size] * len(source), chunksize=64)
    else:
        for path in source.paths:
            yield _decode_file(path, size)


def _check_room(folder: Path, rows: int, size: int) -> None:
    """Refuse, before decoding, a cache the disk cannot hold (a memory map would die with SIGBUS midway)."""
    needed = rows * size * size * 3
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"the decode cache of {rows:,} images at {size}px needs {needed / 1e9:.1f} GB; "
                        f"{folder} has {free / 1e9:.1f} GB free",
                        hint="set data.cache_dir (or EDGEKD_CACHE) to a disk with room, or lower data.image_size")


def _build(source: SplitSource, size: int, folder: Path, workers: int) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    _check_room(folder.parent, len(source), size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        log.info("decoding %d %s images from %s at %dpx into %s (once; later runs reuse it)",
                 len(source), source.name, source.origin, size, folder)
        ids = source.ids()
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(source), size, size, 3))
        kept: list[int] = []
        skipped: list[dict] = []
        for i, result in enumerate(_decoded(source, size, workers)):
            if isinstance(result, str):
                log.warning("skipped %s: %s", ids[i], result)
                skipped.append({"id": ids[i], "reason": result})
                continue
            images[len(kept)] = result
            kept.append(i)
        images.flush()
        del images
        if skipped:
            _shrink(tmp / "images.npy", len(kept))
        if source.labels is not None:
            np.save(tmp / "labels.npy", source.labels[kept])
        index = {"version": CACHE_VERSION, "split": source.name, "image_size": size, "resize": RESIZE_METHOD,
                 "origin": source.origin, "labeled": source.labels is not None,
                 "ids": [ids[i] for i in kept], "skipped": skipped}
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            tmp.rename(folder)
        except OSError:  # another process built the same entry first; theirs is as good as ours
            if not (folder / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _shrink(path: Path, rows: int) -> None:
    """Rewrite an .npy file keeping its first `rows` rows (used when images were skipped)."""
    full = np.load(path, mmap_mode="r")
    trimmed_path = path.with_suffix(".trim.npy")
    trimmed = np.lib.format.open_memmap(trimmed_path, mode="w+", dtype=full.dtype, shape=(rows, *full.shape[1:]))
    trimmed[:] = full[:rows]
    trimmed.flush()
    del trimmed, full
    os.replace(trimmed_path, path)
