"""The file seam: the store engine's file and LMDB-environment I/O goes through here.

LevelDB's ``Env`` and zarr's ``WrapperStore`` show the idea: the engine never calls ``os``
for a write itself, it asks a :class:`FileSystem`, so a test (or a user) can put another one
under a store: one that counts operations, fails the n-th write, fsync or rename with ``ENOSPC``
or ``EIO``, tears a write, or drops everything not fsynced ("power loss").
tests/_faultfs.py is such a one, and tests/test_fault_seam.py sweeps a commit with it.

Choosing one: ``PersistedStore.create(..., fs=)`` / ``PersistedStore.open(..., fs=)`` take one
per store; :func:`using` sets the one that stores opened inside its ``with`` block get (the
default is :data:`OS`, plain POSIX). A store keeps the file system it was opened with for its
life, and hands it to everything it writes through: segments and every other Zarr array
(a zarr ``LocalStore`` whose writes go through the seam, ``_zarrseam.SeamStore``), run files,
protected rows, snapshot copies, the manifest, LMDB's open and each LMDB transaction's commit,
the writer lock and the reader leases (their files and their ``flock``), a sharded root's
manifest and global records (:mod:`dpsn.store.shards`), a levelled root's files and its
migration-state arrays (:mod:`dpsn.store.levels`). Reads of the engine's own files go through
it too (:meth:`FileSystem.open_read`, :meth:`FileSystem.pread`): the manifest, JSON records,
level and shard roots, every checked Zarr array (generator versions, routers, protected rows,
snapshot copies, segment metadata, migration state), run-file headers and co-use files. A read
that fails with an I/O error becomes :class:`dpsn.errors.StoreReadError`, naming the file.

What the seam cannot reach (documented, not hidden):

- the bytes LMDB writes to ``data.mdb``/``lock.mdb``: LMDB writes and fsyncs them in C inside
  ``mdb_txn_commit``; the seam sees the commit as one operation (:meth:`FileSystem.lmdb_commit`)
  that succeeds whole or fails whole, which is LMDB's own contract (its meta page flips last);
- memory-mapped reads: LMDB's map and the run files' entries (``np.memmap``) are read by page
  faults, not calls (their sizes are guarded: ``_files.SizeGuard``); the LMDB file checks of
  ``verify`` (``_lmdbfile``) read ``data.mdb`` with ``os`` directly;
- reads by zarr itself: the segment chunks a ``zarr`` array reads (``LocalStore``'s reads);
- the remote-store helpers (:mod:`dpsn.store.remote`: publishing to and reading from a
  bucket, and its local read-through cache), and ``shards.copy_durably`` (a reshard's copy of
  a whole shard directory, fsynced after), which write outside any open store.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "OS",
    "FileSystem",
    "OsFileSystem",
    "WriteHandle",
    "current",
    "fsync_dir",
    "fsync_tree",
    "using",
    "write_all",
    "write_file",
]


@runtime_checkable
class WriteHandle(Protocol):
    """An open file being written. ``write`` may write fewer bytes than asked (like
    ``os.write``): callers use :func:`write_all`."""

    def write(self, data: bytes | memoryview) -> int: ...

    def seek(self, pos: int) -> None: ...

    def fsync(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class FileSystem(Protocol):
    """The operations the store engine writes with. Paths are absolute ``Path``s. Each may
    raise ``OSError`` (with an ``errno``); the engine turns those into typed dpsn errors."""

    def open_write(self, path: Path, *, exclusive: bool = False) -> WriteHandle:
        """Create (or truncate) ``path`` for writing; ``exclusive``: fail if it exists."""
        ...

    def fsync_dir(self, path: Path) -> None:
        """Make the entries of directory ``path`` (creations, renames, removals) durable."""
        ...

    def replace(self, src: Path, dst: Path) -> None:
        """``os.replace``: rename ``src`` over ``dst`` atomically (files or empty dirs)."""
        ...

    def link(self, src: Path, dst: Path) -> None:
        """``os.link``: a second name for ``src``; fails if ``dst`` exists."""
        ...

    def unlink(self, path: Path, *, missing_ok: bool = False) -> None: ...

    def mkdir(self, path: Path, *, parents: bool = False, exist_ok: bool = False) -> None: ...

    def rmdir(self, path: Path) -> None: ...

    def rmtree(self, path: Path, *, ignore_errors: bool = False) -> None:
        """Remove a directory tree (used for uncommitted leftovers and unreferenced data)."""
        ...

    def fsync_file(self, path: Path) -> None:
        """fsync a file written earlier (zarr closes its files before the engine syncs them)."""
        ...

    def lmdb_open(self, path: Path, **kwargs: Any) -> Any:
        """``lmdb.open(str(path), **kwargs)``."""
        ...

    # -- reads: ``os`` descriptors, since the engine checks them with ``fstat`` and maps some

    def open_read(self, path: Path, *, follow: bool = True) -> int:
        """A read-only descriptor of ``path`` (an ``os`` one, close it with ``os.close``),
        opened non-blocking (a FIFO never hangs the open); ``follow=False``: refuse a link."""
        ...

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes of ``fd`` from ``offset`` (``os.pread``: fewer only at its end)."""
        ...

    # -- locks: the writer lock and the reader leases (``flock`` needs a real descriptor)

    def open_lock(self, path: Path, *, create: bool) -> int:
        """A read-write ``os`` descriptor of the lock or lease file ``path``: a new file
        (``create``: fails if it exists) or the existing one."""
        ...

    def lock(self, fd: int) -> bool:
        """Try to take the exclusive ``flock`` of ``fd`` without waiting: False when another
        open file holds it. The kernel releases it when the process dies, however it dies."""
        ...

    def unlock(self, fd: int) -> None:
        """Release the ``flock`` of ``fd`` (a forked child may share the open file)."""
        ...

    def overwrite(self, fd: int, data: bytes) -> None:
        """Replace the whole content of the open file ``fd`` with ``data`` (a lease naming the
        commit its reader holds; never fsynced: a lease lives only as long as its process)."""
        ...

    def lmdb_commit(self, txn: Any) -> None:
        """Commit an LMDB write transaction (``txn.commit()``): LMDB writes and fsyncs in C."""
        ...


class _OsHandle:
    """A file open for writing on the real file system (an ``os`` descriptor)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | memoryview) -> int:
        return os.write(self.fd, data)

    def seek(self, pos: int) -> None:
        os.lseek(self.fd, pos, os.SEEK_SET)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class OsFileSystem:
    """The default: plain POSIX calls."""

    def open_write(self, path: Path, *, exclusive: bool = False) -> WriteHandle:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_EXCL if exclusive else os.O_TRUNC
        return _OsHandle(os.open(path, flags, 0o644))

    def fsync_dir(self, path: Path) -> None:
        _fsync_path(path)

    def fsync_file(self, path: Path) -> None:
        _fsync_path(path)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def link(self, src: Path, dst: Path) -> None:
        os.link(src, dst)

    def unlink(self, path: Path, *, missing_ok: bool = False) -> None:
        Path(path).unlink(missing_ok=missing_ok)

    def mkdir(self, path: Path, *, parents: bool = False, exist_ok: bool = False) -> None:
        Path(path).mkdir(parents=parents, exist_ok=exist_ok)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def rmtree(self, path: Path, *, ignore_errors: bool = False) -> None:
        shutil.rmtree(path, ignore_errors=ignore_errors)

    def lmdb_open(self, path: Path, **kwargs: Any) -> Any:
        import lmdb

        return lmdb.open(str(path), **kwargs)

    def lmdb_commit(self, txn: Any) -> None:
        txn.commit()

    def open_read(self, path: Path, *, follow: bool = True) -> int:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        return os.open(path, flags if follow else flags | os.O_NOFOLLOW)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def open_lock(self, path: Path, *, create: bool) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC
        return os.open(path, flags | os.O_CREAT | os.O_EXCL if create else flags, 0o644)

    def lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def overwrite(self, fd: int, data: bytes) -> None:
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while len(view):
            n = os.pwrite(fd, view, len(data) - len(view))
            if n <= 0:
                raise OSError(errno.EIO, "a write made no progress")
            view = view[n:]


OS: FileSystem = OsFileSystem()
"""The default file system: the real one."""

_current: contextvars.ContextVar[FileSystem] = contextvars.ContextVar("dpsn_store_fs", default=OS)


def current() -> FileSystem:
    """The file system a store opened now gets when none is named."""
    return _current.get()


@contextlib.contextmanager
def using(fs: FileSystem) -> Iterator[FileSystem]:
    """Stores created or opened inside the block (without an explicit ``fs=``) write through
    ``fs``; they keep it after the block ends."""
    if not isinstance(fs, FileSystem):
        from dpsn.errors import InvalidArgumentTypeError

        raise InvalidArgumentTypeError(
            f"using() needs a dpsn.store.fs.FileSystem, got {type(fs).__name__}"
        )
    token = _current.set(fs)
    try:
        yield fs
    finally:
        _current.reset(token)


# -- helpers every writer uses -------------------------------------------------------------


def write_all(f: WriteHandle, data: bytes | memoryview) -> None:
    """Write all of ``data``: a short write goes on where it stopped; a write of nothing (a
    file system that makes no progress) is ``EIO``, never a silent cut."""
    view = memoryview(data).cast("B")
    while len(view):
        n = f.write(view)
        if n <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        view = view[n:]


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (both through a read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def creating(fs: FileSystem, path: Path) -> Iterator[WriteHandle]:
    """``path`` created for writing through ``fs`` and closed after the block; a block that
    fails removes it, so a failed write leaves no partial file behind."""
    f = fs.open_write(path)
    try:
        yield f
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            fs.unlink(path, missing_ok=True)
        raise
    f.close()


def write_file(fs: FileSystem, path: Path, data: bytes | memoryview, *, sync: bool) -> None:
    """Create ``path`` with ``data`` (fsynced when ``sync``); a failure removes the file."""
    with creating(fs, path) as f:
        write_all(f, data)
        if sync:
            f.fsync()


def fsync_dir(path: Path, fs: FileSystem | None = None) -> None:
    (fs or current()).fsync_dir(Path(path))


def fsync_tree(path: Path, fs: FileSystem | None = None) -> None:
    """fsync every file and directory below ``path`` (zarr writes without fsync), deepest
    first, so a directory's entries are synced after what they name."""
    fs = fs or current()
    for dirpath, _dirnames, filenames in sorted(os.walk(path), key=lambda w: -len(w[0])):
        for name in sorted(filenames):
            fs.fsync_file(Path(dirpath) / name)
        fs.fsync_dir(Path(dirpath))
