"""One LMDB environment per store per process, with a map that grows instead of failing.

LMDB refuses to open the same environment twice in one process, yet a user may well hold a
reader and a writer ``Pool`` of one store side by side; so environments are shared through a
reference-counted registry keyed by the real path. Never carry an environment across ``fork()``:
the registry remembers the pid that opened it and reopens in a child.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

from dpsn.errors import CorruptStoreError, StoreFullError, StoreNotFoundError

from ._format import DB_COMMITS, DB_META, DB_ROWS, DB_SEGMENTS, DB_SNAPSHOTS

T = TypeVar("T")

DEFAULT_MAP_SIZE = 64 << 20  # grows by doubling; LMDB maps sparse files, so this costs no disk
MAX_MAP_SIZE = 1 << 44
MAX_READERS = 512
_DBS = (DB_META, DB_ROWS, DB_COMMITS, DB_SEGMENTS, DB_SNAPSHOTS)


class Env:
    """A shared LMDB environment and its named databases."""

    def __init__(self, path: Path, *, create: bool, map_size: int) -> None:
        if not create and not (path / "data.mdb").is_file():
            raise StoreNotFoundError(
                f"the store's LMDB index is missing: {path / 'data.mdb'} does not exist. "
                "The store is damaged; restore it from a copy."
            )
        try:
            self.env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=len(_DBS) + 2,
                max_readers=MAX_READERS,
                create=create,
                subdir=True,
                readonly=not os.access(path if path.exists() else path.parent, os.W_OK),
            )
        except lmdb.InvalidError as e:
            raise CorruptStoreError(f"{path} is not a valid LMDB environment: {e}") from e
        except lmdb.Error as e:
            raise CorruptStoreError(f"cannot open the LMDB index at {path}: {e}") from e
        self.path = path
        self.pid = os.getpid()
        self.refs = 0
        self._lock = threading.Lock()
        try:
            with self.env.begin(write=not self.env.flags()["readonly"]) as txn:
                self.dbs = {name: self.env.open_db(name, txn=txn) for name in _DBS}
        except lmdb.Error as e:
            raise CorruptStoreError(f"{path}: the LMDB index lacks dpsn's databases: {e}") from e

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in a read transaction: one consistent snapshot of the index."""
        for _ in range(3):
            try:
                with self.env.begin(buffers=False) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                # Another process grew the map; adopt its size and retry.
                self.env.set_mapsize(0)
        raise CorruptStoreError(f"{self.path}: the LMDB map kept changing size under a reader")

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction, growing the map and retrying when it is full.

        ``fn`` must be safe to re-run: a full map aborts the whole transaction, nothing of it
        is kept, and it starts again on the bigger map.
        """
        with self._lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)
                except lmdb.MapFullError:
                    size = self.env.info()["map_size"]
                    if size >= MAX_MAP_SIZE:
                        raise StoreFullError(
                            f"{self.path}: the LMDB map reached {size} bytes, the limit"
                        ) from None
                    self.env.set_mapsize(min(size * 2, MAX_MAP_SIZE))
                except lmdb.DiskError as e:
                    raise StoreFullError(
                        f"{self.path}: the disk is full or failing ({e}); nothing was committed"
                    ) from e
                except lmdb.Error as e:
                    if "Input/output" in str(e) or "No space" in str(e):
                        raise StoreFullError(
                            f"{self.path}: the disk is full or failing ({e}); nothing was committed"
                        ) from e
                    raise

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])


_registry: dict[str, Env] = {}
_registry_lock = threading.Lock()


def acquire_env(path: Path, *, create: bool = False, map_size: int = DEFAULT_MAP_SIZE) -> Env:
    key = os.path.realpath(path)
    with _registry_lock:
        env = _registry.get(key)
        if env is not None and env.pid != os.getpid():
            _registry.pop(key)  # inherited across fork: never touch it
            env = None
        if env is None:
            env = Env(path, create=create, map_size=map_size)
            _registry[key] = env
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
