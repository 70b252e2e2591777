"""The persisted tier: a store directory of one manifest, one LMDB index and one Zarr group.

Commit protocol (the only way data becomes visible):

1. write the new segment under a fresh name and fsync it (``_segments.py``);
2. in ONE LMDB write transaction: upsert the written rows, delete the dropped ones, add the
   segment and commit records, advance ``head``. LMDB commits are atomic and durable.

A crash before step 2 leaves an unreferenced segment that ``gc`` (or the next commit, which
reuses the name) removes; after it the commit is durable. Readers never hold LMDB transactions
for long: they load the row index of one commit into memory and read immutable segments, so a
reader keeps its snapshot while a writer goes on. Only ``gc`` deletes segments, and only those
that neither HEAD nor any snapshot references.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import xxhash
import zarr
from zarr.storage import LocalStore

from dpsn.errors import (
    CorruptSegmentError,
    CorruptStoreError,
    ReadOnlyError,
    SnapshotNotFoundError,
    SnapshotUnavailableError,
    StoreExistsError,
    StoreNotFoundError,
    StoreVersionError,
)

from ._format import (
    DB_COMMITS,
    DB_META,
    DB_ROWS,
    DB_SEGMENTS,
    DB_SNAPSHOTS,
    FORMAT_LIFECYCLE,
    FORMAT_PLAIN,
    FORMAT_VERSION,
    GENERATOR_GROUP,
    LMDB_DIR,
    LOCK_FILE,
    META_FORMAT,
    META_HEAD,
    META_NEXT_SEGMENT,
    ROW_VALUE,
    ROW_VALUE_DTYPE,
    SEGMENT_DROPS,
    SEGMENT_IDS,
    SEGMENT_STATE,
    SEGMENT_USAGE,
    ZARR_DIR,
    Manifest,
    fsync_tree,
    generator_name,
    read_manifest,
    u64_key,
    write_manifest,
)
from ._lmdb import DEFAULT_MAP_SIZE, Env, acquire_env, release_env
from ._lock import WriterLock
from ._rowindex import RowIndex
from ._segments import SegmentRecord, SegmentStore, dir_bytes

SNAPSHOTS_GROUP = "snapshots"
ROUTERS_GROUP = "routers"
_ROUTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SNAPSHOT_COLUMNS = ("ids", "segment", "offset", "commit")
_META_GENERATOR_PREFIX = b"generator/"


@dataclass(frozen=True, slots=True)
class Commit:
    """One entry of the commit log (persisted as JSON in LMDB; never rename keys)."""

    id: int
    parent: int | None
    time: float
    message: str
    rows_written: int
    rows_dropped: int
    persisted_rows: int
    segment: int | None
    generator: int
    provenance: str
    # Runtime figures of the writer at commit time (cache hits, I/O); informational only.
    stats: dict[str, Any] | None = None
    # Routers saved with the store: name -> {"version": commit that wrote it, "digest": hex}.
    routers: dict[str, dict[str, Any]] | None = None
    # The row lifecycle as of this commit: its policy, clocks, thresholds and health figures
    # (JSON; dpsn.pool validates it when it reads it back). None: the store has no lifecycle.
    lifecycle: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Commit:
        try:
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except TypeError as e:
            raise CorruptStoreError(f"a commit record is missing fields: {e}") from e


@dataclass(slots=True)
class VerifyReport:
    """What ``verify`` found. ``ok`` is False as soon as one problem is listed."""

    checked_segments: int = 0
    checked_chunks: int = 0
    checked_rows: int = 0
    problems: list[str] = field(default_factory=list)
    damaged_rows: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked_segments": self.checked_segments,
            "checked_chunks": self.checked_chunks,
            "checked_rows": self.checked_rows,
            "problems": self.problems,
            "damaged_rows": self.damaged_rows,
        }


def _json_value(raw: bytes | None, what: str) -> Any:
    if raw is None:
        raise CorruptStoreError(f"the LMDB index lacks {what}")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStoreError(f"the LMDB record of {what} is not valid JSON: {e}") from e


def _u64(raw: bytes | None, what: str) -> int:
    if raw is None or len(raw) != 8:
        raise CorruptStoreError(f"the LMDB index lacks a valid {what}")
    return int.from_bytes(raw, "big")


def _digest(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


class PersistedStore:
    """LMDB + Zarr on disk. Knows rows, segments and commits; nothing of models or generators
    beyond storing their weights as named float32 arrays."""

    def __init__(self, root: Path, manifest: Manifest, env: Env, *, writable: bool) -> None:
        self.root = root
        self.manifest = manifest
        self._env = env
        self.writable = writable
        self.storage_dtype = storage_dtype(manifest.dtype)
        self.segments = SegmentStore(
            root / ZARR_DIR, storage_dtype=self.storage_dtype, compressor=manifest.compressor
        )
        self._zarr = LocalStore(str(root / ZARR_DIR))
        self._lock: WriterLock | None = None

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
    ) -> PersistedStore:
        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise StoreExistsError(
                f"{root} already exists and is not an empty directory; "
                "pick a new path or remove it first."
            )
        root.mkdir(parents=True, exist_ok=True)
        zarr.open_group(LocalStore(str(root / ZARR_DIR)), mode="w", zarr_format=3)
        env = acquire_env(root / LMDB_DIR, create=True, map_size=map_size)
        store = cls(root, manifest, env, writable=True)
        store._lock = WriterLock(root / LOCK_FILE)
        store._lock.acquire()
        gen_record = store._write_generator(1, generator_state)
        spec_digest = _digest(manifest.to_json())
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
            provenance=_digest(spec_digest, gen_record),
            lifecycle=lifecycle,
        )
        version = FORMAT_PLAIN if lifecycle is None else FORMAT_LIFECYCLE

        def init(txn: lmdb.Transaction) -> None:
            txn.put(META_FORMAT, u64_key(version), db=env.dbs[DB_META])
            txn.put(META_HEAD, u64_key(1), db=env.dbs[DB_META])
            txn.put(META_NEXT_SEGMENT, u64_key(1), db=env.dbs[DB_META])
            txn.put(
                _META_GENERATOR_PREFIX + u64_key(1),
                json.dumps(gen_record).encode(),
                db=env.dbs[DB_META],
            )
            txn.put(u64_key(1), json.dumps(first.to_json()).encode(), db=env.dbs[DB_COMMITS])

        env.write(init)
        # The manifest goes last: a directory without one is not a store, so a crash during
        # create never leaves something that opens as a half-made store.
        write_manifest(root, manifest)
        return store

    @classmethod
    def open(cls, root: Path, *, writable: bool) -> PersistedStore:
        root = Path(root)
        manifest = read_manifest(root)
        storage_dtype(manifest.dtype)  # validates
        if not (root / ZARR_DIR).is_dir():
            raise StoreNotFoundError(f"{root} is damaged: its Zarr group {ZARR_DIR} is missing")
        lock = None
        if writable:
            lock = WriterLock(root / LOCK_FILE)
            lock.acquire()
        try:
            env = acquire_env(root / LMDB_DIR)
        except Exception:
            if lock:
                lock.release()
            raise
        store = cls(root, manifest, env, writable=writable)
        store._lock = lock
        try:
            version = env.read(
                lambda txn: _u64(txn.get(META_FORMAT, db=env.dbs[DB_META]), "format version")
            )
            if version > FORMAT_VERSION:
                raise StoreVersionError(
                    f"{root}: the index has format version {version}; this dpsn reads up to "
                    f"{FORMAT_VERSION}. Upgrade dpsn."
                )
        except Exception:
            store.close()
            raise
        return store

    def close(self) -> None:
        if self._env is not None:
            release_env(self._env)
            self._env = None  # type: ignore[assignment]
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def closed(self) -> bool:
        return self._env is None

    def _require_writer(self) -> None:
        if not self.writable:
            raise ReadOnlyError(
                f'{self.root} is open read-only; open it with mode="r+" to change it.'
            )

    # -- generator weights ---------------------------------------------------------------------

    def _write_generator(self, version: int, state: dict[str, np.ndarray]) -> dict[str, Any]:
        # A directory of this version can only be a crashed commit's leftover: not referenced.
        shutil.rmtree(
            self.root / ZARR_DIR / GENERATOR_GROUP / generator_name(version), ignore_errors=True
        )
        root = zarr.open_group(self._zarr, mode="a", zarr_format=3)
        arrays = {}
        for name, value in sorted(state.items()):
            value = np.ascontiguousarray(value, dtype="<f4")
            path = f"{GENERATOR_GROUP}/{generator_name(version)}/{name}"
            arr = root.create_array(
                path,
                shape=value.shape,
                chunks=value.shape or (1,),
                dtype=value.dtype,
                fill_value=0,
                compressors=None,
            )
            arr[...] = value
            arrays[name] = {"shape": list(value.shape), "xxh64": xxhash.xxh64_intdigest(value.data)}
        # A generator without weights (kind "zeros") still gets its version's group: readers
        # take a missing one for a version removed by gc.
        root.require_group(f"{GENERATOR_GROUP}/{generator_name(version)}")
        fsync_tree(self.root / ZARR_DIR / GENERATOR_GROUP)
        return {"version": version, "arrays": arrays}

    def generator_record(self, version: int) -> dict[str, Any]:
        key = _META_GENERATOR_PREFIX + u64_key(version)
        return self._env.read(
            lambda txn: _json_value(
                txn.get(key, db=self._env.dbs[DB_META]), f"generator version {version}"
            )
        )

    def read_generator(self, version: int) -> dict[str, np.ndarray]:
        """Generator weights, each checked against its recorded shape and checksum."""
        record = self.generator_record(version)
        if not (self.root / ZARR_DIR / GENERATOR_GROUP / generator_name(version)).is_dir():
            raise SnapshotUnavailableError(
                f"generator version {version} was removed by gc; only HEAD and pinned snapshots "
                "keep theirs"
            )
        out = {}
        for name, meta in record["arrays"].items():
            path = f"{GENERATOR_GROUP}/{generator_name(version)}/{name}"
            try:
                value = np.ascontiguousarray(zarr.open_array(self._zarr, path=path, mode="r")[...])
            except Exception as e:
                raise CorruptStoreError(f"generator weight {path} cannot be read: {e}") from e
            if (
                value.dtype != np.dtype("<f4")
                or list(value.shape) != meta["shape"]
                or xxhash.xxh64_intdigest(value.data) != meta["xxh64"]
            ):
                raise CorruptStoreError(
                    f"generator weight {path} fails its checksum or shape check; "
                    "the store is damaged"
                )
            out[name] = value
        return out

    # -- index and history ---------------------------------------------------------------------

    def head(self) -> int:
        return self._env.read(
            lambda txn: _u64(txn.get(META_HEAD, db=self._env.dbs[DB_META]), "head")
        )

    def commit_record(self, commit: int) -> Commit:
        raw = self._env.read(lambda txn: txn.get(u64_key(commit), db=self._env.dbs[DB_COMMITS]))
        if raw is None:
            raise SnapshotNotFoundError(f"no commit {commit} in {self.root}")
        return Commit.from_json(_json_value(raw, f"commit {commit}"))

    def log(self) -> list[Commit]:
        def scan(txn: lmdb.Transaction) -> list[bytes]:
            return [v for _, v in txn.cursor(db=self._env.dbs[DB_COMMITS])]

        return [Commit.from_json(_json_value(v, "a commit")) for v in self._env.read(scan)]

    def segment_record(self, segment: int) -> SegmentRecord:
        raw = self._env.read(lambda txn: txn.get(u64_key(segment), db=self._env.dbs[DB_SEGMENTS]))
        if raw is None:
            raise SnapshotUnavailableError(
                f"segment {segment:016x} is not in {self.root} (removed by gc?)"
            )
        try:
            return SegmentRecord.from_json(_json_value(raw, f"segment {segment}"))
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptStoreError(f"the record of segment {segment:016x} is malformed") from e

    def segment_records(self) -> dict[int, SegmentRecord]:
        def scan(txn: lmdb.Transaction) -> list[bytes]:
            return [v for _, v in txn.cursor(db=self._env.dbs[DB_SEGMENTS])]

        recs = [SegmentRecord.from_json(_json_value(v, "a segment")) for v in self._env.read(scan)]
        return {r.id: r for r in recs}

    def load_head(self) -> tuple[int, RowIndex]:
        """HEAD and its row index, read in one LMDB transaction (so they agree)."""

        def scan(txn: lmdb.Transaction) -> tuple[int, bytes, bytes]:
            head = _u64(txn.get(META_HEAD, db=self._env.dbs[DB_META]), "head")
            db = self._env.dbs[DB_ROWS]
            keys = b"".join(txn.cursor(db=db).iternext(keys=True, values=False))
            values = b"".join(txn.cursor(db=db).iternext(keys=False, values=True))
            return head, keys, values

        head, keys, values = self._env.read(scan)
        n = len(keys) // 8
        if len(keys) != 8 * n or len(values) != ROW_VALUE.size * n:
            raise CorruptStoreError(f"{self.root}: the LMDB row index has malformed entries")
        cols = np.frombuffer(values, dtype=ROW_VALUE_DTYPE)
        index = RowIndex(
            ids=np.frombuffer(keys, dtype=">u8").astype(np.int64),
            segment=cols["segment"].astype(np.int64),
            offset=cols["offset"].astype(np.int64),
            commit=cols["commit"].astype(np.int64),
        )
        return head, index

    def load_index(self, commit: int) -> RowIndex:
        """The row index as of ``commit``: HEAD's from LMDB, a snapshot's from its pinned copy,
        any other commit by replaying the segments of commits up to it."""
        head, index = self.load_head()
        if commit == head:
            return index
        pinned = self._pinned_index(commit)
        if pinned is not None:
            return pinned
        return self._replay(commit)

    def _replay(self, commit: int) -> RowIndex:
        self.commit_record(commit)  # raises if unknown
        parts = [RowIndex.empty()]
        for rec in self.log():
            if rec.id > commit:
                break
            if rec.segment is None:
                continue
            try:
                seg = self.segment_record(rec.segment)
                ids = self.segments.read_column(seg, SEGMENT_IDS)
                drops = self.segments.read_column(seg, SEGMENT_DROPS)
            except (SnapshotUnavailableError, CorruptSegmentError) as e:
                raise SnapshotUnavailableError(
                    f"commit {commit} can no longer be reconstructed: {e}. Only HEAD and pinned "
                    "snapshots survive gc; use pool.snapshot(name) to keep a commit."
                ) from e
            parts[0] = parts[0].apply(ids, seg.id, rec.id, drops)
        return parts[0]

    def resolve(self, at: str | int) -> int:
        """A commit id from a snapshot name or a commit id."""
        if isinstance(at, str):
            snaps = self.snapshots()
            if at in snaps:
                return snaps[at]["commit"]
            if at.isdigit():
                at = int(at)
            else:
                raise SnapshotNotFoundError(
                    f"no snapshot named {at!r} in {self.root}; known: {sorted(snaps) or 'none'}"
                )
        if isinstance(at, bool) or not isinstance(at, int):
            raise TypeError(f"at= takes a snapshot name or a commit id, not {type(at).__name__}")
        self.commit_record(at)
        return at

    # -- routers -------------------------------------------------------------------------------

    def router_group(self, name: str, version: int, *, write: bool) -> zarr.Group:
        """The Zarr group of router ``name`` as saved by commit ``version``. For writing it is
        created empty (a leftover of a crashed commit with that id is removed first); the caller
        fills it and calls :meth:`sync_router` before committing."""
        if not _ROUTER_NAME.fullmatch(name):
            raise ValueError(f"router name {name!r} is invalid: use 1-64 of [A-Za-z0-9_.-]")
        path = f"{ROUTERS_GROUP}/{name}/{version:016x}"
        if write:
            self._require_writer()
            shutil.rmtree(self.root / ZARR_DIR / path, ignore_errors=True)
            root = zarr.open_group(self._zarr, mode="a", zarr_format=3)
            return root.require_group(path)
        try:
            return zarr.open_group(self._zarr, path=path, mode="r", zarr_format=3)
        except Exception as e:
            raise CorruptStoreError(f"router {name!r} ({path}) cannot be opened: {e}") from e

    def sync_router(self, name: str, version: int) -> None:
        fsync_tree(self.root / ZARR_DIR / ROUTERS_GROUP / name / f"{version:016x}")

    # -- snapshots -----------------------------------------------------------------------------

    def snapshots(self) -> dict[str, dict[str, Any]]:
        def scan(txn: lmdb.Transaction) -> list[tuple[bytes, bytes]]:
            return list(txn.cursor(db=self._env.dbs[DB_SNAPSHOTS]))

        return {k.decode(): _json_value(v, "a snapshot") for k, v in self._env.read(scan)}

    def pin(self, name: str, commit: int) -> None:
        """Pin ``commit`` under ``name``: its row index is written out so gc and history
        rewriting can never take it away."""
        self._require_writer()
        if not name or "/" in name or name.isdigit() or len(name.encode()) > 200:
            raise ValueError(
                f"snapshot name {name!r} is invalid: use 1-200 bytes, no '/', not all digits"
            )
        if name in self.snapshots():
            raise ValueError(f"snapshot {name!r} exists already; choose another name")
        index = self.load_index(commit)
        group = f"{SNAPSHOTS_GROUP}/{commit:016x}"
        root = zarr.open_group(self._zarr, mode="a", zarr_format=3)
        sums = {}
        if not (self.root / ZARR_DIR / group).exists():
            for col in _SNAPSHOT_COLUMNS:
                data = np.ascontiguousarray(getattr(index, col), dtype="<i8")
                arr = root.create_array(
                    f"{group}/{col}",
                    shape=data.shape,
                    chunks=(max(1, min(len(data), 1 << 20)),),
                    dtype=data.dtype,
                    fill_value=0,
                )
                if len(data):
                    arr[...] = data
            fsync_tree(self.root / ZARR_DIR / SNAPSHOTS_GROUP)
        for col in _SNAPSHOT_COLUMNS:
            data = np.ascontiguousarray(getattr(index, col), dtype="<i8")
            sums[col] = xxhash.xxh64_intdigest(data.data)
        record = {"commit": commit, "time": time.time(), "rows": len(index), "xxh64": sums}
        self._env.write(
            lambda txn: txn.put(
                name.encode(), json.dumps(record).encode(), db=self._env.dbs[DB_SNAPSHOTS]
            )
        )

    def unpin(self, name: str) -> None:
        self._require_writer()
        if name not in self.snapshots():
            raise SnapshotNotFoundError(f"no snapshot named {name!r}")
        self._env.write(lambda txn: txn.delete(name.encode(), db=self._env.dbs[DB_SNAPSHOTS]))

    def _pinned_index(self, commit: int) -> RowIndex | None:
        for record in self.snapshots().values():
            if record["commit"] != commit:
                continue
            cols = {}
            for col in _SNAPSHOT_COLUMNS:
                path = f"{SNAPSHOTS_GROUP}/{commit:016x}/{col}"
                try:
                    data = np.ascontiguousarray(
                        zarr.open_array(self._zarr, path=path, mode="r")[...]
                    )
                except Exception as e:
                    raise CorruptStoreError(f"snapshot index {path} cannot be read: {e}") from e
                if (
                    data.dtype != np.dtype("<i8")
                    or xxhash.xxh64_intdigest(data.data) != record["xxh64"][col]
                ):
                    raise CorruptStoreError(f"snapshot index {path} fails its checksum")
                cols[col] = data.astype(np.int64)
            return RowIndex(**cols)
        return None

    # -- commit --------------------------------------------------------------------------------

    def commit(
        self,
        index: RowIndex,
        head: int,
        ids: np.ndarray,
        deltas: np.ndarray,
        drops: np.ndarray,
        *,
        message: str = "",
        stats: dict[str, Any] | None = None,
        generator_state: dict[str, np.ndarray] | None = None,
        routers: dict[str, str] | None = None,
        state: np.ndarray | None = None,
        usage: np.ndarray | None = None,
        lifecycle: dict[str, Any] | None = None,
    ) -> tuple[Commit, RowIndex]:
        """Persist ``deltas`` for sorted unique ``ids`` and drop sorted ``drops`` (disjoint from
        ``ids``), on top of ``index`` at commit ``head``. Returns the record and the new index.

        ``generator_state`` (new generator weights) is written as a new generator version;
        ``routers`` maps names to digests of routers the caller has already written with
        :meth:`router_group` for this commit. Both join the provenance hash. ``state`` and
        ``usage`` are per-row columns written beside the deltas; ``lifecycle`` (JSON) goes into
        the commit record, and the first commit that has one raises the store's format
        version to ``FORMAT_LIFECYCLE``."""
        self._require_writer()
        env = self._env
        current = self.head()
        if current != head:
            raise CorruptStoreError(
                f"{self.root}: HEAD moved from {head} to {current} under the writer lock"
            )
        parent = self.commit_record(head)
        commit_id = head + 1
        # Dropping a row that has no delta changes nothing; keep the record honest.
        _, present = index.find(drops)
        drops = drops[present]
        segment_id = env.read(
            lambda txn: _u64(txn.get(META_NEXT_SEGMENT, db=env.dbs[DB_META]), "next segment id")
        )
        seg = None
        if len(ids) or len(drops):
            seg = self.segments.write(
                segment_id,
                commit_id,
                ids,
                deltas,
                drops,
                # A small commit gets one tight chunk instead of a mostly-padding one.
                chunk_rows=min(self.manifest.chunk_rows, max(1, len(ids))),
                state=state,
                usage=usage,
            )
        gen_version, gen_record = parent.generator, None
        if generator_state is not None:
            gen_version, gen_record = commit_id, self._write_generator(commit_id, generator_state)
        router_records = dict(parent.routers or {})
        for name, digest in (routers or {}).items():
            router_records[name] = {"version": commit_id, "digest": digest}
        new_index = index.apply(ids, segment_id, commit_id, drops)
        record = Commit(
            id=commit_id,
            parent=head,
            time=time.time(),
            message=message,
            rows_written=len(ids),
            rows_dropped=len(drops),
            persisted_rows=len(new_index),
            segment=segment_id if seg else None,
            generator=gen_version,
            provenance=_digest(
                parent.provenance,
                seg.checksums if seg else None,
                gen_record or gen_version,
                router_records,
            ),
            stats=stats,
            routers=router_records or None,
            lifecycle=lifecycle,
        )
        values = np.empty(len(ids), dtype=ROW_VALUE_DTYPE)
        values["segment"] = segment_id
        values["offset"] = np.arange(len(ids))
        values["commit"] = commit_id
        # bytes objects built by numpy in C; putmulti inserts them in C: no per-row Python loop.
        items = list(zip(_keys(ids), values.view(f"V{ROW_VALUE.size}").tolist(), strict=True))
        drop_keys = _keys(drops)

        def flip(txn: lmdb.Transaction) -> None:
            rows = env.dbs[DB_ROWS]
            if items:
                txn.cursor(db=rows).putmulti(items, dupdata=False, overwrite=True)
            cur = txn.cursor(db=rows)
            for k in drop_keys:  # drops are rare and small; py-lmdb has no batch delete
                if cur.set_key(k):
                    cur.delete()
            if seg is not None:
                txn.put(
                    u64_key(segment_id), json.dumps(seg.to_json()).encode(), db=env.dbs[DB_SEGMENTS]
                )
                txn.put(META_NEXT_SEGMENT, u64_key(segment_id + 1), db=env.dbs[DB_META])
            if gen_record is not None:
                txn.put(
                    _META_GENERATOR_PREFIX + u64_key(commit_id),
                    json.dumps(gen_record).encode(),
                    db=env.dbs[DB_META],
                )
            txn.put(
                u64_key(commit_id), json.dumps(record.to_json()).encode(), db=env.dbs[DB_COMMITS]
            )
            txn.put(META_HEAD, u64_key(commit_id), db=env.dbs[DB_META])
            if lifecycle is not None:
                meta = env.dbs[DB_META]
                if _u64(txn.get(META_FORMAT, db=meta), "format version") < FORMAT_LIFECYCLE:
                    txn.put(META_FORMAT, u64_key(FORMAT_LIFECYCLE), db=meta)

        try:
            env.write(flip)
        except BaseException:
            if seg is not None:
                self.segments.remove(segment_id)
            raise
        return record, new_index

    # -- reading deltas ------------------------------------------------------------------------

    def read_deltas(
        self, index: RowIndex, ids: np.ndarray, *, state_width: int = 0, usage_width: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Committed deltas of ``ids`` (any order, repeats allowed) under ``index``: a mask of
        which ids have one, their rows (storage dtype) in the order of ``ids[mask]``, their
        per-row state ``[n, state_width]`` (zeros where a segment holds none of that width) and
        their usage statistics ``[n, usage_width]`` float64 (NaN rows where a segment holds none
        of that width: written before the store had a lifecycle)."""
        found, pos = self._found(index, ids)
        out = np.empty((len(pos), self.manifest.dim), dtype=self.storage_dtype)
        state = np.zeros((len(pos), state_width), dtype="<f4")
        usage = np.full((len(pos), usage_width), np.nan, dtype="<f8")
        for rec, at, offsets in self._by_segment(index, pos):
            out[at] = self.segments.gather(rec, offsets)
            if state_width and rec.state_width == state_width:
                state[at] = self.segments.gather(rec, offsets, SEGMENT_STATE)
            if usage_width and rec.usage_width == usage_width:
                usage[at] = self.segments.gather(rec, offsets, SEGMENT_USAGE)
        return found, out, state, usage

    def read_usage(
        self, index: RowIndex, ids: np.ndarray, usage_width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`read_deltas`, but only the usage statistics (NaN rows where a segment
        has none): what a consolidation needs of rows that are neither cached nor staged."""
        found, pos = self._found(index, ids)
        usage = np.full((len(pos), usage_width), np.nan, dtype="<f8")
        for rec, at, offsets in self._by_segment(index, pos):
            if usage_width and rec.usage_width == usage_width:
                usage[at] = self.segments.gather(rec, offsets, SEGMENT_USAGE)
        return found, usage

    @staticmethod
    def _found(index: RowIndex, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos, found = index.find(ids)
        return found, pos[found]

    def _by_segment(
        self, index: RowIndex, pos: np.ndarray
    ) -> Iterator[tuple[SegmentRecord, np.ndarray, np.ndarray]]:
        """For index positions ``pos``: per segment, its record, where its rows go in the
        output and their offsets in the segment (ascending)."""
        if len(pos) == 0:
            return
        seg = index.segment[pos]
        off = index.offset[pos]
        order = np.lexsort((off, seg))  # group by segment, offsets ascending within each
        seg_sorted, off_sorted = seg[order], off[order]
        bounds = np.flatnonzero(np.diff(seg_sorted)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(order)]])
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            rec = self.segment_record(int(seg_sorted[a]))
            yield rec, order[a:b], off_sorted[a:b]

    # -- maintenance ---------------------------------------------------------------------------

    def gc(
        self, *, dry_run: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Remove segments that neither HEAD nor a snapshot references, leftovers of crashed
        commits, and zarr ``.partial`` files. Needs the writer lock. ``progress(done, total)``
        is called as segments are removed."""
        self._require_writer()
        _, head_index = self.load_head()
        live = set(head_index.segments().tolist())
        for record in self.snapshots().values():
            pinned = self._pinned_index(record["commit"])
            if pinned is not None:
                live |= set(pinned.segments().tolist())
        records = self.segment_records()
        dead_records = sorted(set(records) - live)
        orphans = sorted(set(self.segments.on_disk()) - set(records))
        partials = [p for p in (self.root / ZARR_DIR).rglob("*.partial")]
        stale_dirs = self._unreferenced_versions()
        freed = 0
        if not dry_run:
            for d in stale_dirs:
                freed += dir_bytes(d)
                shutil.rmtree(d, ignore_errors=True)
            if dead_records:

                def forget(txn: lmdb.Transaction) -> None:
                    for s in dead_records:
                        txn.delete(u64_key(s), db=self._env.dbs[DB_SEGMENTS])

                self._env.write(forget)
            doomed = dead_records + orphans
            for done, s in enumerate(doomed, 1):
                freed += self.segments.remove(s)
                if progress is not None:
                    progress(done, len(doomed))
            for p in partials:
                freed += p.stat().st_size
                p.unlink(missing_ok=True)
        return {
            "removed_segments": dead_records,
            "orphan_segments": orphans,
            "partial_files": len(partials),
            "stale_versions": [str(d.relative_to(self.root)) for d in stale_dirs],
            "freed_bytes": freed,
            "dry_run": dry_run,
        }

    def _unreferenced_versions(self) -> list[Path]:
        """Generator and router versions that neither HEAD nor a snapshot uses (older ones, and
        leftovers of crashed commits)."""
        keep_commits = {self.head(), *(r["commit"] for r in self.snapshots().values())}
        records = [self.commit_record(c) for c in keep_commits]
        keep = {
            self.root / ZARR_DIR / GENERATOR_GROUP / generator_name(r.generator) for r in records
        }
        for r in records:
            for name, meta in (r.routers or {}).items():
                keep.add(self.root / ZARR_DIR / ROUTERS_GROUP / name / f"{meta['version']:016x}")
        found = []
        gen_dir = self.root / ZARR_DIR / GENERATOR_GROUP
        if gen_dir.is_dir():
            found += [p for p in gen_dir.iterdir() if p.is_dir()]
        router_dir = self.root / ZARR_DIR / ROUTERS_GROUP
        if router_dir.is_dir():
            found += [
                v for n in router_dir.iterdir() if n.is_dir() for v in n.iterdir() if v.is_dir()
            ]
        return sorted(p for p in found if p not in keep)

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Re-read every referenced chunk and check it; report problems, never raise for them."""
        report = VerifyReport()
        try:
            head, index = self.load_head()
            records = self.segment_records()
            gen_version = self.commit_record(head).generator
            self.read_generator(gen_version)
        except (CorruptStoreError, SnapshotUnavailableError, SnapshotNotFoundError) as e:
            report.problems.append(str(e))
            return report
        missing = sorted(set(index.segments().tolist()) - set(records))
        for s in missing:
            report.problems.append(f"rows point at segment {s:016x}, which has no record")
        for rec in records.values():
            report.checked_segments += 1
            try:
                ids = self.segments.read_column(rec, SEGMENT_IDS)
                mine = index.segment == rec.id
                if np.any(index.offset[mine] >= rec.rows) or not np.array_equal(
                    ids[index.offset[mine]], index.ids[mine]
                ):
                    report.problems.append(
                        f"segment {rec.name}: its ids disagree with the LMDB row index"
                    )
                for _key, _chunk in self.segments.iter_chunks(rec):
                    report.checked_chunks += 1
                report.checked_rows += rec.rows
            except CorruptSegmentError as e:
                report.problems.append(str(e))
                report.damaged_rows.extend(e.rows)
            if progress is not None:
                progress(1)
        return report

    def disk_bytes(self) -> int:
        return dir_bytes(self.root)


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype a pool dtype is stored as (zarr has no bfloat16: it goes as uint16)."""
    table = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
    if name not in table:
        raise CorruptStoreError(f"dtype {name!r} is not one dpsn stores; known: {', '.join(table)}")
    return np.dtype(table[name])


def _keys(ids: np.ndarray) -> list[bytes]:
    """LMDB keys (u64 big-endian) of many ids at once."""
    return np.ascontiguousarray(ids, dtype=">u8").view("V8").tolist()
