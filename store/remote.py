"""Stores on object storage: publish a local store's HEAD to a bucket, and open a published
commit from the bucket alone (torch-free; fsspec, with s3fs for ``s3://``).

Why fsspec/s3fs rather than obstore: fsspec is already installed with torch and zarr, zarr v3
ships its ``FsspecStore`` over it, ``storage_options=`` is fsspec's (and pandas', dask's, zarr's)
convention for credentials and endpoints, and s3fs speaks to any S3-compatible server given an
``endpoint_url``; obstore is faster but zarr's support for it is still marked experimental in
the zarr 3.1 this project pins.

Layout under ``URL`` (every object but ``HEAD`` is written once and never changed)::

    objects/<xxh64 hex>-<size>       a store file, content-addressed (dedup across commits)
    published/<commit:016d>.json     what a commit needs: {relative path: object} + the index
    HEAD                             {"commit": N, "record": <xxh64 hex>-<size> of record N}:
                                     the newest published commit, written last

A writer commits locally and publishes (:func:`publish`): it uploads the files of HEAD it has
not uploaded before (segments and generator arrays are immutable; ``dpsn.json`` and the Zarr
group metadata are small and travel inside the record, base64, so a reader needs no request per
metadata file), a copy of the LMDB index taken in one read transaction, then the commit's
record, and only then ``HEAD``. A reader (:func:`checkout`) reads ``HEAD``, then that record,
so it never sees a half-published commit: every object a record names was uploaded before the
record, and objects are never changed or deleted by a publish.

The reader's local disk cache (``cache_dir``, ``cache_bytes``) works at two grains:

- at open, the commit's *eager* files (the LMDB index, the manifest, the Zarr metadata, the
  generator's arrays: what an open reads whole) are downloaded, checked against their xxh64 and
  size, and hard-linked into a directory per published commit that opens as an ordinary
  read-only store (on a later open they are checked again; a damaged one is fetched anew and
  re-linked in place). The record HEAD names by its bytes is kept in the cache too, so a warm
  open of the newest commit makes one request (HEAD);
- segment chunks (the rows) are *lazy*: :class:`ChunkCache` fetches a chunk the first time a
  read needs it and keeps it on disk, least recently used evicted first once the objects in the
  cache pass ``cache_bytes``. Every read of a chunk, from the cache or the network, checks the
  object's xxh64 and size (its name) before the bytes are decoded: a damaged cache entry is
  fetched again, a damaged object in the bucket raises ``CorruptStoreError``, and a chunk is
  never served unchecked (the segment's own per-chunk checksum is then checked too, as for any
  store). The store engine reaches the cache through :func:`chunk_reader`, which the segment
  reader asks once per store: the open path takes no extra argument.

Readers hold their checkout (:class:`CheckoutHold`): a refcount in the process and a shared
``flock`` on the directory's marker, taken by :func:`checkout` and by each store opened there
(:func:`chunk_reader`, released by the store's close). Eviction, by this process or another
sharing ``cache_dir``, removes only commit directories it can lock exclusively without waiting
(:func:`_remove_unheld`), so an open pool's directory is never removed under it. :func:`gc`
removes what a bucket no longer needs. Credentials come only from the environment or
``storage_options`` and are never written into the bucket, the record or the cache.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import xxhash

from dpsn.errors import (
    CacheTooLargeError,
    CorruptStoreError,
    InvalidArgumentError,
    SnapshotNotFoundError,
    StoreNotFoundError,
)

from ._format import LMDB_DIR, MANIFEST, SEGMENTS_GROUP, ZARR_DIR
from ._runs import RUNS_DIR
from .shards import json_object

PUBLISHED_FORMAT = "dpsn-published"
PUBLISHED_VERSION = 2  # never renumber: 1 = no inline files, 2 = small files inline
READ_VERSIONS = (1, 2)
HEAD_OBJECT = "HEAD"
OBJECTS_DIR = "objects"
PUBLISHED_DIR = "published"
LMDB_DATA = "data.mdb"
DEFAULT_CACHE_BYTES = 8 << 30
MAX_RECORD_BYTES = 64 << 20
INLINE_BYTES = 4096  # files this small travel inside the record (metadata, the manifest)
_OBJECT = re.compile(r"^[0-9a-f]{16}-[0-9]{1,15}$")
# A segment chunk (lazy): data.zarr/segments/<segment>/<column>/c[/<i>...]
_LAZY = re.compile(rf"^{ZARR_DIR}/{SEGMENTS_GROUP}/[0-9a-f]+/[a-z_]+/c(/[0-9]+)*$")
_COMPLETE = ".complete"
_TOUCH_S = 60.0  # a cache hit refreshes its file's mtime (the cross-process LRU) at most this often
_RUN_FILE = re.compile(r"^(runs\.json|run-[0-9]+\.bin)$")


def is_url(path: object) -> bool:
    """A ``scheme://`` location (``s3://``, ``memory://``, ``file://``), not a local path."""
    return isinstance(path, str) and re.match(r"^[a-z][a-z0-9+.-]*://", path) is not None


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    if storage_options is not None and not isinstance(storage_options, dict):
        raise InvalidArgumentError("storage_options must be a dict (fsspec's options)")
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise InvalidArgumentError(
            f"cannot reach {url}: {e} (for s3:// install s3fs: pip install 'dpsn[s3]')"
        ) from e
    return fs, path.rstrip("/")


def _hash_file(path: Path) -> str:
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _object_name(data: bytes) -> str:
    return f"{xxhash.xxh64_hexdigest(data)}-{len(data)}"


def _object_size(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def _store_files(root: Path) -> list[str]:
    """Files a reader needs, relative to the store: the manifest, ``data.zarr`` and the run
    files when there are any (derived data: an open maps them instead of reading every row's
    index entry from LMDB, and falls back to the LMDB copy when they do not fit the commit)."""
    out = [MANIFEST]
    for p in sorted((root / ZARR_DIR).rglob("*")):
        if p.is_file() and not p.name.endswith(".partial") and not p.name.startswith(".tmp"):
            out.append(p.relative_to(root).as_posix())
    runs = root / RUNS_DIR
    if runs.is_dir():
        for p in sorted(runs.iterdir()):
            if p.is_file() and _RUN_FILE.match(p.name):
                out.append(p.relative_to(root).as_posix())
    return out


def is_lazy(rel: str) -> bool:
    """Whether a reader fetches the store file ``rel`` on first use (a segment chunk) rather
    than at open."""
    return _LAZY.match(rel) is not None


def publish(store: Any, url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish ``store``'s HEAD (a :class:`PersistedStore`; the caller keeps writers away, as a
    pool's own writer does) under ``url``. Returns the commit, objects uploaded and bytes."""
    fs, prefix = _fs(url, storage_options)
    root = Path(store.root)
    uploaded = sent = 0
    inline: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The caller holds the writer lock, so HEAD cannot move during the copy. Not compacted:
        # a compacting copy renumbers the transaction that the index digests name.
        commit = store.head()
        store.env.env.copy(tmp)
        index_path = Path(tmp) / LMDB_DATA
        files: dict[str, str] = {}
        todo: dict[str, Path] = {}
        for rel in _store_files(root):
            src = root / rel
            size = src.stat().st_size
            if size <= INLINE_BYTES and not is_lazy(rel):
                data = src.read_bytes()
                files[rel] = _object_name(data)
                inline[files[rel]] = base64.b64encode(data).decode()
            else:
                files[rel] = f"{_hash_file(src)}-{size}"
                todo[files[rel]] = src
        index_obj = f"{_hash_file(index_path)}-{index_path.stat().st_size}"
        todo[index_obj] = index_path
        have = set()
        with contextlib.suppress(FileNotFoundError):
            have = {p.rsplit("/", 1)[-1] for p in fs.find(f"{prefix}/{OBJECTS_DIR}")}
        for obj, src in todo.items():
            if obj in have:
                continue
            fs.put_file(str(src), f"{prefix}/{OBJECTS_DIR}/{obj}")
            uploaded += 1
            sent += src.stat().st_size
    record = {
        "format": PUBLISHED_FORMAT,
        "format_version": PUBLISHED_VERSION,
        "commit": commit,
        "uuid": store.manifest.uuid,
        "time": time.time(),
        "index": index_obj,
        "files": files,
        "inline": inline,
    }
    # Objects first, then the record, then HEAD: a reader that sees HEAD finds everything.
    # HEAD names the record's bytes (xxh64 and size) too, so that a reader holding that very
    # record in its cache needs no second request (readers of HEADs without it fetch it).
    body = json.dumps(record).encode()
    fs.pipe_file(f"{prefix}/{PUBLISHED_DIR}/{commit:016d}.json", body)
    head = {"commit": commit, "record": _object_name(body)}
    fs.pipe_file(f"{prefix}/{HEAD_OBJECT}", json.dumps(head).encode())
    return {"commit": commit, "objects_uploaded": uploaded, "bytes_uploaded": sent, "url": url}


def _read_bytes(fs: Any, path: str) -> bytes:
    """A small object's bytes in one ranged GET (``fs.open`` would ask for its size first)."""
    try:
        data = fs.cat_file(path, start=0, end=MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        raise StoreNotFoundError(f"{path}: no such object (nothing published there?)") from None
    if len(data) > MAX_RECORD_BYTES:
        raise CorruptStoreError(f"{path} is larger than {MAX_RECORD_BYTES} bytes")
    return data


def _read_json(fs: Any, path: str) -> dict[str, Any]:
    return json_object(_read_bytes(fs, path), path)


def _check_record(raw: dict[str, Any], where: str) -> dict[str, Any]:
    if raw.get("format") != PUBLISHED_FORMAT or raw.get("format_version") not in READ_VERSIONS:
        raise CorruptStoreError(
            f"{where}: not a {PUBLISHED_FORMAT} record of a version this dpsn reads "
            f"({', '.join(map(str, READ_VERSIONS))}); upgrade dpsn"
        )
    files, index, uuid = raw.get("files"), raw.get("index"), raw.get("uuid")
    inline = raw.setdefault("inline", {})
    if not isinstance(files, dict) or not isinstance(index, str) or not isinstance(uuid, str):
        raise CorruptStoreError(f"{where}: 'files', 'index' or 'uuid' is missing")
    if not isinstance(inline, dict) or not all(isinstance(v, str) for v in inline.values()):
        raise CorruptStoreError(f"{where}: 'inline' must map objects to base64 text")
    if not re.fullmatch(r"[0-9a-f]{32}", uuid):
        raise CorruptStoreError(f"{where}: bad uuid {uuid!r}")
    for rel, obj in [*files.items(), ("index", index)]:
        if not isinstance(obj, str) or not _OBJECT.match(obj):
            raise CorruptStoreError(f"{where}: {rel!r} names a bad object {obj!r}")
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts) or not (
            rel == MANIFEST
            or parts[0] == ZARR_DIR
            or rel == "index"
            or (len(parts) == 2 and parts[0] == RUNS_DIR and _RUN_FILE.match(parts[1]))
        ):
            raise CorruptStoreError(f"{where}: {rel!r} is not a path inside a store")
    if MANIFEST not in files:
        raise CorruptStoreError(f"{where}: names no {MANIFEST}")
    return raw


def published(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """The newest commit published under ``url``."""
    fs, prefix = _fs(url, storage_options)
    return _head_commit(_read_json(fs, f"{prefix}/{HEAD_OBJECT}"), url)


def _head_commit(raw: dict[str, Any], url: str) -> int:
    if "global" in raw:
        raise InvalidArgumentError(
            f"{url} holds a published sharded root: open it with dpsn.open (its shards are "
            "under URL/shard-XXXX)"
        )
    head = raw.get("commit")
    if isinstance(head, bool) or not isinstance(head, int) or head < 1:
        raise CorruptStoreError(f"{url}/{HEAD_OBJECT}: 'commit' must be a positive int")
    return head


@dataclass
class ChunkCache:
    """A read-through, byte-capped disk cache of a bucket's objects (fsspec's cache habits:
    counters on the cache so that policies can be compared).

    ``read`` returns an object's bytes, checked against its name (xxh64 and size) on every read,
    from the cache or the network. Objects live in ``objects`` (shared with the eager files of
    checked-out commits, which are hard-linked and so never evicted here: a file with one link
    is a lazily cached chunk). Past ``cap`` bytes of objects, the least recently read chunks are
    unlinked; the bound is kept by this process's accounting (rescanned when a cache is made),
    so several processes sharing a directory can each overshoot it by what the others add.
    One cache per directory in a process (:func:`_cache_at`), shared by every checkout there
    (the shards of a sharded root, older commits): objects are named by content, so a chunk
    two commits share is cached once. Thread-safe (a lock around the bookkeeping)."""

    objects: Path
    cap: int
    hits: int = 0
    misses: int = 0
    fetched_bytes: int = 0
    refetched: int = 0  # cache entries that failed their check and were fetched again
    evicted_bytes: int = 0
    uncached: int = 0  # chunks served but not kept (a chunk larger than what the cap leaves)
    _lru: OrderedDict[str, int] = field(default_factory=OrderedDict, repr=False)
    _used: int = 0
    _lru_bytes: int = 0  # of the chunks in _lru (the rest of _used is pinned eager files)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.rescan()

    def rescan(self) -> None:
        """Rebuild the bookkeeping from the directory (at each checkout: eager files come and
        go, and other processes may share the directory)."""
        self.objects.mkdir(parents=True, exist_ok=True)
        entries, used = [], 0
        for p in self.objects.iterdir():
            if not _OBJECT.match(p.name):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            used += st.st_size
            if st.st_nlink == 1:
                entries.append((st.st_mtime, p.name, st.st_size))
        with self._lock:
            self._used = used
            self._lru = OrderedDict((name, size) for _, name, size in sorted(entries))
            self._lru_bytes = sum(size for _, _, size in entries)

    @property
    def used(self) -> int:
        """Bytes of objects in the cache directory, as of the last scan and this process's
        own additions."""
        return self._used

    def counters(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "fetched_bytes": self.fetched_bytes,
            "refetched": self.refetched,
            "evicted_bytes": self.evicted_bytes,
            "uncached": self.uncached,
            "used_bytes": self._used,
            "cap_bytes": self.cap,
        }

    def read(self, name: str, fs: Any, prefix: str) -> bytes:
        """The bytes of object ``name`` (checked), from the cache or else from
        ``prefix/objects/`` on ``fs``."""
        path = self.objects / name
        size = _object_size(name)
        data = stale = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                st = os.fstat(fd)
                # a regular file of the object's size is read whole (one call) and checked
                data = os.pread(fd, size + 1, 0) if st.st_size == size else b""
                stale = time.time() - st.st_mtime > _TOUCH_S
            finally:
                os.close(fd)
        if data is not None:
            if _object_name(data) == name:
                with self._lock:
                    self.hits += 1
                    if name in self._lru:
                        self._lru.move_to_end(name)
                if stale:  # the LRU order survives the process (to _TOUCH_S)
                    with contextlib.suppress(OSError):
                        os.utime(path)
                return data
            with self._lock:  # damaged in the cache: never served, fetched again
                self.refetched += 1
                self._forget(name)
            path.unlink(missing_ok=True)
        data = self._download(name, fs, prefix)
        self._keep(name, data)
        return data

    def _download(self, name: str, fs: Any, prefix: str) -> bytes:
        where = f"{prefix}/{OBJECTS_DIR}/{name}"
        try:
            data = fs.cat_file(where)
        except FileNotFoundError:
            raise CorruptStoreError(
                f"{where}: an object the published record names is missing; publish again"
            ) from None
        with self._lock:
            self.misses += 1
            self.fetched_bytes += len(data)
        if _object_name(data) != name:
            raise CorruptStoreError(
                f"{where}: the object does not match its checksum; publish the store again"
            )
        return data

    def _forget(self, name: str) -> None:
        size = self._lru.pop(name, None)
        if size is not None:
            self._used -= size
            self._lru_bytes -= size

    def _keep(self, name: str, data: bytes) -> None:
        with self._lock:
            if name in self._lru:
                return
            if len(data) > self.cap - self._pinned():
                self.uncached += 1
                return
            while self._lru and self._used + len(data) > self.cap:
                old, size = self._lru.popitem(last=False)
                self._used -= size
                self._lru_bytes -= size
                self.evicted_bytes += size
                (self.objects / old).unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.objects, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.objects / name)
            self._lru[name] = len(data)
            self._used += len(data)
            self._lru_bytes += len(data)

    def _pinned(self) -> int:
        return self._used - self._lru_bytes

    def not_known(self, names: set[str]) -> set[str]:
        """The ``names`` this process has not seen in the cache (those it has need no stat)."""
        with self._lock:
            return names - self._lru.keys()

    def prefetch_room(self) -> int:
        """Bytes a prefetch may bring in: half of what the eager (pinned) files leave."""
        with self._lock:
            return (self.cap - self._pinned()) // 2

    def add_fetched(self, name: str, data: bytes) -> None:
        """Count ``data``, fetched from the bucket for object ``name`` by a batch prefetch, as
        a miss and keep it if it is that object (checked against its name)."""
        with self._lock:
            self.misses += 1
            self.fetched_bytes += len(data)
        if _object_name(data) == name:
            self._keep(name, data)


@dataclass(frozen=True)
class Checkout:
    """A published commit checked out into the disk cache: ``path`` opens as a read-only store
    whose segment chunks come through ``chunks`` (``lazy`` maps each chunk's path inside
    ``data.zarr`` to its object). ``hold`` is the caller's hold on it (:class:`CheckoutHold`):
    release it once the store opened at ``path`` holds its own (or is not needed)."""

    path: Path
    commit: int
    chunks: ChunkCache
    lazy: dict[str, str]
    fs: Any
    prefix: str
    hold: CheckoutHold | None = field(default=None, compare=False, repr=False)


@dataclass
class _Held:
    """A checkout some reader of this process holds: how many holds, and the file descriptor
    whose shared ``flock`` on the checkout's marker tells other processes' eviction to keep
    the directory (one per process; the kernel drops it when the process dies)."""

    co: Checkout
    refs: int
    fd: int


# Checkouts this process holds, by the real path of their data.zarr: how the segment reader of
# a store opened at a checkout finds its chunk cache without an argument threaded through every
# open (``chunk_reader``). An entry lives while a hold does (an open store, or a checkout not
# yet handed to one) and goes with the last release. Entries hold no credentials beyond the
# fsspec filesystem object.
_CHECKOUTS: dict[str, _Held] = {}
_CHECKOUTS_LOCK = threading.Lock()


def _lock_shared(local: Path) -> int | None:
    """A descriptor holding a shared ``flock`` on ``local``'s marker, or None if the directory
    is gone or was replaced meanwhile (an evictor renames a directory aside under an exclusive
    lock before it removes it, so a shared lock on a marker still at its path pins it)."""
    marker = local / _COMPLETE
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits out an evictor's brief exclusive lock
        st, now = os.fstat(fd), os.stat(marker)
        if (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev):
            return fd
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _release(key: str) -> None:
    with _CHECKOUTS_LOCK:
        held = _CHECKOUTS.get(key)
        if held is None:
            return
        held.refs -= 1
        if held.refs > 0:
            return
        del _CHECKOUTS[key]
    os.close(held.fd)  # drops the shared flock: the directory may now be evicted


class CheckoutHold:
    """One reader's hold on a checked-out commit: while any hold of this process lives, the
    checkout stays registered (its chunks read through the cache) and its directory is pinned
    against eviction, by this process (the refcount) and by any other sharing the cache
    directory (a shared ``flock``). :meth:`release` is idempotent; a hold that is garbage
    collected unreleased releases itself (a backstop, not the contract)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._fin = weakref.finalize(self, _release, key)

    def release(self) -> None:
        self._fin()

    @property
    def released(self) -> bool:
        return not self._fin.alive


def _hold(co: Checkout) -> CheckoutHold | None:
    """A new hold on ``co`` (None if its directory vanished before it could be pinned)."""
    key = os.path.realpath(co.path / ZARR_DIR)
    with _CHECKOUTS_LOCK:
        held = _CHECKOUTS.get(key)
        if held is not None:
            held.refs += 1
            return CheckoutHold(key)
    fd = _lock_shared(co.path)  # outside the lock: it may wait for an evictor
    if fd is None:
        return None
    with _CHECKOUTS_LOCK:
        held = _CHECKOUTS.get(key)
        if held is not None:  # another thread registered it meanwhile
            held.refs += 1
            os.close(fd)
        else:
            _CHECKOUTS[key] = _Held(co=co, refs=1, fd=fd)
    return CheckoutHold(key)


def held_checkouts() -> list[Path]:
    """The checkout directories this process holds (open stores read them)."""
    with _CHECKOUTS_LOCK:
        return [h.co.path for h in _CHECKOUTS.values()]


def chunk_reader(zarr_root: Path) -> ChunkReader | None:
    """For the segment reader: a function ``(chunk path, size limit) -> bytes | None`` that
    reads the segment chunks of a checked-out published commit through its cache (``None``:
    no such chunk was published, which reads as the fill value as for a local store), or None
    for an ordinary local store. The reader holds the checkout (:class:`CheckoutHold`) until
    its :meth:`ChunkReader.release` (the segment store's close)."""
    key = os.path.realpath(zarr_root)
    with _CHECKOUTS_LOCK:
        held = _CHECKOUTS.get(key)
        if held is None:
            return None
        held.refs += 1
        co = held.co
    return ChunkReader(co, str(zarr_root).rstrip("/") + "/", CheckoutHold(key))


class ChunkReader:
    """The segment reader's view of a checkout: one chunk at a time (``__call__``), and
    :meth:`prefetch` of the chunks a read is about to need, fetched concurrently."""

    def __init__(self, co: Checkout, base: str, hold: CheckoutHold | None = None) -> None:
        self.co, self.base, self.hold = co, base, hold

    def release(self) -> None:
        """Let go of the checkout (the store reading it closed); idempotent."""
        if self.hold is not None:
            self.hold.release()

    def _name(self, path: Path) -> str | None:
        s = str(path)
        return self.co.lazy.get(s[len(self.base) :]) if s.startswith(self.base) else None

    def __call__(self, path: Path, limit: int) -> bytes | None:
        name = self._name(path)
        if name is None:
            return None
        if _object_size(name) > limit:
            raise CorruptStoreError(f"chunk {path} is larger than any chunk of its array can be")
        return self.co.chunks.read(name, self.co.fs, self.co.prefix)

    def prefetch(self, paths: list[Path]) -> None:
        """Fetch the chunks at ``paths`` not in the cache yet in one concurrent request batch
        (fsspec's ``cat`` of many paths; s3fs runs them at once), as far as half the cache's
        room allows. Best effort: what fails here is fetched, checked and reported by the read
        itself."""
        cache, co = self.co.chunks, self.co
        names = {n for p in paths if (n := self._name(p)) is not None}
        names = cache.not_known(names)  # chunks this process knows to be cached need no stat
        todo = sorted(n for n in names if not (cache.objects / n).is_file())
        room = cache.prefetch_room()
        take, total = [], 0
        for n in todo:
            total += _object_size(n)
            if total > room:
                break
            take.append(n)
        if len(take) < 2:
            return
        where = {f"{co.prefix}/{OBJECTS_DIR}/{n}": n for n in take}
        try:
            got = co.fs.cat(list(where), on_error="omit")
        except Exception:  # best effort: each read fetches (and reports) on its own
            return
        for remote_path, data in got.items():
            name = where.get(remote_path) or where.get(remote_path.split("://", 1)[-1])
            if name is None or not isinstance(data, bytes):
                continue
            cache.add_fetched(name, data)


def cache_counters(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """The chunk cache's counters (hits, misses, bytes fetched, ...) of the checkout a pool
    opened from a URL reads (``pool.path``), or None if ``path`` is not one."""
    with _CHECKOUTS_LOCK:
        held = _CHECKOUTS.get(os.path.realpath(Path(path) / ZARR_DIR))
    return None if held is None else held.co.chunks.counters()


_CACHES: dict[str, ChunkCache] = {}


def _cache_at(objects: Path, cap: int) -> ChunkCache:
    """This process's cache of the directory ``objects`` (made, or its cap set to ``cap``)."""
    key = os.path.realpath(objects)
    with _CHECKOUTS_LOCK:
        cache = _CACHES.get(key)
        if cache is None or not objects.is_dir():
            cache = _CACHES[key] = ChunkCache(objects=objects, cap=cap)
        cache.cap = cap
    return cache  # rescanned by the checkout, once it holds its directory


def _record(
    url: str,
    storage_options: dict[str, Any] | None,
    at: int | None,
    head: dict[str, Any] | None,
    objects: Path,
) -> tuple[Any, str, int, dict[str, Any]]:
    """The commit to check out (``at``, or what HEAD names) and its record. ``head``: HEAD
    as already read (None: read it here). A record HEAD names by its bytes (xxh64 and size)
    is kept in ``objects`` and read from there while it matches: a warm open of the newest
    commit asks the bucket for HEAD alone."""
    fs, prefix = _fs(url, storage_options)
    name = None
    if at is None:
        raw = head if head is not None else _read_json(fs, f"{prefix}/{HEAD_OBJECT}")
        commit = _head_commit(raw, url)
        if isinstance(raw.get("record"), str) and _OBJECT.match(raw["record"]):
            name = raw["record"]
    else:
        commit = at
    where = f"{prefix}/{PUBLISHED_DIR}/{commit:016d}.json"
    data = None
    if name is not None:
        with contextlib.suppress(OSError):
            data = (objects / name).read_bytes()
        if data is not None and _object_name(data) != name:
            data = None  # damaged in the cache: fetched again
    if data is None:
        try:
            data = _read_bytes(fs, where)
        except StoreNotFoundError:
            raise SnapshotNotFoundError(f"{url}: commit {commit} was not published") from None
        if name is not None:
            if _object_name(data) != name:
                raise CorruptStoreError(
                    f"{where} is not the record {url}/{HEAD_OBJECT} names (its checksum "
                    "differs); publish the store again"
                )
            with contextlib.suppress(OSError):
                _put_bytes(objects, name, data)
    rec = _check_record(json_object(data, where), where)
    return fs, prefix, commit, rec


def _put_bytes(objects: Path, name: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=objects, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, objects / name)


_ATTEMPTS = 5  # checkouts built and evicted by another process before this one could hold


def checkout(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    at: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    _head: dict[str, Any] | None = None,
) -> Checkout:
    """Check the commit published under ``url`` (the newest, or ``at``) out into the disk
    cache: its eager files are fetched (or found and checked again), its segment chunks are
    left to be read through the returned checkout's :class:`ChunkCache`. The checkout comes
    held (``Checkout.hold``): eviction, in this process or another sharing ``cache_dir``, leaves
    it alone until the hold is released."""
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 1:
        raise InvalidArgumentError(f"cache_bytes must be a positive int, got {cache_bytes!r}")
    cache = Path(cache_dir) if cache_dir is not None else _default_cache()
    objects = cache / OBJECTS_DIR
    objects.mkdir(parents=True, exist_ok=True)
    fs, prefix, commit, rec = _record(url, storage_options, at, _head, objects)
    lazy_prefix = ZARR_DIR + "/"
    lazy = {rel[len(lazy_prefix) :]: o for rel, o in rec["files"].items() if is_lazy(rel)}
    eager = {rel: o for rel, o in rec["files"].items() if not is_lazy(rel)}
    eager[f"{LMDB_DIR}/{LMDB_DATA}"] = rec["index"]
    local = cache / "commits" / rec["uuid"] / f"{commit:016d}"
    co = Checkout(
        path=local,
        commit=commit,
        chunks=_cache_at(objects, cache_bytes),
        lazy=lazy,
        fs=fs,
        prefix=prefix,
    )
    for _ in range(_ATTEMPTS):
        if (local / _COMPLETE).is_file():
            hold = _hold(co)
            if hold is None:
                continue  # evicted by another process between the check and the lock
            try:
                bad = _damaged(local, eager)
                if bad:  # mended in place: a reader of this directory keeps its paths
                    _fetch(fs, prefix, objects, sorted(set(bad.values()) - set(rec["inline"])))
                    for name, text in rec["inline"].items():
                        if name in bad.values():
                            _put_inline(objects, name, text)
                    _relink(local, objects, bad)
                else:
                    os.utime(local / _COMPLETE)
            except BaseException:
                hold.release()
                raise
            co.chunks.rescan()  # the eager files just linked count against the cap
            if co.chunks.used > cache_bytes:  # over the cap (held checkouts were kept): trim
                with contextlib.suppress(OSError):
                    _evict(cache, cache_bytes - _held_bytes(eager), keep=set(eager.values()))
                co.chunks.rescan()
            return replace(co, hold=hold)
        need = sum(_object_size(o) for o in set(eager.values()))
        if need > cache_bytes:
            raise CacheTooLargeError(
                f"commit {commit} of {url} needs {need} bytes on disk at open (its index and "
                f"metadata), more than cache_bytes={cache_bytes}; raise cache_bytes"
            )
        _evict(cache, cache_bytes - need, keep=set(eager.values()))
        _fetch(fs, prefix, objects, sorted(set(eager.values()) - set(rec["inline"])))
        for name, text in rec["inline"].items():
            _put_inline(objects, name, text)
        _link(local, objects, eager, commit)  # or another process linked it meanwhile
    raise CacheTooLargeError(
        f"commit {commit} of {url} was evicted from {cache} by another process {_ATTEMPTS} "
        "times before this one could hold it; raise cache_bytes"
    )


# Holds that ``materialize`` took for an open in progress (``open_scope``): released when the
# open returns, by which time the stores it opened hold their checkouts themselves.
_SCOPE: contextvars.ContextVar[list[CheckoutHold] | None] = contextvars.ContextVar(
    "dpsn_remote_scope", default=None
)


@contextlib.contextmanager
def open_scope() -> Any:
    """Keep the checkouts :func:`materialize` makes inside the block held until it ends: an
    open wraps itself in one, so that nothing evicts a checkout between its making and the
    store that reads it taking its own hold (:func:`chunk_reader`)."""
    token = _SCOPE.set([])
    try:
        yield
    finally:
        holds = _SCOPE.get() or []
        _SCOPE.reset(token)
        for h in holds:
            h.release()


def materialize(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    at: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Path:
    """The local directory to open for ``url`` (a store or a sharded root): that of
    :func:`checkout_any`. Its checkouts stay held until the enclosing :func:`open_scope` ends
    (without one, they are released at once: open the directory inside a scope)."""
    path, holds = checkout_any(
        url, storage_options, at=at, cache_dir=cache_dir, cache_bytes=cache_bytes
    )
    scope = _SCOPE.get()
    if scope is None:
        for h in holds:
            h.release()
    else:
        scope.extend(holds)
    return path


def _held_bytes(eager: dict[str, str]) -> int:
    """Bytes of ``eager``'s objects (what a checkout pins)."""
    return sum(_object_size(o) for o in set(eager.values()))


def _damaged(local: Path, eager: dict[str, str]) -> dict[str, str]:
    """The eager files of a checked-out commit's directory (relative path: object) that are
    missing or no longer match their object (size and xxh64): they are mended, never served."""
    bad = {}
    for rel, obj in eager.items():
        p = local.joinpath(*rel.split("/"))
        try:
            if p.stat().st_size != _object_size(obj) or _hash_file(p) != obj.rsplit("-", 1)[0]:
                bad[rel] = obj
        except OSError:
            bad[rel] = obj
    return bad


def _relink(local: Path, objects: Path, files: dict[str, str]) -> None:
    """Point each of ``files`` in ``local`` at its (fetched, checked) object, atomically."""
    for rel, obj in files.items():
        dst = local.joinpath(*rel.split("/"))
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".relink-{dst.name}-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.link(objects / obj, tmp)
        os.replace(tmp, dst)


def _put_inline(objects: Path, name: str, text: str) -> None:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise CorruptStoreError(f"the record's inline object {name} is not base64: {e}") from None
    if _object_name(data) != name:
        raise CorruptStoreError(f"the record's inline object {name} does not match its checksum")
    if not (objects / name).is_file() or _hash_file(objects / name) != name.rsplit("-", 1)[0]:
        fd, tmp = tempfile.mkstemp(dir=objects, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, objects / name)


def _link(local: Path, objects: Path, eager: dict[str, str], commit: int) -> None:
    """Build the commit's directory aside and rename it into place; if another process built
    it meanwhile, keep theirs (a complete directory is never replaced: someone may hold it)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}-"))
    try:
        for rel, obj in eager.items():
            dst = tmp.joinpath(*rel.split("/"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(objects / obj, dst)
        (tmp / _COMPLETE).write_text(json.dumps({"url_commit": commit}))
        if local.is_dir() and not (local / _COMPLETE).is_file():
            shutil.rmtree(local, ignore_errors=True)  # a leftover without a marker: unheld
        try:
            tmp.rename(local)
        except OSError:  # another process's complete directory is there now
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpsn"


def _fetch(fs: Any, prefix: str, objects: Path, names: list[str]) -> None:
    """Download the objects ``names`` not cached (or not intact) into ``objects`` (one batched,
    concurrent ``get``), checking each one's size and xxh64 (its name) before it enters the
    cache."""
    todo = []
    for name in names:
        p = objects / name
        if p.is_file() and p.stat().st_size == _object_size(name):
            if _hash_file(p) == name.rsplit("-", 1)[0]:
                os.utime(p)
                continue
            p.unlink()
        todo.append(name)
    if not todo:
        return
    parts = [str(objects / (".part-" + n)) for n in todo]
    try:
        fs.get([f"{prefix}/{OBJECTS_DIR}/{n}" for n in todo], parts)
    except FileNotFoundError as e:
        raise CorruptStoreError(f"an object the published record names is missing: {e}") from None
    for name, part in zip(todo, map(Path, parts), strict=True):
        digest, size = name.rsplit("-", 1)
        if not part.is_file() or part.stat().st_size != int(size) or _hash_file(part) != digest:
            part.unlink(missing_ok=True)
            raise CorruptStoreError(
                f"{prefix}/{OBJECTS_DIR}/{name}: the object does not match its checksum; "
                "publish the store again"
            )
        part.rename(objects / name)


def _remove_unheld(local: Path) -> bool:
    """Remove the checked-out commit directory ``local`` unless a reader holds it (a shared
    ``flock`` on its marker, from this process or another): under an exclusive lock it is
    renamed aside, so a reader waiting for its shared lock finds the path gone, then deleted."""
    marker = local / _COMPLETE
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # held
        st, now = os.fstat(fd), os.stat(marker)
        if (st.st_ino, st.st_dev) != (now.st_ino, now.st_dev):
            return False  # replaced meanwhile
        aside = local.parent / f".evict-{local.name}-{os.getpid()}-{threading.get_ident()}"
        os.rename(local, aside)
    except OSError:
        return False
    finally:
        os.close(fd)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _evict(cache: Path, budget: int, keep: set[str]) -> None:
    """Free the cache down to ``budget`` bytes of objects besides ``keep``: lazily cached
    chunks first (least recently read first), then whole commit directories that no reader
    holds, least recently opened first, with the objects nothing links any more. A chunk is
    unlinked even if a reader is about to read it: a read opens a cached chunk and reads it
    whole in one go, and one that finds it gone fetches it again."""
    objects = cache / OBJECTS_DIR

    def sizes() -> dict[str, os.stat_result]:
        out = {}
        for p in objects.iterdir():
            if p.name not in keep and _OBJECT.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    out[p.name] = p.stat()
        return out

    have = sizes()
    used = sum(s.st_size for s in have.values())
    for name, st in sorted(have.items(), key=lambda kv: kv[1].st_mtime):
        if used <= budget:
            return
        if st.st_nlink == 1:
            (objects / name).unlink(missing_ok=True)
            used -= st.st_size
    if used <= budget:
        return
    markers = []
    for m in (cache / "commits").glob("*/*/" + _COMPLETE):
        with contextlib.suppress(FileNotFoundError):
            markers.append((m.stat().st_mtime, m))
    for _, marker in sorted(markers):
        if not _remove_unheld(marker.parent):
            continue
        for name, st in sizes().items():
            if st.st_nlink == 1:
                (objects / name).unlink(missing_ok=True)
        if sum(s.st_size for s in sizes().values()) <= budget:
            return


# -- garbage collection of a bucket ------------------------------------------------------------

GC_GRACE_S = 3600.0  # objects younger than this are never removed (a publish may be under way)
_RECORD_NAME = re.compile(r"^([0-9]{16})\.json$")


def _mtime(info: dict[str, Any]) -> float | None:
    """An object's upload time (seconds since the epoch) from a listing, if it says."""
    t = info.get("LastModified") or info.get("mtime") or info.get("created")
    if t is None:
        return None
    return t.timestamp() if hasattr(t, "timestamp") else float(t)


def gc(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    keep_last: int | None = None,
    keep_within: float | None = None,
    grace: float = GC_GRACE_S,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Remove what a bucket's published store no longer needs: the records of commits not
    retained, then every object under ``objects/`` that no retained record names.

    Retained: every published commit when neither ``keep_last`` (the newest N records) nor
    ``keep_within`` (records uploaded in the last that many seconds) is given; always the
    commit HEAD names and any newer one (a publish between its record and HEAD). Objects
    uploaded less than ``grace`` seconds ago are kept whatever names them: a publish uploads
    its objects before its record. Run it while no publish to ``url`` is under way (like a
    local gc under the writer lock): a publish reuses objects it finds in the bucket, and one
    that found an object just before this run removed it would name a missing object (HEAD is
    read again before objects go, and nothing is removed if it moved). A reader of a commit
    that was not retained finds it gone (``SnapshotNotFoundError``, or a missing object).

    A published sharded root is collected the same way one level up: the rule picks the global
    commits retained (HEAD's and newer always), their records go first, and then each shard
    keeps exactly the commits the retained global records name (and its own HEAD's and newer,
    a publish under way), with its objects collected as a store's. Returns what was (or, with
    ``dry_run``, would be) removed; for a sharded root, ``head``/``kept_commits``/
    ``removed_commits`` count global commits and ``shards`` holds each shard's own answer."""
    for name, v in (("keep_last", keep_last), ("keep_within", keep_within), ("grace", grace)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise InvalidArgumentError(f"{name} must be a number >= 0, got {v!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise InvalidArgumentError(f"keep_last must be a positive int, got {keep_last!r}")
    fs, prefix = _fs(url, storage_options)
    head_raw = _read_json(fs, f"{prefix}/{HEAD_OBJECT}")

    def retained(head: int, records: dict[int, tuple[str, float | None]]) -> set[int]:
        commits, now = sorted(records), time.time()
        if keep_last is None and keep_within is None:
            keep = set(commits)
        else:
            keep = set(commits[-keep_last:]) if keep_last else set()
            if keep_within is not None:
                keep |= {c for c in commits if (records[c][1] or now) >= now - keep_within}
        return keep | {c for c in commits if c >= head}

    if "global" in head_raw:
        return _gc_sharded(fs, prefix, url, head_raw, retained, grace, dry_run)
    return _gc_store(fs, prefix, url, head_raw, retained, grace, dry_run)


def _records(fs: Any, where: str) -> dict[int, tuple[str, float | None]]:
    """The commit records under ``where`` (``<16 digits>.json``): id -> (path, upload time)."""
    out: dict[int, tuple[str, float | None]] = {}
    with contextlib.suppress(FileNotFoundError):
        for path, info in fs.find(where, detail=True).items():
            m = _RECORD_NAME.match(path.rsplit("/", 1)[-1])
            if m:
                out[int(m.group(1))] = (path, _mtime(info))
    return out


def _gc_store(
    fs: Any,
    prefix: str,
    url: str,
    head_raw: dict[str, Any],
    retained: Any,
    grace: float,
    dry_run: bool,
) -> dict[str, Any]:
    """:func:`gc` of one published store: ``retained(head, records)`` names the commits kept."""
    head = _head_commit(head_raw, url)
    now = time.time()
    records = _records(fs, f"{prefix}/{PUBLISHED_DIR}")
    keep = set(retained(head, records)) & set(records)
    referenced: set[str] = set()
    for c in sorted(keep):
        where = f"{prefix}/{PUBLISHED_DIR}/{c:016d}.json"
        rec = _check_record(_read_json(fs, where), where)
        referenced |= set(rec["files"].values()) | {rec["index"]}
    doomed_records = [c for c in sorted(records) if c not in keep]
    objects: dict[str, tuple[str, int, float | None]] = {}
    with contextlib.suppress(FileNotFoundError):
        for path, info in fs.find(f"{prefix}/{OBJECTS_DIR}", detail=True).items():
            name = path.rsplit("/", 1)[-1]
            objects[name] = (path, int(info.get("size") or 0), _mtime(info))
    doomed, young = [], 0
    for name, (_path, _size, t) in sorted(objects.items()):
        if name in referenced:
            continue
        if t is None or now - t < grace:
            young += 1  # a publish may be uploading it, or it cannot tell: kept
            continue
        doomed.append(name)
    out = {
        "url": url,
        "head": head,
        "kept_commits": sorted(keep),
        "removed_commits": doomed_records,
        "removed_objects": len(doomed),
        "freed_bytes": sum(objects[n][1] for n in doomed),
        "young_objects_kept": young,
        "dry_run": dry_run,
    }
    if dry_run:
        return out
    for c in doomed_records:  # records first: an interrupted gc leaves only unnamed objects
        fs.rm_file(records[c][0])
    if _head_commit(_read_json(fs, f"{prefix}/{HEAD_OBJECT}"), url) != head:
        out.update(removed_objects=0, freed_bytes=0, head_moved=True)
        return out  # a publish ran meanwhile: its objects are left alone (run gc again)
    if doomed:
        fs.rm([objects[n][0] for n in doomed])
    return out


def _gc_whole(fs: Any, prefix: str, url: str, grace: float, dry_run: bool) -> dict[str, Any]:
    """Remove a published shard store no retained global commit names (a layout a reshard left
    behind): every object, record and its HEAD, unless something under it is younger than
    ``grace`` (a publish may be writing there: then nothing of it goes)."""
    now = time.time()
    files: dict[str, tuple[int, float | None]] = {}
    with contextlib.suppress(FileNotFoundError):
        for path, info in fs.find(prefix, detail=True).items():
            files[path] = (int(info.get("size") or 0), _mtime(info))
    young = sum(1 for _size, t in files.values() if t is None or now - t < grace)
    names = [p.rsplit("/", 1)[-1] for p in files]
    out = {
        "url": url,
        "head": None,
        "kept_commits": [],
        "removed_commits": sorted(int(m.group(1)) for n in names if (m := _RECORD_NAME.match(n))),
        "removed_objects": sum(1 for p in files if f"/{OBJECTS_DIR}/" in p),
        "freed_bytes": sum(size for size, _t in files.values()),
        "young_objects_kept": 0,
        "whole_store": True,
        "dry_run": dry_run,
    }
    if young:  # kept whole: run gc again once the grace period has passed
        out.update(removed_commits=[], removed_objects=0, freed_bytes=0, young_objects_kept=young)
        return out
    if not dry_run and files:
        head = f"{prefix}/{HEAD_OBJECT}"  # HEAD first: no reader starts on what goes next
        if head in files:
            fs.rm_file(head)
        fs.rm([p for p in files if p != head])
    return out


def _gc_sharded(
    fs: Any,
    prefix: str,
    url: str,
    head_raw: dict[str, Any],
    retained: Any,
    grace: float,
    dry_run: bool,
) -> dict[str, Any]:
    """:func:`gc` of a published sharded root: global commits first, then each shard keeps
    what the retained global records name."""
    from . import shards as layout

    gid = head_raw["global"]
    if isinstance(gid, bool) or not isinstance(gid, int) or gid < 1:
        raise CorruptStoreError(f"{url}/{HEAD_OBJECT}: 'global' must be a positive int")
    records = _records(fs, f"{prefix}/{layout.GLOBAL_DIR}")
    if gid not in records:
        raise CorruptStoreError(f"{url}: HEAD names global commit {gid}, which is not published")
    keep = set(retained(gid, records)) & set(records)
    named: dict[str, set[int]] = {}  # every shard directory a global record names: what it keeps
    for g in sorted(records):
        where = f"{prefix}/{layout.GLOBAL_DIR}/{g:016d}.json"
        for d, commit in layout.parse_global(_read_json(fs, where), where).shards:
            named.setdefault(d, set()).update([commit] if g in keep else [])
    doomed = [g for g in sorted(records) if g not in keep]
    if not dry_run:
        for g in doomed:  # global records first: no reader is offered a shard commit that goes
            fs.rm_file(records[g][0])
    shards: dict[str, Any] = {}
    for d in sorted(named):
        shard_prefix = f"{prefix}/{d}"
        shard_url = f"{url.rstrip('/')}/{d}"
        mine = named[d]  # what retained global commits name, and its HEAD's and newer
        if not mine:  # named by dropped global commits only: the whole shard store goes
            shards[d] = _gc_whole(fs, shard_prefix, shard_url, grace, dry_run)
            continue

        def kept(head: int, recs: dict[int, tuple[str, float | None]], mine=mine) -> set[int]:
            return mine | {c for c in recs if c >= head}

        shard_head = _read_json(fs, f"{shard_prefix}/{HEAD_OBJECT}")
        shards[d] = _gc_store(fs, shard_prefix, shard_url, shard_head, kept, grace, dry_run)
    return {
        "url": url,
        "head": gid,
        "kept_commits": sorted(keep),
        "removed_commits": doomed,
        "removed_objects": sum(o["removed_objects"] for o in shards.values()),
        "freed_bytes": sum(o["freed_bytes"] for o in shards.values()),
        "young_objects_kept": sum(o["young_objects_kept"] for o in shards.values()),
        "head_moved": any(o.get("head_moved") for o in shards.values()),
        "dry_run": dry_run,
        "shards": shards,
    }


# -- sharded roots -----------------------------------------------------------------------------
#
# A sharded root publishes as one prefix holding each shard as an ordinary published store
# (``URL/shard-XXXX/...``, its own objects, records and HEAD) and, beside them, the root's
# manifest, the global records and the root's ``HEAD`` = {"global": N}. Each shard's commit is
# published first, then the root manifest and global record N (naming each shard's published
# commit), then ``HEAD``: a reader that sees HEAD finds every shard commit it names.


def publish_global(
    root: Path, record: Any, url: str, storage_options: dict[str, Any] | None = None
) -> None:
    """Phase 2 of a sharded root's publish, once every shard's commit named by ``record`` (a
    :class:`dpsn.store.shards.GlobalCommit`) is published under ``url/<shard dir>``: the root
    manifest, the global record, then the root's ``HEAD``."""
    from ._files import read_regular
    from .shards import GLOBAL_DIR, ROOT_MANIFEST
    from .shards import MAX_RECORD_BYTES as ROOT_BYTES

    fs, prefix = _fs(url, storage_options)
    manifest = read_regular(Path(root) / ROOT_MANIFEST, ROOT_BYTES, ROOT_MANIFEST)
    fs.pipe_file(f"{prefix}/{ROOT_MANIFEST}", manifest)
    body = json.dumps(record.to_json(), sort_keys=True).encode()
    fs.pipe_file(f"{prefix}/{GLOBAL_DIR}/{record.id:016d}.json", body)
    fs.pipe_file(f"{prefix}/{HEAD_OBJECT}", json.dumps({"global": record.id}).encode())


def checkout_any(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    at: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> tuple[Path, list[CheckoutHold]]:
    """What ``dpsn.open(url)`` opens, with the holds on its checkouts (release them once the
    stores opened there hold their own): for a published store, its :func:`checkout`'s
    directory; for a published sharded root, a local root in the cache (the root manifest and
    the one global record, newest or ``at``, with each shard's checkout linked in under its
    name)."""
    from . import shards as layout

    fs, prefix = _fs(url, storage_options)
    head = _read_json(fs, f"{prefix}/{HEAD_OBJECT}")
    if "global" not in head:
        co = checkout(
            url, storage_options, at=at, cache_dir=cache_dir, cache_bytes=cache_bytes, _head=head
        )
        assert co.hold is not None
        return co.path, [co.hold]
    gid = head["global"] if at is None else at
    if isinstance(gid, bool) or not isinstance(gid, int) or gid < 1:
        raise CorruptStoreError(f"{url}/{HEAD_OBJECT}: 'global' must be a positive int")
    cache = Path(cache_dir) if cache_dir is not None else _default_cache()
    try:
        raw = _read_json(fs, f"{prefix}/{layout.GLOBAL_DIR}/{gid:016d}.json")
    except StoreNotFoundError:
        raise SnapshotNotFoundError(f"{url}: global commit {gid} was not published") from None
    record = layout.parse_global(raw, f"{url}/{layout.GLOBAL_DIR}/{gid:016d}.json")
    manifest = json.dumps(_read_json(fs, f"{prefix}/{layout.ROOT_MANIFEST}")).encode()
    holds: list[CheckoutHold] = []
    try:
        shard_paths = []
        for d, commit in record.shards:
            co = checkout(
                f"{url.rstrip('/')}/{d}",
                storage_options,
                at=commit,
                cache_dir=cache,
                cache_bytes=cache_bytes,
            )
            assert co.hold is not None
            holds.append(co.hold)
            shard_paths.append(co.path)
        local = _root_dir(cache, layout, manifest, record, gid, shard_paths)
    except BaseException:
        for h in holds:
            h.release()
        raise
    return local, holds


def _same_root(local: Path, new: Path, dirs: list[str], layout: Any) -> bool:
    """Whether the local root ``local`` already says what ``new`` does (manifest, record and
    each shard's link)."""
    try:
        return (
            (local / layout.ROOT_MANIFEST).read_bytes() == (new / layout.ROOT_MANIFEST).read_bytes()
            and all(os.readlink(local / d) == os.readlink(new / d) for d in dirs)
            and sorted(p.name for p in (local / layout.GLOBAL_DIR).iterdir())
            == sorted(p.name for p in (new / layout.GLOBAL_DIR).iterdir())
        )
    except OSError:
        return False


def _root_dir(
    cache: Path, layout: Any, manifest: bytes, record: Any, gid: int, shard_paths: list[Path]
) -> Path:
    """The local root of a published sharded root's global commit ``gid`` in ``cache``."""
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".root-"))
    try:
        (tmp / layout.ROOT_MANIFEST).write_bytes(manifest)
        (tmp / layout.GLOBAL_DIR).mkdir()
        (tmp / layout.GLOBAL_DIR / f"{gid:016d}.json").write_text(
            json.dumps(record.to_json(), sort_keys=True)
        )
        for (d, _), p in zip(record.shards, shard_paths, strict=True):
            os.symlink(os.path.relpath(p, tmp.parent / "roots" / "x" / "y"), tmp / d)
        uuid = layout.read_root_manifest(tmp).uuid  # checks the manifest before it is used
        local = cache / "roots" / uuid / f"{gid:016d}"
        local.parent.mkdir(parents=True, exist_ok=True)
        if _same_root(local, tmp, [d for d, _ in record.shards], layout):
            shutil.rmtree(tmp, ignore_errors=True)  # a reader may be using it: left in place
            return local
        shutil.rmtree(local, ignore_errors=True)
        tmp.rename(local)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return local
