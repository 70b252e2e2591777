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

A reader on a read-only copy of a store cannot write a lease; it reads without one (no writer
can change such a copy either).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["READERS_DIR", "Lease", "LiveReaders", "live_readers"]

READERS_DIR = "readers"
_SUFFIX = ".lease"
_MAX_LEASE_BYTES = 4096


class Lease:
    """One reader's lease; ``hold(commit)`` names the commit it reads."""

    def __init__(self, root: Path) -> None:
        self.path: Path | None = None
        self._fd: int | None = None
        folder = Path(root) / READERS_DIR
        name = f"{os.getpid()}-{uuid.uuid4().hex[:16]}"
        # Made and locked under a name the scan skips, then renamed (the lock stays with the
        # file): a scan can never find the lease unlocked and take it for a dead reader's.
        tmp, path = folder / f"{name}.tmp", folder / f"{name}{_SUFFIX}"
        for attempt in range(5):
            try:
                folder.mkdir(exist_ok=True)
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileNotFoundError:  # the last reader removed the folder meanwhile
                if attempt == 4:
                    raise
            except OSError:
                # A read-only copy, a full disk, or a damaged store (``readers`` is a file):
                # read without a lease rather than not at all.
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fd = fd
            self.hold(None)
            os.rename(tmp, path)
        except OSError:
            self._fd = None
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self.path = path

    @property
    def active(self) -> bool:
        return self._fd is not None

    def hold(self, commit: int | None) -> None:
        """Name the commit this reader reads (``None``: choosing one)."""
        if self._fd is None:
            return
        data = json.dumps({"commit": commit, "pid": os.getpid(), "time": time.time()}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        fd, path = self._fd, self.path
        self._fd = self.path = None
        if fd is None:
            return
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):  # the last one out leaves the store as it was
                path.parent.rmdir()
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


def live_readers(root: Path, *, remove_dead: bool = False, skip: str | None = None) -> LiveReaders:
    """Scan the leases of a store. A lease whose lock can be taken is a dead reader's (removed
    when ``remove_dead``: the caller holds the writer lock); one that cannot be parsed while
    locked is being written, and counts as choosing. ``skip``: a lease file name to leave out
    (the caller's own, when it reads the store to answer a dry run)."""
    folder = Path(root) / READERS_DIR
    commits: set[int] = set()
    names: set[str] = set()
    choosing = 0
    try:
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        return LiveReaders(frozenset(), 0, frozenset())
    for path in entries:
        creating = path.name.endswith(".tmp")
        if not (creating or path.name.endswith(_SUFFIX)) or path.name == skip:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # removed meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = os.pread(fd, _MAX_LEASE_BYTES, 0)
                names.add(path.name)
                commit = None if creating else _commit_of(raw)
                if commit is None:
                    choosing += 1
                else:
                    commits.add(commit)
                continue
            if remove_dead:  # its owner is gone: the kernel released its lock
                path.unlink(missing_ok=True)
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
