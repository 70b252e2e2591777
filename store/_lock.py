"""The single-writer lock.

LMDB already serialises write transactions, but a second writer would interleave its staged
segments and commits with ours; we want it refused up front with a clear error. ``flock`` locks
belong to an open file description, so a second ``open(mode="r+")`` in the same process is
refused too, and the kernel releases the lock when a writer dies (even by SIGKILL).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dpsn.errors import ReadOnlyError, StoreLockedError


class WriterLock:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; True if this call created the lock file."""
        created = True
        try:
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                created = False
                fd = os.open(self._path, os.O_RDWR)
        except PermissionError as e:
            raise ReadOnlyError(
                f"cannot take the writer lock {self._path}: {e}. Open the store read-only "
                '(mode="r") or fix its permissions.'
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{self._path.parent} is already open for writing by another process or Pool; "
                'close that writer first, or open this one with mode="r".'
            ) from None
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
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
