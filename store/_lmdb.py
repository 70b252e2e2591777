"""One LMDB environment per store per process, with a map that grows instead of failing.

LMDB refuses to open the same environment twice in one process, yet a user may well hold a
reader and a writer ``Pool`` of one store side by side; so environments are shared through a
reference-counted registry keyed by the real path. Never carry an environment across ``fork()``:
the registry remembers the pid that opened it and reopens in a child.

Readers open the environment read-only (``MDB_RDONLY``): they never begin a write transaction
and never write a byte of ``data.mdb``. When a writer of the same store arrives in a process
that already holds a read-only environment for it, the shared environment is reopened writable
in place (:meth:`Env.upgrade`), once no transaction is in flight.

Before LMDB maps ``data.mdb`` its meta pages and size are checked, and before the first read the
pages the newest transaction reaches are walked (``_lmdbfile.py``): a damaged or truncated file
is a ``CorruptStoreError``, never a SIGBUS.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

from dpsn.errors import CorruptStoreError, StoreFullError, StoreNotFoundError

from ._files import SizeGuard
from ._format import DB_COMMITS, DB_META, DB_ROWS, DB_SEGMENTS, DB_SNAPSHOTS
from ._lmdbfile import FREE, MAX_FILE_BYTES, check_trees, read_meta
from .fs import FileSystem
from .fs import current as current_fs

T = TypeVar("T")

DEFAULT_MAP_SIZE = 64 << 20  # grows by doubling; LMDB maps sparse files, so this costs no disk
MAX_MAP_SIZE = MAX_FILE_BYTES  # the largest map; a meta page naming more is damage
MAX_READERS = 512
DATA_FILE = "data.mdb"
_DBS = (DB_META, DB_ROWS, DB_COMMITS, DB_SEGMENTS, DB_SNAPSHOTS)
_DISK_FULL = ("No space", "Input/output", "File too large", "Disk quota")
_DISK_FULL_ERRNO = {errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT}


def _is_disk_full(e: BaseException) -> bool:
    return isinstance(e, lmdb.DiskError) or any(s in str(e) for s in _DISK_FULL)


class Env:
    """A shared LMDB environment and its named databases."""

    def __init__(
        self,
        path: Path,
        *,
        create: bool,
        map_size: int,
        writable: bool = True,
        fs: FileSystem | None = None,
    ) -> None:
        self.path = path
        # LMDB's open and each write transaction's commit go through the file seam; the bytes
        # LMDB writes inside a commit do not (C): see ``dpsn.store.fs``.
        self.fs = fs or current_fs()
        self.pid = os.getpid()
        self.refs = 0
        self._lock = threading.Lock()  # one write transaction at a time
        self._cond = threading.Condition()  # guards _active and _swapping
        self._active = 0  # transactions in flight (an upgrade waits for none)
        self._swapping = False
        self._map_size = map_size
        self._walked_txn = -1  # the transaction a full page walk last covered
        if not create:
            data = path / DATA_FILE
            if not data.is_file():
                raise StoreNotFoundError(
                    f"the store's LMDB index is missing: {data} does not exist. "
                    "The store is damaged; restore it from a copy."
                )
            read_meta(data)  # before anything maps it
        self.writable = writable and os.access(path if path.exists() else path.parent, os.W_OK)
        self.env, self.dbs = self._open(create=create)
        self._guard = self._size_guard()

    def _size_guard(self) -> SizeGuard | None:
        """LMDB maps ``data.mdb`` and never shrinks it: a file cut under this process (a copy
        over a live store) would make the next page read SIGBUS. Each transaction first checks
        the file still has the size it had at open (one ``fstat``)."""
        try:
            fd = os.open(self.path / DATA_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        return SizeGuard(fd, os.fstat(fd).st_size)

    def _check_size(self) -> None:
        guard = getattr(self, "_guard", None)  # (None while the environment is being opened)
        if guard is not None and not guard.intact():
            raise CorruptStoreError(
                f"{self.path / DATA_FILE} was cut under this process (under {guard.size} "
                "bytes: a copy over a live store?); nothing more is read from it. Close the "
                "pool, run `dpsn verify`, restore the store from a copy"
            )

    def _open(self, *, create: bool) -> tuple[lmdb.Environment, dict[bytes, lmdb._Database]]:
        path = self.path
        try:
            env = self.fs.lmdb_open(
                path,
                map_size=self._map_size,
                max_dbs=len(_DBS) + 2,
                max_readers=MAX_READERS,
                create=create,
                subdir=True,
                readonly=not self.writable,
            )
        except lmdb.InvalidError as e:
            raise CorruptStoreError(f"{path} is not a valid LMDB environment: {e}") from e
        except OSError as e:  # the file seam's own failure (py-lmdb raises lmdb.Error)
            from ._checks import write_failed
            from ._files import read_fault

            err = read_fault(e, path, f"the LMDB index {path}")
            raise (
                write_failed(e, f"cannot open the LMDB index at {path}") if err is e else err
            ) from e
        except lmdb.Error as e:
            if create and _is_disk_full(e):
                raise StoreFullError(f"{path}: the disk is full or failing ({e})") from e
            raise CorruptStoreError(f"cannot open the LMDB index at {path}: {e}") from e
        try:
            if not create:
                # before LMDB reads a page: opening the databases walks the main tree
                self.check_file(env)
        except BaseException:
            env.close()
            raise
        try:
            if create:
                with env.begin(write=True) as txn:
                    dbs = {name: env.open_db(name, txn=txn) for name in _DBS}
            else:
                # No transaction given: py-lmdb uses a read one on a read-only environment and an
                # empty (never committed to disk) write one otherwise. Never creates a database.
                dbs = {name: env.open_db(name, create=False) for name in _DBS}
        except lmdb.Error as e:
            env.close()
            if create and _is_disk_full(e):
                raise StoreFullError(f"{path}: the disk is full or failing ({e})") from e
            raise CorruptStoreError(f"{path}: the LMDB index lacks dpsn's databases: {e}") from e
        return env, dbs

    def check_file(self, env: lmdb.Environment | None = None, *, full: bool | None = None) -> None:
        """Walk the pages of the transaction a read now sees (``_lmdbfile.check_trees``),
        holding that transaction so no writer in another process recycles them meanwhile.

        A writer (or ``full``) walks everything. A reader skips the row index and the free-page
        tree: it reads no free pages, and it reads the row index only through
        :meth:`read_walked`, which walks it first; so opening a store for a few records costs
        O(commits + segments), not O(rows)."""
        full = self.writable if full is None else full
        skip = frozenset() if full else frozenset({"rows", FREE})
        self._walk(env or self.env, lambda txn: None, skip=skip, full=full)

    def _walk(
        self,
        env: lmdb.Environment,
        fn: Callable[[lmdb.Transaction], T],
        *,
        only: frozenset[str] | None = None,
        skip: frozenset[str] = frozenset(),
        full: bool = False,
        keys: dict[str, list[bytes]] | None = None,
    ) -> T:
        self._check_size()
        data = self.path / DATA_FILE
        for _ in range(10):
            with env.begin(buffers=False) as txn:
                tid = txn.id()
                if tid != self._walked_txn:
                    meta = read_meta(data, txnid=tid)
                    if meta is None:
                        continue  # a writer committed twice since the read began: again
                    check_trees(data, meta, only=only, skip=skip, keys=keys)
                    if full:
                        self._walked_txn = tid
                return fn(txn)
        raise CorruptStoreError(f"{self.path}: the LMDB index changed too fast to be checked")

    def read_walked(
        self,
        fn: Callable[[lmdb.Transaction], T],
        dbs: frozenset[str] = frozenset(),
        *,
        keys: dict[str, list[bytes]] | None = None,
    ) -> T:
        """Like :meth:`read`, but first walk the pages of databases ``dbs`` in the same read
        transaction (unless a full walk already covered that transaction): for reads of a
        whole database a reader's open did not check (the row index). With ``keys``
        (``{"rows": [key, ...]}``) only the pages on the way to those keys are walked: for a
        few lookups."""
        self._enter()
        try:
            for _ in range(3):
                try:
                    return self._walk(self.env, fn, only=dbs, keys=keys)
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)
                except lmdb.Error as e:
                    raise CorruptStoreError(
                        f"{self.path}: the LMDB index cannot be read ({e}); the store is "
                        "damaged: run `dpsn verify`, restore it from a copy"
                    ) from e
        finally:
            self._leave()
        raise CorruptStoreError(f"{self.path}: the LMDB map kept changing size under a reader")

    def upgrade(self) -> None:
        """Reopen a read-only environment writable, in place (a writer joined a reader)."""
        if self.writable:
            return
        with self._cond:
            while self._swapping:
                self._cond.wait()
            if self.writable:
                return
            self._swapping = True
            while self._active:
                self._cond.wait()
        try:
            self.env.close()
            self.writable = True
            try:
                self.env, self.dbs = self._open(create=False)
            except BaseException:
                self.writable = False
                self.env, self.dbs = self._open(create=False)
                raise
        finally:
            with self._cond:
                self._swapping = False
                self._cond.notify_all()

    def _enter(self) -> None:
        with self._cond:
            while self._swapping:
                self._cond.wait()
            self._active += 1

    def _leave(self) -> None:
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in a read transaction: one consistent snapshot of the index."""
        self._check_size()
        self._enter()
        try:
            for _ in range(3):
                try:
                    with self.env.begin(buffers=False) as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    # Another process grew the map; adopt its size and retry.
                    self.env.set_mapsize(0)
                except lmdb.Error as e:
                    raise CorruptStoreError(
                        f"{self.path}: the LMDB index cannot be read ({e}); the store is "
                        "damaged: run `dpsn verify`, restore it from a copy"
                    ) from e
        finally:
            self._leave()
        raise CorruptStoreError(f"{self.path}: the LMDB map kept changing size under a reader")

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction, growing the map and retrying when it is full.

        ``fn`` must be safe to re-run: a full map aborts the whole transaction, nothing of it
        is kept, and it starts again on the bigger map.
        """
        if not self.writable:
            raise CorruptStoreError(f"{self.path}: internal error: a write on a read-only index")
        self._check_size()
        with self._lock:
            self._enter()
            try:
                return self._write(fn)
            finally:
                self._leave()

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        while True:
            try:
                txn = self.env.begin(write=True)
                try:
                    result = fn(txn)
                    self.fs.lmdb_commit(txn)
                except BaseException:
                    txn.abort()  # (a no-op after a commit that failed inside LMDB)
                    raise
                return result
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.MapFullError:
                size = self.env.info()["map_size"]
                if size >= MAX_MAP_SIZE:
                    raise StoreFullError(
                        f"{self.path}: the LMDB map reached {size} bytes, the limit"
                    ) from None
                self.env.set_mapsize(min(size * 2, MAX_MAP_SIZE))
            except (lmdb.Error, OSError) as e:
                if _is_disk_full(e) or getattr(e, "errno", None) in _DISK_FULL_ERRNO:
                    raise StoreFullError(
                        f"{self.path}: the disk is full or failing ({e}); nothing was committed"
                    ) from e
                raise CorruptStoreError(
                    f"{self.path}: the LMDB index failed a write ({e}); nothing was committed. "
                    "Run `dpsn verify`."
                ) from e

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])


_registry: dict[str, Env] = {}
_registry_lock = threading.Lock()


def acquire_env(
    path: Path,
    *,
    create: bool = False,
    map_size: int = DEFAULT_MAP_SIZE,
    writable: bool = False,
    fs: FileSystem | None = None,
) -> Env:
    """The process's environment of ``path``, opened (and checked) on first use: read-only
    unless ``writable`` (or ``create``); a later writable acquire upgrades it in place. The
    environment keeps the file system (``fs``) of the acquire that opened it."""
    key = os.path.realpath(path)
    with _registry_lock:
        env = _registry.get(key)
        if env is not None and env.pid != os.getpid():
            _registry.pop(key)  # inherited across fork: never touch it
            env = None
        if env is None:
            env = Env(path, create=create, map_size=map_size, writable=writable or create, fs=fs)
            _registry[key] = env
        elif writable and not env.writable:
            env.upgrade()
        env.refs += 1
        return env


def release_env(env: Env) -> None:
    with _registry_lock:
        env.refs -= 1
        if env.refs <= 0:
            key = os.path.realpath(env.path)
            if _registry.get(key) is env:
                del _registry[key]
            if env.pid == os.getpid():
                env.env.close()
