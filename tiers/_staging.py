"""Uncommitted changes of a writable pool, held on the host as sorted columns, so that a batch
of ids is looked up with one ``searchsorted`` (no dict, no loop per id).

A staged row holds its *whole* delta (not an increment) and every other persisted column of its
layout (a row optimizer's state, usage statistics; zero when unused): reading it needs nothing
from disk, and committing it is a plain overwrite. Dropped rows are kept apart as a sorted id
set.
"""

from __future__ import annotations

import numpy as np
import torch

from ._columns import Column, RowLayout
from ._sorted import sorted_find

_NO_IDS = np.empty((0,), dtype=np.int64)


class Staging:
    def __init__(self, layout: RowLayout) -> None:
        self.layout = layout
        self.clear()

    @property
    def columns(self) -> tuple[Column, ...]:
        """The persisted columns a staged row carries."""
        return self.layout.persisted_columns()

    def clear(self) -> None:
        self.ids = _NO_IDS
        self.values = {c.name: c.zeros(0) for c in self.columns}
        self.drops = _NO_IDS

    def set_layout(self, layout: RowLayout) -> None:
        """Adopt a new layout (a new state or usage width): staged deltas stay, a column whose
        width changed resets to zeros."""
        self.layout = layout
        for col in self.columns:
            if self.values[col.name].shape[1] != col.width:
                self.values[col.name] = col.zeros(len(self.ids))

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the staged rows where ``mask`` (aligned with ``ids``) is True, and no
        drops: what stays staged after a commit that wrote the others."""
        at = torch.from_numpy(mask)
        self.ids = self.ids[mask]
        self.values = {name: v[at] for name, v in self.values.items()}
        self.drops = _NO_IDS

    def __len__(self) -> int:
        return len(self.ids) + len(self.drops)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, torch.Tensor], np.ndarray]:
        """For ``ids``: a mask of the staged ones, their columns (in the order of
        ``ids[mask]``), and a mask of the ones staged for dropping."""
        pos, staged = sorted_find(self.ids, ids)
        _, dropped = sorted_find(self.drops, ids)
        sel = torch.from_numpy(pos[staged])
        return staged, {name: v[sel] for name, v in self.values.items()}, dropped

    def put(self, ids: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        """Stage whole rows for sorted unique ``ids``; a persisted column missing from
        ``values`` is staged as zeros."""
        n = len(ids)
        values = {c.name: values[c.name] if c.name in values else c.zeros(n) for c in self.columns}
        pos, present = sorted_find(self.ids, ids)
        if present.any():
            at, src = torch.from_numpy(pos[present]), torch.from_numpy(present)
            for name, v in values.items():
                self.values[name][at] = v[src].to(self.values[name].dtype)
        new = ~present
        if new.any():
            all_ids = np.concatenate([self.ids, ids[new]])
            order = np.argsort(all_ids, kind="stable")
            src, perm = torch.from_numpy(new), torch.from_numpy(order)
            self.ids = all_ids[order]
            for name, v in values.items():
                old = self.values[name]
                self.values[name] = torch.cat([old, v[src].to(old.dtype)])[perm]
        if len(self.drops):
            _, undrop = sorted_find(self.drops, ids)
            if undrop.any():
                self.drops = np.setdiff1d(self.drops, ids, assume_unique=True)

    def drop(self, ids: np.ndarray) -> None:
        """Stage sorted unique ``ids`` for dropping (they lose any staged delta)."""
        _, present = sorted_find(self.ids, ids)
        if present.any():
            _, gone = sorted_find(ids, self.ids)
            keep = torch.from_numpy(~gone)
            self.ids = self.ids[~gone]
            self.values = {name: v[keep] for name, v in self.values.items()}
        self.drops = np.union1d(self.drops, ids)
