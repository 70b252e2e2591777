"""Uncommitted changes of a writable pool, held as sorted columns so that a batch of ids is
looked up with one ``searchsorted`` (no dict, no loop per id).

A staged row holds its *whole* delta (not an increment): reading it needs nothing from disk,
and committing it is a plain overwrite. Dropped rows are kept apart as a sorted id set.
"""

from __future__ import annotations

import numpy as np
import torch

_NO_IDS = np.empty((0,), dtype=np.int64)


def _member(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == ids


class Staging:
    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        self.dim = dim
        self.dtype = dtype
        self.clear()

    def clear(self) -> None:
        self.ids = _NO_IDS
        self.values = torch.empty((0, self.dim), dtype=self.dtype)
        self.drops = _NO_IDS

    def __len__(self) -> int:
        return len(self.ids) + len(self.drops)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """For unique ``ids``: mask of staged ones, their values, mask of staged drops."""
        pos, staged = _member(self.ids, ids)
        _, dropped = _member(self.drops, ids)
        return staged, self.values[torch.from_numpy(pos[staged])], dropped

    def put(self, ids: np.ndarray, values: torch.Tensor) -> None:
        """Stage whole deltas for sorted unique ``ids``."""
        pos, present = _member(self.ids, ids)
        if present.any():
            self.values[torch.from_numpy(pos[present])] = values[torch.from_numpy(present)]
        new = ~present
        if new.any():
            all_ids = np.concatenate([self.ids, ids[new]])
            order = np.argsort(all_ids, kind="stable")
            self.ids = all_ids[order]
            self.values = torch.cat([self.values, values[torch.from_numpy(new)]])[
                torch.from_numpy(order)
            ]
        _, undrop = _member(self.drops, ids)
        if undrop.any():
            self.drops = np.setdiff1d(self.drops, ids, assume_unique=True)

    def drop(self, ids: np.ndarray) -> None:
        _, present = _member(self.ids, ids)
        if present.any():
            keep = ~np.isin(self.ids, ids)
            self.ids = self.ids[keep]
            self.values = self.values[torch.from_numpy(keep)]
        self.drops = np.union1d(self.drops, ids)
