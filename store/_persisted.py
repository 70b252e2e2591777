"""The persisted tier: a store directory of one manifest, one LMDB index and one Zarr group.

``PersistedStore`` is made of parts, one concern each, that use only its public operations:
the commit protocol (``_commit.py``, ``store.committer``), pinned snapshots (``_snapshots.py``,
``store.pins``), generator versions (``_generators.py``, ``store.generators``); maintenance
(compaction, retention, gc) works through ``store.begin_maintenance()`` (``_maintenance.py``).
Every write goes through the store's file seam (``dpsn.store.fs``). This module keeps opening,
creating, the row index and history, routers and reading deltas.

Commit protocol (the only way data becomes visible):

1. write the new segment under a fresh name and fsync it (``_segments.py``);
2. in ONE LMDB write transaction: upsert the written rows, delete the dropped ones, add the
   segment and commit records, advance ``head``, update the index digests. LMDB commits are
   atomic and durable.

A crash before step 2 leaves an unreferenced segment that ``gc`` (or the next commit, which
reuses the name) removes; after it the commit is durable. Readers never hold LMDB transactions
for long: they load the row index of one commit into memory and read immutable segments, so a
reader keeps its snapshot while a writer goes on. Only ``gc`` deletes segments, and only those
that neither HEAD nor any snapshot references.

A store is untrusted input. Every LMDB record is checked where it is read (``_records.py``),
the row index against the digest its commit recorded (``_digest.py``) when it is loaded, the
LMDB file's structure before LMDB maps it (``_lmdbfile.py``), and every Zarr array's metadata
and decoded chunk sizes before any data is decoded (``_zarrsafe.py``). ``verify`` checks all
of it and reports, never raises (``_verify.py``).

``create`` takes the writer lock before it looks at the target directory, and removes what it
made if it fails; ``pin`` writes a snapshot's index under a temporary name, fsyncs it, renames
it into place and only then records it in one LMDB transaction.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import zarr

from dpsn._dtypes import POOL_DTYPES, STORAGE
from dpsn.errors import (
    CorruptSegmentError,
    CorruptStoreError,
    DpsnError,
    InvalidArgumentError,
    ReadOnlyError,
    SnapshotNotFoundError,
    SnapshotUnavailableError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    StoreVersionError,
)

from . import _runs
from ._checks import (
    DISK_FULL,
    check_digest,
    check_index,
    commit_key,
    full_error,
    write_failed,
)
from ._commit import CommitProtocol, CommitRequest, digest_after, provenance_digest
from ._digest import RECORD_CHECK, rows_hash_raw
from ._files import check_regular
from ._format import (
    COMPRESSOR_NAMES,
    DB_COMMITS,
    DB_META,
    DB_ROWS,
    DB_SEGMENTS,
    FORMAT_LIFECYCLE,
    FORMAT_PLAIN,
    FORMAT_VERSION,
    GENERATOR_GROUP,
    LMDB_DIR,
    LOCK_FILE,
    MANIFEST,
    MAX_COMMIT_ID,
    META_DIGESTS,
    META_FORMAT,
    META_GENERATOR_PREFIX,
    META_HEAD,
    META_NEXT_SEGMENT,
    ROUTERS_GROUP,
    ROW_VALUE,
    ROW_VALUE_DTYPE,
    SEGMENT_DROPS,
    SEGMENT_IDS,
    SEGMENT_STATE,
    SEGMENT_USAGE,
    SEGMENTS_GROUP,
    SNAPSHOT_COLUMNS,
    SNAPSHOTS_GROUP,
    ZARR_DIR,
    Manifest,
    fsync_tree,
    read_manifest,
    u64_key,
    write_manifest,
)
from ._generators import (
    GeneratorVersions,
    check_generator_state,
)
from ._layered import LayeredIndex
from ._leases import Lease
from ._lmdb import DEFAULT_MAP_SIZE, Env, acquire_env, release_env
from ._lock import WriterLock
from ._maintenance import Maintenance
from ._names import check_router_name, check_snapshot_name
from ._records import (
    Commit,
    VerifyReport,
    Writer,
    lifecycle_record,
    parse_record,
    read_u64,
    stored_digests,
)
from ._rowindex import RowBlockError, RowIndex
from ._runs import RUNS_DIR, RunsUnusableError, check_run_files, open_layers, read_runset
from ._runs import discard as discard_runs
from ._runs import maintain as maintain_runs
from ._runs import save as save_runs
from ._segments import SegmentRecord, SegmentStore, dir_bytes
from ._snapshots import Snapshots
from ._zarrseam import SeamStore
from .fs import FileSystem
from .fs import current as current_fs
from .usage_fields import usage_problem

__all__ = [
    "Commit",
    "CommitRequest",
    "PersistedStore",
    "VerifyReport",
    "check_snapshot_name",
    "storage_dtype",
]

_SNAPSHOT_COLUMNS = SNAPSHOT_COLUMNS
_META_GENERATOR_PREFIX = META_GENERATOR_PREFIX


@dataclass
class _Made:
    """What ``create`` made, so that a failed create can remove exactly that."""

    lock: WriterLock
    dirs: list[Path]  # directories create made, outermost first (the store's root last)
    lock_file: bool  # create made writer.lock (the root existed and was empty)


def _claim_new_dir(root: Path, fs: FileSystem) -> _Made:
    """Make ``root`` if needed and take its writer lock, then check it holds nothing else
    (through the file seam ``fs``).

    The lock comes first: two creators of one path cannot both pass the emptiness check, and a
    writer opening a store never sees one half made (there is no manifest until the end)."""
    for _ in range(10):
        made: list[Path] = []
        missing = []
        p = root
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                try:
                    fs.mkdir(d)
                    made.append(d)
                except FileExistsError:
                    pass
        except OSError as e:
            _remove_dirs(made, fs)
            if e.errno in DISK_FULL:
                raise full_error(e, f"cannot create {root}") from e
            raise
        if not root.is_dir():
            _remove_dirs(made, fs)
            raise StoreExistsError(f"{root} already exists and is not a directory")
        lock = WriterLock(root / LOCK_FILE, fs)
        try:
            lock_file = lock.acquire()
        except StoreLockedError:
            _remove_dirs(made, fs)
            raise StoreExistsError(
                f"{root} is being created or written by another process; pick a new path"
            ) from None
        except FileNotFoundError:
            continue  # another creator that failed removed the directory: start again
        except OSError as e:
            _remove_dirs(made, fs)
            if e.errno in DISK_FULL:
                raise full_error(e, f"cannot create {root}") from e
            raise
        if not lock.still_linked():  # locked a file a failed creator has just removed
            lock.release()
            continue
        if any(p.name != LOCK_FILE for p in root.iterdir()):
            if lock_file:
                with contextlib.suppress(OSError):
                    fs.unlink(root / LOCK_FILE, missing_ok=True)
            lock.release()
            _remove_dirs(made, fs)
            raise StoreExistsError(
                f"{root} already exists and is not an empty directory; "
                "pick a new path or remove it first."
            )
        return _Made(lock=lock, dirs=made, lock_file=lock_file)
    raise StoreExistsError(f"{root} kept changing while create tried to claim it")


def _remove_dirs(dirs: list[Path], fs: FileSystem) -> None:
    """Remove the directories this process made, innermost first, each only if it is empty.

    Never recursively: once made, a directory is visible to every process, and another creator
    may have claimed it (its lock file) or put its own store beside ours in a new parent."""
    for d in reversed(dirs):
        with contextlib.suppress(OSError):  # not empty (or gone): not ours to remove
            fs.rmdir(d)


def _undo_create(root: Path, made: _Made, fs: FileSystem) -> None:
    """Remove what a failed ``create`` wrote (through the file seam ``fs``); the caller still
    holds the lock, so what is in ``root`` is this create's own (its lock file too, when it made
    it). The directories it made go only if that leaves them empty."""
    for child in list(root.iterdir()) if root.is_dir() else []:
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            fs.rmtree(child, ignore_errors=True)
        else:
            fs.unlink(child, missing_ok=True)
    if made.lock_file:
        with contextlib.suppress(OSError):
            fs.unlink(root / LOCK_FILE, missing_ok=True)
    _remove_dirs(made.dirs, fs)
    made.lock.release()


class PersistedStore:
    """LMDB + Zarr on disk. Knows rows, segments and commits; nothing of models or generators
    beyond storing their weights as named float32 arrays."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        env: Env,
        *,
        writable: bool,
        fs: FileSystem | None = None,
    ) -> None:
        self.root = root
        self.fs = fs or current_fs()  # every write goes through it (``dpsn.store.fs``)
        self.manifest = manifest
        self._env = env
        self.writable = writable
        self.storage_dtype = storage_dtype(manifest.dtype)
        self.segments = SegmentStore(
            root / ZARR_DIR,
            storage_dtype=self.storage_dtype,
            compressor=manifest.compressor,
            fs=self.fs,
        )
        self._zarr = SeamStore(root / ZARR_DIR, self.fs)
        self.generators = GeneratorVersions(self)  # generator versions (``_generators.py``)
        self.pins = Snapshots(self)  # pinned snapshots (``_snapshots.py``)
        self.committer = CommitProtocol(self)  # the commit protocol (``_commit.py``)
        self._lock: WriterLock | None = None
        self._made: _Made | None = None
        self._lease: Lease | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        manifest: Manifest,
        generator_state: dict[str, np.ndarray],
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        lifecycle: dict[str, Any] | None = None,
        fs: FileSystem | None = None,
    ) -> PersistedStore:
        """Make a new store at ``root`` (a new or empty directory) holding commit 1.

        Every argument is checked before the disk is touched; if anything fails after, what
        was made is removed (a full disk is a ``StoreFullError``), so a retry finds the path
        as it was. ``fs``: the file system it writes through (``dpsn.store.fs``; default the
        current one)."""
        root = Path(root)
        fs = fs or current_fs()
        storage_dtype(manifest.dtype)
        if manifest.compressor not in COMPRESSOR_NAMES:
            raise InvalidArgumentError(f"compressor must be one of {COMPRESSOR_NAMES}")
        check_generator_state(generator_state)
        if lifecycle is not None:
            lifecycle_record(lifecycle)  # what a reader will check, checked before writing
        made = _claim_new_dir(root, fs)
        env = None
        try:
            zarr.open_group(SeamStore(root / ZARR_DIR, fs), mode="w", zarr_format=3)
            env = acquire_env(root / LMDB_DIR, create=True, map_size=map_size, fs=fs)
            store = cls(root, manifest, env, writable=True, fs=fs)
            gen_record = store._write_generator(1, generator_state)
            spec_digest = provenance_digest(manifest.to_json())
            first = Commit(
                id=1,
                parent=None,
                time=time.time(),
                message="create",
                rows_written=0,
                rows_dropped=0,
                persisted_rows=0,
                segment=None,
                generator=1,
                provenance=provenance_digest(spec_digest, gen_record),
                index_digest=0,
                lifecycle=lifecycle,
            )
            version = FORMAT_PLAIN if lifecycle is None else FORMAT_LIFECYCLE

            def init(txn: lmdb.Transaction) -> None:
                w = Writer(txn, env.dbs)
                w.put(DB_META, META_FORMAT, u64_key(version))
                w.put(DB_META, META_HEAD, u64_key(1))
                w.put(DB_META, META_NEXT_SEGMENT, u64_key(1))
                w.put_record(DB_META, _META_GENERATOR_PREFIX + u64_key(1), gen_record)
                w.put_record(DB_COMMITS, u64_key(1), first.to_json())
                w.finish()

            env.write(init)
            # What the store's first commit names is durable before the manifest makes it a
            # store: the Zarr groups and generator version 1, and the root's entries (a power
            # loss after create returned left data.zarr/zarr.json empty: the create sweep's
            # power-loss case at close found it).
            fsync_tree(root / ZARR_DIR, fs)
            fs.fsync_dir(root)
            # The manifest goes last: a directory without one is not a store, so a crash during
            # create never leaves something that opens as a half-made store.
            write_manifest(root, manifest, fs)
        except BaseException as e:
            if env is not None:
                release_env(env)
            _undo_create(root, made, fs)
            if isinstance(e, OSError) and not isinstance(e, DpsnError):
                # a full disk is StoreFullError, any other failed write StoreWriteError (errno
                # kept): the fault sweep found EIO escaping untyped here
                raise write_failed(e, f"cannot create {root}") from e
            raise
        store._lock = made.lock
        store._made = made
        return store

    def discard(self) -> None:
        """Remove a store this process has just made with :meth:`create` (nothing committed
        since): for a caller whose own set-up failed after ``create`` returned."""
        if self._made is None or self.head() != 1:
            raise CorruptStoreError(f"{self.root}: only a store just created can be discarded")
        made, self._made, self._lock = self._made, None, None
        release_env(self._env)
        self._env = None  # type: ignore[assignment]
        _undo_create(self.root, made, self.fs)

    @classmethod
    def open(cls, root: Path, *, writable: bool, fs: FileSystem | None = None) -> PersistedStore:
        """Open the store at ``root``; ``fs``: the file system it writes through
        (``dpsn.store.fs``; default the current one)."""
        root = Path(root)
        fs = fs or current_fs()
        manifest = read_manifest(root, fs)
        storage_dtype(manifest.dtype)  # validates
        if not (root / ZARR_DIR).is_dir():
            raise StoreNotFoundError(f"{root} is damaged: its Zarr group {ZARR_DIR} is missing")
        _check_group_files(root, fs)
        lock = None
        if writable:
            lock = WriterLock(root / LOCK_FILE, fs)
            lock.acquire()
        try:
            env = acquire_env(root / LMDB_DIR, writable=writable, fs=fs)
        except BaseException:
            if lock:
                lock.release()
            raise
        store = cls(root, manifest, env, writable=writable, fs=fs)
        store._lock = lock
        try:
            if not writable:  # so that gc in a writer's process keeps what this one reads
                store._lease = Lease(root, fs)
            version = env.read(
                lambda txn: read_u64(txn.get(META_FORMAT, db=env.dbs[DB_META]), "format version")
            )
            if version > FORMAT_VERSION:
                raise StoreVersionError(
                    f"{root}: the index has format version {version}; this dpsn reads up to "
                    f"{FORMAT_VERSION}. Upgrade dpsn."
                )
            store.check_manifest()
        except BaseException:
            store.close()
            raise
        return store

    def check_manifest(self) -> None:
        """The manifest must be the one the store was created with: commit 1's provenance is a
        digest of it (and of the first generator weights), so an edited or damaged manifest (a
        changed seed or dim, which would silently change every row) is a ``CorruptStoreError``."""
        first = self.commit_record(1)
        gen = {k: v for k, v in self.generator_record(1).items() if k != RECORD_CHECK}
        if provenance_digest(provenance_digest(self.manifest.to_json()), gen) != first.provenance:
            raise CorruptStoreError(
                f"{self.root}: {MANIFEST} is not the manifest this store was created with (commit "
                "1 holds a digest of it); it was edited or is damaged: restore it from a copy"
            )

    def hold(self, commit: int | None, index: RowIndex | None = None) -> None:
        """A reader names the commit it reads (``None``: about to choose one) in its lease,
        then checks that every segment ``index`` needs is still recorded: a ``gc`` that began
        before the lease was seen may have removed them (``_leases.py``)."""
        if self._lease is not None:
            # The lease names the newest commit whose segments the index reads: a past commit
            # read through a compaction after it (``load_index``) reads that one's segment.
            # Never past HEAD: a commit gc does not know protects nothing.
            newest = index.newest_commit() if index is not None else 0
            if commit is not None and newest > commit:
                newest = min(newest, self.head())
            self._lease.hold(None if commit is None else max(commit, newest))
        if index is None or not len(index):
            return

        missing = set(index.segments().tolist()) - self._segment_ids()
        if missing:
            raise SnapshotUnavailableError(
                f"commit {commit} was removed by gc while it was being opened (segments "
                f"{', '.join(f'{s:016x}' for s in sorted(missing)[:4])}); open it again"
            )

    @property
    def lease_held(self) -> bool | None:
        """Whether this reader holds a lease a writer's gc can see (``None``: a writer, which
        needs none). ``False``: it could not write one and warned (``LeaseWarning``)."""
        if self.writable:
            return None
        return self._lease is not None and self._lease.active

    @property
    def env(self) -> Env:
        """The store's LMDB environment, for the tier modules that keep records beside the
        commit protocol (retention, verify): one writer lock and one map for all of them."""
        return self._env

    def close(self) -> None:
        self.segments.close()
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._env is not None:
            release_env(self._env)
            self._env = None  # type: ignore[assignment]
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._made = None

    @property
    def closed(self) -> bool:
        return self._env is None

    def __enter__(self) -> PersistedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require_writer(self) -> None:
        """``ReadOnlyError`` unless this store is open for writing (holds the writer lock)."""
        if not self.writable:
            raise ReadOnlyError(
                f'{self.root} is open read-only; open it with mode="r+" to change it.'
            )

    def read(self, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        """Run ``fn`` in one LMDB read transaction of the store's index (records beside the
        commit protocol: retention's policy, compaction's counters)."""
        return self._env.read(fn)

    def db(self, name: bytes) -> Any:
        """The LMDB database ``name`` (``DB_META``, ``DB_COMMITS`` ...) for :meth:`read`."""
        return self._env.dbs[name]

    @property
    def zarr_store(self) -> Any:
        """The store's Zarr v3 store (``data.zarr``), writing through the file seam."""
        return self._zarr

    def begin_maintenance(self) -> Maintenance:
        """The operations maintenance (compaction, retention, gc) works with (``_maintenance.py``):
        one write transaction of the index, the next segment id, snapshot index copies,
        unreferenced versions. What writes needs the writer lock (``ReadOnlyError``); a dry
        run reads through it on a read-only store. They keep to the commit protocol: a file
        is written and fsynced before the transaction that references it."""
        return Maintenance(self)

    # -- generator weights (``_generators.py``) ------------------------------------------------

    def _write_generator(self, version: int, state: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.generators.write(version, state)

    def generator_record(self, version: int) -> dict[str, Any]:
        return self.generators.record(version)

    def generator_shapes(self) -> dict[str, list[int]] | None:
        """The weight shapes the manifest's generator config implies (None: an unknown kind)."""
        return self.generators.shapes()

    def read_generator(self, version: int) -> dict[str, np.ndarray]:
        """Generator weights, checked (``GeneratorVersions.read``)."""
        return self.generators.read(version)

    # -- index and history ---------------------------------------------------------------------

    def head(self) -> int:
        return self.read(lambda txn: read_u64(txn.get(META_HEAD, db=self.db(DB_META)), "head"))

    def commit_record(self, commit: int) -> Commit:
        commit = commit_key(commit)
        raw = self.read(lambda txn: txn.get(u64_key(commit), db=self.db(DB_COMMITS)))
        if raw is None:
            raise SnapshotNotFoundError(f"no commit {commit} in {self.root}")
        return _commit(raw, commit)

    def log(self) -> list[Commit]:
        def scan(txn: lmdb.Transaction) -> list[tuple[bytes, bytes]]:
            return list(txn.cursor(db=self.db(DB_COMMITS)))

        return [_commit(v, _key_id(k, "commit")) for k, v in self.read(scan)]

    def segment_record(self, segment: int) -> SegmentRecord:
        if not 0 <= segment < 2**64:  # (a damaged index's segment field)
            raise CorruptStoreError(
                f"{self.root}: the row index names segment {segment}, which no store can hold; "
                "the index is damaged: run `dpsn verify`"
            )
        raw = self.read(lambda txn: txn.get(u64_key(segment), db=self.db(DB_SEGMENTS)))
        if raw is None:
            raise SnapshotUnavailableError(
                f"segment {segment:016x} is not in {self.root} (removed by gc?)"
            )
        return _segment(raw, segment)

    def segment_records(self) -> dict[int, SegmentRecord]:
        def scan(txn: lmdb.Transaction) -> list[tuple[bytes, bytes]]:
            return list(txn.cursor(db=self.db(DB_SEGMENTS)))

        recs = [_segment(v, _key_id(k, "segment")) for k, v in self.read(scan)]
        return {r.id: r for r in recs}

    def load_head(self) -> tuple[int, LayeredIndex]:
        """HEAD and its row index: from the run files when they are usable (``_runs.py``: an
        open then maps them and replays the few commits since, instead of reading every row),
        else from LMDB (:meth:`load_flat_head`); a writer then writes the run set anew."""
        reason = None
        try:
            got = self.load_from_runs()
        except RunsUnusableError as e:
            got, reason = None, str(e)
        if got is not None:
            return got
        head, flat = self.load_flat_head()
        index = LayeredIndex.of(flat, head)
        if self.writable:
            try:
                if len(flat) >= _runs.RUN_MIN_ROWS:
                    index = self._save_runs(index, head)
                elif reason is not None:
                    discard_runs(self.root, self.fs)
            except (OSError, RunsUnusableError):
                pass  # runs only speed up the next open; LMDB has the index
        return head, index

    def load_from_runs(self) -> tuple[int, LayeredIndex] | None:
        """HEAD and its index from the run set and the commits since (``None``: no run set;
        ``RunsUnusableError``: one that cannot be used, and why)."""
        runset = read_runset(self.root, self.manifest.uuid, self.fs)
        if runset is None:
            return None

        def scan(txn: lmdb.Transaction) -> tuple[int, bytes | None, bytes | None]:
            head = read_u64(txn.get(META_HEAD, db=self.db(DB_META)), "head")
            commits = self.db(DB_COMMITS)
            return (
                head,
                txn.get(u64_key(head), db=commits),
                txn.get(u64_key(runset.commit), db=commits),
            )

        head, raw_head, raw_base = self.read(scan)
        if runset.commit > head or raw_head is None or raw_base is None:
            raise RunsUnusableError(f"the run set is of commit {runset.commit}, HEAD is {head}")
        base = _commit(raw_base, runset.commit)
        if base.index_digest != runset.digest or base.persisted_rows != runset.count:
            raise RunsUnusableError(f"the run set does not match commit {runset.commit}")
        record = _commit(raw_head, head)
        if self.writable:
            # A writer computes each commit's digest change from what the index says: it reads
            # the runs whole once (sequentially, ~GB/s) rather than trust bytes it did not write.
            check_run_files(self.root, runset, self.fs)
        names = tuple(name for name, _, _ in runset.files)
        index = LayeredIndex(
            open_layers(self.root, runset, self.fs),
            names,
            RowIndex.empty(),
            base_commit=runset.commit,
            since=0,
            count=runset.count,
            live=runset.live,
            newest=min(runset.newest, runset.commit),  # a lease never names a later commit
            fallback=self._fallback_lookup(None if self.writable else head),
        )
        digest = runset.digest
        try:
            for rec in self.log_range(runset.commit + 1, head):
                if rec.segment is None:
                    continue
                seg = self.segment_record(rec.segment)
                ids = self.segments.read_column(seg, SEGMENT_IDS)
                drops = self.segments.read_column(seg, SEGMENT_DROPS)
                if digest is not None:
                    digest = digest_after(index, digest, ids, seg.id, rec.id, drops)
                index = index.apply(ids, seg.id, rec.id, drops)
        except (DpsnError, OSError, ValueError) as e:
            raise RunsUnusableError(f"the commits after the run set cannot be replayed: {e}") from e
        if len(index) != record.persisted_rows or (
            record.index_digest is not None and digest != record.index_digest
        ):
            raise RunsUnusableError(
                f"the run set replayed to HEAD {head} disagrees with its record"
            )
        # Rows per segment are what a lease and a compaction go by: they must add up to the
        # rows and name only recorded segments (HEAD's segments are never gc'd), else LMDB.
        if sum(index.live.values()) != len(index):
            raise RunsUnusableError("runs.json's rows per segment do not add up to its rows")
        missing = set(index.live) - self._segment_ids()
        if missing:
            raise RunsUnusableError(
                f"runs.json names segments the store does not hold ({len(missing)})"
            )
        return head, index

    def _segment_ids(self) -> set[int]:
        """The ids of every recorded segment (keys only: reads check the records)."""

        def keys(txn: lmdb.Transaction) -> set[int]:
            cur = txn.cursor(db=self.db(DB_SEGMENTS))
            return {int.from_bytes(k, "big") for k in cur.iternext(keys=True, values=False)}

        return self.read(keys)

    def _fallback_lookup(self, head: int | None) -> Any:
        """A lookup in LMDB's row index, for a ``LayeredIndex`` whose run file fails a block
        checksum (``_runs.py``): right while LMDB's HEAD is ``head`` (``None``: the writer,
        whose index is always HEAD's); otherwise ``RowBlockError``. One ``get`` per distinct
        id: a damaged store's path, never the usual one."""

        def lookup(ids: np.ndarray) -> tuple[np.ndarray, ...]:
            uniq, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)

            def scan(txn: lmdb.Transaction) -> tuple[int, list[bytes | None]]:
                now = read_u64(txn.get(META_HEAD, db=self.db(DB_META)), "head")
                if head is not None and now != head:
                    return now, []
                db = self.db(DB_ROWS)
                keys = [u64_key(int(i)) if i >= 0 else None for i in uniq.tolist()]
                return now, [txn.get(k, db=db) if k is not None else None for k in keys]

            now, raw = self.read(scan)
            if head is not None and now != head:
                raise RowBlockError(
                    f"{self.root}: a run file of the row index fails its checksum and LMDB "
                    f"has moved on from commit {head} to {now}: refresh or reopen the pool "
                    "(run `dpsn verify`; a writer's open rebuilds the run files)"
                )
            found = np.array([v is not None for v in raw], dtype=bool)
            cols = np.zeros((len(uniq), 3), dtype=np.int64)
            if found.any():
                if any(len(v) != ROW_VALUE.size for v in raw if v is not None):
                    raise CorruptStoreError(f"{self.root}: the LMDB row index is damaged")
                packed = b"".join(v for v in raw if v is not None)
                vals = np.frombuffer(packed, dtype=ROW_VALUE_DTYPE)
                cols[found, 0] = vals["segment"]
                cols[found, 1] = vals["offset"]
                cols[found, 2] = vals["commit"]
            return (
                found[inverse],
                cols[inverse, 0],
                cols[inverse, 1],
                cols[inverse, 2],
            )

        return lookup

    def runs_commit(self) -> int | None:
        """The commit the row index's run set reflects (``None``: no usable set)."""
        try:
            runset = read_runset(self.root, self.manifest.uuid, self.fs)
        except RunsUnusableError:
            return None
        return runset.commit if runset is not None else None

    def log_range(self, first: int, last: int) -> list[Commit]:
        """Commits ``first..last`` (a cursor walk over just those records)."""

        def scan(txn: lmdb.Transaction) -> list[tuple[bytes, bytes]]:
            cur = txn.cursor(db=self.db(DB_COMMITS))
            out: list[tuple[bytes, bytes]] = []
            if first > last or not cur.set_range(u64_key(first)):
                return out
            for k, v in cur:
                if read_u64(k, "commit") > last:
                    break
                out.append((k, v))
            return out

        return [_commit(v, _key_id(k, "commit")) for k, v in self.read(scan)]

    def load_flat_head(self) -> tuple[int, RowIndex]:
        """HEAD and its row index, read in one LMDB transaction (so they agree), checked: ids
        sorted and in range, HEAD the newest commit, the row count its ``persisted_rows`` and
        the index's digest the one its commit (and the store's digests) recorded."""

        def scan(txn: lmdb.Transaction) -> tuple[Any, ...]:
            head = read_u64(txn.get(META_HEAD, db=self.db(DB_META)), "head")
            db = self.db(DB_ROWS)
            keys = b"".join(txn.cursor(db=db).iternext(keys=True, values=False))
            values = b"".join(txn.cursor(db=db).iternext(keys=False, values=True))
            cur = txn.cursor(db=self.db(DB_COMMITS))
            newest = cur.key() if cur.last() else None
            record = txn.get(u64_key(head), db=self.db(DB_COMMITS))
            digests = txn.get(META_DIGESTS, db=self.db(DB_META))
            return head, keys, values, newest, record, digests, txn.id()

        head, keys, values, newest, raw_record, raw_digests, txn_id = self._env.read_walked(
            scan, frozenset({"rows"})
        )
        where = f"{self.root}: the LMDB row index"
        n = len(keys) // 8
        if len(keys) != 8 * n or len(values) != ROW_VALUE.size * n:
            raise CorruptStoreError(f"{where} has malformed entries")
        if newest != u64_key(head):
            raise CorruptStoreError(
                f"{self.root}: HEAD is commit {head} but the newest commit in the log is "
                f"{read_u64(newest, 'commit') if newest else None}; the index is damaged"
            )
        if raw_record is None:
            raise CorruptStoreError(f"{self.root}: HEAD commit {head} has no record")
        record = _commit(raw_record, head)
        ids = np.frombuffer(keys, dtype=">u8").astype(np.int64)
        cols = np.frombuffer(values, dtype=ROW_VALUE_DTYPE)
        index = RowIndex(
            ids=ids,
            segment=cols["segment"].astype(np.int64),
            offset=cols["offset"].astype(np.int64),
            commit=cols["commit"].astype(np.int64),
        )
        check_index(index, self.manifest.rows, head, where)
        if len(index) != record.persisted_rows:
            raise CorruptStoreError(
                f"{where} holds {len(index)} rows but commit {head} recorded "
                f"{record.persisted_rows}; the index is damaged: restore the store from a copy"
            )
        stored = stored_digests(raw_digests)
        current = stored is not None and stored[0] == txn_id
        if record.index_digest is not None or current:
            total = int(rows_hash_raw(keys, values).sum(dtype=np.uint64))
            if record.index_digest is not None and total != record.index_digest:
                raise CorruptStoreError(
                    f"{where} does not match the digest commit {head} recorded; the index is "
                    "damaged: restore the store from a copy"
                )
            if current and stored is not None:
                want = stored[1][DB_ROWS]
                if (want.count, want.total) != (n, total):
                    raise CorruptStoreError(
                        f"{where} does not match the store's digests; the index is damaged: "
                        "restore the store from a copy"
                    )
        return head, index

    def load_index(self, commit: int) -> RowIndex | LayeredIndex:
        """The row index as of ``commit``: HEAD's from LMDB, a snapshot's from its pinned copy,
        any other commit by replaying the segments of commits up to it."""
        commit = commit_key(commit)
        head = self.head()
        if commit == head:
            return self.load_head()[1]
        pinned = self.pins.pinned_index(commit)
        if pinned is not None:
            return pinned
        from ._retention import representative

        # A commit followed only by compactions has their rows: read it through the last of
        # them, whose segments gc keeps when it keeps the commit (``_retention.py``).
        rep = representative(self.log(), commit)
        if rep == head:
            return self.load_head()[1]
        if rep != commit:
            pinned = self.pins.pinned_index(rep)
            if pinned is not None:
                return pinned
        return self._replay(rep)

    def _replay(self, commit: int) -> RowIndex:
        from ._retention import base_index

        target = self.commit_record(commit)  # raises if unknown
        base, start = base_index(self, commit)  # the checkpoint or a snapshot, if one is older
        parts = [start]
        for rec in self.log():
            if rec.id > commit:
                break
            if rec.segment is None or rec.id <= base:
                continue
            try:
                seg = self.segment_record(rec.segment)
                ids = self.segments.read_column(seg, SEGMENT_IDS)
                drops = self.segments.read_column(seg, SEGMENT_DROPS)
            except (SnapshotUnavailableError, CorruptSegmentError) as e:
                raise SnapshotUnavailableError(
                    f"commit {commit} can no longer be reconstructed: {e}. Only HEAD and pinned "
                    "snapshots and the commits the retention policy keeps survive gc; use "
                    "pool.snapshot(name) to keep a commit."
                ) from e
            parts[0] = parts[0].apply(ids, seg.id, rec.id, drops)
        index = parts[0]
        check_digest(index, target, f"{self.root}: the replayed index of commit {commit}")
        return index

    def resolve(self, at: str | int) -> int:
        """A commit id from a snapshot name or a commit id."""
        if isinstance(at, str):
            snaps = self.snapshots()
            if at in snaps:
                return snaps[at]["commit"]
            if at.isascii() and at.isdigit() and len(at) <= 19:
                at = int(at)
            else:
                shown = at if len(at) <= 80 else at[:80] + "..."
                raise SnapshotNotFoundError(
                    f"no snapshot named {shown!r} in {self.root}; known: {sorted(snaps) or 'none'}"
                )
        return self.commit_record(commit_key(at)).id

    # -- routers -------------------------------------------------------------------------------

    def router_dir(self, name: str, version: int) -> Path:
        check_router_name(name)
        return self.root / ZARR_DIR / ROUTERS_GROUP / name / f"{commit_key(version):016x}"

    def router_group(self, name: str, version: int, *, write: bool) -> zarr.Group:
        """The Zarr group of router ``name`` as saved by commit ``version``. For writing it is
        created empty (a leftover of a crashed commit with that id is removed first); the caller
        fills it and calls :meth:`sync_router` before committing."""
        path = str(self.router_dir(name, version).relative_to(self.root / ZARR_DIR))
        if write:
            self.require_writer()
            self.fs.rmtree(self.root / ZARR_DIR / path, ignore_errors=True)
            root = zarr.open_group(self._zarr, mode="a", zarr_format=3)
            return root.require_group(path)
        # zarr opens the group's zarr.json itself: checked first (a FIFO would hang it)
        meta = self.root / ZARR_DIR / path / "zarr.json"
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            check_regular(meta, f"router {name!r} ({path})'s zarr.json", self.fs)
        try:
            return zarr.open_group(self._zarr, path=path, mode="r", zarr_format=3)
        except Exception as e:
            raise CorruptStoreError(f"router {name!r} ({path}) cannot be opened: {e}") from e

    def sync_router(self, name: str, version: int) -> None:
        fsync_tree(self.router_dir(name, version), self.fs)

    # -- snapshots (``_snapshots.py``) ---------------------------------------------------------

    def snapshots(self) -> dict[str, dict[str, Any]]:
        """Pinned snapshots: name -> record (``commit``, ``time``, ``rows``, ``xxh64``)."""
        return self.pins.all()

    def pin(self, name: str, commit: int) -> None:
        """Pin ``commit`` under ``name`` (``Snapshots.pin``: atomic, a full disk is a
        ``StoreFullError`` and records nothing)."""
        self.pins.pin(name, commit)

    def unpin(self, name: str) -> None:
        self.pins.unpin(name)

    def read_pinned(self, name: str, record: dict[str, Any]) -> RowIndex:
        """A snapshot's pinned index, checked (``Snapshots.read_pinned``)."""
        return self.pins.read_pinned(name, record)

    # -- commit --------------------------------------------------------------------------------

    def commit(
        self, index: LayeredIndex | RowIndex, head: int, request: CommitRequest
    ) -> tuple[Commit, LayeredIndex]:
        """Persist what ``request`` holds on top of ``index`` at commit ``head``; the record and
        the new index (the commit protocol: ``_commit.CommitProtocol.commit``)."""
        return self.committer.commit(index, head, request)

    def maintain_runs(self, index: LayeredIndex, record: Commit) -> LayeredIndex:
        """After a commit: fold or write the row index's runs (``_runs.py``). The commit is
        durable already: a failure here keeps the rows in memory, and the next open replays
        forward from the last run set."""
        try:
            return maintain_runs(
                self.root, self.manifest.uuid, index, record.id, record.index_digest, self.fs
            )
        except (OSError, RunsUnusableError):  # (a run just written that cannot be read back)
            return index

    def settle_runs(self, index: RowIndex | LayeredIndex, head: int) -> None:
        """At a writer's close: write the overlay of HEAD's index out as a run, so that the
        next open replays no commit (best effort: a failure only makes that open replay)."""
        if not isinstance(index, LayeredIndex) or not index.since:
            return
        if not any(r is not None for r in index.runs):
            return
        with contextlib.suppress(OSError, DpsnError, RunsUnusableError):
            if head == self.head():
                self._save_runs(index, head)

    def _save_runs(self, index: LayeredIndex, head: int) -> LayeredIndex:
        """Write ``index`` (HEAD's, at ``head``) as the run set (``_runs.save``)."""
        digest = self.commit_record(head).index_digest
        return save_runs(self.root, self.manifest.uuid, index, head, digest, self.fs)

    def next_segment(self) -> int:
        """The id the next segment takes, checked: above every recorded segment (a damaged
        ``next_segment`` must never make a commit overwrite a live segment)."""

        def scan(txn: lmdb.Transaction) -> tuple[int, bytes | None]:
            nxt = read_u64(txn.get(META_NEXT_SEGMENT, db=self.db(DB_META)), "next segment id")
            cur = txn.cursor(db=self.db(DB_SEGMENTS))
            return nxt, cur.key() if cur.last() else None

        nxt, last = self.read(scan)
        newest = read_u64(last, "segment id") if last is not None else 0
        if not newest < nxt <= MAX_COMMIT_ID:
            raise CorruptStoreError(
                f"{self.root}: the next segment id {nxt} is not above the newest segment "
                f"{newest}; the index is damaged: restore the store from a copy"
            )
        return nxt

    # -- reading deltas ------------------------------------------------------------------------

    def read_deltas(
        self, index: RowIndex, ids: np.ndarray, *, state_width: int = 0, usage_width: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Committed deltas of ``ids`` (any order, repeats allowed) under ``index``: a mask of
        which ids have one, their rows (storage dtype) in the order of ``ids[mask]``, their
        per-row state ``[n, state_width]`` (zeros where a segment holds none of that width) and
        their usage statistics ``[n, usage_width]`` float64 (NaN rows where a segment holds none
        of that width: written before the store had a lifecycle)."""
        found, where = self._found(index, ids)
        n = len(where[0])
        out = np.empty((n, self.manifest.dim), dtype=self.storage_dtype)
        state = np.zeros((n, state_width), dtype="<f4")
        usage = np.full((n, usage_width), np.nan, dtype="<f8")
        mapped = _mapped(index)
        for rec, at, offsets in self._by_segment(index, where):
            if mapped:
                self._check_rows(rec, offsets, np.asarray(ids)[found][at])
            out[at] = self.segments.gather(rec, offsets)
            if state_width and rec.state_width == state_width:
                state[at] = self.segments.gather(rec, offsets, SEGMENT_STATE)
            if usage_width and rec.usage_width == usage_width:
                usage[at] = self._gather_usage(rec, offsets)
        return found, out, state, usage

    def read_usage(
        self, index: RowIndex, ids: np.ndarray, usage_width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`read_deltas`, but only the usage statistics (NaN rows where a segment
        has none): what a consolidation needs of rows that are neither cached nor staged."""
        found, where = self._found(index, ids)
        usage = np.full((len(where[0]), usage_width), np.nan, dtype="<f8")
        for rec, at, offsets in self._by_segment(index, where):
            if usage_width and rec.usage_width == usage_width:
                usage[at] = self._gather_usage(rec, offsets)
        return found, usage

    def _gather_usage(self, rec: SegmentRecord, offsets: np.ndarray) -> np.ndarray:
        """Usage rows of a segment, their values checked too: the checksums say the chunks are
        the ones written, not that what was written (by whoever) is usable statistics."""
        usage = self.segments.gather(rec, offsets, SEGMENT_USAGE)
        problem = usage_problem(usage)
        if problem is not None:
            raise CorruptSegmentError(
                f"{self.root}: segment {rec.name}: its usage statistics {problem}; the store is "
                "damaged or was not written by dpsn: run `dpsn verify`",
                segment=rec.name,
            )
        return usage

    def _check_rows(self, rec: SegmentRecord, offsets: np.ndarray, ids: np.ndarray) -> None:
        """That a segment holds ``ids`` at ``offsets``, as the index says: run files are
        mapped, not checked at open (that would read them whole), so a damaged one is caught
        here before a read returns another row's delta (``dpsn verify`` checks them whole)."""
        if not np.array_equal(self.segments.gather(rec, offsets, SEGMENT_IDS), ids):
            raise CorruptStoreError(
                f"{self.root}: the row index points at rows segment {rec.name} does not hold; "
                f"its run files ({RUNS_DIR}/) are damaged: run `dpsn verify`"
            )

    @staticmethod
    def _found(
        index: RowIndex | LayeredIndex, ids: np.ndarray
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        found, seg, off, _ = index.lookup(ids)
        return found, (seg[found], off[found])

    def _by_segment(
        self, index: RowIndex | LayeredIndex, where: tuple[np.ndarray, np.ndarray]
    ) -> Iterator[tuple[SegmentRecord, np.ndarray, np.ndarray]]:
        """For rows at ``where`` (segments, offsets): per segment, its record, where its rows
        go in the output and their offsets in the segment (ascending)."""
        seg, off = where
        if len(seg) == 0:
            return
        order = np.lexsort((off, seg))  # group by segment, offsets ascending within each
        seg_sorted, off_sorted = seg[order], off[order]
        bounds = np.flatnonzero(np.diff(seg_sorted)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(order)]])
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            try:
                rec = self.segment_record(int(seg_sorted[a]))
            except SnapshotUnavailableError as e:
                if not _mapped(index) or self.lease_held is False:
                    raise  # (a reader without a lease: a gc elsewhere may have removed it)
                # A reader's lease keeps what its index names: a run naming no segment lies.
                raise CorruptStoreError(
                    f"{self.root}: the row index points at a segment the store does not hold; "
                    f"its run files ({RUNS_DIR}/) are damaged: run `dpsn verify`"
                ) from e
            if rec.dim != self.manifest.dim or int(off_sorted[b - 1]) >= rec.rows:
                raise CorruptStoreError(
                    f"{self.root}: segment {rec.name} ({rec.rows} rows of width {rec.dim}) does "
                    f"not hold the rows the index points at (width {self.manifest.dim}); the "
                    "store is damaged: run `dpsn verify`"
                )
            yield rec, order[a:b], off_sorted[a:b]

    # -- maintenance ---------------------------------------------------------------------------

    def gc(
        self,
        *,
        dry_run: bool = False,
        progress: Callable[[int, int], None] | None = None,
        **retention: Any,
    ) -> dict[str, Any]:
        """Remove what no kept commit needs: segments, leftovers of crashed commits and
        snapshots, generator/router versions and indexes no kept commit uses, zarr
        ``.partial`` files. What is kept: HEAD, snapshots, the retention policy's window
        (``keep_last=``, ``keep_within=`` override it) and what live readers hold
        (``_retention.py``). Needs the writer lock. ``progress(done, total)`` counts segments
        removed."""
        from ._retention import collect

        return collect(self, dry_run=dry_run, progress=progress, **retention)

    def compact(
        self,
        index: RowIndex | None = None,
        head: int | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        target: float = 1.1,
        segments: list[int] | None = None,
        collect: bool = True,
        placement: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Any:
        """Rewrite the live rows of sparse segments (or of exactly ``segments``), then gc
        unless ``collect`` is False (``_compact.py``); ``placement``: the co-use order to
        write rows in (``_placement.py``)."""
        from ._compact import compact

        if index is None or head is None:
            head, index = self.load_head()
        return compact(
            self,
            index,
            head,
            progress=progress,
            target=target,
            segments=segments,
            collect=collect,
            placement=placement,
        )

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Check everything the store holds; report problems, never raise for them. Needs
        neither torch nor a generator or router module (``_verify.py``)."""
        from ._verify import verify_store

        return verify_store(self, progress)

    def disk_bytes(self) -> int:
        return dir_bytes(self.root)


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype a pool dtype is stored as (``dpsn/_dtypes.py``'s table); a manifest
    naming any other is damage."""
    if name not in POOL_DTYPES:
        raise CorruptStoreError(
            f"dtype {name!r} is not one dpsn stores; known: {', '.join(POOL_DTYPES)}"
        )
    return STORAGE[name]


def _key_id(key: bytes, what: str) -> int:
    return read_u64(key, f"{what} key")


def _commit(raw: bytes, commit: int) -> Commit:
    record = Commit.from_json(parse_record(raw, f"commit {commit}"))
    if record.id != commit:
        raise CorruptStoreError(f"the record stored as commit {commit} says it is {record.id}")
    return record


def _segment(raw: bytes, segment: int) -> SegmentRecord:
    record = SegmentRecord.from_json(parse_record(raw, f"segment {segment:016x}"))
    if record.id != segment:
        raise CorruptStoreError(f"the record stored as segment {segment:016x} says {record.id}")
    return record


def _check_group_files(root: Path, fs: FileSystem) -> None:
    """The Zarr groups' metadata files zarr itself opens (a writer's commit): regular files,
    or absent (``NotRegularFileError`` before zarr could block on a FIFO there)."""
    top = root / ZARR_DIR
    for group in ("", SEGMENTS_GROUP, GENERATOR_GROUP, SNAPSHOTS_GROUP, ROUTERS_GROUP):
        path = top / group / "zarr.json" if group else top / "zarr.json"
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            check_regular(path, f"{root}: the Zarr group metadata {path.relative_to(root)}", fs)


def _mapped(index: RowIndex | LayeredIndex) -> bool:
    """Whether ``index`` reads run files (``_runs.py``)."""
    return isinstance(index, LayeredIndex) and any(r is not None for r in index.runs)
