"""The single-writer lock.

LMDB already serialises write transactions, but a second writer would interleave its staged
segments and commits with ours; we want it refused up front with a clear error. ``flock`` locks
belong to an open file description, so a second ``open(mode="r+")`` in the same process is
refused too, and the kernel releases the lock when a writer dies (even by SIGKILL).

The lock file is made, opened and locked through the file seam (``dpsn.store.fs``:
``open_lock`` and ``lock``), so a fault-injecting file system reaches it too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dpsn.errors import ReadOnlyError, StoreLockedError

from ._checks import write_failed
from .fs import FileSystem
from .fs import current as current_fs


class WriterLock:
    def __init__(self, path: Path, fs: FileSystem | None = None) -> None:
        self._path = path
        self._fs = fs or current_fs()
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; True if this call created the lock file."""
        created = True
        try:
            try:
                fd = self._fs.open_lock(self._path, create=True)
            except FileExistsError:
                created = False
                fd = self._fs.open_lock(self._path, create=False)
        except PermissionError as e:
            raise ReadOnlyError(
                f"cannot take the writer lock {self._path}: {e}. Open the store read-only "
                '(mode="r") or fix its permissions.'
            ) from e
        except OSError as e:
            if isinstance(e, FileNotFoundError | FileExistsError):
                raise  # (the callers handle a folder removed or a file made meanwhile)
            raise write_failed(e, f"cannot take the writer lock {self._path}") from e
        try:
            held = self._fs.lock(fd)
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):
                raise write_failed(e, f"cannot take the writer lock {self._path}") from e
            raise
        if not held:
            os.close(fd)
            raise StoreLockedError(
                f"{self._path.parent} is already open for writing by another process or Pool; "
                'close that writer first, or open this one with mode="r".'
            )
        self._fd = fd
        return created

    def still_linked(self) -> bool:
        """Whether the locked file is still the one at the path: a creator that failed removes
        its folder, lock file included, and a lock on that removed file protects nothing."""
        if self._fd is None:
            return False
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return False
        own = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:  # explicitly: a forked child may share the open file (and so the lock)
                with contextlib.suppress(OSError):  # (closing it releases ours anyway)
                    self._fs.unlock(fd)
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None
