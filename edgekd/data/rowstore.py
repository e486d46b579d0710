"""Several arrays addressed as one, without copying: the train split's images when unlabeled photos live in a
cache entry of their own (and, built the same way, any per-row data such as cached teacher logits)."""

from __future__ import annotations

import numpy as np


class RowStore:
    """Rows of `parts` (same trailing shape and dtype) as one array: part i's row r is global row offsets[i] + r.

    Indexing reads only the rows asked for, part by part (each part's rows in the order given, so sorted
    rows read memory-mapped files in file order), and returns a plain ndarray in the order asked for.
    """

    def __init__(self, parts: list[np.ndarray]):
        if not parts:
            raise ValueError("a RowStore needs at least one array")
        trailing = {(p.shape[1:], np.dtype(p.dtype)) for p in parts}
        if len(trailing) != 1:
            raise ValueError(f"RowStore parts differ in row shape or dtype: {sorted(map(str, trailing))}")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])  # part i holds global rows offsets[i]:offsets[i+1]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.parts[0].dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return self._rows(np.arange(len(self))[index])
        rows = np.asarray(index)
        if rows.ndim == 0:
            return self._rows(rows.reshape(1))[0]
        return self._rows(rows)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        if rows.dtype == bool or not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"RowStore rows must be integers, not {rows.dtype}")
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for a RowStore of {len(self)} rows")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for i, part in enumerate(self.parts):
            mask = part_of == i
            if mask.any():
                out[mask] = part[rows[mask] - self.offsets[i]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every row (reads it all: for tests and small stores)."""
        whole = self._rows(np.arange(len(self)))
        return whole if dtype is None else whole.astype(dtype)

    def __repr__(self) -> str:
        return f"RowStore({' + '.join(str(len(p)) for p in self.parts)} rows of {self.shape[1:]} {self.dtype})"
