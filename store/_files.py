"""Opening a store's files as untrusted input: regular files only, sizes bounded, no blocking.

A store is a directory anyone may have changed: a FIFO where a file should be blocks ``open``
for ever (no writer ever comes), a link to ``/dev/zero`` reads without end, a device node may do
anything. So every file the store engine reads is opened with ``O_NONBLOCK`` (an ``open`` of a
FIFO returns at once instead of waiting for a writer), checked with ``fstat`` to be a regular
file before a byte is read, and read only up to a bound its caller states. ``O_NONBLOCK`` has
no effect on regular files, so reads after the check behave as usual.

Both go through the file seam (``dpsn.store.fs``: ``open_read`` and ``pread``), on the file
system the caller names (the store's own) or the current one. An I/O error while opening or
reading (``EIO`` and its kin, not a missing file) becomes :class:`StoreReadError`, naming the
file: the caller's "could not read" is typed, and nothing was changed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from dpsn.errors import CorruptStoreError, StoreReadError

from .fs import FileSystem
from .fs import current as current_fs

__all__ = [
    "READ_FAULTS",
    "NotRegularFileError",
    "SizeGuard",
    "StoreReadError",
    "check_regular",
    "file_kind",
    "kind_of",
    "open_regular",
    "pread_regular",
    "read_fault",
    "read_regular",
]

# What a read of a store's file fails with when the device does (not a missing or
# wrong-type file, which callers handle by their own names).
READ_FAULTS = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADMSG, errno.ESTALE})


def read_fault(e: OSError, path: Path | str, what: str = "") -> OSError:
    """``e`` as :class:`StoreReadError` naming ``path`` when it is a device's read fault
    (:data:`READ_FAULTS`); otherwise ``e`` itself (a caller re-raises what it gets)."""
    if isinstance(e, CorruptStoreError) or e.errno not in READ_FAULTS:
        return e
    err = StoreReadError(
        e.errno,
        f"{what or path} cannot be read ({os.strerror(e.errno)}): the device failed the read; "
        "nothing was changed",
        str(path),
    )
    err.__cause__ = e
    return err


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


def open_regular(path: Path | str, what: str = "", fs: FileSystem | None = None) -> tuple[int, int]:
    """A read-only descriptor of ``path`` and its size, once it is known to be a regular file
    (``NotRegularFileError`` otherwise; an I/O error is :class:`StoreReadError`;
    ``FileNotFoundError`` and other ``OSError`` pass). Never blocks: a FIFO is opened
    non-blocking and refused. Opened through ``fs`` (the current file system by default)."""
    try:
        fd = (fs or current_fs()).open_read(Path(path))
    except OSError as e:
        raise read_fault(e, path, what) from None
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


def check_regular(path: Path | str, what: str = "", fs: FileSystem | None = None) -> int:
    """The size of ``path`` once it is known to be a regular file (see :func:`open_regular`)."""
    fd, size = open_regular(path, what, fs)
    os.close(fd)
    return size


def pread_regular(
    fd: int, n: int, offset: int, path: Path | str, what: str = "", fs: FileSystem | None = None
) -> bytes:
    """``fs.pread`` of a descriptor :func:`open_regular` gave, an I/O error typed."""
    try:
        return (fs or current_fs()).pread(fd, n, offset)
    except OSError as e:
        raise read_fault(e, path, what) from None


def read_regular(
    path: Path | str, limit: int, what: str = "", fs: FileSystem | None = None
) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (``CorruptStoreError`` when it is
    larger: the size is checked before anything is read, and the read stops at the bound
    whatever the file does meanwhile). Read through ``fs`` (the current one by default)."""
    fs = fs or current_fs()
    fd, size = open_regular(path, what, fs)
    try:
        if size > limit:
            raise CorruptStoreError(
                f"{what or path} is {size} bytes, over the {limit} this file can be: the store "
                "is damaged"
            )
        chunks, got = [], 0
        while got <= limit:
            block = pread_regular(fd, min(1 << 20, limit + 1 - got), got, path, what, fs)
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
