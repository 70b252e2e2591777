"""Uncommitted changes of a writable pool, held on the host as a sorted id column over
append-only row columns, so that a batch of ids is looked up with one ``searchsorted`` (no dict,
no loop per id).

A staged row holds its *whole* delta (not an increment) and every other persisted column of its
layout (a row optimizer's state, usage statistics; zero when unused): reading it needs nothing
from disk, and committing it is a plain overwrite. Dropped rows are kept apart as a sorted id
set.

Why append-only: with a lifecycle, rows in their warm-up stay staged across commits, so staging
can hold millions of rows while evictions keep adding a few thousand per step. Keeping the row
columns themselves in id order made every addition rewrite all of them (O(staged rows x row
bytes) per eviction: the cost grew with every step). Now an addition appends its rows (capacity
grows by half, amortized O(added)) and only the sorted ``ids`` and their slots (16 bytes a row) are
merged. ``values`` gives the columns in id order: it compacts the slots first, which callers
do at commits and consolidations, not per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import torch

from ._columns import Column, RowLayout
from ._sorted import sorted_find
from ._tier import TierRead

_NO_IDS = np.empty((0,), dtype=np.int64)


class Staging:
    """The staged rows (see the module docstring), and the first of the row stack's lower
    tiers (``_tier.Tier``: staged rows are found, rows staged for dropping end the search)."""

    name = "staging"

    def __init__(self, layout: RowLayout) -> None:
        self.layout = layout
        self.clear()

    @property
    def columns(self) -> tuple[Column, ...]:
        """The persisted columns a staged row carries."""
        return self.layout.persisted_columns()

    def clear(self) -> None:
        self._ids = _NO_IDS  # sorted unique staged ids
        self._slots = _NO_IDS  # the row of each id in the columns
        self._cols = {c.name: c.zeros(0) for c in self.columns}  # rows [0, _used) are written
        self._used = 0
        self._ordered = True  # _slots == arange(len(_ids)) and every column has that many rows
        self.drops = _NO_IDS

    @property
    def ids(self) -> np.ndarray:
        """The staged ids, sorted (read-only: change them through the methods)."""
        return self._ids

    @property
    def values(self) -> Mapping[str, torch.Tensor]:
        """Each persisted column's staged rows, aligned with ``ids`` (a compaction when rows
        were added or removed since the last call; replace a column with ``set_column``)."""
        self._compact()
        return MappingProxyType(self._cols)

    def set_column(self, name: str, values: torch.Tensor) -> None:
        """Replace column ``name`` of every staged row (``values`` aligned with ``ids``)."""
        self._compact()
        if values.shape[0] != len(self._ids):
            raise ValueError(f"{values.shape[0]} rows for {len(self._ids)} staged ids")
        self._cols[name] = values

    def _compact(self) -> None:
        """Reorder the columns into id order, with nothing else in them."""
        if self._ordered:
            return
        n = len(self._ids)
        if self._used == n and np.array_equal(self._slots, np.arange(n)):
            self._cols = {name: v[:n] for name, v in self._cols.items()}  # appended in order
        else:
            at = torch.from_numpy(self._slots)
            self._cols = {name: v[at] for name, v in self._cols.items()}
        self._slots = np.arange(n, dtype=np.int64)
        self._used = n
        self._ordered = True

    def set_layout(self, layout: RowLayout) -> None:
        """Adopt a new layout (a new state or usage width): staged deltas stay, a column whose
        width changed resets to zeros."""
        self._compact()
        self.layout = layout
        for col in self.columns:
            if col.name not in self._cols or self._cols[col.name].shape[1] != col.width:
                self._cols[col.name] = col.zeros(len(self._ids))

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the staged rows where ``mask`` (aligned with ``ids``) is True, and no
        drops: what stays staged after a commit that wrote the others."""
        self._ids = self._ids[mask]
        self._slots = self._slots[mask]
        self._ordered = False
        self._compact()
        self.drops = _NO_IDS

    def __len__(self) -> int:
        return len(self._ids) + len(self.drops)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, torch.Tensor], np.ndarray]:
        """For ``ids``: a mask of the staged ones, their columns (in the order of
        ``ids[mask]``), and a mask of the ones staged for dropping."""
        pos, staged = sorted_find(self._ids, ids)
        _, dropped = sorted_find(self.drops, ids)
        sel = torch.from_numpy(self._slots[pos[staged]])
        return staged, {name: v[sel] for name, v in self._cols.items()}, dropped

    def read(self, ids: np.ndarray, layout: RowLayout) -> TierRead:
        """The tier protocol's read (``_tier.Tier``): the staged rows of ``ids`` and the ones
        staged for dropping, with the columns of ``layout``. Staging that holds nothing (a
        read-only pool's never does; a writer's is empty after each commit until a dirty row
        is evicted) answers without a search."""
        if not len(self._ids) and not len(self.drops):
            cols = self._cols
            return TierRead(
                _NO_IDS,
                _NO_IDS,
                cols[layout.delta.name][:0],
                cols[layout.state.name][:0],
                cols[layout.usage.name][:0],
            )
        staged, cols, dropped = self.lookup(ids)
        return TierRead(
            np.flatnonzero(staged),
            np.flatnonzero(dropped),
            cols[layout.delta.name],
            cols[layout.state.name],
            cols[layout.usage.name],
        )

    def put(self, ids: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        """Stage whole rows for sorted unique ``ids``; a persisted column missing from
        ``values`` is staged as zeros."""
        n = len(ids)
        values = {c.name: values[c.name] if c.name in values else c.zeros(n) for c in self.columns}
        pos, present = sorted_find(self._ids, ids)
        if present.any():
            at, src = torch.from_numpy(self._slots[pos[present]]), torch.from_numpy(present)
            for name, v in values.items():
                self._cols[name][at] = v[src].to(self._cols[name].dtype)
        new = ~present
        if new.any():
            added = ids[new]
            m = len(added)
            first = self._append({name: v[torch.from_numpy(new)] for name, v in values.items()})
            # merge the sorted new ids into the sorted ids: each lands after the old ones below it
            into = np.searchsorted(self._ids, added) + np.arange(m)
            keep = np.ones(len(self._ids) + m, dtype=bool)
            keep[into] = False
            merged_ids = np.empty(len(keep), dtype=np.int64)
            merged_slots = np.empty(len(keep), dtype=np.int64)
            merged_ids[keep], merged_ids[into] = self._ids, added
            merged_slots[keep] = self._slots
            merged_slots[into] = np.arange(first, first + m)
            self._ids, self._slots = merged_ids, merged_slots
            self._ordered = False
        if len(self.drops):
            _, undrop = sorted_find(self.drops, ids)
            if undrop.any():
                self.drops = np.setdiff1d(self.drops, ids, assume_unique=True)

    def _append(self, rows: dict[str, torch.Tensor]) -> int:
        """Write ``rows`` after the used rows of the columns, returning where they start. A
        full column grows by half (amortized: each row is copied about twice more, and at most
        a third of a column is spare)."""
        m = len(next(iter(rows.values())))
        first, need = self._used, self._used + m
        for name, v in rows.items():
            col = self._cols[name]
            if len(col) < need:
                grown = torch.empty(
                    (max(need, len(col) + len(col) // 2), col.shape[1]), dtype=col.dtype
                )
                grown[:first] = col[:first]
                self._cols[name] = col = grown
            col[first:need] = v.to(col.dtype)
        self._used = need
        return first

    def drop(self, ids: np.ndarray) -> None:
        """Stage sorted unique ``ids`` for dropping (they lose any staged delta)."""
        _, present = sorted_find(self._ids, ids)
        if present.any():
            _, gone = sorted_find(ids, self._ids)
            self._ids, self._slots = self._ids[~gone], self._slots[~gone]
            self._ordered = False
            if 2 * len(self._ids) < self._used:  # mostly holes: reclaim them
                self._compact()
        self.drops = np.union1d(self.drops, ids)
