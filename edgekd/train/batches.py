"""Batches straight from the decode-once cache: uint8 NCHW tensors, shuffled by a per-epoch seed.

The shuffle order depends only on (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch

from edgekd.data import Split


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).numpy()


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    if drop_last and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)


class Batch(NamedTuple):
    pixels: torch.Tensor  # uint8 (B, 3, S, S), channels-last memory
    labels: torch.Tensor | None  # int64 (B,), None for an unlabeled split
    rows: np.ndarray  # the rows of the cache entry they came from (to look up cached teacher logits)


def iter_batches(split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                 drop_last: bool = False, shard: tuple[int, int] = (0, 1), start: int = 0) -> Iterator[Batch]:
    """Batches of a split, shuffled by (seed, epoch) when asked, from batch number `start` on (a run
    resumed mid-epoch continues there: the order is the same, the batches before are never read).

    With drop_last, a final partial batch is dropped (BatchNorm cannot train on a single sample), unless
    the split is smaller than one batch. With shard=(rank, world), this process gets every world-th
    position of each global batch, so the global batches do not depend on the number of processes.
    """
    rank, world = shard
    n = len(split)
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
    for b in range(start, batch_count(n, batch_size, drop_last)):
        rows = split.rows_at(order[b * batch_size:(b + 1) * batch_size][rank::world])
        x = torch.from_numpy(np.ascontiguousarray(split.images[rows])).permute(0, 3, 1, 2)
        labels = torch.from_numpy(split.labels[rows]) if split.labels is not None else None
        yield Batch(x, labels, rows)
