"""Datasets: sources on disk → decode-once cache → splits with a held-out validation set."""

from edgekd.data.dataset import UNLABELED, Dataset, Split, channel_stats, open_dataset, stratified_holdout, \
    stratified_subset
from edgekd.data.rowstore import RowStore
from edgekd.data.sources import dataset_class_names

__all__ = ["UNLABELED", "Dataset", "RowStore", "Split", "channel_stats", "dataset_class_names", "open_dataset",
           "stratified_holdout", "stratified_subset"]
