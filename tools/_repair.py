"""``dpsn repair``: what ``dpsn verify``'s advice comes down to, in one command that ends with a
clean verify where that is possible without losing committed data that is still intact.

1. Find the damaged chunks of every segment (checksums, decoding).
2. Drop the rows HEAD reads from a damaged chunk, in one commit: they read their procedural
   base again (their learned deltas are lost; they were unreadable anyway).
3. Move HEAD's intact rows out of the damaged segments (a compaction of exactly those
   segments), so that no row HEAD reads lives in one.
4. gc with only HEAD kept (older commits that read the damaged segments cannot be rebuilt
   anyway), which removes the damaged segments unless a snapshot pins them.
0. Delete damaged co-use statistics (``couse/``: advice, not data; a pool cannot open over them).
5. verify again. Snapshots that still pin a damaged segment are named, with the command that
   deletes them; repair never deletes a snapshot itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dpsn.errors import DpsnError


def scan(store: Any) -> tuple[set[int], set[int], set[int]]:
    """(damaged segment ids, row ids in damaged chunks, segments whose ids are unreadable)."""
    bad_segments: set[int] = set()
    bad_rows: set[int] = set()
    unreadable: set[int] = set()
    for sid, rec in store.segment_records().items():
        try:
            errors = store.segments.damaged_chunks(rec)
        except DpsnError:
            errors = None
        if errors == []:
            continue
        bad_segments.add(sid)
        if errors is None or any(not e.rows for e in errors):
            unreadable.add(sid)
        for e in errors or ():
            bad_rows.update(e.rows)
    return bad_segments, bad_rows, unreadable


def repair(path: str | Path) -> dict[str, Any]:
    """Repair the store at ``path`` (module doc); what was done, and whether verify is clean."""
    import dpsn
    from dpsn.store import PersistedStore, couse_file

    path = Path(path)
    store = PersistedStore.open(path, writable=True)
    try:
        couse_dropped = couse_file.drop_damaged(path, store.manifest.rows)
        bad_segments, bad_rows, unreadable = scan(store)
        head, index = store.load_head()
        ids = np.array(sorted(bad_rows), dtype=np.int64)
        had, seg, _, _ = index.lookup(ids)
        in_bad = had & np.isin(seg, np.array(sorted(bad_segments), dtype=np.int64))
        drop = ids[in_bad]
        if unreadable:  # which rows a chunk held is unknown: HEAD's rows in those segments
            lost = np.isin(index.segment, np.array(sorted(unreadable), dtype=np.int64))
            drop = np.union1d(drop, index.ids[lost])
    finally:
        store.close()
    out: dict[str, Any] = {
        "damaged_segments": len(bad_segments),
        "rows_dropped": 0,
        "rows_moved": 0,
        "unreadable_segments": sorted(unreadable),
        "couse_dropped": couse_dropped,
    }
    if not bad_segments:
        out.update(verify_ok=True, pinned_by_snapshots=[])
        return out
    if len(drop):
        with dpsn.open(path, "r+", cache_rows=0) as pool:
            pool.drop(drop)
            c = pool.commit(f"repair: drop {len(drop)} row(s) of damaged chunks")
        out["rows_dropped"] = c.rows_dropped
    store = PersistedStore.open(path, writable=True)
    try:
        head, index = store.load_head()
        moved = store.compact(index, head, segments=sorted(bad_segments), collect=False)
        out["rows_moved"] = moved.rows_moved
        store.gc(keep_last=1, keep_within=None)
        pinned = []
        for name, rec in store.snapshots().items():
            segs = set(store.read_pinned(name, rec).segments().tolist())
            if segs & bad_segments:
                pinned.append(name)
        out["pinned_by_snapshots"] = sorted(pinned)
        report = store.verify()
    finally:
        store.close()
    out["verify_ok"] = report.ok
    out["problems"] = report.problems
    return out
