"""A prepared dataset: cached splits, the validation hold-out, class names and the train mean/std.

Semi-supervised data (data.unlabeled, data.label_fraction with hidden_labels: unlabeled) puts unlabeled rows in
the train split: their label is UNLABELED (-1), and only the distillation term learns from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekd.data.cache import CachedSplit, cached_split, default_cache_root
from edgekd.data.rowstore import RowStore
from edgekd.data.sources import SplitSource, dataset_class_names, has_split, limit_per_class, split_source, \
    unlabeled_source
from edgekd.errors import DataError
from edgekd.recipe import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
UNLABELED = -1  # the label of a training row without one: it teaches through the teacher only


@dataclass
class Split:
    """Rows `rows` of a cached image array; several splits can share one cache (train and its hold-out).

    With unlabeled photos, train's `images` is a RowStore over the train cache and the unlabeled cache (rows
    of the latter come after all rows of the former) and `labels` is UNLABELED (-1) for every unlabeled row.
    """

    name: str
    images: np.ndarray | RowStore  # the cache's whole (N, S, S, 3) uint8 array, indexed by cache row
    labels: np.ndarray | None  # int64 per cache row; None: a split without labels (images not in class folders)
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def row_labels(self) -> np.ndarray:
        if self.labels is None:
            raise DataError(f"the {self.name} split has no labels (its images are not in class folders)")
        return self.labels[self.rows]

    @property
    def unlabeled_count(self) -> int:
        """How many of the split's rows are unlabeled (label -1); 0 for a split without labels at all."""
        return 0 if self.labels is None else int(np.count_nonzero(self.labels[self.rows] < 0))

    def labeled_only(self) -> Split:
        """The split without its unlabeled rows (for training without a teacher: they have nothing to teach)."""
        return Split(self.name, self.images, self.labels, self.rows[self.row_labels >= 0])

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """The cache rows at `positions` (indices into this split), sorted so reads go in file order."""
        return np.sort(self.rows[positions])

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Images and labels at `positions` (indices into this split), read in file order."""
        rows = self.rows_at(positions)
        return self.images[rows], (self.labels[rows] if self.labels is not None else None)


@dataclass
class Dataset:
    config: DataConfig
    class_names: list[str]
    splits: dict[str, Split]
    skipped: dict[str, list[dict]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    # The decode-once cache entries behind the splits (train's also holds a held-out val).
    entries: dict[str, CachedSplit] = field(default_factory=dict)
    val_held_out: bool = False
    labels_hidden: int = 0  # training images whose labels data.label_fraction hid (dropped or kept unlabeled)

    @property
    def train_entries(self) -> list[CachedSplit]:
        """The cache entries behind train's rows, in row order: a RowStore over per-entry arrays built in this
        order (e.g. cached teacher logits) is indexed by the same rows as train's images."""
        return [self.entries[name] for name in ("train", "unlabeled") if name in self.entries]

    @property
    def root(self) -> str:
        """Where the images came from (for Fashion-MNIST without data.root, Debian's folder)."""
        if self.config.root:
            return self.config.root
        return str(Path(next(iter(self.origins.values()))).parent) if self.origins else "?"

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def describe(self) -> str:
        kind = "Fashion-MNIST" if self.config.kind == "fashion-mnist" else "image folders"
        sizes = ", ".join(f"{name} {len(split)}" + (f" ({len(split) - split.unlabeled_count} labelled, "
                                                     f"{split.unlabeled_count} taught by the teacher alone)"
                                                     if split.unlabeled_count else "")
                          for name, split in self.splits.items())
        held = f" (val held out of train, {self.config.val_fraction:.0%})" if self.val_held_out else ""
        labels = (f", labels of {self.config.label_fraction:.0%} of train kept ({self.labels_hidden} hidden, "
                  f"{'dropped' if self.config.hidden_labels == 'drop' else 'kept unlabeled'})"
                  if self.labels_hidden else "")
        return (f"{kind} at {self.root}: {len(self.class_names)} classes, {sizes} images{held}{labels}, "
                f"{self.image_size}px")

    def summary(self) -> dict:
        return {"kind": self.config.kind, "root": self.root, "classes": self.class_names,
                "image_size": self.image_size, "sizes": {k: len(v) for k, v in self.splits.items()},
                "val_held_out": self.val_held_out,
                # training rows with a label, and those only the teacher teaches (hidden labels, unlabeled photos)
                "labelled": len(train) - train.unlabeled_count if (train := self.splits.get("train")) else 0,
                "unlabeled": sum(split.unlabeled_count for split in self.splits.values()),
                "unlabeled_folder": self.config.unlabeled, "label_fraction": self.config.label_fraction,
                "labels_hidden": self.labels_hidden,
                "skipped_images": {k: len(v) for k, v in self.skipped.items()},
                "skipped_files": {k: [s["id"] for s in v] for k, v in self.skipped.items() if v}}


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions kept for training and held out for validation: `fraction` of each class, seeded."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = int(round(fraction * len(rows)))
        if len(rows) >= 2:
            count = min(max(count, 1), len(rows) - 1)
        else:
            count = 0
        held.append(rng.permutation(rows)[:count])
    val = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions keeping `fraction` of each class (at least one image: every class needs a label), seeded.

    Each class's positions come from one permutation whose draws do not depend on `fraction`, so for one
    seed a smaller fraction keeps a subset of what a larger one keeps (label-budget curves stay nested).
    """
    rng = np.random.default_rng((seed, 1))  # a stream of its own: not the val hold-out's draws again
    kept = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = min(max(int(round(fraction * len(rows))), 1), len(rows))
        kept.append(rng.permutation(rows)[:count])
    return np.sort(np.concatenate(kept))


def _cache(config: DataConfig, source: SplitSource, workers: int) -> CachedSplit:
    cache_root = Path(config.cache_dir) if config.cache_dir else default_cache_root()
    entry = cached_split(source, config.image_size, cache_root, workers)
    if not entry.ids:
        raise DataError(f"no image in {source.origin} could be decoded",
                        hint=f"see the skipped files in {entry.path / 'index.json'}")
    return entry


def _cache_splits(config: DataConfig, wanted: set[str], class_names: list[str], workers: int,
                  extra: list[SplitSource]) -> tuple[dict[str, CachedSplit], dict[str, str]]:
    cached: dict[str, CachedSplit] = {}
    origins: dict[str, str] = {}
    sources = (split_source(config, name, class_names) for name in SPLITS if name in wanted)
    for source in [*sources, *extra]:
        if source is None:
            continue
        source = limit_per_class(source, config.max_per_class, config.split_seed)
        origins[source.name] = source.origin
        cached[source.name] = _cache(config, source, workers)
    return cached, origins


def open_dataset(config: DataConfig, splits: tuple[str, ...] = ("train", "val"), workers: int = 0) -> Dataset:
    """Decode (or reuse the cache of) the requested splits. A missing `val` is held out of train."""
    class_names = dataset_class_names(config)
    # Without a val folder, val is held out of train: then either one needs the train cache and the hold-out.
    hold_out = not has_split(config, "val") and bool({"train", "val"} & set(splits))
    # Listed (not decoded) first, so a missing or empty unlabeled folder fails before any decoding.
    extra = [unlabeled_source(config.unlabeled)] if config.unlabeled and "train" in splits else []
    wanted = set(splits) | ({"train"} if hold_out else set())
    cached, origins = _cache_splits(config, wanted, class_names, workers, extra)
    dataset = Dataset(config, class_names, {}, {k: v.skipped for k, v in cached.items()}, origins, cached)
    for name, split in cached.items():
        if name in SPLITS:
            dataset.splits[name] = Split(name, split.images, split.labels, np.arange(len(split.ids)))
    if hold_out:
        train = dataset.splits["train"]
        keep, held = stratified_holdout(train.labels, config.val_fraction, config.split_seed)
        dataset.splits["train"] = Split("train", train.images, train.labels, keep)
        dataset.splits["val"] = Split("val", train.images, train.labels, held)
        dataset.val_held_out = True
    missing = [s for s in splits if s not in dataset.splits]
    if missing:
        raise DataError(f"the dataset at {dataset.root} has no {' or '.join(missing)} split",
                        hint="use --split val, or add the folder (e.g. test/<class>/*.jpg)")
    dataset.splits = {name: split for name, split in dataset.splits.items() if name in splits}
    if "train" in dataset.splits:  # after the hold-out: val keeps every label
        dataset.splits["train"] = _semi_supervised_train(dataset)
    _check_labels(dataset)
    return dataset


def _semi_supervised_train(dataset: Dataset) -> Split:
    """Train with data.label_fraction applied (hidden labels dropped, or set to UNLABELED) and the data.unlabeled
    photos appended as UNLABELED rows; the plain train split when neither is set."""
    config, train = dataset.config, dataset.splits["train"]
    labels, rows = train.labels, train.rows
    if config.label_fraction < 1:
        keep = stratified_subset(train.row_labels, config.label_fraction, config.split_seed)
        dataset.labels_hidden = len(rows) - len(keep)
        if config.hidden_labels == "drop":
            rows = rows[keep]
        else:  # a copy: val shares the cache's labels array and keeps its labels
            labels = labels.copy()
            labels[np.setdiff1d(rows, rows[keep])] = UNLABELED
    images = train.images
    photos = dataset.entries.get("unlabeled")
    if photos is not None:
        offset = len(images)
        images = RowStore([images, photos.images])
        labels = np.concatenate([labels, np.full(len(photos.ids), UNLABELED, dtype=labels.dtype)])
        rows = np.concatenate([rows, offset + np.arange(len(photos.ids))])
    split = Split("train", images, labels, rows)
    if split.unlabeled_count or dataset.labels_hidden:
        log.info("train: %d labelled and %d unlabeled images (%d unlabeled photos, %d labels hidden by "
                 "data.label_fraction %g, %s)", len(split) - split.unlabeled_count, split.unlabeled_count,
                 0 if photos is None else len(photos.ids), dataset.labels_hidden, config.label_fraction,
                 "dropped" if config.hidden_labels == "drop" else "kept unlabeled")
    return split


def _check_labels(dataset: Dataset) -> None:
    train = dataset.splits.get("train")
    if train is not None:
        present = set(np.unique(train.row_labels).tolist()) - {UNLABELED}
        absent = [n for i, n in enumerate(dataset.class_names) if i not in present]
        if absent:
            raise DataError(f"no readable training image for class(es) {', '.join(absent)}",
                            hint="every class needs training images")


def channel_stats(split: Split, chunk: int = 512) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a split's pixels, in [0, 1] units (computed in float64, chunked)."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for start in range(0, len(split), chunk):
        pixels, _ = split.take(np.arange(start, min(start + chunk, len(split))))
        x = pixels.reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # a constant channel: leave it unscaled rather than divide by 0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
