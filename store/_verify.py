"""``verify``: check everything a store holds, and report; never raise for damage.

Why a separate pass rather than the checks reads make: reads check what they touch, when they
touch it; ``verify`` must find damage a read would only meet later (an old snapshot, a segment
only ``gc`` reads, a generator version only a past commit uses) and damage no read notices but
that changes what ``info``, ``log`` or ``gc`` say. It reads every LMDB database in one read
transaction and recomputes their digests, cross-checks the records with each other, with the
manifest and with the Zarr arrays, and re-reads every chunk. It needs neither torch nor a
generator or router module: routers are checked by their manifests' digests, shapes and
codecs, and generator weights by their shapes and checksums.

Each step runs on its own: a step that cannot run (because what it needs is damaged) is itself
reported, and the others still run. A malformed record is a problem in the report, never a
``KeyError``, ``TypeError`` or ``RecursionError`` out of ``verify``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import lmdb
import numpy as np

from dpsn.errors import CorruptSegmentError, DpsnError

from . import couse_file
from ._compact import META_GROWTH, growth_counters
from ._digest import DbDigest, entry_hash
from ._files import read_regular
from ._format import (
    DB_COMMITS,
    DB_META,
    DB_ROWS,
    DB_SEGMENTS,
    DB_SNAPSHOTS,
    FORMAT_LIFECYCLE,
    FORMAT_PLACED,
    FORMAT_VERSION,
    GENERATOR_GROUP,
    MAX_COMMIT_ID,
    META_DIGESTS,
    META_FORMAT,
    META_GENERATOR_PREFIX,
    META_HEAD,
    META_NEXT_SEGMENT,
    ROUTERS_GROUP,
    ROW_VALUE_DTYPE,
    SEGMENT_DELTAS,
    SEGMENT_DROPS,
    SEGMENT_IDS,
    SEGMENT_STATE,
    SEGMENT_USAGE,
    SEGMENTS_GROUP,
    SNAPSHOTS_GROUP,
    ZARR_DIR,
)
from ._names import check_snapshot_name
from ._policy import META_MAINTENANCE, MaintenancePolicy
from ._records import (
    DIGESTED_DBS,
    Commit,
    VerifyReport,
    generator_record,
    is_compaction,
    parse_record,
    rows_digest_of,
    snapshot_record,
    stored_digests,
)
from ._retention import META_CHECKPOINT
from ._rowindex import TOMBSTONE, RowIndex
from ._runs import RUNS_DIR, RunsUnusableError, check_run_files, open_layers, read_runset
from ._segments import SegmentRecord
from .usage_fields import usage_problem

__all__ = ["verify_store"]

MAX_LISTED = 50  # problems of one kind listed one by one; past that, counted


class _UnreadableError(Exception):
    """A step found damage that makes the steps needing it unsafe to run (already reported)."""


class _Verifier:
    def __init__(self, store: Any, report: VerifyReport, progress: Callable[[int], None] | None):
        self.store = store
        self.report = report
        self.progress = progress
        self.m = store.manifest
        self.raw: dict[bytes, list[tuple[bytes, bytes]]] | None = None
        self.rows_keys = b""
        self.rows_values = b""
        self.txn_id = -1
        self.head: int | None = None
        self.next_segment: int | None = None
        self.index: RowIndex | None = None
        self.commits: dict[int, Commit] = {}
        self.segments: dict[int, SegmentRecord] = {}
        self.segment_ids: dict[int, np.ndarray] = {}
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.generators: set[int] = set()
        self.checkpoint: dict[str, Any] | None = None
        self.format_version: int | None = None
        self._counts: dict[str, int] = {}

    def problem(self, kind: str, text: str) -> None:
        n = self._counts.get(kind, 0) + 1
        self._counts[kind] = n
        if n <= MAX_LISTED:
            self.report.problems.append(text)
        elif n == MAX_LISTED + 1:
            self.report.problems.append(f"... more problems of the kind {kind!r} (see above)")

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    # -- steps ---------------------------------------------------------------------------------

    def lmdb_file(self) -> None:
        try:
            self.store.env.check_file(full=True)
        except DpsnError as e:
            self.problem("lmdb", str(e))
            raise _UnreadableError from e  # nothing may read LMDB pages past a failed walk

    def read_lmdb(self) -> None:
        """Every database in one read transaction: what the other steps check."""
        env = self.store.env

        def scan(txn: lmdb.Transaction) -> tuple[Any, ...]:
            out = {}
            for name in (DB_META, DB_COMMITS, DB_SEGMENTS, DB_SNAPSHOTS):
                out[name] = list(txn.cursor(db=env.dbs[name]))
            db = env.dbs[DB_ROWS]
            keys = b"".join(txn.cursor(db=db).iternext(keys=True, values=False))
            values = b"".join(txn.cursor(db=db).iternext(keys=False, values=True))
            return out, keys, values, txn.id()

        self.raw, self.rows_keys, self.rows_values, self.txn_id = env.read(scan)

    def digests(self) -> None:
        assert self.raw is not None
        meta = dict(self.raw[DB_META])
        try:
            stored = stored_digests(meta.get(META_DIGESTS))
        except DpsnError as e:
            self.problem("digests", f"the index digests cannot be checked: {e}")
            return
        if stored is None:
            keeping = sorted(c.id for c in self.commits.values() if c.index_digest is not None)
            if keeping:  # a dpsn that keeps digests wrote those commits: the entry was lost
                self.problem(
                    "digests",
                    f"the LMDB index has no meta/digests entry, but commit {keeping[-1]} was "
                    "written by a dpsn that keeps it: the index is damaged; restore the store "
                    "from a copy",
                )
                return
            self.note(
                "the LMDB index holds no digests (the store was written by a dpsn that did not "
                "keep them): the row index and records were checked one by one, not as a "
                "whole; the next commit records digests"
            )
            return
        txn, want = stored
        got: dict[bytes, DbDigest] = {}
        try:
            got[DB_ROWS] = rows_digest_of(self.rows_keys, self.rows_values)
        except DpsnError as e:
            self.problem("digests", str(e))
        for name in DIGESTED_DBS:
            if name == DB_ROWS:
                continue
            d = DbDigest()
            for k, v in self.raw[name]:
                if name == DB_META and k == META_DIGESTS:
                    continue
                d.add(entry_hash(k, v))
            got[name] = d
        if txn != self.txn_id:
            # A compacted copy (``mdb_copy -c``, the usual LMDB backup) renumbers transactions:
            # digests that still match every database say nothing changed since.
            if all(got.get(name) == want[name] for name in DIGESTED_DBS):
                self.note(
                    f"the index digests were recorded at LMDB transaction {txn} and the index "
                    f"is at {self.txn_id} (a compacted copy, such as mdb_copy -c, renumbers "
                    "them); they match every database"
                )
                return
            self.problem(
                "digests",
                f"the index digests were recorded at LMDB transaction {txn} but the index is at "
                f"{self.txn_id} and no longer matches them: a dpsn that does not keep them wrote "
                "to the store since, or the index is damaged. The next commit by this dpsn "
                "records them again.",
            )
            return
        for name in DIGESTED_DBS:
            if name in got and got[name] != want[name]:
                self.problem(
                    "digests",
                    f"the LMDB database {name.decode()!r} does not match its digest (it holds "
                    f"{got[name]!r}, the digest says {want[name]!r}): an entry was changed, lost "
                    "or added; the index is damaged: restore the store from a copy",
                )

    def meta(self) -> None:
        assert self.raw is not None
        for key, value in self.raw[DB_META]:
            if key == META_FORMAT:
                if len(value) != 8 or not 1 <= int.from_bytes(value, "big") <= FORMAT_VERSION:
                    self.problem("meta", f"meta/format_version is {value!r}")
                else:
                    self.format_version = int.from_bytes(value, "big")
            elif key == META_HEAD:
                if len(value) != 8:
                    self.problem("meta", "meta/head is not a u64")
                else:
                    self.head = int.from_bytes(value, "big")
            elif key == META_NEXT_SEGMENT:
                if len(value) != 8:
                    self.problem("meta", "meta/next_segment is not a u64")
                else:
                    self.next_segment = int.from_bytes(value, "big")
            elif key.startswith(META_GENERATOR_PREFIX):
                rest = key[len(META_GENERATOR_PREFIX) :]
                version = int.from_bytes(rest, "big")
                try:
                    if len(rest) != 8:
                        raise ValueError(f"a generator record has the key {key!r}")
                    generator_record(parse_record(value, f"generator {version}"), version)
                    self.generators.add(version)
                except (DpsnError, ValueError) as e:
                    self.problem("generator", str(e))
            elif key in (META_GROWTH, META_MAINTENANCE, META_CHECKPOINT):
                try:
                    if key == META_GROWTH:
                        growth_counters(value)
                    elif key == META_MAINTENANCE:
                        MaintenancePolicy.from_json(parse_record(value, "the maintenance policy"))
                    else:
                        self.checkpoint = snapshot_record(
                            parse_record(value, "the history checkpoint"), "checkpoint"
                        )
                except DpsnError as e:
                    self.problem("meta", f"meta/{key.decode()}: {e}")
            elif key != META_DIGESTS:
                self.note(f"meta holds a key this dpsn does not know: {key[:64]!r}")
        if self.head is None:
            self.problem("meta", "meta/head is missing")
        if self.next_segment is None:
            self.problem("meta", "meta/next_segment is missing")

    def commit_log(self) -> None:
        assert self.raw is not None
        for key, value in self.raw[DB_COMMITS]:
            if len(key) != 8:
                self.problem("commit", f"a commit has the key {key[:64]!r}, not a u64")
                continue
            cid = int.from_bytes(key, "big")
            try:
                rec = Commit.from_json(parse_record(value, f"commit {cid}"))
                if rec.id != cid:
                    raise ValueError(f"the record stored as commit {cid} says it is {rec.id}")
            except (DpsnError, ValueError) as e:
                self.problem("commit", f"commit {cid}: {e}")
                continue
            self.commits[cid] = rec
        ids = sorted(self.commits)
        n = len(self.raw[DB_COMMITS])
        if [int.from_bytes(k, "big") for k, _ in self.raw[DB_COMMITS]] != list(range(1, n + 1)):
            self.problem("commit", f"the commit log is not commits 1..{n} in order")
        if self.head is not None and self.head != n:
            self.problem("commit", f"HEAD is commit {self.head} but the log's newest commit is {n}")
        for cid in ids:
            rec = self.commits[cid]
            if rec.parent != (cid - 1 if cid > 1 else None):
                self.problem("commit", f"commit {cid} names {rec.parent} as its parent")
            if rec.generator not in self.generators:
                self.problem(
                    "commit", f"commit {cid} uses generator version {rec.generator}, not recorded"
                )

    def rows(self) -> None:
        keys, values = self.rows_keys, self.rows_values
        try:
            rows_digest_of(keys, values)  # sizes
        except DpsnError as e:
            self.problem("rows", str(e))
            return
        cols = np.frombuffer(values, dtype=ROW_VALUE_DTYPE)
        index = RowIndex(
            ids=np.frombuffer(keys, dtype=">u8").astype(np.int64),
            segment=cols["segment"].astype(np.int64),
            offset=cols["offset"].astype(np.int64),
            commit=cols["commit"].astype(np.int64),
        )
        self.index = index
        self.report.checked_rows = 0
        where = "the LMDB row index"
        self.index_problems(index, where, self.head or MAX_COMMIT_ID)
        head = self.commits.get(self.head) if self.head is not None else None
        if head is not None:
            if head.persisted_rows != len(index):
                self.problem(
                    "rows",
                    f"{where} holds {len(index)} rows but commit {head.id} recorded "
                    f"{head.persisted_rows}",
                )
            if head.index_digest is not None:
                got = rows_digest_of(keys, values).total
                if got != head.index_digest:
                    self.problem(
                        "rows", f"{where} does not match the digest commit {head.id} recorded"
                    )

    def index_runs(self) -> None:
        """The row index's run files (``_runs.py``): derived from LMDB, which openers fall back
        to, but a run file that lies would make reads find the wrong rows, so every byte is
        checked and the runs (with the commits since) must equal the LMDB index."""
        root, fix = self.store.root, f"remove {RUNS_DIR}/ (the next writer rebuilds it)"
        try:
            runset = read_runset(root, self.m.uuid, self.store.fs)
            if runset is None or self.index is None:
                return
            check_run_files(root, runset, self.store.fs)
            got = self.store.load_from_runs()
        except (RunsUnusableError, OSError) as e:
            self.problem("runs", f"the row index's run files cannot be used: {e}; {fix}")
            return
        if got is None:
            return
        head, flat = got[0], got[1].flat()
        same = head == self.head and all(
            np.array_equal(getattr(flat, c), getattr(self.index, c))
            for c in ("ids", "segment", "offset", "commit")
        )
        if not same:
            self.problem("runs", f"the row index's run files disagree with LMDB's; {fix}")
            return
        # Every other field of runs.json, against what the runs and LMDB say.
        if got[1].live != self.index.live_rows():
            self.problem("runs", f"runs.json's rows per segment disagree with LMDB's; {fix}")
        top = 0
        for layer in open_layers(root, runset, self.store.fs):
            alive = np.asarray(layer.commit)[np.asarray(layer.segment) != TOMBSTONE]
            top = max(top, int(alive.max()) if len(alive) else 0)
        if not top <= runset.newest <= runset.commit:
            self.problem(
                "runs",
                f"runs.json's newest commit {runset.newest} is not between the newest commit "
                f"its runs hold ({top}) and its own commit ({runset.commit}); {fix}",
            )

    def index_problems(self, index: RowIndex, where: str, head: int) -> None:
        ids = index.ids
        if len(ids) == 0:
            return
        if ids[0] < 0 or ids[-1] >= self.m.rows or np.any(ids[1:] <= ids[:-1]):
            self.problem("rows", f"{where} holds ids out of order or out of range")
        if int(index.commit.min()) < 2 or int(index.commit.max()) > head:
            self.problem("rows", f"{where} holds rows written by commits that do not exist")
        if int(index.offset.min()) < 0 or int(index.segment.min()) < 1:
            self.problem("rows", f"{where} holds rows that point at no segment")

    def segment_records(self) -> None:
        assert self.raw is not None
        for key, value in self.raw[DB_SEGMENTS]:
            sid = int.from_bytes(key, "big") if len(key) == 8 else -1
            try:
                if sid < 1:
                    raise ValueError(f"a segment has the key {key[:64]!r}")
                rec = SegmentRecord.from_json(parse_record(value, f"segment {sid:016x}"))
                if rec.id != sid:
                    raise ValueError(f"the record stored as segment {sid:016x} says {rec.id}")
            except (DpsnError, ValueError) as e:
                self.problem("segment", f"segment {sid:016x}: {e}")
                continue
            self.segments[sid] = rec
            c = self.commits.get(rec.commit)
            if c is None or c.segment != sid:
                self.problem(
                    "segment",
                    f"segment {rec.name} names commit {rec.commit}, which did not write it",
                )
            elif (c.rows_written, c.rows_dropped) != (rec.rows, rec.drops):
                self.problem(
                    "segment",
                    f"segment {rec.name} holds {rec.rows} rows and {rec.drops} drops but commit "
                    f"{c.id} recorded {c.rows_written} and {c.rows_dropped}",
                )
            if rec.dim != self.m.dim or rec.chunk_rows > self.m.chunk_rows:
                self.problem(
                    "segment",
                    f"segment {rec.name} has dim {rec.dim} and chunks of {rec.chunk_rows} rows; "
                    f"the manifest says dim {self.m.dim}, chunks of at most {self.m.chunk_rows}",
                )
            if self.next_segment is not None and sid >= self.next_segment:
                self.problem(
                    "segment", f"segment {rec.name} is not below next_segment {self.next_segment}"
                )

    def segment_data(self) -> None:
        segs = self.store.segments
        index = self.index
        for rec in self.segments.values():
            self.report.checked_segments += 1
            try:
                ids = segs.read_column(rec, SEGMENT_IDS)
                drops = segs.read_column(rec, SEGMENT_DROPS)
                self.segment_ids[rec.id] = ids
                if len(ids) and not ids_ok(ids, self.m.rows, placed=rec.placed):
                    what = "distinct ids" if rec.placed else "sorted ids"
                    self.problem("segment", f"segment {rec.name}: its ids are not {what}")
                if len(drops) and (
                    drops[0] < 0
                    or drops[-1] >= self.m.rows
                    or np.any(drops[1:] <= drops[:-1])
                    or np.isin(drops, ids).any()
                ):
                    self.problem("segment", f"segment {rec.name}: its drops are not sorted ids")
                bad_rows: set[int] = set()
                for key, _chunk, first, values in segs.iter_chunks(rec):
                    self.report.checked_chunks += 1
                    if key in (SEGMENT_DELTAS, SEGMENT_STATE):
                        at = first + np.flatnonzero(_non_finite_rows(values))
                        bad_rows.update(ids[at[at < len(ids)]].tolist())
                    del values  # one chunk in memory at a time (a hostile one may be large)
                if bad_rows:
                    self.problem(
                        "chunk",
                        f"segment {rec.name}: {len(bad_rows)} rows hold values that are not "
                        "finite (NaN or Inf) in their deltas or state; reads return them as "
                        "they are: write those rows again (pool.write) or drop them",
                    )
                    self.report.damaged_rows.extend(sorted(bad_rows))
                if rec.usage_width and rec.rows:
                    problem = usage_problem(segs.read_column(rec, SEGMENT_USAGE))
                    if problem is not None:
                        self.problem("chunk", f"segment {rec.name}: its usage statistics {problem}")
                        self.report.damaged_rows.extend(ids.tolist())
                self.report.checked_rows += rec.rows
            except CorruptSegmentError as e:
                self.problem("chunk", str(e))
                self.report.damaged_rows.extend(e.rows)
            except DpsnError as e:
                self.problem("chunk", f"segment {rec.name}: {e}")
            if self.progress is not None:
                self.progress(1)
        if index is not None:
            self.index_against_segments(index, "the LMDB row index")

    def index_against_segments(self, index: RowIndex, where: str) -> None:
        """Every row of ``index`` points at a recorded segment, inside it, at its own id, and
        names the commit that wrote that segment."""
        if len(index) == 0:
            return
        missing = sorted(set(index.segments().tolist()) - set(self.segments))
        for s in missing:
            self.problem("rows", f"{where}: rows point at segment {s:016x}, which has no record")
        for sid, rec in self.segments.items():
            mine = index.segment == sid
            if not mine.any():
                continue
            off = index.offset[mine]
            if np.any(index.commit[mine] != rec.commit) or np.any(off >= rec.rows):
                self.problem("rows", f"{where}: rows point outside segment {rec.name}")
                continue
            ids = self.segment_ids.get(sid)
            if ids is not None and not np.array_equal(ids[off], index.ids[mine]):
                self.problem("rows", f"segment {rec.name}: its ids disagree with {where}")

    def placed(self) -> None:
        """Placed segments (format 4) only in a store whose index says format 4."""
        placed = [r.name for r in self.segments.values() if r.placed]
        if placed and self.format_version is not None and self.format_version < FORMAT_PLACED:
            self.problem(
                "meta",
                f"meta/format_version is {self.format_version} but {len(placed)} segments hold "
                f"rows in co-use order (format {FORMAT_PLACED}); the index is damaged",
            )

    def couse(self) -> None:
        """Co-use statistics (``couse/``): each file pair parses and holds a valid sketch of
        ids in the pool's range; a damaged one is advice lost, not data (`dpsn repair`)."""
        root = self.store.root
        for commit in couse_file.saved(root / couse_file.DIR):
            try:
                problem = couse_file.check_arrays(couse_file.read_arrays(root, commit), self.m.rows)
            except DpsnError as e:
                problem = str(e)
            if problem is not None:
                self.problem(
                    "couse",
                    f"co-use statistics of commit {commit}: {problem}; `dpsn repair` deletes "
                    "them (statistics are advice: the pool starts a new sketch)",
                )

    def lifecycle(self) -> None:
        """Lifecycle data (format 2) only in a store that says it is format 2: a reader of
        format 1 would take FREE rows' stored deltas for their values, without their decay."""
        if self.format_version is None or self.format_version >= FORMAT_LIFECYCLE:
            return
        commits = [c.id for c in self.commits.values() if c.lifecycle is not None]
        usage = [r.name for r in self.segments.values() if r.usage_width]
        if commits or usage:
            self.problem(
                "meta",
                f"meta/format_version is {self.format_version} but the store holds lifecycle "
                f"data (format {FORMAT_LIFECYCLE}): {len(commits)} commits with a lifecycle "
                f"record, {len(usage)} segments with usage statistics; the index is damaged",
            )

    def snapshot_records(self) -> None:
        assert self.raw is not None

        for key, value in self.raw[DB_SNAPSHOTS]:
            try:
                name = check_snapshot_name(key.decode("utf-8"))
                record = snapshot_record(parse_record(value, f"snapshot {name!r}"), name)
            except (DpsnError, ValueError, UnicodeDecodeError) as e:
                self.problem("snapshot", f"snapshot {key[:64]!r}: {e}")
                continue
            self.snapshots[name] = record
            commit = self.commits.get(record["commit"])
            if commit is None:
                self.problem(
                    "snapshot",
                    f"snapshot {name!r} pins commit {record['commit']}, which is not in the log",
                )
                continue
            if record["rows"] != commit.persisted_rows:
                self.problem(
                    "snapshot",
                    f"snapshot {name!r} holds {record['rows']} rows but commit {commit.id} "
                    f"recorded {commit.persisted_rows}",
                )
                continue
            try:
                pinned = self.store.read_pinned(name, record)
            except DpsnError as e:
                self.problem("snapshot", str(e))
                continue
            self.index_against_segments(pinned, f"snapshot {name!r}")

    def manifest(self) -> None:
        if 1 not in self.commits or 1 not in self.generators:
            self.problem("manifest", "commit 1 or its generator record is missing")
            return
        try:
            self.store.check_manifest()
        except DpsnError as e:
            self.problem("manifest", str(e))

    def history(self) -> None:
        """Compaction commits change no row and no setting of their parent; the history
        checkpoint is the index of its commit; every commit from it up to HEAD can be
        rebuilt (the segments replay needs are recorded)."""
        for cid, rec in sorted(self.commits.items()):
            if not is_compaction(rec):
                continue
            parent = self.commits.get(cid - 1)
            if parent is None:
                continue
            same = (
                rec.persisted_rows == parent.persisted_rows
                and rec.rows_dropped == 0
                and rec.provenance == parent.provenance
                and rec.generator == parent.generator
                and rec.routers == parent.routers
            )
            if not same:
                self.problem(
                    "compaction", f"compaction commit {cid} changes what commit {cid - 1} holds"
                )
            seg = self.segments.get(rec.segment) if rec.segment is not None else None
            if seg is not None and (seg.drops or seg.rows != rec.rows_written or seg.commit != cid):
                self.problem(
                    "compaction", f"compaction commit {cid}: its segment {seg.name} does not fit it"
                )
        cp = self.checkpoint
        if cp is None or self.head is None:
            return
        commit = self.commits.get(cp["commit"])
        if commit is None or cp["rows"] != commit.persisted_rows:
            self.problem(
                "checkpoint",
                f"the history checkpoint names commit {cp['commit']} but does not match it",
            )
            return
        try:
            index = self.store.read_pinned("checkpoint", cp)
        except DpsnError as e:
            self.problem("checkpoint", str(e))
            return
        self.index_against_segments(index, "the history checkpoint")
        for cid in range(cp["commit"] + 1, self.head + 1):
            rec = self.commits.get(cid)
            if rec is not None and rec.segment is not None and rec.segment not in self.segments:
                self.problem(
                    "checkpoint",
                    f"commit {cid} is kept (after the checkpoint) but its segment "
                    f"{rec.segment:016x} is gone: it cannot be rebuilt",
                )

    def kept_commits(self) -> list[Commit]:
        keep = {self.head, *(r["commit"] for r in self.snapshots.values())}
        if self.checkpoint is not None and self.head is not None:
            keep |= set(range(self.checkpoint["commit"], self.head + 1))
        return [self.commits[c] for c in sorted(k for k in keep if k in self.commits)]

    def generator_data(self) -> None:
        try:
            self.store.generator_shapes()
        except DpsnError as e:
            self.problem("generator", str(e))
            return
        for version in sorted({c.generator for c in self.kept_commits()}):
            try:
                self.store.read_generator(version)
            except DpsnError as e:
                self.problem("generator", f"generator version {version}: {e}")

    def routers(self) -> None:
        from ._router_check import check_router

        for c in self.kept_commits():
            for name, r in sorted((c.routers or {}).items()):
                try:
                    check_router(
                        self.store.router_dir(name, r["version"]),
                        expected_digest=r["digest"],
                        fs=self.store.fs,
                    )
                except (DpsnError, ValueError) as e:
                    self.problem("router", f"router {name!r} of commit {c.id}: {e}")

    def protected(self) -> None:
        from ._protected import verify_protected

        rows = self.store.manifest.rows
        for problem in verify_protected(self.store.root, self.kept_commits(), rows, self.store.fs):
            self.problem("protected", problem)

    def zarr_groups(self) -> None:
        """The group metadata a writer opens (a damaged one would fail the next commit)."""
        root = self.store.root / ZARR_DIR
        for group in ("", SEGMENTS_GROUP, GENERATOR_GROUP, SNAPSHOTS_GROUP, ROUTERS_GROUP):
            path = root / group / "zarr.json" if group else root / "zarr.json"
            if not path.exists() and group:
                continue
            try:
                raw = json.loads(read_regular(path, 1 << 20, fs=self.store.fs))
                ok = isinstance(raw, dict) and raw.get("node_type") == "group"
            except (OSError, ValueError, RecursionError):
                ok = False
            if not ok:
                self.problem("zarr", f"{path} is not a zarr group's metadata: commits would fail")

    def leftovers(self) -> None:
        root = self.store.root / ZARR_DIR
        orphans = sorted(set(self.store.segments.on_disk()) - set(self.segments))
        if orphans:
            self.note(
                f"{len(orphans)} segment directories no record references (left by crashed "
                "commits, or by gc's forgetting them): `dpsn gc` removes them"
            )
        partial = sum(1 for _ in root.rglob("*.partial"))
        temporary = sum(1 for _ in root.rglob("*.tmp-*"))
        if partial or temporary:
            self.note(f"{partial + temporary} temporary files of interrupted writes: `dpsn gc`")


def verify_store(store: Any, progress: Callable[[int], None] | None = None) -> VerifyReport:
    report = VerifyReport()
    v = _Verifier(store, report, progress)
    steps = [
        ("the LMDB file", v.lmdb_file, ()),
        ("the LMDB index", v.read_lmdb, ("lmdb_file",)),
        ("meta", v.meta, ("read_lmdb",)),
        ("the commit log", v.commit_log, ("read_lmdb",)),
        ("the index digests", v.digests, ("read_lmdb",)),  # after the log: digests it names
        ("the manifest", v.manifest, ("read_lmdb",)),
        ("the row index", v.rows, ("read_lmdb",)),
        ("the row index's run files", v.index_runs, ("rows",)),
        ("segment records", v.segment_records, ("read_lmdb",)),
        ("segment data", v.segment_data, ("read_lmdb",)),
        ("the lifecycle", v.lifecycle, ("read_lmdb",)),
        ("placed segments", v.placed, ("segment_records",)),
        ("co-use statistics", v.couse, ()),
        ("snapshots", v.snapshot_records, ("read_lmdb",)),
        ("compactions and the history checkpoint", v.history, ("read_lmdb",)),
        ("generator weights", v.generator_data, ("read_lmdb",)),
        ("routers", v.routers, ("read_lmdb",)),
        ("protected rows", v.protected, ("read_lmdb",)),
        ("zarr groups", v.zarr_groups, ()),
        ("leftovers", v.leftovers, ()),
    ]
    failed: set[str] = set()
    for what, step, needs in steps:
        if failed & set(needs):
            failed.add(step.__name__)  # what needs a skipped step is skipped too
            continue
        try:
            step()
        except _UnreadableError:
            failed.add(step.__name__)
        except Exception as e:  # verify reports; whatever a damaged store does, never raise
            failed.add(step.__name__)
            report.problems.append(f"{what} cannot be checked: {type(e).__name__}: {e}")
    return report


def ids_ok(ids: np.ndarray, rows: int, *, placed: bool) -> bool:
    """A segment's ids column: ids in ``[0, rows)``, sorted and distinct (distinct in any
    order for a placed segment, format 4)."""
    if placed:
        ids = np.sort(ids)
    return not (ids[0] < 0 or ids[-1] >= rows or bool(np.any(ids[1:] <= ids[:-1])))


def _non_finite_rows(values: np.ndarray) -> np.ndarray:
    """Which rows of a chunk of deltas or state hold NaN or Inf (bfloat16 is stored as its
    uint16 bits: widened to float32 first)."""
    if values.dtype == np.uint16:
        values = (values.astype(np.uint32) << 16).view(np.float32)
    flat = values.reshape(len(values), -1)
    return ~np.isfinite(flat).all(axis=1)
