"""Compaction: rewrite the live rows of sparsely live segments into new, dense segments.

Why: a segment stays on disk while any one of its rows is live, so a training run that keeps
rewriting a few hot rows leaves segments that are mostly superseded versions (42x the live
bytes after 40 commits of ``examples/lm.py``). Compaction is LSM-style (RocksDB, LevelDB):
it copies the live rows of the segments that waste the most into one new segment, after which
the old ones are referenced only by history, and ``gc`` (run right after, by the store's
retention policy) frees them.

A compaction is a commit, made by the commit protocol: the new segment is written and fsynced
first, then ONE LMDB write transaction points the moved rows at it, records the segment and a
commit whose ``message`` is ``"compact"`` and whose ``stats`` holds ``{"compaction": ...}``,
advances HEAD and updates the digests exactly (the moved rows' old entries subtracted, the new
ones added). A crash before the flip leaves an unreferenced segment; after it the compaction is
durable. The compaction commit changes no row's bits: it copies every per-row column a source
segment holds (deltas, optimizer state, usage statistics: whatever its record declares) byte
for byte, and carries everything else of its parent's record (generator version, routers,
provenance, lifecycle) unchanged. Its rows' ``commit`` in the index is the compaction's, as
for any commit that writes rows. Past commits keep their views: their segments stay until
retention lets them go.

Figures (the same in ``dpsn info``, ``dpsn stats`` and the bench):

- space amplification: the stored bytes of every recorded segment / the raw bytes of HEAD's
  live rows (ids, deltas and per-row columns);
- write amplification: (bytes commits wrote + bytes compactions wrote) / bytes commits wrote,
  from counters kept in ``meta/growth``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from dpsn.errors import CorruptStoreError, StoreFullError

from ._digest import rows_hash
from ._format import (
    DB_COMMITS,
    DB_META,
    DB_ROWS,
    DB_SEGMENTS,
    META_HEAD,
    META_NEXT_SEGMENT,
    ROW_VALUE,
    ROW_VALUE_DTYPE,
    SEGMENT_DELTAS,
    SEGMENT_DROPS,
    SEGMENT_IDS,
    u64_key,
)
from ._layered import LayeredIndex
from ._placement import Placement, place, raise_format
from ._records import Commit, Writer, is_compaction, parse_record, read_u64

if TYPE_CHECKING:
    from ._segments import SegmentRecord

__all__ = [
    "META_GROWTH",
    "CompactResult",
    "amplification",
    "compact",
    "count_commit_bytes",
    "growth_counters",
    "is_compaction",
    "maybe_compact",
]

META_GROWTH = b"growth"
# Rows of one compaction commit are gathered in memory; past this many raw bytes the rest go
# to a further compaction commit, so memory stays bounded whatever the store's size.
MAX_BATCH_BYTES = 256 << 20
_EMPTY = np.empty((0,), dtype=np.int64)


# -- figures -----------------------------------------------------------------------------------


def _row_raw_bytes(rec: SegmentRecord) -> float:
    """Raw bytes one row of a segment takes: its id, delta and every per-row column."""
    if rec.rows == 0:
        return 0.0
    return (rec.raw_bytes - 8 * rec.drops) / rec.rows


def growth_counters(raw: bytes | None) -> dict[str, int]:
    """``meta/growth``: bytes written by commits and by compactions, compactions made."""
    out = {"commit_bytes": 0, "compaction_bytes": 0, "compactions": 0, "compacted_rows": 0}
    if raw is None:
        return out
    rec = parse_record(raw, "the growth counters")
    for k in out:
        v = rec.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CorruptStoreError(f"the growth counters record has {k}={v!r}")
        out[k] = v
    return out


def _bump(w: Writer, **add: int) -> None:
    txn, dbs = w.txn, w.dbs
    raw = txn.get(META_GROWTH, db=dbs[DB_META])
    counters = growth_counters(raw)
    if raw is None:  # a store older than the counters: what its segments hold is all we know
        counters["commit_bytes"] = sum(
            int(parse_record(v, "a segment").get("stored_bytes", 0))
            for _, v in txn.cursor(db=dbs[DB_SEGMENTS])
        )
    for k, v in add.items():
        counters[k] += int(v)
    w.put_record(DB_META, META_GROWTH, counters)


def count_commit_bytes(w: Writer, stored_bytes: int) -> None:
    """Called inside a commit's LMDB transaction: the bytes its segment took on disk."""
    _bump(w, commit_bytes=stored_bytes)


def amplification(
    records: dict[int, SegmentRecord], live_rows: dict[int, int], counters: dict[str, int]
) -> dict[str, Any]:
    """Space and write amplification (module doc) from segment records, HEAD's live rows per
    segment and the growth counters."""
    stored = sum(r.stored_bytes for r in records.values())
    live = sum(_row_raw_bytes(records[s]) * n for s, n in live_rows.items() if s in records)
    written = counters["commit_bytes"]
    return {
        "segment_bytes_stored": stored,
        "live_bytes": int(live),
        "space_amplification": (stored / live) if live else None,
        "commit_bytes_written": written,
        "compaction_bytes_written": counters["compaction_bytes"],
        "write_amplification": (
            (written + counters["compaction_bytes"]) / written if written else None
        ),
        "compactions": counters["compactions"],
    }


def _columns(rec: SegmentRecord) -> tuple[tuple[str, int], ...]:
    """The per-row columns a segment declares, with their widths: every checksummed array
    but ``ids`` and ``drops``, so columns added later (usage statistics) are carried too."""
    out = []
    for col in sorted(rec.checksums):
        if col in (SEGMENT_IDS, SEGMENT_DROPS):
            continue
        width = rec.dim if col == SEGMENT_DELTAS else getattr(rec, f"{col}_width", None)
        if not isinstance(width, int):
            raise CorruptStoreError(f"segment {rec.name} holds a column {col!r} of no known width")
        out.append((col, width))
    return tuple(out)


# -- planning ----------------------------------------------------------------------------------


def plan(
    records: dict[int, SegmentRecord], live: dict[int, int], *, target: float
) -> list[list[int]]:
    """Source segments to compact, in groups of one layout (same per-row columns), worst first.

    A segment is worth rewriting when its stored bytes exceed ``target`` times its live rows'
    raw bytes (superseded rows, or a small commit's metadata). Segments are taken by how much
    they waste until the projected amplification of the live segments falls to ``target``:
    rewriting the most wasteful first frees the most bytes per byte written."""
    scored = []
    stored_live = 0.0
    live_bytes = 0.0
    for s, n in live.items():
        rec = records.get(s)
        if rec is None:
            continue
        lb = _row_raw_bytes(rec) * n
        stored_live += rec.stored_bytes
        live_bytes += lb
        if rec.stored_bytes > target * lb:
            scored.append((rec.stored_bytes - lb, s, lb))
    if not live_bytes:
        return []
    scored.sort(reverse=True)
    chosen = []
    for waste, s, _lb in scored:
        if stored_live <= target * live_bytes:
            break
        chosen.append(s)
        stored_live -= waste
    groups: dict[tuple[tuple[str, int], ...], list[int]] = {}
    for s in chosen:
        groups.setdefault(_columns(records[s]), []).append(s)
    # One whole segment rewritten alone would come out as it went in.
    return [sorted(g) for g in groups.values() if len(g) > 1 or live[g[0]] < records[g[0]].rows]


# -- compacting --------------------------------------------------------------------------------


@dataclass
class CompactResult:
    """What a compaction did (``commits`` empty: nothing was worth rewriting)."""

    commits: list[int] = field(default_factory=list)
    source_segments: list[int] = field(default_factory=list)
    new_segments: list[int] = field(default_factory=list)
    rows_moved: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    gc: dict[str, Any] | None = None
    head: int = 0
    index: LayeredIndex = field(default_factory=LayeredIndex.empty, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "commits": self.commits,
            "source_segments": self.source_segments,
            "new_segments": self.new_segments,
            "rows_moved": self.rows_moved,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "before": self.before,
            "after": self.after,
            "gc": self.gc,
            "head": self.head,
        }


def figures(store: Any, index: LayeredIndex) -> dict[str, Any]:
    counters = store.read(lambda txn: growth_counters(txn.get(META_GROWTH, db=store.db(DB_META))))
    return amplification(store.segment_records(), index.live_rows(), counters)


def _batches(
    group: list[int], records: dict[int, SegmentRecord], live: dict[int, int]
) -> list[list[int]]:
    out: list[list[int]] = [[]]
    size = 0.0
    for s in group:
        b = _row_raw_bytes(records[s]) * live[s]
        if out[-1] and size + b > MAX_BATCH_BYTES:
            out.append([])
            size = 0.0
        out[-1].append(s)
        size += b
    return out


def compact(
    store: Any,
    index: LayeredIndex,
    head: int,
    *,
    target: float = 1.1,
    progress: Callable[[int, int], None] | None = None,
    collect: bool = True,
    segments: list[int] | None = None,
    placement: Placement | None = None,
) -> CompactResult:
    """Compact the store at HEAD ``head`` (whose row index is ``index``) until the live
    segments' stored bytes are at most ``target`` times their live bytes, then (``collect``)
    run ``gc`` by the store's retention policy. ``progress(done, total)`` counts rows moved.
    ``segments``: rewrite the live rows of exactly these segments instead (``dpsn repair``
    moves the intact rows out of damaged segments so that gc can remove them).
    ``placement``: given the sorted ids of a new segment, the order to write them in (co-use
    statistics' ``CoUse.placement``): rows that fire together then share chunks."""
    store.require_writer()
    records = store.segment_records()
    live = index.live_rows()
    result = CompactResult(head=head, index=index)
    result.before = figures(store, index)
    if segments is None:
        groups = plan(records, live, target=target)
    else:
        chosen: dict[tuple[tuple[str, int], ...], list[int]] = {}
        for s in sorted(set(segments)):
            if live.get(s) and s in records:
                chosen.setdefault(_columns(records[s]), []).append(s)
        groups = list(chosen.values())
    batches = [b for g in groups for b in _batches(g, records, live)]
    total = sum(live[s] for b in batches for s in b)
    done = 0
    if progress is not None:
        progress(0, total)
    for batch in batches:
        record, index, seg, read = _compact_one(store, index, head, batch, records, placement)
        head = record.id
        result.commits.append(record.id)
        result.source_segments += batch
        result.new_segments.append(seg.id)
        result.rows_moved += seg.rows
        result.bytes_read += read
        result.bytes_written += seg.stored_bytes
        done += seg.rows
        if progress is not None:
            progress(done, total)
    result.head, result.index = head, index
    if collect and result.commits:
        from ._retention import collect as run_gc

        result.gc = run_gc(store, index=index, head=head)
    result.after = figures(store, index)
    return result


def _compact_one(
    store: Any,
    index: LayeredIndex,
    head: int,
    sources: list[int],
    records: dict[int, SegmentRecord],
    placement: Placement | None = None,
) -> tuple[Commit, LayeredIndex, SegmentRecord, int]:
    """One compaction commit: the live rows of ``sources`` (one layout) into a new segment,
    in id order, or in ``placement``'s order (a placed segment, format 4: ``_placement.py``)."""
    maintenance = store.begin_maintenance()
    dbs = maintenance.dbs
    parent = store.commit_record(head)
    if store.head() != head:
        raise CorruptStoreError(f"{store.root}: HEAD moved from {head} under the writer lock")
    # The live rows of the sources: those of each source's ids the index still points there
    # (read per segment, so a compaction walks its sources, not the whole index).
    found = []
    for s in sources:
        sids = store.segments.read_column(records[s], SEGMENT_IDS)
        has, seg_of, off_of, com_of = index.lookup(sids)
        here = has & (seg_of == s)
        found.append((sids[here], seg_of[here], off_of[here], com_of[here]))
    ids, old_seg, old_off, old_commit = (np.concatenate(c) for c in zip(*found, strict=True))
    by_id = np.argsort(ids, kind="stable")
    ids, old_seg, old_off, old_commit = (c[by_id] for c in (ids, old_seg, old_off, old_commit))
    n = len(ids)
    layout = _columns(records[sources[0]])
    cols: dict[str, np.ndarray] = {}
    read = 0
    for s in sources:
        rec = records[s]
        if _columns(rec) != layout:
            raise CorruptStoreError("internal error: one compaction batch mixes segment layouts")
        sel = np.flatnonzero(old_seg == s)
        if rec.placed:  # rows in co-use order (format 4): read by offset, put back by id
            sel = sel[np.argsort(old_off[sel], kind="stable")]
        off = old_off[sel]
        if len(off) and (int(off.max()) >= rec.rows or bool(np.any(np.diff(off) <= 0))):
            raise CorruptStoreError(
                f"{store.root}: the index points outside segment {rec.name} or out of order; "
                "the store is damaged: run `dpsn verify`"
            )
        read += rec.stored_bytes
        for col, _width in layout:
            block = store.segments.gather(rec, off, col)
            if col not in cols:
                cols[col] = np.empty((n, *block.shape[1:]), dtype=block.dtype)
            cols[col][sel] = block
    perm = place(ids, placement)
    placed = perm is not None
    if perm is not None:  # the rows in co-use order; every column (and the old entries) alike
        ids, old_seg, old_off, old_commit = (c[perm] for c in (ids, old_seg, old_off, old_commit))
        cols = {c: v[perm] for c, v in cols.items()}
    commit_id = head + 1
    segment_id = maintenance.next_segment()
    extra = {c: v for c, v in cols.items() if c != SEGMENT_DELTAS}
    seg = store.segments.write(
        segment_id,
        commit_id,
        ids,
        cols[SEGMENT_DELTAS],
        _EMPTY,
        chunk_rows=min(store.manifest.chunk_rows, max(1, n)),
        placed=placed,
        **extra,
    )
    removed = int(rows_hash(ids, old_seg, old_off, old_commit).sum(dtype=np.uint64))
    new_off = np.arange(n, dtype=np.int64)
    added = int(
        rows_hash(ids, np.full(n, segment_id), new_off, np.full(n, commit_id)).sum(dtype=np.uint64)
    )
    values = np.empty(n, dtype=ROW_VALUE_DTYPE)
    values["segment"] = segment_id
    values["offset"] = new_off
    values["commit"] = commit_id
    keys = np.ascontiguousarray(ids, dtype=">u8").view("V8").tolist()
    items = list(zip(keys, values.view(f"V{ROW_VALUE.size}").tolist(), strict=True))
    info = {
        "sources": sources,
        "rows": n,
        "bytes_read": read,
        "bytes_written": seg.stored_bytes,
    }
    record = replace(
        parent,
        id=commit_id,
        parent=head,
        time=time.time(),
        message="compact",
        rows_written=n,
        rows_dropped=0,
        segment=segment_id,
        stats={"compaction": info},
        index_digest=None,
    )

    def flip(txn: lmdb.Transaction) -> Commit:
        w = Writer(txn, dbs)
        if read_u64(txn.get(META_HEAD, db=dbs[DB_META]), "head") != head:
            raise CorruptStoreError(f"{store.root}: HEAD moved under the writer lock")
        rows = w.digests[DB_ROWS]
        if rows.count != len(index):
            raise CorruptStoreError(
                f"{store.root}: the LMDB row index holds {rows.count} rows but the writer's "
                f"copy {len(index)}; nothing was compacted"
            )
        rows.remove(removed, n)
        rows.add(added, n)
        if items:
            txn.cursor(db=dbs[DB_ROWS]).putmulti(items, dupdata=False, overwrite=True)
        _bump(w, compaction_bytes=seg.stored_bytes, compactions=1, compacted_rows=n)
        if placed:
            raise_format(txn, dbs[DB_META], w)
        w.put_record(DB_SEGMENTS, u64_key(segment_id), seg.to_json())
        w.put(DB_META, META_NEXT_SEGMENT, u64_key(segment_id + 1))
        final = replace(record, index_digest=rows.total)
        w.put_record(DB_COMMITS, u64_key(commit_id), final.to_json())
        w.put(DB_META, META_HEAD, u64_key(commit_id))
        w.finish()
        return final

    try:
        final = maintenance.write(flip)
    except BaseException:
        store.segments.remove(segment_id)
        raise
    after = index.apply(ids, segment_id, commit_id, _EMPTY)
    return final, store.maintain_runs(after, final), seg, read


def maybe_compact(
    store: Any, index: LayeredIndex, head: int, policy: Any, placement: Placement | None = None
) -> CompactResult | None:
    """The automatic trigger after a commit: compact when the live segments hold more than
    ``policy.compact_above`` times the live bytes (and at least ``compact_min_bytes``), down to
    halfway between 1 and the threshold, so that the next trigger is some commits away (write
    amplification stays modest: a segment is rewritten only once it is mostly waste)."""
    above = policy.compact_above
    if above is None:
        return None
    records = store.segment_records()
    total = sum(r.stored_bytes for r in records.values())
    if total < policy.compact_min_bytes or not len(index):
        return None
    # A cheap bound first (no pass over the index): every segment's bytes against the live
    # rows at the newest segment's row size. Most commits stop here.
    newest = max((r for r in records.values() if r.rows), key=lambda r: r.id, default=None)
    if newest is None or total <= above * len(index) * _row_raw_bytes(newest) * 0.9:
        return None
    live = index.live_rows()
    stored_live = sum(records[s].stored_bytes for s in live if s in records)
    if stored_live < policy.compact_min_bytes:
        return None
    live_bytes = sum(_row_raw_bytes(records[s]) * n for s, n in live.items() if s in records)
    if not live_bytes or stored_live <= above * live_bytes:
        return None
    try:
        return compact(store, index, head, target=1.0 + (above - 1.0) / 2, placement=placement)
    except StoreFullError:
        return None  # the commit itself is durable; compaction waits for space
