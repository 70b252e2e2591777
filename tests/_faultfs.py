"""A fault-injecting file system for the store's file seam (``dpsn.store.fs``).

``FaultFS`` passes every operation to the real file system and counts it. Armed with
``arm(at=n, kind=k)`` it fails the n-th operation (0-based, counted from the arming) with:

- ``"enospc"`` / ``"eio"``: the operation raises ``OSError`` (nothing done); a read, a
  lock or an unlock is not hit by ``"enospc"`` (reads fail with ``EIO``);
- ``"short"``: a write writes half of its bytes and says so (``os.write`` may); other
  operations are not hit by this kind;
- ``"torn"``: a write writes half of its bytes, then the process dies (:class:`Crash`); for
  any other operation the process dies before it;
- ``"power"``: the power goes before the operation: everything not made durable is dropped
  (file contents not fsynced since they last changed, directory entries not fsynced since
  they last changed: the strict POSIX model LevelDB's ``FaultInjectionTestEnv`` uses), and
  the process dies (:class:`Crash`).

After a :class:`Crash` every further operation raises :class:`Crash` again (the process is
dead; its ``finally`` blocks must not get to write). LMDB's own files are outside the model:
LMDB writes and fsyncs them itself inside ``mdb_txn_commit`` (one seam operation,
``lmdb_commit``), so they hold exactly the transactions committed before the fault.

Durability is tracked by inode. So that an inode number is never reused while the model
still names it, nothing is really deleted while the file system is armed: removed files and
trees are moved to a graveyard directory beside the store (same file system).
"""

from __future__ import annotations

import errno
import os
import re
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpsn.store.fs import OS

KINDS = ("enospc", "eio", "short", "torn", "power")
WRITE_OPS = {"write"}
READ_OPS = {"open_read", "read", "lock", "unlock"}  # no ENOSPC, no short write
# What the model leaves alone: LMDB's directory (LMDB syncs it), the writer lock and the
# reader leases (locks of live processes: never data, never fsynced).
UNTRACKED = {"index.lmdb", "writer.lock", "readers"}
# The seam's shared helpers: a site is named by their caller.
_HELPERS = {
    "fsync_tree", "fsync_dir", "write_file", "write_all", "_fsync_tree",
    "open_regular", "pread_regular", "read_regular", "check_regular",
    "read_array_meta", "read_array", "read_chunks", "_read_chunk",
}  # fmt: skip


def applies(name: str, kind: str) -> bool:
    """Whether fault ``kind`` can hit an operation named ``name`` (a short write only hits a
    write; a read or a lock cannot run out of space)."""
    if kind == "short":
        return name in WRITE_OPS
    if kind == "enospc":
        return name not in READ_OPS
    return True


class Crash(BaseException):
    """The process died at an injected fault (a torn write or a power loss). A
    ``BaseException``, so that no ``except Exception``/``except OSError`` of the engine
    handles it: like a killed process, it runs nothing more."""


@dataclass
class Op:
    """One counted operation: its index, name, the path it touched and the engine's call site
    (``file:line`` of the nearest store frame; zarr's writes, which run on zarr's event loop
    thread, are named by their path pattern instead)."""

    index: int
    name: str
    path: str
    site: str


def _pattern(rel: str) -> str:
    """A path with its numbers taken out: one site for every chunk, segment, temporary."""
    rel = re.sub(r"\.tmp-[0-9a-f]+", ".tmp-*", rel)
    rel = re.sub(r"[0-9a-f]{16}", "*", rel)
    return re.sub(r"(?<=/)\d+(?=/|$)", "*", rel)


@dataclass
class FaultFS:
    """See the module docstring. ``root``: the store directory whose durability is modelled;
    ``graveyard``: a directory on the same file system for what is removed while armed."""

    root: Path
    graveyard: Path
    ops: list[Op] = field(default_factory=list)
    at: int | None = None
    kind: str | None = None
    armed: bool = False
    dead: bool = False
    fired: Op | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _files: dict[int, bytes] = field(default_factory=dict)  # inode -> durable content
    # directory inode -> its durable entries: name -> (inode, is a directory)
    _dirs: dict[int, dict[str, tuple[int, bool]]] = field(default_factory=dict)
    _fds: dict[int, Path] = field(default_factory=dict)  # descriptors it opened -> path

    # -- arming and the durable model ------------------------------------------------------

    def arm(self, at: int | None = None, kind: str | None = None) -> None:
        """Start counting (and, with ``at``/``kind``, fail the ``at``-th operation). Everything
        under ``root`` now is taken as durable."""
        self.graveyard.mkdir(parents=True, exist_ok=True)
        self.ops, self.at, self.kind, self.fired = [], at, kind, None
        self.armed, self.dead = True, False
        self._files, self._dirs = {}, {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            # (at any depth: a sharded or levelled root holds several stores)
            dirnames[:] = [d for d in dirnames if d not in UNTRACKED]
            self._sync_dir(Path(dirpath))
            for name in filenames:
                if name not in UNTRACKED:
                    self._sync_file(Path(dirpath) / name)

    def disarm(self) -> None:
        self.armed = False

    def power_off(self) -> None:
        """Lose the power now (after an operation returned): what it made durable must stay."""
        self._power_loss()
        self.dead = True

    def _sync_file(self, path: Path) -> None:
        st = os.stat(path)
        self._files[st.st_ino] = Path(path).read_bytes()

    def _sync_dir(self, path: Path) -> None:
        entries = {}
        with os.scandir(path) as it:
            for e in it:
                entries[e.name] = (e.inode(), e.is_dir(follow_symlinks=False))
        self._dirs[os.stat(path).st_ino] = entries

    def _power_loss(self) -> None:
        """Put ``root`` back to what the model says is durable; LMDB's directory and the writer
        lock (untracked) are kept as they are."""
        old = self.graveyard / f"power-{uuid.uuid4().hex[:8]}"
        root_ino = os.stat(self.root).st_ino
        os.rename(self.root, old)
        os.mkdir(self.root)

        def build(ino: int, dst: Path) -> None:
            for name, (child, is_dir) in self._dirs.get(ino, {}).items():
                if name in UNTRACKED:
                    continue
                if is_dir:
                    os.mkdir(dst / name)
                    build(child, dst / name)
                else:
                    (dst / name).write_bytes(self._files.get(child, b""))

        build(root_ino, self.root)
        # the untracked files are kept as they are, wherever their directory survived
        for dirpath, dirnames, filenames in os.walk(old):
            rel = Path(dirpath).relative_to(old)
            for name in [*dirnames, *filenames]:
                if name in UNTRACKED and (self.root / rel).is_dir():
                    os.rename(Path(dirpath) / name, self.root / rel / name)
            dirnames[:] = [d for d in dirnames if d not in UNTRACKED]

    # -- counting and failing ----------------------------------------------------------------

    def _site(self, name: str, path: Path) -> str:
        for frame in reversed(traceback.extract_stack(limit=40)[:-2]):
            f = frame.filename.replace(os.sep, "/")
            if frame.name in _HELPERS:
                continue
            if "/store/" in f and not f.endswith(("/fs.py", "/_zarrseam.py")):
                return f"{name} {f.rsplit('/', 1)[1]}:{frame.lineno}"
        try:
            rel = str(Path(path).relative_to(self.root))
        except ValueError:
            rel = str(path)
        return f"{name} zarr:{_pattern(rel)}"

    def _op(self, name: str, path: Path) -> str | None:
        """Count one operation; the fault kind to apply to it now, if any (raises for the
        kinds that need nothing of the caller)."""
        if self.dead:
            raise Crash("the process is dead")
        if not self.armed:
            return None
        with self._lock:
            op = Op(len(self.ops), name, str(path), self._site(name, path))
            self.ops.append(op)
            if op.index != self.at or self.kind is None:
                return None
            kind = self.kind
            if not applies(name, kind):
                return None  # nothing to shorten, no space to run out of
            self.fired = op
        if kind in ("enospc", "eio"):
            code = errno.ENOSPC if kind == "enospc" else errno.EIO
            raise OSError(code, f"injected {kind} at {op.site}", str(path))
        if kind == "power":
            self.dead = True
            self._power_loss()
            raise Crash(f"power lost before {op.site}")
        if kind == "torn" and name not in WRITE_OPS:
            self.dead = True
            raise Crash(f"killed before {op.site}")
        return kind  # "short" or "torn" on a write: the handle does it

    def _bury(self, path: Path) -> None:
        """Move ``path`` aside instead of deleting it (its inode stays taken)."""
        os.rename(path, self.graveyard / f"{uuid.uuid4().hex}-{Path(path).name}")

    # -- the FileSystem protocol -------------------------------------------------------------

    def open_write(self, path: Path, *, exclusive: bool = False) -> Any:
        self._op("open", path)
        if self.armed and not exclusive and os.path.lexists(path):
            self._bury(path)  # O_TRUNC of a durable file: its old inode keeps the old bytes
        return _Handle(self, Path(path), OS.open_write(path, exclusive=exclusive))

    def fsync_dir(self, path: Path) -> None:
        self._op("fsync_dir", path)
        OS.fsync_dir(path)
        if self.armed:
            self._sync_dir(Path(path))

    def fsync_file(self, path: Path) -> None:
        self._op("fsync", path)
        OS.fsync_file(path)
        if self.armed:
            self._sync_file(Path(path))

    def replace(self, src: Path, dst: Path) -> None:
        self._op("replace", dst)
        if self.armed and os.path.lexists(dst) and not os.path.isdir(dst):
            os.link(dst, self.graveyard / f"{uuid.uuid4().hex}-{Path(dst).name}")
        OS.replace(src, dst)

    def link(self, src: Path, dst: Path) -> None:
        self._op("link", dst)
        OS.link(src, dst)

    def unlink(self, path: Path, *, missing_ok: bool = False) -> None:
        self._op("unlink", path)
        if not self.armed:
            OS.unlink(path, missing_ok=missing_ok)
        elif os.path.lexists(path):
            self._bury(path)
        elif not missing_ok:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))

    def mkdir(self, path: Path, *, parents: bool = False, exist_ok: bool = False) -> None:
        self._op("mkdir", path)
        OS.mkdir(path, parents=parents, exist_ok=exist_ok)

    def rmdir(self, path: Path) -> None:
        self._op("rmdir", path)
        if self.armed:
            if any(os.scandir(path)):
                raise OSError(errno.ENOTEMPTY, "directory not empty", str(path))
            self._bury(path)
        else:
            OS.rmdir(path)

    def rmtree(self, path: Path, *, ignore_errors: bool = False) -> None:
        try:
            self._op("rmtree", path)
            if not self.armed:
                OS.rmtree(path, ignore_errors=ignore_errors)
            elif os.path.isdir(path):
                self._bury(path)
            elif not ignore_errors:
                raise FileNotFoundError(errno.ENOENT, "no such directory", str(path))
        except OSError:
            if not ignore_errors:
                raise

    def lmdb_open(self, path: Path, **kwargs: Any) -> Any:
        self._op("lmdb_open", path)
        return OS.lmdb_open(path, **kwargs)

    def lmdb_commit(self, txn: Any) -> None:
        self._op("lmdb_commit", self.root / "index.lmdb")
        OS.lmdb_commit(txn)

    def open_read(self, path: Path, *, follow: bool = True) -> int:
        self._op("open_read", path)
        fd = OS.open_read(path, follow=follow)
        self._fds[fd] = Path(path)
        return fd

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        self._op("read", self._fds.get(fd, Path(f"fd-{fd}")))
        return OS.pread(fd, n, offset)

    def open_lock(self, path: Path, *, create: bool) -> int:
        self._op("open_lock", path)
        fd = OS.open_lock(path, create=create)
        self._fds[fd] = Path(path)
        return fd

    def lock(self, fd: int) -> bool:
        self._op("lock", self._fds.get(fd, Path(f"fd-{fd}")))
        return OS.lock(fd)

    def unlock(self, fd: int) -> None:
        self._op("unlock", self._fds.get(fd, Path(f"fd-{fd}")))
        OS.unlock(fd)

    def overwrite(self, fd: int, data: bytes) -> None:
        self._op("overwrite", self._fds.get(fd, Path(f"fd-{fd}")))
        OS.overwrite(fd, data)


class _Handle:
    """A file being written through :class:`FaultFS`."""

    def __init__(self, fs: FaultFS, path: Path, real: Any) -> None:
        self.fs, self.path, self.real = fs, path, real

    def write(self, data: bytes | memoryview) -> int:
        kind = self.fs._op("write", self.path)
        if kind is None or len(data) < 2:
            return self.real.write(data)
        n = self.real.write(memoryview(data)[: len(data) // 2])
        if kind == "torn":
            self.fs.dead = True
            raise Crash(f"killed in the middle of a write to {self.path}")
        return n

    def seek(self, pos: int) -> None:
        self.real.seek(pos)

    def fsync(self) -> None:
        self.fs._op("fsync", self.path)
        self.real.fsync()
        if self.fs.armed:
            self.fs._sync_file(self.path)

    def close(self) -> None:
        self.real.close()
