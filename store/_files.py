"""Opening a store's files as untrusted input: regular files only, sizes bounded, no blocking.

A store is a directory anyone may have changed: a FIFO where a file should be blocks ``open``
for ever (no writer ever comes), a link to ``/dev/zero`` reads without end, a device node may do
anything. So every file the store engine reads is opened with ``O_NONBLOCK`` (an ``open`` of a
FIFO returns at once instead of waiting for a writer), checked with ``fstat`` to be a regular
file before a byte is read, and read only up to a bound its caller states. ``O_NONBLOCK`` has
no effect on regular files, so reads after the check behave as usual.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from dpsn.errors import CorruptStoreError

__all__ = [
    "NotRegularFileError",
    "SizeGuard",
    "check_regular",
    "file_kind",
    "kind_of",
    "open_regular",
    "read_regular",
]


class NotRegularFileError(CorruptStoreError):
    """A path in a store holds something other than a regular file (a FIFO, a device, a
    directory, a socket): it is never read, since reading it could block or never end."""


def kind_of(mode: int) -> str:
    """A file type in words, for messages."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


file_kind = kind_of  # the public name (``dpsn.tiers.file_kind``)


def open_regular(path: Path | str, what: str = "") -> tuple[int, int]:
    """A read-only descriptor of ``path`` and its size, once it is known to be a regular file
    (``NotRegularFileError`` otherwise; ``FileNotFoundError`` and other ``OSError`` pass).
    Never blocks: a FIFO is opened non-blocking and refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(
                f"{what or path} is {kind_of(st.st_mode)}, not a regular file: the store is "
                "damaged (a file of it was replaced); restore it from a copy"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def check_regular(path: Path | str, what: str = "") -> int:
    """The size of ``path`` once it is known to be a regular file (see :func:`open_regular`)."""
    fd, size = open_regular(path, what)
    os.close(fd)
    return size


def read_regular(path: Path | str, limit: int, what: str = "") -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (``CorruptStoreError`` when it is
    larger: the size is checked before anything is read, and the read stops at the bound
    whatever the file does meanwhile)."""
    fd, size = open_regular(path, what)
    try:
        if size > limit:
            raise CorruptStoreError(
                f"{what or path} is {size} bytes, over the {limit} this file can be: the store "
                "is damaged"
            )
        chunks, got = [], 0
        while got <= limit:
            block = os.read(fd, min(1 << 20, limit + 1 - got))
            if not block:
                break
            chunks.append(block)
            got += len(block)
        if got > limit:
            raise CorruptStoreError(f"{what or path} grew past {limit} bytes while being read")
        return b"".join(chunks)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


class SizeGuard:
    """An open descriptor of a memory-mapped file and the size it must keep: ``intact()`` is
    one ``fstat``, run before code touches the map. A page past the end of a file cut under
    its map (a backup restored with ``cp`` over a live store) raises SIGBUS, which kills the
    process; the check turns that into a typed error. The descriptor is closed with the
    guard."""

    __slots__ = ("_fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self._fd: int | None = fd
        self.size = size

    def intact(self) -> bool:
        try:
            return self._fd is not None and os.fstat(self._fd).st_size >= self.size
        except OSError:
            return False

    def __del__(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
