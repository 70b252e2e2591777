"""Pinned snapshots: a name -> commit record in LMDB's snapshot database, and the commit's row
index copied out as three int64 Zarr arrays (``data.zarr/snapshots/<commit>``) so that gc and
history rewriting never take it away. ``pin`` writes the copy under a temporary name, fsyncs
it, renames it into place and only then records the name in one LMDB transaction. Part of
``PersistedStore`` (``store.pins``); touches only the store's public operations."""

from __future__ import annotations

import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import xxhash
import zarr

from dpsn.errors import (
    CorruptStoreError,
    InvalidSnapshotNameError,
    SnapshotNotFoundError,
    StoreFullError,
    StoreWriteError,
)

from ._checks import TMP, check_digest, check_index, write_failed
from ._format import (
    DB_SNAPSHOTS,
    SNAPSHOT_COLUMNS,
    SNAPSHOTS_GROUP,
    ZARR_DIR,
    fsync_dir,
    fsync_tree,
)
from ._names import check_snapshot_name
from ._records import Writer, parse_record, snapshot_record
from ._rowindex import RowIndex
from ._zarrsafe import read_array, read_array_meta

__all__ = ["Snapshots"]


class Snapshots:
    """The pinned snapshots of one store."""

    def __init__(self, store: Any) -> None:
        # ``store``: the PersistedStore that owns this part (typed loosely: that module imports
        # this one, never the other way round). A weak proxy: no reference cycle, so a store
        # dropped without close() still goes (and releases its reader lease) at once.
        self._store = weakref.proxy(store)

    def all(self) -> dict[str, dict[str, Any]]:
        def scan(txn: lmdb.Transaction) -> list[tuple[bytes, bytes]]:
            return list(txn.cursor(db=self._store.db(DB_SNAPSHOTS)))

        out = {}
        for k, v in self._store.read(scan):
            try:
                name = k.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorruptStoreError(f"{self._store.root}: a snapshot name is not UTF-8") from e
            out[name] = snapshot_record(parse_record(v, f"snapshot {name!r}"), name)
        return out

    def dir(self, commit: int) -> Path:
        return self._store.root / ZARR_DIR / SNAPSHOTS_GROUP / f"{commit:016x}"

    def pin(self, name: str, commit: int) -> None:
        """Pin ``commit`` under ``name``: its row index is written out so gc and history
        rewriting can never take it away.

        Atomic: the index is written under a temporary name, fsynced and renamed into place,
        then the name is recorded in one LMDB transaction. A failure (a full disk is a
        ``StoreFullError``) records nothing, and a retry writes the index again."""
        self._store.require_writer()
        check_snapshot_name(name)
        commit = self._store.commit_record(commit).id
        if name in self.all():
            raise InvalidSnapshotNameError(f"snapshot {name!r} exists already; choose another")
        index = self._store.load_index(commit)
        columns = {
            col: np.ascontiguousarray(getattr(index, col), dtype="<i8") for col in SNAPSHOT_COLUMNS
        }
        sums = {col: xxhash.xxh64_intdigest(data.data) for col, data in columns.items()}
        final = self.dir(commit)
        if not (final.is_dir() and self.arrays_ok(final, len(index), sums)):
            self.write_arrays(final, columns)
        record = {"commit": commit, "time": time.time(), "rows": len(index), "xxh64": sums}

        def flip(txn: lmdb.Transaction) -> None:
            w = Writer(txn, self._store.env.dbs)
            w.put_record(DB_SNAPSHOTS, name.encode(), record)
            w.finish()

        self._store.env.write(flip)

    def write_arrays(self, final: Path, columns: dict[str, np.ndarray]) -> None:
        parent = final.parent
        new_group = not (parent / "zarr.json").is_file()  # the first pin makes snapshots/
        tmp_name = f"{final.name}{TMP}{uuid.uuid4().hex[:12]}"
        tmp = parent / tmp_name
        try:
            root = zarr.open_group(self._store.zarr_store, mode="a", zarr_format=3)
            for col, data in columns.items():
                arr = root.create_array(
                    f"{SNAPSHOTS_GROUP}/{tmp_name}/{col}",
                    shape=data.shape,
                    chunks=(max(1, min(len(data), 1 << 20)),),
                    dtype=data.dtype,
                    fill_value=0,
                )
                if len(data):
                    arr[...] = data
            fsync_tree(tmp, self._store.fs)
            if final.exists():  # a damaged or partial copy: replace it whole
                trash = parent / f"{final.name}{TMP}old-{uuid.uuid4().hex[:12]}"
                self._store.fs.replace(final, trash)
                self._store.fs.replace(tmp, final)
                self._store.fs.rmtree(trash, ignore_errors=True)
            else:
                self._store.fs.replace(tmp, final)
            fsync_dir(parent, self._store.fs)
            if new_group:  # else a power loss after the pin returned loses snapshots/ whole
                self._store.fs.fsync_file(parent / "zarr.json")
                fsync_dir(parent.parent, self._store.fs)
        except OSError as e:
            self._store.fs.rmtree(tmp, ignore_errors=True)
            if isinstance(e, StoreFullError | StoreWriteError):
                raise
            raise write_failed(e, f"could not write the snapshot index {final.name}") from e

    def arrays_ok(self, path: Path, rows: int, sums: dict[str, int]) -> bool:
        try:
            return all(
                xxhash.xxh64_intdigest(self._column(path, col, rows).data) == sums[col]
                for col in SNAPSHOT_COLUMNS
            )
        except CorruptStoreError:
            return False

    def _column(self, path: Path, col: str, rows: int) -> np.ndarray:
        meta = read_array_meta(path / col, dtypes={"int64"}, shape=(rows,), fs=self._store.fs)
        return np.ascontiguousarray(read_array(meta), dtype="<i8")

    def unpin(self, name: str) -> None:
        self._store.require_writer()
        if name not in self.all():
            raise SnapshotNotFoundError(f"no snapshot named {name!r}")

        def flip(txn: lmdb.Transaction) -> None:
            w = Writer(txn, self._store.env.dbs)
            w.delete(DB_SNAPSHOTS, name.encode())
            w.finish()

        self._store.env.write(flip)

    def pinned_index(self, commit: int) -> RowIndex | None:
        for name, record in self.all().items():
            if record["commit"] != commit:
                continue
            return self.read_pinned(name, record)
        return None

    def read_pinned(self, name: str, record: dict[str, Any]) -> RowIndex:
        """A snapshot's pinned index, checked: columns against the snapshot's checksums, the
        whole against the digest its commit recorded."""
        commit = record["commit"]
        commit_record = self._store.commit_record(commit)
        if record["rows"] != commit_record.persisted_rows:  # before rows are allocated
            raise CorruptStoreError(
                f"{self._store.root}: snapshot {name!r} holds {record['rows']} rows but commit "
                f"{commit} recorded {commit_record.persisted_rows}; the index is damaged"
            )
        path = self.dir(commit)
        cols = {}
        for col in SNAPSHOT_COLUMNS:
            try:
                data = self._column(path, col, record["rows"])
            except CorruptStoreError as e:
                raise CorruptStoreError(
                    f"snapshot {name!r}: index column {col} cannot be read: {e}"
                ) from e
            if xxhash.xxh64_intdigest(data.data) != record["xxh64"][col]:
                raise CorruptStoreError(
                    f"snapshot {name!r}: index column {col} ({path}) fails its checksum"
                )
            cols[col] = data.astype(np.int64)
        index = RowIndex(**cols)
        where = f"{self._store.root}: snapshot {name!r}"
        check_index(index, self._store.manifest.rows, commit, where)
        check_digest(index, commit_record, where)
        return index
