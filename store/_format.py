"""The on-disk format of a store: names, key layouts and value layouts.

Everything here is persisted. Never renumber, never reuse a name for something else; add new
names instead and bump ``FORMAT_VERSION`` when an older dpsn could misread a newer store.
``docs/format.md`` describes the same layout for people.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpsn.errors import CorruptStoreError, StoreNotFoundError, StoreVersionError

from .fs import FileSystem, write_file
from .fs import current as current_fs
from .fs import fsync_tree as _fsync_tree

FORMAT_NAME = "dpsn-store"
FORMAT_VERSION = 4  # the newest format this dpsn reads; never renumber
# What a store's LMDB ``format_version`` says. A store without lifecycle data stays at 1 (its
# bytes are format 1's). The first commit that records a lifecycle raises it to 2: from then on
# FREE rows' deltas decay lazily (``deltas`` times a factor their ``usage`` row and the commit's
# lifecycle epoch determine), which a format-1 reader would misread as undecayed.
FORMAT_PLAIN = 1
FORMAT_LIFECYCLE = 2
# An overlay store's manifest (never its LMDB index) says 3: its rows are its base store's rows
# at a pinned commit plus its own deltas (manifest field "base"), which a reader of format 2
# would misread as procedural rows plus deltas.
FORMAT_OVERLAY = 3
# The LMDB ``format_version`` a store's index says once a compaction has written a placed
# segment (record field "placed": its ids column in co-use order, not sorted; the index maps
# each id to its offset there): a reader of format 3 would take the column for sorted and
# point rows at other rows' deltas. Stores with no placed segment keep their number and bytes.
FORMAT_PLACED = 4

MANIFEST = "dpsn.json"
MAX_MANIFEST_BYTES = 1 << 20
LMDB_DIR = "index.lmdb"
ZARR_DIR = "data.zarr"
LOCK_FILE = "writer.lock"

# LMDB named databases (never rename).
DB_META = b"meta"
DB_ROWS = b"rows"
DB_COMMITS = b"commits"
DB_SEGMENTS = b"segments"
DB_SNAPSHOTS = b"snapshots"

# Keys of DB_META.
META_FORMAT = b"format_version"
META_HEAD = b"head"
META_NEXT_SEGMENT = b"next_segment"
META_GENERATOR_PREFIX = b"generator/"  # + u64 BE version: a generator record
# JSON {"txn", "dbs": {db: [entries, sum of entry hashes mod 2**64]}, "record_xxh64"}: the
# digests of every database (this key excluded) as of LMDB transaction "txn" (_digest.py).
META_DIGESTS = b"digests"

# DB_ROWS value: segment id (u64), row offset inside the segment (u64), commit id (u64).
# Little-endian so that numpy reads a whole column of values with one frombuffer.
ROW_VALUE = struct.Struct("<QQQ")
ROW_VALUE_DTYPE = [("segment", "<u8"), ("offset", "<u8"), ("commit", "<u8")]

# Keys of DB_ROWS, DB_COMMITS and DB_SEGMENTS are u64 big-endian, so LMDB's byte order is the
# numeric order and a cursor walk returns ids sorted.
U64_KEY = struct.Struct(">Q")

# Zarr paths inside ZARR_DIR.
SEGMENTS_GROUP = "segments"
GENERATOR_GROUP = "generator"
SEGMENT_IDS = "ids"  # int64 [n], unique, sorted (any order if the record says "placed")
SEGMENT_DELTAS = "deltas"  # [n, dim] in the store dtype (bf16 stored as uint16)
SEGMENT_DROPS = "drops"  # int64 [m], sorted: rows the commit returned to procedural
SEGMENT_STATE = "state"  # float32 [n, w], optional: per-row state (e.g. a row optimizer's)
SEGMENT_USAGE = "usage"  # float64 [n, w], optional: per-row usage statistics (the lifecycle's)
SNAPSHOTS_GROUP = "snapshots"
SNAPSHOT_COLUMNS = ("ids", "segment", "offset", "commit")  # int64 [r] each
ROUTERS_GROUP = "routers"

COMPRESSOR_NAMES = ("lz4", "zstd", "none")  # the manifest's "compressor" (never rename)
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the manifest's "dtype" (never rename)
MAX_COMMIT_ID = (1 << 63) - 1  # commit and segment ids are u64 keys; dpsn keeps them below 2**63


def u64_key(value: int) -> bytes:
    return U64_KEY.pack(value)


def segment_name(segment_id: int) -> str:
    """Zarr group name of a segment: fixed width, so names sort like ids."""
    return f"{segment_id:016x}"


def generator_name(version: int) -> str:
    return f"v{version:08d}"


@dataclass(frozen=True, slots=True)
class Manifest:
    """The immutable description of a store, written once by ``create``."""

    rows: int
    dim: int
    dtype: str
    seed: int
    generator: dict[str, Any]
    chunk_rows: int
    compressor: str
    created: float
    uuid: str
    format_version: int = FORMAT_PLAIN
    # An overlay's base: {"path", "uuid", "commit", "snapshot"} (``tiers/_overlay.py``); None
    # for an ordinary store (the key is then absent, so older manifests digest as before).
    base: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = self._fields()
        if self.base is not None:
            out["base"] = self.base
        return out

    def _fields(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "seed": self.seed,
            "generator": self.generator,
            "chunk_rows": self.chunk_rows,
            "compressor": self.compressor,
            "created": self.created,
            "uuid": self.uuid,
        }


def write_manifest(root: Path, manifest: Manifest, fs: FileSystem | None = None) -> None:
    """Write the manifest durably (temp file, fsync, rename, fsync the directory)."""
    fs = fs or current_fs()
    tmp = root / (MANIFEST + ".tmp")
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    write_file(fs, tmp, text.encode("utf-8"), sync=True)
    fs.replace(tmp, root / MANIFEST)
    fs.fsync_dir(root)


_MANIFEST_FIELDS = {
    "rows": int,
    "dim": int,
    "dtype": str,
    "seed": int,
    "generator": dict,
    "chunk_rows": int,
    "compressor": str,
    "created": (int, float),
    "uuid": str,
}


def read_manifest(root: Path, fs: FileSystem | None = None) -> Manifest:
    """Read and validate a manifest; a store is untrusted input, so every field is checked.
    Read through the file seam ``fs`` (the current one by default): a device's read fault is
    ``StoreReadError`` naming the file."""
    from ._files import read_regular

    path = root / MANIFEST
    if not root.exists():
        raise StoreNotFoundError(f"no such store: {root} does not exist")
    if not root.is_dir():
        raise StoreNotFoundError(
            f"{root} is a file, not a dpsn store (a store is a directory made by dpsn.create)"
        )
    if not path.is_file():
        raise StoreNotFoundError(
            f"{root} is not a dpsn store: it has no {MANIFEST}. "
            "Create one with dpsn.create(path, rows, dim) or `dpsn create`."
        )
    try:
        text = read_regular(path, MAX_MANIFEST_BYTES, f"{path} (the manifest)", fs)
        raw = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptStoreError(f"{path} is not valid JSON: {e}") from e
    except CorruptStoreError:
        raise
    except OSError as e:
        raise CorruptStoreError(f"{path} cannot be read: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise StoreNotFoundError(
            f"{root} is not a dpsn store: {MANIFEST} does not say format={FORMAT_NAME!r}"
        )
    version = raw.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CorruptStoreError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise StoreVersionError(
            f"{root} has format version {version}; this dpsn reads up to {FORMAT_VERSION}. "
            "Upgrade dpsn to open it."
        )
    for name, kind in _MANIFEST_FIELDS.items():
        if not isinstance(raw.get(name), kind) or isinstance(raw.get(name), bool):
            raise CorruptStoreError(f"{path}: field {name!r} is missing or has the wrong type")
    if not 1 <= raw["rows"] <= MAX_COMMIT_ID or not 1 <= raw["dim"] <= 1 << 20:
        raise CorruptStoreError(f"{path}: rows must be in 1..2**63-1 and dim in 1..2**20")
    if not 1 <= raw["chunk_rows"] < 1 << 40 or not 0 <= raw["seed"] < 1 << 64:
        raise CorruptStoreError(f"{path}: chunk_rows or seed is out of range")
    if raw["compressor"] not in COMPRESSOR_NAMES or raw["dtype"] not in DTYPE_NAMES:
        raise CorruptStoreError(
            f"{path}: compressor {raw['compressor']!r} or dtype {raw['dtype']!r} is not one dpsn "
            "writes"
        )
    gen = raw["generator"]
    if not isinstance(gen.get("kind"), str) or not isinstance(gen.get("config"), dict):
        raise CorruptStoreError(f"{path}: generator must be {{'kind': str, 'config': {{...}}}}")
    return Manifest(
        rows=raw["rows"],
        dim=raw["dim"],
        dtype=raw["dtype"],
        seed=raw["seed"],
        generator=raw["generator"],
        chunk_rows=raw["chunk_rows"],
        compressor=raw["compressor"],
        created=float(raw["created"]),
        uuid=raw["uuid"],
        format_version=version,
        base=_base_field(raw, path, version),
    )


def _base_field(raw: dict[str, Any], path: Path, version: int) -> dict[str, Any] | None:
    """The manifest's overlay link, checked (present exactly when the format is overlay)."""
    base = raw.get("base")
    if base is None and version < FORMAT_OVERLAY:
        return None
    ok = (
        version >= FORMAT_OVERLAY
        and isinstance(base, dict)
        and isinstance(base.get("path"), str)
        and 0 < len(base["path"]) < 4096
        and isinstance(base.get("uuid"), str)
        and isinstance(base.get("commit"), int)
        and not isinstance(base.get("commit"), bool)
        and 1 <= base["commit"] <= MAX_COMMIT_ID
        and (base.get("snapshot") is None or isinstance(base.get("snapshot"), str))
    )
    if not ok:
        raise CorruptStoreError(
            f"{path}: an overlay store (format {FORMAT_OVERLAY}) needs a field 'base' "
            "{path, uuid, commit, snapshot}; it is missing or malformed"
        )
    return {k: base.get(k) for k in ("path", "uuid", "commit", "snapshot")}


def fsync_dir(path: Path, fs: FileSystem | None = None) -> None:
    """fsync directory ``path`` through the file seam (``fs``; the current one by default)."""
    (fs or current_fs()).fsync_dir(Path(path))


def fsync_tree(path: Path, fs: FileSystem | None = None) -> None:
    """fsync every file and directory below ``path`` (zarr writes without fsync) through the
    file seam, each directory after what it holds."""
    _fsync_tree(Path(path), fs)
