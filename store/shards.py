"""The on-disk layout of a sharded root, and its global commit records (torch-free).

A sharded root is a directory holding one ordinary dpsn store per shard and a log of global
commits that names, for each shard, the shard directory and the commit of that store which
belongs to the global commit::

    ROOT/
      dpsn-sharded.json           the root manifest: format, uuid, shard count, placement
      shard-0000/ ... shard-NNNN/ one dpsn store each (dpsn.json, index.lmdb, data.zarr)
      global/0000000000000001.json, ...   one file per global commit (never rewritten)

Two-phase commit: every rank commits its own shard (phase 1: an ordinary, durable store
commit), then rank 0 writes the next global record (phase 2) by write-to-temp, fsync, rename
and fsync of the directory. A global commit exists exactly when its file exists under its final
name, so a crash at any point leaves the newest record whole: readers open the shards at the
commits it names, and a writer that finds a shard ahead of it rolls that shard back
(``tiers._rollback``) before training on. ``dpsn reshard`` writes new shard directories (named
after the global commit that introduces them) and then one global record naming them, so it
is atomic the same way.

Everything here is persisted: never renumber :data:`PLACEMENT_SEED` or rename the keys.
Records are read as untrusted input (JSON only, every field checked).

The root manifest and the global records are written and read through the file seam
(``dpsn.store.fs``; each function takes ``fs=``, default the current file system).
:func:`copy_durably` (a reshard's whole-directory copy) is not: it copies with ``shutil`` and
then fsyncs the copy through the seam.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpsn.errors import CorruptStoreError, DpsnError, InvalidArgumentError, StoreNotFoundError

from ._checks import write_failed
from ._files import read_regular
from ._format import fsync_dir, fsync_tree
from .fs import FileSystem, write_file
from .fs import current as current_fs

ROOT_MANIFEST = "dpsn-sharded.json"
ROOT_FORMAT_NAME = "dpsn-sharded-root"
ROOT_FORMAT_VERSION = 1  # never renumber
GLOBAL_DIR = "global"
# The XXH64 seed of row placement: rank = xxh64(id, PLACEMENT_SEED) mod shards, top bit
# cleared first (a non-negative int64). Independent of the pool's seed so that resharding
# and the pool's own hashes never correlate. Never renumber.
PLACEMENT_SEED = 0x5348415244  # "SHARD"
MAX_SHARDS = 1 << 16
MAX_RECORD_BYTES = 1 << 22
_RECORD_NAME = re.compile(r"^([0-9]{16})\.json$")
_SHARD_DIR = re.compile(r"^shard-[0-9]{4,5}(\.[0-9]{1,16})?$")


def shard_dir_name(shard: int, generation: int = 0) -> str:
    """``shard-0003`` for the stores made at create; ``shard-0003.7`` for those a reshard made
    for global commit 7 (new names, so the old layout stays whole until the record flips)."""
    base = f"shard-{shard:04d}"
    return base if generation == 0 else f"{base}.{generation}"


@dataclass(frozen=True, slots=True)
class RootManifest:
    """What never changes for a sharded root: its identity and the dimensions every shard
    shares (checked against each shard's own manifest when it is opened)."""

    uuid: str
    rows: int
    dim: int
    created: float

    def to_json(self) -> dict[str, Any]:
        return {
            "format": ROOT_FORMAT_NAME,
            "format_version": ROOT_FORMAT_VERSION,
            "uuid": self.uuid,
            "rows": self.rows,
            "dim": self.dim,
            "created": self.created,
            "placement": {"hash": "xxh64", "seed": PLACEMENT_SEED},
        }


@dataclass(frozen=True, slots=True)
class GlobalCommit:
    """One global commit: ``shards[i]`` is (directory, commit id) of shard ``i``."""

    id: int
    shards: tuple[tuple[str, int], ...]
    time: float
    message: str

    @property
    def count(self) -> int:
        return len(self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "message": self.message,
            "shards": [{"dir": d, "commit": c} for d, c in self.shards],
        }


def is_sharded(root: str | os.PathLike[str]) -> bool:
    """True when ``root`` holds a sharded root's manifest."""
    return (Path(root) / ROOT_MANIFEST).is_file()


def _write_atomic(path: Path, obj: dict[str, Any], fs: FileSystem | None = None) -> None:
    """Write JSON to ``path`` so that it appears whole or not at all, durably: temp file in
    the same directory, fsync, link to its name, fsync of the directory, through the file seam
    ``fs``. Refuses to replace a file. A failure removes the temporary file (a crash leaves it:
    :func:`global_ids` skips it) and is ``StoreFullError``/``StoreWriteError`` (a record that
    exists already stays a ``FileExistsError``)."""
    fs = fs or current_fs()
    data = json.dumps(obj, sort_keys=True).encode()
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:12]}.json"
    try:
        write_file(fs, tmp, data, sync=True)
        if path.exists():
            raise FileExistsError(f"{path} exists: a record is never rewritten")
        fs.link(tmp, path)  # fails if a racing writer made it first: records are never replaced
        fs.unlink(tmp)
        fsync_dir(path.parent, fs)
    except BaseException as e:
        with contextlib.suppress(OSError):
            fs.unlink(tmp, missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, FileExistsError | DpsnError):
            raise write_failed(e, f"could not write {path}") from e
        raise


def _read_json(path: Path, fs: FileSystem | None = None) -> dict[str, Any]:
    try:  # a regular file, its size bounded before it is read (never a FIFO or /dev/zero)
        data = read_regular(path, MAX_RECORD_BYTES, str(path), fs)
    except FileNotFoundError:
        raise StoreNotFoundError(f"{path} does not exist") from None
    return json_object(data, str(path))


def json_object(data: bytes, where: str) -> dict[str, Any]:
    """``data`` parsed as one JSON object (``CorruptStoreError`` otherwise)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptStoreError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CorruptStoreError(f"{where} does not hold a JSON object")
    return raw


def _int(raw: dict[str, Any], key: str, where: Path | str, lo: int = 0, hi: int = 1 << 63) -> int:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise CorruptStoreError(f"{where}: {key!r} must be an int in {lo}..{hi - 1}, got {v!r}")
    return v


def write_root_manifest(root: Path, manifest: RootManifest, fs: FileSystem | None = None) -> None:
    _write_atomic(root / ROOT_MANIFEST, manifest.to_json(), fs)


def read_root_manifest(root: str | os.PathLike[str], fs: FileSystem | None = None) -> RootManifest:
    """The root's manifest; ``StoreNotFoundError`` if ``root`` is not a sharded root,
    ``CorruptStoreError`` if its manifest is damaged."""
    path = Path(root) / ROOT_MANIFEST
    if not path.is_file():
        raise StoreNotFoundError(f"{root} is not a sharded dpsn root (no {ROOT_MANIFEST})")
    raw = _read_json(path, fs)
    if raw.get("format") != ROOT_FORMAT_NAME:
        raise CorruptStoreError(f"{path}: not a {ROOT_FORMAT_NAME} manifest")
    version = _int(raw, "format_version", path, 1)
    if version > ROOT_FORMAT_VERSION:
        raise CorruptStoreError(
            f"{path}: format version {version} is newer than this dpsn reads "
            f"({ROOT_FORMAT_VERSION}); upgrade dpsn"
        )
    placement = raw.get("placement")
    if placement != {"hash": "xxh64", "seed": PLACEMENT_SEED}:
        raise CorruptStoreError(f"{path}: unknown row placement {placement!r}")
    uuid, created = raw.get("uuid"), raw.get("created")
    if not isinstance(uuid, str) or not isinstance(created, int | float):
        raise CorruptStoreError(f"{path}: 'uuid' and 'created' are missing or of the wrong type")
    return RootManifest(
        uuid=uuid,
        rows=_int(raw, "rows", path, 1),
        dim=_int(raw, "dim", path, 1, (1 << 20) + 1),
        created=float(created),
    )


def parse_global(raw: dict[str, Any], path: Path | str) -> GlobalCommit:
    """A global record read as untrusted JSON (from the root, or from a bucket), every field
    checked; ``path`` names it in errors."""
    shards = raw.get("shards")
    if not isinstance(shards, list) or not 1 <= len(shards) <= MAX_SHARDS:
        raise CorruptStoreError(f"{path}: 'shards' must be a list of 1..{MAX_SHARDS} entries")
    out = []
    for s in shards:
        if not isinstance(s, dict) or not isinstance(s.get("dir"), str):
            raise CorruptStoreError(f"{path}: a shard entry lacks its 'dir'")
        if not _SHARD_DIR.match(s["dir"]):  # never a path out of the root
            raise CorruptStoreError(f"{path}: {s['dir']!r} is not a shard directory name")
        out.append((s["dir"], _int(s, "commit", path, 1)))
    message, when = raw.get("message", ""), raw.get("time")
    if not isinstance(message, str) or not isinstance(when, int | float):
        raise CorruptStoreError(f"{path}: 'message' or 'time' has the wrong type")
    return GlobalCommit(
        id=_int(raw, "id", path, 1), shards=tuple(out), time=float(when), message=message
    )


def global_ids(root: str | os.PathLike[str]) -> list[int]:
    """Ids of the global commits under ``root``, ascending (temp files ignored)."""
    d = Path(root) / GLOBAL_DIR
    if not d.is_dir():
        return []
    ids = [int(m.group(1)) for n in os.listdir(d) if (m := _RECORD_NAME.match(n))]
    return sorted(ids)


def read_global(
    root: str | os.PathLike[str], gid: int | None = None, fs: FileSystem | None = None
) -> GlobalCommit:
    """Global commit ``gid`` (default the newest): the consistent cut a reader opens."""
    ids = global_ids(root)
    if not ids:
        raise CorruptStoreError(f"{root}: a sharded root without any global commit")
    if gid is None:
        gid = ids[-1]
    elif gid not in ids:
        from dpsn.errors import SnapshotNotFoundError

        raise SnapshotNotFoundError(f"{root}: no global commit {gid} (have {ids[0]}..{ids[-1]})")
    path = Path(root) / GLOBAL_DIR / f"{gid:016d}.json"
    rec = parse_global(_read_json(path, fs), path)
    if rec.id != gid:
        raise CorruptStoreError(f"{path}: names global commit {rec.id}, not {gid}")
    return rec


def global_log(root: str | os.PathLike[str], fs: FileSystem | None = None) -> list[GlobalCommit]:
    return [read_global(root, gid, fs) for gid in global_ids(root)]


def write_global(
    root: str | os.PathLike[str],
    shards: list[tuple[str, int]],
    message: str,
    fs: FileSystem | None = None,
) -> GlobalCommit:
    """Phase 2: append the next global commit naming ``shards`` (each already committed).
    Atomic and durable (through the file seam ``fs``); returns it."""
    fs = fs or current_fs()
    ids = global_ids(root)
    rec = GlobalCommit(
        id=(ids[-1] + 1) if ids else 1,
        shards=tuple((d, int(c)) for d, c in shards),
        time=time.time(),
        message=message,
    )
    d = Path(root) / GLOBAL_DIR
    if not d.is_dir():
        try:
            fs.mkdir(d, exist_ok=True)
            fsync_dir(d.parent, fs)
        except OSError as e:
            raise write_failed(e, f"could not make {d}") from e
    _write_atomic(d / f"{rec.id:016d}.json", rec.to_json(), fs)
    return rec


def copy_durably(src: Path, dst: Path) -> None:
    """Copy the directory ``src`` to ``dst`` (replacing a leftover) and fsync it all."""
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    fsync_tree(dst)


def check_shards(shards: object) -> int:
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise InvalidArgumentError(f"shards must be an int in 1..{MAX_SHARDS}, got {shards!r}")
    return shards
