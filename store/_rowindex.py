"""The row index of one commit, held in memory as sorted numpy columns.

LMDB is the durable, atomically flipped copy (one key per persisted row); lookups for a batch
of ids go through this in-memory copy with one ``searchsorted``, because per-id LMDB calls from
Python cost about a microsecond each (STORAGE-NOTES.md) and a step looks up 10^5 ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dpsn.errors import CorruptStoreError

from ._digest import rows_hash

_EMPTY = np.empty((0,), dtype=np.int64)
TOMBSTONE = np.iinfo(np.int64).max  # segment id of a dropped row while replaying history
FENCE_STEP = 128  # entries of a run file per fence: 128 entries of 32 bytes, one 4 KiB page
_WEIGHTS = np.arange(1, 2 * FENCE_STEP, 2, dtype=np.uint64)  # odd: position counts, never renumber


class RowBlockError(CorruptStoreError):
    """A block of a run file failed its checksum when a lookup first touched it; none of its
    entries was used. ``LayeredIndex.lookup`` falls back to LMDB where it can."""


def block_sums(
    ids: np.ndarray, segment: np.ndarray, offset: np.ndarray, commit: np.ndarray
) -> np.ndarray:
    """The checksum of each block of ``FENCE_STEP`` entries (the last may be short): the sum
    modulo 2**64 of each entry's ``rows`` hash (``_digest.py``) times ``2 * position + 1``, so
    a changed, lost or moved entry changes it. Vectorized: no loop per entry or block."""
    n = len(ids)
    blocks = -(-n // FENCE_STEP)
    h = np.zeros(blocks * FENCE_STEP, dtype=np.uint64)
    h[:n] = rows_hash(ids, segment, offset, commit)
    with np.errstate(over="ignore"):
        return (h.reshape(blocks, FENCE_STEP) * _WEIGHTS).sum(axis=1, dtype=np.uint64)


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
    # With fences, for a run file: each block's checksum, which blocks have been checked (set
    # in place as lookups touch them) and the file, for messages.
    sums: np.ndarray | None = None
    checked: np.ndarray | None = None
    source: str | None = None
    # The mapped file's size guard (``_files.SizeGuard``): a file cut under the map would make
    # a touched page SIGBUS, so its size is checked before pages are touched.
    guard: Any = None

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
        if self.guard is not None and not self.guard.intact():
            raise RowBlockError(
                f"run file {self.source} was cut under this process (a copy over a live "
                "store?); no entry of it is used"
            )
        pos = np.searchsorted(self.ids, ids) if self.fences is None else self._fenced(ids)
        pos_clipped = np.minimum(pos, n - 1)
        if self.sums is not None:
            self.check_blocks(pos_clipped // FENCE_STEP)
        return pos_clipped, self.ids[pos_clipped] == ids

    def check_blocks(self, blocks: np.ndarray) -> None:
        """Check the blocks ``blocks`` of a run file against their sums, those not checked yet
        (``RowBlockError`` naming the first that fails; a block that passes is not read
        again). Many blocks at once, vectorized."""
        if self.sums is None or self.checked is None:
            return
        todo = np.unique(np.asarray(blocks, dtype=np.int64))
        todo = todo[~self.checked[todo]]
        if not len(todo):
            return
        n = len(self.ids)
        at = (todo[:, None] * FENCE_STEP + np.arange(FENCE_STEP)[None, :]).ravel()
        inside = at < n
        at = np.where(inside, at, 0)
        h = rows_hash(self.ids[at], self.segment[at], self.offset[at], self.commit[at])
        h[~inside] = 0
        with np.errstate(over="ignore"):
            got = (h.reshape(len(todo), FENCE_STEP) * _WEIGHTS).sum(axis=1, dtype=np.uint64)
        bad = todo[got != self.sums[todo]]
        if len(bad):
            raise RowBlockError(
                f"run file {self.source}: block {int(bad[0])} (entries "
                f"{int(bad[0]) * FENCE_STEP}..) fails its checksum; the row index's run files "
                "are damaged: run `dpsn verify` (a writer's open rebuilds them from LMDB)"
            )
        self.checked[todo] = True

    def check_all(self) -> None:
        """Check every block not checked yet (before a pass that reads the whole file)."""
        if self.checked is not None:
            if self.guard is not None and not self.guard.intact():
                raise RowBlockError(f"run file {self.source} was cut under this process")
            self.check_blocks(np.flatnonzero(~self.checked))

    def _fenced(self, ids: np.ndarray) -> np.ndarray:
        """``searchsorted`` through the fences: the fence array picks each id's block of
        FENCE_STEP entries (one page of a run file), a binary search within it, all ids at
        once, the position."""
        assert self.fences is not None
        n = len(self.ids)
        q = np.asarray(ids, dtype=np.int64)
        block = np.maximum(np.searchsorted(self.fences, q, side="right") - 1, 0)
        self.check_blocks(block)  # before any entry of it steers the search
        lo = block * FENCE_STEP
        hi = np.minimum(lo + FENCE_STEP, n)
        for _ in range(FENCE_STEP.bit_length()):  # the answer lies in [lo, hi]
            mid = (lo + hi) >> 1
            right = (lo < hi) & (self.ids[np.minimum(mid, n - 1)] < q)
            lo, hi = np.where(right, mid + 1, lo), np.where(right | (lo >= hi), hi, mid)
        return lo

    def apply(self, ids: np.ndarray, segment: int, commit: int, drops: np.ndarray) -> RowIndex:
        """The index after a commit wrote ``ids`` to ``segment`` and dropped ``drops``: ``ids``
        is the segment's ids column (offsets 0..n-1), sorted or placed (``placed_column``)."""
        n = len(ids)
        ids, offsets = placed_column(ids)
        return merge_newest(
            [
                self,
                RowIndex(
                    ids,
                    np.full(n, segment, dtype=np.int64),
                    offsets,
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


def placed_column(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A segment's ids column as ``(sorted ids, their offsets)``: the column itself and
    ``0..n-1`` when it is sorted (every segment but a placed one, format 4), else sorted by id
    with the offsets they sit at."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return ids, np.arange(len(ids), dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    return ids[order], order.astype(np.int64)
