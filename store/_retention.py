"""Retention and ``gc``: which history a store keeps, and removing the rest.

Anchors: Iceberg / Delta Lake table maintenance (expire snapshots by age or count, then remove
the files no kept snapshot names) and LMDB's MVCC (nothing a live reader sees is reclaimed).

What is kept (``_policy.py`` says how the window is set):

- HEAD, every named snapshot (their pinned indexes), and the *window*: every commit from the
  oldest one the policy keeps up to HEAD;
- while a reader in any process holds a commit (``_leases.py``), every segment written up to
  that commit: the reader reads the layout it loaded, which compaction may have rewritten;
- a commit in the window is rebuilt by replaying the segments of the commits after a *base*
  (an index written out, like a snapshot's) over it. ``gc`` writes the base of the window's
  oldest commit (the ``checkpoint``, ``meta/checkpoint``, arrays under ``snapshots/``), so the
  segments of older commits can go: only those the base's index points at, those of the
  window's commits and those snapshots pin are needed;
- generator and router versions of every kept commit.

``gc`` decides with the leases it read, then, in ONE LMDB transaction, forgets the segments it
removes and records the new checkpoint; files are deleted only after that, and only if no
reader appeared meanwhile (``_leases.py``). A crash at any point leaves at worst unreferenced
files, which the next ``gc`` removes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lmdb
import numpy as np
import xxhash

from dpsn.errors import CorruptStoreError, SnapshotUnavailableError

from ._format import DB_META, DB_SEGMENTS, SNAPSHOT_COLUMNS, ZARR_DIR, u64_key
from ._leases import live_readers
from ._policy import META_MAINTENANCE, MaintenancePolicy
from ._records import Commit, Writer, is_compaction, parse_record, snapshot_record
from ._rowindex import RowIndex

__all__ = [
    "META_CHECKPOINT",
    "base_index",
    "collect",
    "read_policy",
    "representative",
    "retained_from",
    "write_policy",
]

META_CHECKPOINT = b"checkpoint"
_UNSET: Any = object()


# -- the policy record -------------------------------------------------------------------------


def read_policy(store: Any) -> MaintenancePolicy:
    """The store's retention and compaction policy (the default one if none was set)."""
    raw = store.read(lambda txn: txn.get(META_MAINTENANCE, db=store.db(DB_META)))
    if raw is None:
        return MaintenancePolicy()
    return MaintenancePolicy.from_json(parse_record(raw, "the maintenance policy"))


def write_policy(store: Any, policy: MaintenancePolicy) -> None:
    """Record ``policy`` as the store's, in one LMDB transaction (needs the writer lock)."""
    maintenance = store.begin_maintenance()

    def put(txn: lmdb.Transaction) -> None:
        w = Writer(txn, maintenance.dbs)
        w.put_record(DB_META, META_MAINTENANCE, policy.to_json())
        w.finish()

    maintenance.write(put)


# -- the window --------------------------------------------------------------------------------


def representative(log: list[Commit], commit: int) -> int:
    """The newest commit that holds exactly ``commit``'s rows: ``commit`` itself, or the last
    of the compaction commits that follow it directly (they change no row). Keeping that one
    keeps ``commit``'s view, without the segments compaction rewrote."""

    by_id = {c.id: c for c in log}
    rep = commit
    while rep + 1 in by_id and is_compaction(by_id[rep + 1]):
        rep += 1
    return rep


def retained_from(log: list[Commit], policy: MaintenancePolicy, now: float) -> int:
    """The oldest commit the policy keeps (HEAD's id when it keeps only HEAD); a commit
    followed by compactions is kept through the last of them (:func:`representative`)."""

    head = log[-1].id
    oldest = head
    if policy.keep_last is not None:
        made = [c.id for c in log if not is_compaction(c) and c.id != 1]
        if made:
            oldest = min(oldest, made[max(0, len(made) - policy.keep_last)])
        else:
            oldest = min(oldest, log[0].id)
    if policy.keep_within is not None:
        young = [c.id for c in log if c.time >= now - policy.keep_within]
        if young:
            oldest = min(oldest, young[0])
    return representative(log, oldest)


def checkpoint_record(store: Any) -> dict[str, Any] | None:
    raw = store.read(lambda txn: txn.get(META_CHECKPOINT, db=store.db(DB_META)))
    if raw is None:
        return None
    return snapshot_record(parse_record(raw, "the history checkpoint"), "checkpoint")


def base_index(store: Any, commit: int) -> tuple[int, RowIndex]:
    """The newest written-out index at or before ``commit`` (the checkpoint or a snapshot's),
    to replay from; ``(1, empty)`` when there is none (replay from the store's creation)."""
    best: tuple[int, str, dict[str, Any]] | None = None
    cp = checkpoint_record(store)
    if cp is not None and cp["commit"] <= commit:
        best = (cp["commit"], "checkpoint", cp)
    for name, rec in store.snapshots().items():
        if rec["commit"] <= commit and (best is None or rec["commit"] > best[0]):
            best = (rec["commit"], name, rec)
    if best is None:
        return 1, RowIndex.empty()
    return best[0], store.read_pinned(best[1], best[2])


# -- gc ----------------------------------------------------------------------------------------


def collect(
    store: Any,
    *,
    index: RowIndex | None = None,
    head: int | None = None,
    keep_last: Any = _UNSET,
    keep_within: Any = _UNSET,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Remove what no kept commit needs (module doc). ``keep_last`` / ``keep_within`` override
    the store's policy for this call; ``head``: HEAD as the caller knows it (checked against
    LMDB); ``index`` is not used (what HEAD needs is read from LMDB), kept for callers.

    A dry run changes nothing, so it needs no writer lock: on a store opened read-only it
    leaves its own reader lease out of the count. The result's ``"pinned"`` says what keeps
    segments that HEAD does not read: each snapshot, the retention window and live readers
    (segments and stored bytes each holds; a segment two of them hold counts for both)."""
    own_lease = getattr(getattr(store, "_lease", None), "path", None)
    if not dry_run:
        store.require_writer()
    policy = read_policy(store)
    overrides = {}
    if keep_last is not _UNSET:
        overrides["keep_last"] = keep_last
    if keep_within is not _UNSET:
        overrides["keep_within"] = keep_within
    policy = policy.with_(**overrides)
    now = time.time() if now is None else now
    readers = live_readers(
        store.root,
        remove_dead=not dry_run,
        skip=own_lease.name if own_lease is not None else None,
        fs=store.fs,
    )
    # What HEAD's rows are in is read from LMDB and checked against HEAD's digests, never
    # taken from a derived file (the run set's rows per segment) or the caller's index: gc
    # deletes what this says is not needed (issue 21).
    lmdb_head, truth = store.load_flat_head()
    if head is not None and head != lmdb_head:
        raise CorruptStoreError(f"{store.root}: HEAD moved from {head} to {lmdb_head} under gc")
    head = lmdb_head
    log = store.log()
    if not log or log[-1].id != head:
        raise CorruptStoreError(f"{store.root}: HEAD {head} is not the newest commit in the log")
    snaps = store.snapshots()
    pinned = {r["commit"] for r in snaps.values()}
    by_id = {c.id: c for c in log}
    oldest = retained_from(log, policy, now)
    held = sorted(c for c in readers.commits if c in by_id and c not in pinned)
    if any(c not in by_id for c in readers.commits):
        # A lease naming no commit of the log (damage, or a reader of a newer HEAD than this
        # gc saw): keep all that any commit up to HEAD wrote.
        held.append(head)
    records = store.segment_records()
    keep = set(np.unique(truth.segment).tolist())
    head_segments = set(keep)
    holders: dict[str, set[int]] = {}
    if held:
        # A reader holds the exact layout it loaded, which compaction may have rewritten
        # since: keep every segment written up to the newest commit a reader holds.
        holders[f"readers at commit(s) {', '.join(map(str, held))}"] = {
            s for s, r in records.items() if r.commit <= held[-1]
        }
        keep |= holders[f"readers at commit(s) {', '.join(map(str, held))}"]
    for name, rec in snaps.items():
        segs = set(store.read_pinned(name, rec).segments().tolist())
        holders[f"snapshot {name!r} (commit {rec['commit']})"] = segs
        keep |= segs
    runs_from = store.runs_commit()
    if runs_from is not None:
        # An opener replays the commits after the row index's run set from their segments.
        replayed = {c.segment for c in log if runs_from < c.id <= head and c.segment is not None}
        holders[f"commits {runs_from + 1}..{head}, replayed at open over the row index"] = replayed
        keep |= replayed
    cp = checkpoint_record(store)
    new_cp: dict[str, Any] | None = None
    base: RowIndex | None = None
    if oldest < head:
        # The window's base: the oldest kept commit's index, written out (unless a snapshot
        # pins that very commit). A commit older than the last base can no longer be rebuilt.
        floor = cp["commit"] if cp is not None else 1
        oldest = max(oldest, floor)
        try:
            base = store.load_index(oldest)
        except SnapshotUnavailableError:
            # Older history is already gone (a narrower policy ran before): keep what is left.
            base_commit, base = base_index(store, head)
            oldest = base_commit
        if oldest not in pinned and oldest != 1 and (cp is None or cp["commit"] != oldest):
            new_cp = {"commit": oldest, "rows": len(base)}
        window = set(base.segments().tolist())
        window |= {c.segment for c in log if oldest < c.id <= head and c.segment is not None}
        holders[f"retention window (commits {oldest}..{head})"] = window
        keep |= window
    kept_commits = {head, *pinned, *held, *(c.id for c in log if oldest <= c.id <= head)}
    dead = sorted(set(records) - keep)
    orphans = sorted(set(store.segments.on_disk()) - set(records))
    partials = list((store.root / ZARR_DIR).rglob("*.partial"))
    cp_commit = new_cp["commit"] if new_cp else (cp["commit"] if cp and oldest < head else None)
    maintenance = store.begin_maintenance()
    stale = maintenance.unreferenced_versions(kept_commits, checkpoint=cp_commit)
    result: dict[str, Any] = {
        "removed_segments": dead,
        "orphan_segments": orphans,
        "partial_files": len(partials),
        "stale_versions": [str(d.relative_to(store.root)) for d in stale],
        "freed_bytes": 0,
        "dry_run": dry_run,
        "kept_from": oldest,
        "kept_commits": len(kept_commits),
        "reader_commits": sorted(readers.commits),
        "deferred": False,
        "pinned": _pinned(holders, head_segments, records),
    }
    if dry_run:
        return result
    if new_cp is not None and base is not None:
        columns = {
            col: np.ascontiguousarray(getattr(base, col), dtype="<i8") for col in SNAPSHOT_COLUMNS
        }
        new_cp["xxh64"] = {c: xxhash.xxh64_intdigest(d.data) for c, d in columns.items()}
        new_cp["time"] = now
        final = maintenance.snapshot_dir(new_cp["commit"])
        if not (
            final.is_dir() and maintenance.snapshot_arrays_ok(final, len(base), new_cp["xxh64"])
        ):
            maintenance.write_snapshot_arrays(final, columns)
    drop_cp = cp is not None and cp_commit is None

    def forget(txn: lmdb.Transaction) -> None:
        w = Writer(txn, maintenance.dbs)
        for s in dead:
            w.delete(DB_SEGMENTS, u64_key(s))
        if new_cp is not None:
            w.put_record(DB_META, META_CHECKPOINT, new_cp)
        elif drop_cp:
            w.delete(DB_META, META_CHECKPOINT)
        w.finish()

    if dead or new_cp is not None or drop_cp:
        maintenance.write(forget)
    after = live_readers(store.root, fs=store.fs)
    if after.choosing or not after.names <= readers.names:
        # A reader arrived while gc decided: it may hold what gc just forgot. Leave the files
        # (unreferenced now: the next gc removes them once no reader is choosing).
        result["deferred"] = True
        return result
    if after.names:
        # A record-less segment may be one a live reader still reads (its record forgotten by
        # a gc that deferred): leftovers wait until no reader is open.
        orphans = []
        result["orphan_segments"] = []
    freed = 0
    for d in stale:
        freed += _tree_bytes(d)
        store.fs.rmtree(d, ignore_errors=True)
    doomed = dead + orphans
    for done, s in enumerate(doomed, 1):
        freed += store.segments.remove(s)
        if progress is not None:
            progress(done, len(doomed))
    for p in partials:
        try:
            freed += p.stat().st_size
        except OSError:
            continue
        store.fs.unlink(p, missing_ok=True)
    result["freed_bytes"] = freed
    return result


def _pinned(
    holders: dict[str, set[int]], head_segments: set[int], records: dict[int, Any]
) -> list[dict[str, Any]]:
    """What each holder keeps beyond the segments HEAD reads: its segments and stored bytes."""
    out = []
    for what, segs in holders.items():
        extra = sorted(s for s in segs - head_segments if s in records)
        if extra:
            stored = sum(records[s].stored_bytes for s in extra)
            out.append({"by": what, "segments": len(extra), "stored_bytes": stored})
    return out


def _tree_bytes(path: Any) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
