"""Datasets: sources on disk → decode-once cache → splits with a held-out validation set."""

from edgekd.data.dataset import Dataset, Split, channel_stats, open_dataset, stratified_holdout
from edgekd.data.sources import dataset_class_names

__all__ = ["Dataset", "Split", "channel_stats", "dataset_class_names", "open_dataset", "stratified_holdout"]
