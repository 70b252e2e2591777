"""Uncommitted changes of a writable pool, held as sorted columns so that a batch of ids is
looked up with one ``searchsorted`` (no dict, no loop per id).

A staged row holds its *whole* delta (not an increment) and its per-row state (e.g. a row
optimizer's; ``state_width`` columns, zero when unused): reading it needs nothing from disk, and
committing it is a plain overwrite. Dropped rows are kept apart as a sorted id set.
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
    def __init__(self, dim: int, dtype: torch.dtype, state_width: int = 0) -> None:
        self.dim = dim
        self.dtype = dtype
        self.state_width = state_width
        self.clear()

    def clear(self) -> None:
        self.ids = _NO_IDS
        self.values = torch.empty((0, self.dim), dtype=self.dtype)
        self.state = torch.empty((0, self.state_width), dtype=torch.float32)
        self.drops = _NO_IDS

    def set_state_width(self, width: int) -> None:
        """Change the per-row state width; staged rows keep their deltas, their state resets."""
        self.state_width = width
        self.state = torch.zeros((len(self.ids), width), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.ids) + len(self.drops)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, np.ndarray]:
        """For ``ids``: mask of staged ones, their values and state, mask of staged drops."""
        pos, staged = _member(self.ids, ids)
        _, dropped = _member(self.drops, ids)
        sel = torch.from_numpy(pos[staged])
        return staged, self.values[sel], self.state[sel], dropped

    def put(self, ids: np.ndarray, values: torch.Tensor, state: torch.Tensor | None = None) -> None:
        """Stage whole deltas (and state; zeros if None) for sorted unique ``ids``."""
        if state is None:
            state = torch.zeros((len(ids), self.state_width), dtype=torch.float32)
        pos, present = _member(self.ids, ids)
        if present.any():
            at, src = torch.from_numpy(pos[present]), torch.from_numpy(present)
            self.values[at] = values[src]
            self.state[at] = state[src]
        new = ~present
        if new.any():
            all_ids = np.concatenate([self.ids, ids[new]])
            order = torch.from_numpy(np.argsort(all_ids, kind="stable"))
            src = torch.from_numpy(new)
            self.ids = all_ids[order.numpy()]
            self.values = torch.cat([self.values, values[src]])[order]
            self.state = torch.cat([self.state, state[src]])[order]
        _, undrop = _member(self.drops, ids)
        if undrop.any():
            self.drops = np.setdiff1d(self.drops, ids, assume_unique=True)

    def drop(self, ids: np.ndarray) -> None:
        _, present = _member(self.ids, ids)
        if present.any():
            keep = ~np.isin(self.ids, ids)
            self.ids = self.ids[keep]
            self.values = self.values[torch.from_numpy(keep)]
            self.state = self.state[torch.from_numpy(keep)]
        self.drops = np.union1d(self.drops, ids)
