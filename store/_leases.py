"""Reader leases: how ``gc`` and compaction in one process see what readers in others hold.

A reader (``mode="r"``) loads the row index of one commit and reads that commit's segments for
as long as it lives; deleting one of them under it would turn its reads into errors. LMDB's
reader table cannot say which *commit* a reader holds (and holding a read transaction for a
reader's whole life would pin LMDB pages and block map resizes), so each reader keeps a lease:

- ``readers/<pid>-<random>.lease`` in the store, ``flock``-ed exclusively by its owner for its
  whole life, holding JSON ``{"commit": id or null, "pid", "time"}``. ``null`` means the reader
  is still choosing its commit.
- The kernel drops a ``flock`` when its owner dies, however it dies: a lease whose lock can be
  taken belongs to a dead reader, and the writer removes it. No clocks, no expiry to tune.
- ``gc`` reads the leases before it decides (every held commit is kept), and again after it
  has forgotten the segments' records but before it deletes a file: if a lease appeared or is
  still choosing, it leaves the files (the next ``gc`` removes them as leftovers). A reader,
  once its lease names its commit, checks that every segment its index needs is still recorded
  (``SnapshotUnavailableError`` otherwise). Either the writer sees the lease, or the reader sees
  the records gone: no reader is left reading a deleted file.

A reader that cannot write a lease (a read-only copy or mount, a store only its writer may write
to, a full disk) reads without one: it warns (``LeaseWarning``) and ``pool.info()`` says
``"reader_lease": False``. Nothing then stops a writer's gc from removing the commit it reads
(its reads fail with ``SnapshotUnavailableError``, never return wrong rows): give readers
write access to ``readers/``, or pin what they read with a snapshot.

Every file operation here (the folder, the lease's creation, ``flock``, its content, the
rename, the scan's opens, locks, reads and removals) goes through the file seam
(``dpsn.store.fs``): the store's file system, or the current one.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from dpsn.errors import LeaseWarning

from ._files import READ_FAULTS, read_fault
from .fs import FileSystem
from .fs import current as current_fs

__all__ = ["READERS_DIR", "Lease", "LeaseWarning", "LiveReaders", "live_readers"]


READERS_DIR = "readers"
_SUFFIX = ".lease"
_MAX_LEASE_BYTES = 4096


class Lease:
    """One reader's lease; ``hold(commit)`` names the commit it reads."""

    def __init__(self, root: Path, fs: FileSystem | None = None) -> None:
        self.path: Path | None = None
        self._fd: int | None = None
        self._fs = fs = fs or current_fs()
        self.problem: str | None = None  # why no lease could be made
        folder = Path(root) / READERS_DIR
        name = f"{os.getpid()}-{uuid.uuid4().hex[:16]}"
        # Made and locked under a name the scan skips, then renamed (the lock stays with the
        # file): a scan can never find the lease unlocked and take it for a dead reader's.
        tmp, path = folder / f"{name}.tmp", folder / f"{name}{_SUFFIX}"
        for attempt in range(5):
            try:
                fs.mkdir(folder, exist_ok=True)
                fd = fs.open_lock(tmp, create=True)
                break
            except FileNotFoundError:  # the last reader removed the folder meanwhile
                if attempt == 4:
                    raise
            except OSError as e:
                # A read-only copy or mount, a store only its writer may write to, a full
                # disk, a damaged store (``readers`` is a file): read without a lease rather
                # than not at all, and say so (a gc elsewhere cannot see this reader).
                self._no_lease(folder, e)
                return
        try:
            if not fs.lock(fd):  # a new file no one else has opened: never taken
                raise BlockingIOError(f"{tmp} is locked by another reader")
            self._fd = fd
            self.hold(None)
            fs.replace(tmp, path)
        except BaseException as e:
            self._fd = None
            os.close(fd)
            with contextlib.suppress(OSError):
                fs.unlink(tmp, missing_ok=True)
            if not isinstance(e, OSError):
                raise
            self._no_lease(folder, e)  # a failed lock, write or rename: as a failed create
            return
        self.path = path

    def _no_lease(self, folder: Path, e: OSError) -> None:
        self.problem = f"{folder}: {e.strerror or e}"
        warnings.warn(
            f"this reader holds no lease ({self.problem}): a gc in a writer cannot "
            "see it and may remove the commit it reads. Give readers write access to "
            f"{folder}/ or pin the commit with a snapshot (pool.info()['reader_lease'] "
            "is False)",
            LeaseWarning,
            stacklevel=5,
        )

    @property
    def active(self) -> bool:
        return self._fd is not None

    def hold(self, commit: int | None) -> None:
        """Name the commit this reader reads (``None``: choosing one)."""
        if self._fd is None:
            return
        data = json.dumps({"commit": commit, "pid": os.getpid(), "time": time.time()}).encode()
        self._fs.overwrite(self._fd, data)

    def release(self) -> None:
        fd, path = self._fd, self.path
        self._fd = self.path = None
        if fd is None:
            return
        try:
            if path is not None:
                with contextlib.suppress(OSError):
                    self._fs.unlink(path)
                with contextlib.suppress(OSError):  # the last one out leaves the store as it was
                    self._fs.rmdir(path.parent)
        finally:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


@dataclass(frozen=True)
class LiveReaders:
    """What the live leases hold: the commits named, and how many are still choosing."""

    commits: frozenset[int]
    choosing: int
    names: frozenset[str]


def live_readers(
    root: Path,
    *,
    remove_dead: bool = False,
    skip: str | None = None,
    fs: FileSystem | None = None,
) -> LiveReaders:
    """Scan the leases of a store. A lease whose lock can be taken is a dead reader's (removed
    when ``remove_dead``: the caller holds the writer lock); one that cannot be parsed while
    locked is being written, and counts as choosing. ``skip``: a lease file name to leave out
    (the caller's own, when it reads the store to answer a dry run). Through the file seam
    ``fs`` (the current one by default); a scan that cannot read the folder or a lease raises
    its ``OSError`` (gc then keeps every file: it cannot know what readers hold)."""
    fs = fs or current_fs()
    folder = Path(root) / READERS_DIR
    commits: set[int] = set()
    names: set[str] = set()
    choosing = 0
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # (not a folder: no reader could lease)
        return LiveReaders(frozenset(), 0, frozenset())
    for path in entries:
        creating = path.name.endswith(".tmp")
        if not (creating or path.name.endswith(_SUFFIX)) or path.name == skip:
            continue
        try:
            # Non-blocking: a FIFO planted under a lease's name must not hang gc.
            fd = fs.open_read(path, follow=False)
        except OSError as e:
            if e.errno in READ_FAULTS:  # the device failed: gc cannot know what it holds
                raise read_fault(e, path, f"reader lease {path}") from None
            continue  # removed meanwhile (or a link: never a lease)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue  # not a lease: no reader made it
            try:
                held = not fs.lock(fd)
                raw = fs.pread(fd, _MAX_LEASE_BYTES, 0) if held else b""
            except OSError as e:
                raise read_fault(e, path, f"reader lease {path}") from None
            if held:
                names.add(path.name)
                commit = None if creating else _commit_of(raw)
                if commit is None:
                    choosing += 1
                else:
                    commits.add(commit)
                continue
            if remove_dead:  # its owner is gone: the kernel released its lock
                with contextlib.suppress(OSError):  # best effort: the next scan retries
                    fs.unlink(path, missing_ok=True)
        finally:
            os.close(fd)
    return LiveReaders(frozenset(commits), choosing, frozenset(names))


def _commit_of(raw: bytes) -> int | None:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    commit = value.get("commit") if isinstance(value, dict) else None
    if isinstance(commit, bool) or not isinstance(commit, int) or commit < 1:
        return None
    return commit
