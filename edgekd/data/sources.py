"""Where images come from: ImageFolder trees (plain; split folders named in any case; Kaggle's Intel;
Nguyen's unlabeled test folder), photos found in subfolders of a class too, and Fashion-MNIST IDX files.

A source lists a split's images and labels without decoding them; `cache.py` decodes each once.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekd.errors import DataError
from edgekd.recipe import DataConfig
from edgekd.runtime.preprocess import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

# Split folder names, matched in any case (Train/, VALIDATION/ ...).
SPLIT_DIR_NAMES = {
    "train": ("train", "seg_train", "training"),
    "val": ("val", "valid", "validation", "seg_val"),
    "test": ("test", "seg_test", "testing"),
}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
INTEL_HINT = ("for Intel Image Classification, download it from "
              "https://www.kaggle.com/datasets/puneet6060/intel-image-classification, unzip it and point "
              "data.root at the folder holding seg_train/ and seg_test/ (--set data.root=PATH)")


@dataclass
class SplitSource:
    """One split, listed but not decoded. Exactly one of `paths` (files) or `pixels` (arrays) is set."""

    name: str
    labels: np.ndarray | None  # None: an unlabeled split (images straight in the folder)
    paths: list[Path] | None = None
    pixels: np.ndarray | None = None  # (N, H, W, 3) uint8 at native size
    origin: str = ""  # the folder or files it came from, for messages
    fingerprint: str = field(default="", repr=False)  # changes whenever the listed inputs change

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.pixels)

    def ids(self) -> list[str]:
        return [str(p) for p in self.paths] if self.paths is not None else [f"#{i}" for i in range(len(self))]


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


# ----- ImageFolder trees -------------------------------------------------------------------------------

def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _unnest(folder: Path) -> Path:
    """Kaggle zips nest a folder in itself (seg_train/seg_train); step into such a single twin."""
    while True:
        children = [c for c in folder.iterdir() if not c.name.startswith(".")]
        if len(children) == 1 and children[0].is_dir() and children[0].name == folder.name:
            folder = children[0]
        else:
            return folder


def _find_split_dir(root: Path, split: str, explicit: str | None) -> Path | None:
    if explicit:
        folder = Path(explicit) if Path(explicit).is_absolute() else root / explicit
        if not folder.is_dir():
            raise DataError(f"data.{split}_dir: {folder} is not a folder",
                            hint=f"{root} holds {describe_folder(root)}")
        return _unnest(folder)
    by_name = {_split_key(c.name): c for c in reversed(_subfolders(root))}  # Train/ before train/ if both
    for name in SPLIT_DIR_NAMES[split]:
        if name in by_name:
            return _unnest(by_name[name])
    return None


def _split_key(folder_name: str) -> str:
    """A folder's name as a split name: any case, and Kaggle's `training_set`/`test set` spelt as `training`."""
    name = folder_name.lower()
    return re.sub(r"[ _-]?set$", "", name) if name not in ("set", "_set") else name


def _subfolders(folder: Path) -> list[Path]:
    return sorted(c for c in folder.iterdir() if c.is_dir() and not c.name.startswith("."))


def _class_dirs(folder: Path) -> list[Path]:
    return _subfolders(folder)


def images_under(folder: Path) -> list[Path]:
    """Every image file under `folder`, in subfolders too, sorted; hidden files and folders are skipped.
    Symlinked folders are followed, as torchvision's ImageFolder does (each real folder once)."""
    found: list[Path] = []
    seen: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a symlink loop, or the same folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / f for f in files if _is_image(Path(top) / f)]
    return sorted(found)


def _direct_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def describe_folder(root: Path, limit: int = 12) -> str:
    """What a folder holds, for messages: its subfolders with their image counts (subfolders included)."""
    subs = _subfolders(root)
    parts = [f"{c.name}/ ({len(images_under(c))} images)" for c in subs[:limit]]
    if len(subs) > limit:
        parts.append(f"... {len(subs) - limit} more folders")
    loose = len(_direct_images(root))
    if loose:
        parts.append(f"{loose} images directly in it")
    return ", ".join(parts) if parts else "nothing (no folders, no images)"


LAYOUT_KEYS_HINT = ("name the split folders in the recipe, relative to data.root: data.train_dir: <the folder "
                    "of class folders> (and data.val_dir, data.test_dir); data.train_dir: . reads data.root "
                    "itself as <class>/<images>")


SPLIT_WORDS = ("train", "val", "test", "hold", "fit", "eval", "dev", "split")


def _looks_like_unnamed_splits(root: Path) -> bool:
    """Top folders named like splits that each hold the same class folders (Fit/ and Holdout/ both with cat/
    and dog/) are splits under names edgekd does not know, not classes: read as classes, they would train a
    model to tell the splits apart. (cat/2023/ and dog/2023/ are classes: their names are not split words.)"""
    tops = _subfolders(root)
    if len(tops) < 2 or not any(word in top.name.lower() for top in tops for word in SPLIT_WORDS):
        return False
    names = [frozenset(c.name for c in _subfolders(top)) for top in tops]
    return len(names[0]) >= 2 and all(n == names[0] for n in names) and \
        all(images_under(c) for c in _subfolders(tops[0]))


def find_split_dirs(config: DataConfig) -> dict[str, Path | None]:
    """Locate train/val/test folders under data.root, or fail saying what layout was expected."""
    if not config.root:
        raise DataError("data.root is not set", hint=f"point it at an ImageFolder dataset; {INTEL_HINT}")
    root = Path(config.root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist", hint=INTEL_HINT)
    dirs = {split: _find_split_dir(root, split, getattr(config, f"{split}_dir")) for split in SPLIT_DIR_NAMES}
    if dirs["train"] is None:
        if _class_dirs(root) and not any(d for d in dirs.values()) and not _looks_like_unnamed_splits(root):
            dirs["train"] = root  # a plain ImageFolder: class folders straight under root
        else:
            known = "; ".join(f"{k}: {', '.join(v)}" for k, v in SPLIT_DIR_NAMES.items())
            raise DataError(
                f"no training folder in {root}; it holds {describe_folder(root)}. Expected "
                f"{root}/train/<class>/<images> (optional val/ and test/; split folders are named, in any "
                f"case, {known}), or {root}/<class>/<images>", hint=LAYOUT_KEYS_HINT)
    return dirs


def folder_class_names(train_dir: Path) -> list[str]:
    classes = [c.name for c in _class_dirs(train_dir)]
    if not classes:
        raise DataError(f"{train_dir} holds no class folders ({describe_folder(train_dir)}): expected "
                        f"{train_dir}/<class>/<image files>",
                        hint=f"put the photos of each class in a folder named after it (photos without classes "
                             f"go in data.unlabeled), or {LAYOUT_KEYS_HINT}")
    return classes


def _list_labeled(folder: Path, class_names: list[str], split: str) -> tuple[list[Path], np.ndarray]:
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [c.name for c in _class_dirs(folder) if c.name not in index]
    if unknown:
        raise DataError(f"{folder}: class folder(s) {', '.join(unknown)} are not training classes "
                        f"({', '.join(class_names)})")
    paths: list[Path] = []
    labels: list[int] = []
    for name in class_names:
        class_dir = folder / name
        files = images_under(class_dir) if class_dir.is_dir() else []
        if not files and split == "train":
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"class folder {class_dir} holds no images, subfolders included ({folder} holds "
                            f"{describe_folder(folder)})",
                            hint=f"add images or remove the folder (image files end in {suffixes}); if these "
                                 f"folders are not classes, {LAYOUT_KEYS_HINT}")
        paths += files
        labels += [index[name]] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _files_fingerprint(paths: list[Path], labels: np.ndarray | None) -> str:
    stats = []
    for p in paths:
        st = p.stat()
        stats.append((str(p), st.st_size, st.st_mtime_ns))
    return digest(stats, None if labels is None else labels.tolist())


def folder_split(folder: Path, split: str, class_names: list[str]) -> SplitSource:
    if _class_dirs(folder):
        paths, labels = _list_labeled(folder, class_names, split)
    else:  # a test folder of images without class folders (Nguyen's layout): unlabeled
        paths, labels = _direct_images(folder), None
    if not paths:
        raise DataError(f"{folder} holds no images", hint=f"expected {folder}/<class>/*.jpg")
    return SplitSource(split, labels, paths=paths, origin=str(folder),
                       fingerprint=_files_fingerprint(paths, labels))


def unlabeled_source(folder: str | Path) -> SplitSource:
    """data.unlabeled: every image file under `folder`, searched recursively (hidden files and folders are
    skipped, as in class folders), without labels. Its cache entry and skipped files go by "unlabeled"."""
    folder = Path(folder)
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    if not folder.is_dir():
        raise DataError(f"data.unlabeled: {folder} is not a folder",
                        hint="point data.unlabeled at a folder of photos (searched recursively), or remove it")
    paths = images_under(folder)
    if not paths:
        raise DataError(f"data.unlabeled: {folder} holds no image files", hint=f"image files end in {suffixes}")
    return SplitSource("unlabeled", None, paths=paths, origin=str(folder),
                       fingerprint=_files_fingerprint(paths, None))


# ----- Fashion-MNIST ------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: holds {len(raw) - offset} bytes of data, its header promises {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def fashion_mnist_split(root: Path, split: str) -> SplitSource:
    image_file, label_file = (root / name for name in FASHION_MNIST_FILES[split])
    for f in (image_file, label_file):
        if not f.is_file():
            raise DataError(
                f"Fashion-MNIST file {f} is missing",
                hint="install Debian's package: sudo apt-get install dataset-fashion-mnist (it puts the four "
                     f"IDX files in {FASHION_MNIST_DIR}), or point data.root at a folder holding them")
    gray = read_idx(image_file)
    labels = read_idx(label_file).astype(np.int64)
    if gray.ndim != 3 or len(gray) != len(labels):
        raise DataError(f"{image_file}: {gray.shape[0]} images but {len(labels)} labels")
    pixels = np.repeat(gray[..., None], 3, axis=3)  # grayscale → 3 equal channels
    fingerprint = digest([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in (image_file, label_file)])
    return SplitSource(split, labels, pixels=pixels, origin=str(image_file), fingerprint=fingerprint)


# ----- one entry point ----------------------------------------------------------------------------------

def dataset_class_names(config: DataConfig) -> list[str]:
    """Class names in label order, without decoding any image."""
    if config.kind == "fashion-mnist":
        found = FASHION_MNIST_CLASSES
    else:
        found = folder_class_names(find_split_dirs(config)["train"])
    if config.classes is not None and sorted(config.classes) != sorted(found):
        missing = sorted(set(config.classes) - set(found))
        extra = sorted(set(found) - set(config.classes))
        raise DataError(f"data.classes does not match the dataset: missing {missing or 'none'}, "
                        f"not listed {extra or 'none'}", hint="fix data.classes or data.root")
    return list(config.classes) if config.classes is not None else list(found)


def has_split(config: DataConfig, split: str) -> bool:
    """Whether the dataset has its own folder (or files) for `split`, without listing any image."""
    if config.kind == "fashion-mnist":
        return split in FASHION_MNIST_FILES
    return find_split_dirs(config)[split] is not None


def split_source(config: DataConfig, split: str, class_names: list[str]) -> SplitSource | None:
    """The split's images as listed on disk, or None when the dataset has no such split."""
    if config.kind == "fashion-mnist":
        root = Path(config.root or FASHION_MNIST_DIR)
        return fashion_mnist_split(root, split) if split in FASHION_MNIST_FILES else None
    folder = find_split_dirs(config)[split]
    return folder_split(folder, split, class_names) if folder is not None else None


def limit_per_class(source: SplitSource, limit: int | None, seed: int) -> SplitSource:
    """A seeded subset of at most `limit` images per class, in the source's order."""
    if limit is None or source.labels is None:
        return source
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(source.labels):
        rows = np.flatnonzero(source.labels == label)
        keep.append(np.sort(rng.permutation(rows)[:limit]) if len(rows) > limit else rows)
    rows = np.sort(np.concatenate(keep))
    if len(rows) == len(source):
        return source
    return SplitSource(
        source.name, source.labels[rows],
        paths=[source.paths[i] for i in rows] if source.paths is not None else None,
        pixels=source.pixels[rows] if source.pixels is not None else None,
        origin=source.origin, fingerprint=digest(source.fingerprint, "subset", rows.tolist()))
