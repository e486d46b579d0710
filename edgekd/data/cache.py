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
    if not (folder / "index.json").is_file():
        _build(source, image_size, folder, workers)
    return _open(folder, source.name)


def _open(folder: Path, name: str) -> CachedSplit:
    index = json.loads((folder / "index.json").read_text())
    labels = np.load(folder / "labels.npy") if index["labeled"] else None
    skipped = index["skipped"]
    if skipped:
        log.warning("%s: %d unreadable image(s) were skipped when the cache was built (listed in %s)",
                    name, len(skipped), folder / "index.json")
    return CachedSplit(name, np.load(folder / "images.npy", mmap_mode="r"), labels, index["ids"], skipped, folder)


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


def _build(source: SplitSource, size: int, folder: Path, workers: int) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
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
