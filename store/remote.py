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
    HEAD                             {"commit": N}: the newest published commit, written last

A writer commits locally and publishes (:func:`publish`): it uploads the files of HEAD it has
not uploaded before (segments and generator arrays are immutable; ``dpsn.json`` and the Zarr
group metadata are small), a compacted copy of the LMDB index taken in one read transaction,
then the commit's record, and only then ``HEAD``. A reader (:func:`materialize`) reads ``HEAD``,
then that record, so it never sees a half-published commit: every object a record names was
uploaded before the record. Credentials come only from the environment or ``storage_options``
and are never written into the bucket, the record or the cache.

The reader's local disk cache (``cache_dir``, ``cache_bytes``): objects are downloaded once,
checked against their xxh64 and size, and hard-linked into a directory per published commit that
opens as an ordinary read-only store (whose segment reads check every chunk's checksum again,
as for any store). Past ``cache_bytes`` the least recently opened commits' directories and the
objects no kept commit links are removed. What it is not: a per-chunk read-through cache; a
commit's files are fetched whole when it is opened (see docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
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

from ._format import LMDB_DIR, MANIFEST, ZARR_DIR
from .shards import json_object

PUBLISHED_FORMAT = "dpsn-published"
PUBLISHED_VERSION = 1  # never renumber
HEAD_OBJECT = "HEAD"
OBJECTS_DIR = "objects"
PUBLISHED_DIR = "published"
LMDB_DATA = "data.mdb"
DEFAULT_CACHE_BYTES = 8 << 30
MAX_RECORD_BYTES = 64 << 20
_OBJECT = re.compile(r"^[0-9a-f]{16}-[0-9]{1,15}$")
_COMPLETE = ".complete"


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


def _store_files(root: Path) -> list[str]:
    """Files a reader needs, relative to the store: the manifest and ``data.zarr`` (run files
    are left out: a read-only open reads the index from LMDB)."""
    out = [MANIFEST]
    for p in sorted((root / ZARR_DIR).rglob("*")):
        if p.is_file() and not p.name.endswith(".partial") and not p.name.startswith(".tmp"):
            out.append(p.relative_to(root).as_posix())
    return out


def publish(store: Any, url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish ``store``'s HEAD (a :class:`PersistedStore`; the caller keeps writers away, as a
    pool's own writer does) under ``url``. Returns the commit, objects uploaded and bytes."""
    fs, prefix = _fs(url, storage_options)
    root = Path(store.root)
    uploaded = sent = 0
    with tempfile.TemporaryDirectory() as tmp:
        # The caller holds the writer lock, so HEAD cannot move during the copy. Not compacted:
        # a compacting copy renumbers the transaction that the index digests name.
        commit = store.head()
        store.env.env.copy(tmp)
        index_path = Path(tmp) / LMDB_DATA
        files: dict[str, str] = {}
        for rel in _store_files(root):
            files[rel] = f"{_hash_file(root / rel)}-{(root / rel).stat().st_size}"
        index_obj = f"{_hash_file(index_path)}-{index_path.stat().st_size}"
        have = set()
        with contextlib.suppress(FileNotFoundError):
            have = {p.rsplit("/", 1)[-1] for p in fs.find(f"{prefix}/{OBJECTS_DIR}")}
        todo = {obj: root / rel for rel, obj in files.items()} | {index_obj: index_path}
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
    }
    fs.pipe_file(f"{prefix}/{PUBLISHED_DIR}/{commit:016d}.json", json.dumps(record).encode())
    fs.pipe_file(f"{prefix}/{HEAD_OBJECT}", json.dumps({"commit": commit}).encode())
    return {"commit": commit, "objects_uploaded": uploaded, "bytes_uploaded": sent, "url": url}


def _read_json(fs: Any, path: str) -> dict[str, Any]:
    try:
        with fs.open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        raise StoreNotFoundError(f"{path}: no such object (nothing published there?)") from None
    if len(data) > MAX_RECORD_BYTES:
        raise CorruptStoreError(f"{path} is larger than {MAX_RECORD_BYTES} bytes")
    return json_object(data, path)


def _check_record(raw: dict[str, Any], where: str) -> dict[str, Any]:
    if raw.get("format") != PUBLISHED_FORMAT or raw.get("format_version") != PUBLISHED_VERSION:
        raise CorruptStoreError(f"{where}: not a {PUBLISHED_FORMAT} v{PUBLISHED_VERSION} record")
    files, index, uuid = raw.get("files"), raw.get("index"), raw.get("uuid")
    if not isinstance(files, dict) or not isinstance(index, str) or not isinstance(uuid, str):
        raise CorruptStoreError(f"{where}: 'files', 'index' or 'uuid' is missing")
    if not re.fullmatch(r"[0-9a-f]{32}", uuid):
        raise CorruptStoreError(f"{where}: bad uuid {uuid!r}")
    for rel, obj in [*files.items(), ("index", index)]:
        if not isinstance(obj, str) or not _OBJECT.match(obj):
            raise CorruptStoreError(f"{where}: {rel!r} names a bad object {obj!r}")
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts) or not (
            rel == MANIFEST or parts[0] == ZARR_DIR or rel == "index"
        ):
            raise CorruptStoreError(f"{where}: {rel!r} is not a path inside a store")
    if MANIFEST not in files:
        raise CorruptStoreError(f"{where}: names no {MANIFEST}")
    return raw


def published(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """The newest commit published under ``url``."""
    fs, prefix = _fs(url, storage_options)
    head = _read_json(fs, f"{prefix}/{HEAD_OBJECT}").get("commit")
    if isinstance(head, bool) or not isinstance(head, int) or head < 1:
        raise CorruptStoreError(f"{url}/{HEAD_OBJECT}: 'commit' must be a positive int")
    return head


def materialize(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    at: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Path:
    """A local read-only copy of the commit published under ``url`` (the newest, or ``at``),
    in the disk cache: the directory to open as a store."""
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 1:
        raise InvalidArgumentError(f"cache_bytes must be a positive int, got {cache_bytes!r}")
    fs, prefix = _fs(url, storage_options)
    commit = published(url, storage_options) if at is None else at
    where = f"{prefix}/{PUBLISHED_DIR}/{commit:016d}.json"
    try:
        rec = _check_record(_read_json(fs, where), where)
    except StoreNotFoundError:
        raise SnapshotNotFoundError(f"{url}: commit {commit} was not published") from None
    cache = Path(cache_dir) if cache_dir is not None else _default_cache()
    local = cache / "commits" / rec["uuid"] / f"{commit:016d}"
    if (local / _COMPLETE).is_file():
        os.utime(local / _COMPLETE)
        return local
    objects = cache / OBJECTS_DIR
    objects.mkdir(parents=True, exist_ok=True)
    wanted = {**rec["files"], f"{LMDB_DIR}/{LMDB_DATA}": rec["index"]}
    need = sum(int(o.rsplit("-", 1)[1]) for o in set(wanted.values()))
    if need > cache_bytes:
        raise CacheTooLargeError(
            f"commit {commit} of {url} needs {need} bytes on disk, more than cache_bytes="
            f"{cache_bytes}; raise cache_bytes"
        )
    _evict(cache, cache_bytes - need, keep=set(wanted.values()))
    _fetch(fs, prefix, objects, sorted(set(wanted.values())))
    tmp = local.with_name(local.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, obj in wanted.items():
        dst = tmp.joinpath(*rel.split("/"))
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(objects / obj, dst)
    shutil.rmtree(local, ignore_errors=True)
    tmp.rename(local)
    (local / _COMPLETE).write_text(json.dumps({"url_commit": commit}))
    return local


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpsn"


def _fetch(fs: Any, prefix: str, objects: Path, names: list[str]) -> None:
    """Download the objects ``names`` not cached yet into ``objects`` (one batched, concurrent
    ``get``), checking each one's size and xxh64 (its name) before it enters the cache."""
    todo = []
    for name in names:
        if (objects / name).is_file():
            os.utime(objects / name)
        else:
            todo.append(name)
    if not todo:
        return
    parts = [str(objects / (n + ".part")) for n in todo]
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


def _evict(cache: Path, budget: int, keep: set[str]) -> None:
    """Free the cache down to ``budget`` bytes of objects besides ``keep``: whole commit
    directories, least recently opened first, then the objects nothing links any more."""
    objects = cache / OBJECTS_DIR

    def used() -> int:
        return sum(p.stat().st_size for p in objects.iterdir() if p.name not in keep)

    if used() <= budget:
        return
    dirs = sorted((cache / "commits").glob("*/*/" + _COMPLETE), key=lambda p: p.stat().st_mtime)
    for marker in dirs:
        shutil.rmtree(marker.parent, ignore_errors=True)
        for p in list(objects.iterdir()):
            if p.name not in keep and p.stat().st_nlink == 1:
                p.unlink()
        if used() <= budget:
            return
