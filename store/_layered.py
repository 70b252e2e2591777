"""HEAD's row index as layers: sorted runs (memory-mapped files, or arrays) under a small
in-memory overlay of the latest commits.

Why layers: a commit changes r rows of n. Keeping one sorted array means rebuilding it, O(n),
at every commit (44-180 ms at 10^6 rows), and loading it whole at every open (O(n) time, ~32 B
per row of RAM). Here a commit adds its r entries to the overlay (O(r log r)); a lookup searches
the layers newest first (O(log n) each); the writer turns the overlay into a run file from time
to time and merges runs by size (``_runs.py``), as an LSM tree does, so that each entry is
rewritten O(log n) times over its life and an open maps the runs instead of reading them.

A layer is a ``RowIndex``; in every layer but the bottom one a ``TOMBSTONE`` segment hides the
row in the layers below (the row was dropped). The figures a commit, a lease or a compaction
need (row count, rows per segment, newest commit) are kept up to date in O(r) per commit, so
none of them walks the index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ._rowindex import TOMBSTONE, RowBlockError, RowIndex, merge_newest, placed_column

# What answers a lookup when a run file's block fails its checksum: LMDB's row index, read by
# the store (``PersistedStore.fallback_lookup``), or ``RowBlockError`` when it no longer
# holds this index's commit.
Fallback = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


class LayeredIndex:
    """Sorted layers (oldest first) and an overlay; read-only, ``apply`` returns a new index.

    ``runs`` names the file behind each layer (``None``: held in memory) and ``base_commit``
    the commit the layers reflect (the overlay holds the commits after it, ``since`` of them).
    """

    __slots__ = (
        "_flat",
        "base_commit",
        "count",
        "fallback",
        "layers",
        "live",
        "newest",
        "overlay",
        "runs",
        "since",
    )

    def __init__(
        self,
        layers: tuple[RowIndex, ...],
        runs: tuple[str | None, ...],
        overlay: RowIndex,
        *,
        base_commit: int,
        since: int,
        count: int,
        live: dict[int, int],
        newest: int,
        fallback: Fallback | None = None,
    ) -> None:
        self.layers, self.runs, self.overlay = layers, runs, overlay
        self.base_commit, self.since = base_commit, since
        self.count, self.live, self.newest = count, live, newest
        self.fallback = fallback
        self._flat: RowIndex | None = None

    @classmethod
    def of(cls, index: RowIndex, commit: int) -> LayeredIndex:
        """One in-memory layer holding ``index`` (no tombstones), as of ``commit``."""
        return cls(
            (index,),
            (None,),
            RowIndex.empty(),
            base_commit=commit,
            since=0,
            count=len(index),
            live=index.live_rows(),
            newest=index.newest_commit(),
        )

    @classmethod
    def empty(cls) -> LayeredIndex:
        return cls.of(RowIndex.empty(), 0)

    def __len__(self) -> int:
        return self.count

    def _newest_first(self) -> Iterable[RowIndex]:
        if len(self.overlay):
            yield self.overlay
        yield from reversed(self.layers)

    # -- questions -----------------------------------------------------------------------------

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For each of ``ids`` (any order, repeats allowed): present, and its segment, offset
        and commit (zero where absent). Each layer is asked only about the ids the layers above
        it did not answer. A run file's block that fails its checksum is never used: the
        whole lookup is answered by the fallback (LMDB), or raises ``RowBlockError``."""
        ids = np.asarray(ids, dtype=np.int64)
        try:
            return self._lookup(ids)
        except RowBlockError:
            if self.fallback is None:
                raise
            return self.fallback(ids)

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = len(ids)
        seg = np.zeros(n, dtype=np.int64)
        off = np.zeros(n, dtype=np.int64)
        com = np.zeros(n, dtype=np.int64)
        found = np.zeros(n, dtype=bool)
        pending = np.arange(n)
        for layer in self._newest_first():
            if not len(pending):
                break
            if not len(layer):
                continue
            pos, hit = layer.find(ids[pending])
            at, pos = pending[hit], pos[hit]
            s = np.asarray(layer.segment[pos])
            alive = s != TOMBSTONE
            seg[at], off[at], com[at] = s, layer.offset[pos], layer.commit[pos]
            found[at] = alive
            seg[at[~alive]] = 0
            off[at[~alive]] = 0
            com[at[~alive]] = 0
            pending = pending[~hit]
        return found, seg, off, com

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return self.lookup(ids)[0]

    def live_rows(self) -> dict[int, int]:
        """Rows per segment (segments with none left are not listed)."""
        return dict(self.live)

    def segments(self) -> np.ndarray:
        return np.asarray(sorted(self.live), dtype=np.int64)

    def newest_commit(self) -> int:
        """An upper bound of the newest commit any row was written by (exact unless a commit
        since the layers dropped the newest rows): what a reader's lease names."""
        return self.newest if self.count else 0

    def flat(self) -> RowIndex:
        """The whole index as one in-memory ``RowIndex`` (O(n) time and memory, kept): for the
        maintenance passes that walk every row anyway (compaction, verify, snapshots)."""
        if self._flat is None:
            for layer in self.layers:
                layer.check_all()  # a run file read whole: every block checked first
            parts = [*self.layers, self.overlay]
            self._flat = merge_newest([p for p in parts if len(p)] or [RowIndex.empty()])
        return self._flat

    # ``RowIndex``'s columns, for the maintenance passes.
    @property
    def ids(self) -> np.ndarray:
        return self.flat().ids

    @property
    def segment(self) -> np.ndarray:
        return self.flat().segment

    @property
    def offset(self) -> np.ndarray:
        return self.flat().offset

    @property
    def commit(self) -> np.ndarray:
        return self.flat().commit

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in :meth:`flat`'s columns (which this builds): for maintenance only."""
        return self.flat().find(ids)

    # -- change --------------------------------------------------------------------------------

    def apply(self, ids: np.ndarray, segment: int, commit: int, drops: np.ndarray) -> LayeredIndex:
        """The index after a commit wrote ``ids`` to ``segment`` (its ids column, offsets
        0..r-1: sorted, or placed, ``placed_column``) and dropped sorted ``drops``:
        O((r + overlay) log) and no pass over the layers."""
        ids, offsets = placed_column(ids)
        drops = np.asarray(drops, dtype=np.int64)
        had, old_seg, _, _ = self.lookup(np.concatenate([ids, drops]))
        written_had, drops_had = had[: len(ids)], had[len(ids) :]
        live = dict(self.live)
        gone_segs, gone_counts = np.unique(old_seg[had], return_counts=True)
        for s, c in zip(gone_segs.tolist(), gone_counts.tolist(), strict=True):
            left = live.get(s, 0) - c
            if left > 0:
                live[s] = left
            else:
                live.pop(s, None)
        if len(ids):
            live[segment] = live.get(segment, 0) + len(ids)
        n, m = len(ids), len(drops[drops_had])
        fresh = RowIndex(
            ids,
            np.full(n, segment, dtype=np.int64),
            offsets,
            np.full(n, commit, dtype=np.int64),
        )
        tombs = RowIndex(
            drops[drops_had],
            np.full(m, TOMBSTONE, dtype=np.int64),
            np.zeros(m, dtype=np.int64),
            np.full(m, commit, dtype=np.int64),
        )
        overlay = merge_newest([self.overlay, fresh, tombs], keep_tombstones=True)
        count = self.count + int(n - written_had.sum()) - m
        return LayeredIndex(
            self.layers,
            self.runs,
            overlay,
            base_commit=self.base_commit,
            since=self.since + 1,
            count=count,
            live=live,
            newest=max(self.newest, commit) if n else self.newest,
            fallback=self.fallback,
        )

    def with_layers(
        self, layers: tuple[RowIndex, ...], runs: tuple[str | None, ...], commit: int
    ) -> LayeredIndex:
        """The same rows, laid out anew (the overlay folded into ``layers``, as of ``commit``)."""
        return LayeredIndex(
            layers,
            runs,
            RowIndex.empty(),
            base_commit=commit,
            since=0,
            count=self.count,
            live=dict(self.live),
            newest=self.newest,
            fallback=self.fallback,
        )

    def describe(self) -> dict[str, Any]:
        """The layout, for ``dpsn info``-style reports and the growth benchmark."""
        return {
            "layers": [len(layer) for layer in self.layers],
            "files": sum(r is not None for r in self.runs),
            "overlay": len(self.overlay),
            "commits_since_runs": self.since,
        }


# What the read path takes: HEAD's layered index, or a past commit's in-memory one.
RowLookup = RowIndex | LayeredIndex
