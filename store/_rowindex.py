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
FENCE_STEP = 128  # entries of a run file per fence: 128 entries of 32 bytes, one 4 KiB page


@dataclass(frozen=True, slots=True)
class RowIndex:
    """Sorted, unique ``ids`` and, per id, the segment, offset and commit that hold its delta."""

    ids: np.ndarray
    segment: np.ndarray
    offset: np.ndarray
    commit: np.ndarray
    # Every FENCE_STEP-th id, when the columns are a mapped run file (``_runs.py``): a search
    # then touches one page of the file per id instead of the ~log2(n) of a binary search.
    fences: np.ndarray | None = None

    @classmethod
    def empty(cls) -> RowIndex:
        return cls(_EMPTY, _EMPTY, _EMPTY, _EMPTY)

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``ids`` in the index and a mask of which ids are present."""
        n = len(self.ids)
        if n == 0:
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.searchsorted(self.ids, ids) if self.fences is None else self._fenced(ids)
        pos_clipped = np.minimum(pos, n - 1)
        return pos_clipped, self.ids[pos_clipped] == ids

    def _fenced(self, ids: np.ndarray) -> np.ndarray:
        """``searchsorted`` through the fences: the fence array picks each id's block of
        FENCE_STEP entries (one page of a run file), a binary search within it, all ids at
        once, the position."""
        assert self.fences is not None
        n = len(self.ids)
        q = np.asarray(ids, dtype=np.int64)
        lo = np.maximum(np.searchsorted(self.fences, q, side="right") - 1, 0) * FENCE_STEP
        hi = np.minimum(lo + FENCE_STEP, n)
        for _ in range(FENCE_STEP.bit_length()):  # the answer lies in [lo, hi]
            mid = (lo + hi) >> 1
            right = (lo < hi) & (self.ids[np.minimum(mid, n - 1)] < q)
            lo, hi = np.where(right, mid + 1, lo), np.where(right | (lo >= hi), hi, mid)
        return lo

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

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For each of ``ids`` (any order): present, and its segment, offset and commit (zero
        where absent). The one question the read path asks; ``LayeredIndex`` answers it too."""
        pos, found = self.find(ids)
        if not len(self.ids):
            zero = np.zeros(len(ids), dtype=np.int64)
            return found, zero, zero.copy(), zero.copy()
        return (
            found,
            np.where(found, self.segment[pos], 0),
            np.where(found, self.offset[pos], 0),
            np.where(found, self.commit[pos], 0),
        )

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return self.find(ids)[1]

    def live_rows(self) -> dict[int, int]:
        """Rows per segment."""
        segs, counts = np.unique(self.segment, return_counts=True)
        return dict(zip(segs.tolist(), counts.tolist(), strict=True))

    def newest_commit(self) -> int:
        """The newest commit any row was written by (0 when empty)."""
        return int(self.commit.max()) if len(self.ids) else 0

    def flat(self) -> RowIndex:
        return self


def merge_newest(parts: list[RowIndex], *, keep_tombstones: bool = False) -> RowIndex:
    """Merge indexes in order, later parts winning; tombstones remove a row (or, with
    ``keep_tombstones``, stay, to hide the row in the older layers under the merged one).

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
    if not keep_tombstones:
        keep = keep[seg[keep] != TOMBSTONE]
    return RowIndex(ids=ids[keep], segment=seg[keep], offset=off[keep], commit=com[keep])
