"""The row index of one commit, held in memory as sorted numpy columns.

LMDB is the durable, atomically flipped copy (one key per persisted row); lookups for a batch
of ids go through this in-memory copy with one ``searchsorted``, because per-id LMDB calls from
Python cost about a microsecond each (STORAGE-NOTES.md) and a step looks up 10^5 ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EMPTY = np.empty((0,), dtype=np.int64)
TOMBSTONE = np.iinfo(np.int64).max  # segment id of a dropped row while replaying history


@dataclass(frozen=True, slots=True)
class RowIndex:
    """Sorted, unique ``ids`` and, per id, the segment, offset and commit that hold its delta."""

    ids: np.ndarray
    segment: np.ndarray
    offset: np.ndarray
    commit: np.ndarray

    @classmethod
    def empty(cls) -> RowIndex:
        return cls(_EMPTY, _EMPTY, _EMPTY, _EMPTY)

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``ids`` in the index and a mask of which ids are present."""
        if len(self.ids) == 0:
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.searchsorted(self.ids, ids)
        pos_clipped = np.minimum(pos, len(self.ids) - 1)
        return pos_clipped, self.ids[pos_clipped] == ids

    def apply(self, ids: np.ndarray, segment: int, commit: int, drops: np.ndarray) -> RowIndex:
        """The index after a commit wrote sorted ``ids`` to ``segment`` and dropped ``drops``."""
        n = len(ids)
        return merge_newest(
            [
                self,
                RowIndex(
                    ids,
                    np.full(n, segment, dtype=np.int64),
                    np.arange(n, dtype=np.int64),
                    np.full(n, commit, dtype=np.int64),
                ),
                RowIndex(
                    drops,
                    np.full(len(drops), TOMBSTONE, dtype=np.int64),
                    np.zeros(len(drops), dtype=np.int64),
                    np.full(len(drops), commit, dtype=np.int64),
                ),
            ]
        )

    def segments(self) -> np.ndarray:
        return np.unique(self.segment)


def merge_newest(parts: list[RowIndex]) -> RowIndex:
    """Merge indexes in order, later parts winning; tombstones remove a row.

    Within each part ids are unique. A stable sort on id keeps parts in order, so the last entry
    of each run of equal ids is the newest.
    """
    ids = np.concatenate([p.ids for p in parts])
    if len(ids) == 0:
        return RowIndex.empty()
    seg = np.concatenate([p.segment for p in parts])
    off = np.concatenate([p.offset for p in parts])
    com = np.concatenate([p.commit for p in parts])
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    newest = np.ones(len(ids), dtype=bool)
    newest[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    keep = order[newest]
    keep = keep[seg[keep] != TOMBSTONE]
    return RowIndex(ids=ids[keep], segment=seg[keep], offset=off[keep], commit=com[keep])
