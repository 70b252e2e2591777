"""Checking a saved router without torch: manifest, digests, array files (numpy only).

The layout of a saved router is ``dpsn.index``'s (``index/_persist.py`` writes it and documents
it); the checks live here, beside the other storage checks, so that ``verify`` (and the CLI)
can run them without importing ``dpsn.index``, torch or FAISS. ``load_router`` runs them before
it builds anything. What is
checked, in order, before a byte of array data is read:

1. the group's ``zarr.json`` (at most 1 MiB) holds a ``dpsn_router`` manifest of a known format
   version and kind, with well-formed array entries (name, plain numeric dtype, shape);
2. the manifest's own digest, and the digest the store's commit recorded, when given;
3. each array's ``zarr.json`` against its entry: dtype, shape, codecs from an allow-list
   (``bytes`` then ``zstd`` or ``blosc``);
4. the entries' total size against a sane maximum (half this machine's memory, at most 64 GiB):
   a router larger than that could not be loaded anyway.

Then each array is read with bounded memory (the store's bounded Zarr reader: decoded sizes from the
codec headers are checked before decoding) and its blake2b compared with its entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpsn.errors import CorruptStoreError, StoreNotFoundError, StoreReadError, StoreVersionError

from ._files import read_regular
from ._zarrsafe import MAX_META_BYTES, ArrayMeta, array_dir, read_array, read_array_meta
from .fs import FileSystem

__all__ = [
    "ATTR",
    "FORMAT_VERSION",
    "KIND_NAMES",
    "RouterCheck",
    "array_digest",
    "check_router",
    "manifest_digest",
    "max_router_bytes",
]


class UnknownRouterKindError(StoreVersionError):
    """A router kind this dpsn does not know (``load_router`` raises ``UnknownRouterError``)."""


FORMAT_VERSION = 1  # never renumber
ATTR = "dpsn_router"
KIND_NAMES = ("product_keys", "vq", "lsh")  # persisted kind names: never rename
DIGEST_SIZE = 32
# Persisted dtype names (the manifest's "dtype") -> the numpy dtype the zarr array holds.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(np_name)
    for name, np_name in {
        "bool": "bool",
        "uint8": "uint8",
        "int8": "int8",
        "int16": "int16",
        "int32": "int32",
        "int64": "int64",
        "float16": "float16",
        "bfloat16": "int16",  # zarr has no bfloat16: the bits are stored
        "float32": "float32",
        "float64": "float64",
    }.items()
}
FLOATS = frozenset({"float16", "bfloat16", "float32", "float64"})
# What save_router writes is "bytes" + "zstd"; blosc is read too. Nothing else decodes a router.
CODECS = frozenset({"bytes", "zstd", "blosc"})
ARRAY_NAME = re.compile(r"(state|extra)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
MAX_ARRAYS = 4096


def array_digest(arr: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update(f"{arr.dtype.str}|{list(arr.shape)}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def manifest_digest(kind: str, config: dict[str, Any], digests: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    head = {"format_version": FORMAT_VERSION, "kind": kind, "config": config}
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(digests):
        h.update(b"\0" + name.encode() + b"\0" + digests[name].encode())
    return h.hexdigest()


def max_router_bytes() -> int:
    """The sane maximum of a router's state: half this machine's memory, at most 64 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 1 << 37
    return min(total // 2, 1 << 36)


@dataclass
class RouterCheck:
    """What a checked router group holds."""

    kind: str
    config: dict[str, Any]
    digest: str
    entries: dict[str, dict[str, Any]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(
            math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize for e in self.entries.values()
        )


def read_manifest(group_dir: Path, fs: FileSystem | None = None) -> dict[str, Any]:
    """The ``dpsn_router`` manifest from a group's ``zarr.json``, structure checked (read
    through the file seam ``fs``, the current one by default)."""
    where = str(group_dir)
    path = Path(group_dir) / "zarr.json"
    try:
        raw_bytes = read_regular(path, MAX_META_BYTES, f"router group {where}'s zarr.json", fs)
    except FileNotFoundError as e:
        raise StoreNotFoundError(f"{where} holds no zarr group, so no dpsn router") from e
    except CorruptStoreError:
        raise
    except OSError as e:
        raise CorruptStoreError(f"router group {where} cannot be read: {e}") from e
    if len(raw_bytes) > MAX_META_BYTES:
        raise CorruptStoreError(f"router group {where} has a zarr.json over {MAX_META_BYTES} B")
    try:
        raw = json.loads(raw_bytes)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptStoreError(f"router group {where} has a zarr.json that is not JSON") from e
    if not isinstance(raw, dict) or raw.get("node_type") != "group":
        raise CorruptStoreError(f"{where} is not a zarr group")
    attrs = raw.get("attributes")
    manifest = attrs.get(ATTR) if isinstance(attrs, dict) else None
    return check_manifest_structure(manifest, where)


def check_manifest_structure(manifest: Any, where: str) -> dict[str, Any]:
    if manifest is None:
        raise StoreNotFoundError(
            f"zarr group {where!r} holds no dpsn router (no {ATTR!r} attribute); "
            "save one there with save_router"
        )
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), dict):
        raise CorruptStoreError(f"router manifest in {where!r} is malformed")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreVersionError(
            f"router in {where!r} has format_version {version!r}; this dpsn reads "
            f"{FORMAT_VERSION}: upgrade dpsn"
        )
    return manifest


def check_entries(raw: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The manifest's array entries, validated as data from a stranger would be."""
    if len(raw) > MAX_ARRAYS:
        raise CorruptStoreError(f"router manifest in {where!r} lists {len(raw)} arrays")
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in raw.items():
        ok = (
            isinstance(name, str)
            and ARRAY_NAME.fullmatch(name) is not None
            and isinstance(entry, dict)
            and isinstance(entry.get("blake2b"), str)
            and entry.get("dtype") in DTYPES
            and (not name.startswith("extra.") or entry.get("dtype") == "uint8")
            and isinstance(entry.get("shape"), list)
            and len(entry["shape"]) <= 8
            and all(type(n) is int and 0 <= n < 1 << 48 for n in entry["shape"])
        )
        if not ok:
            raise CorruptStoreError(f"router manifest in {where!r} has a malformed entry {name!r}")
        entries[name] = entry
    return entries


def check_header(manifest: dict[str, Any], where: str, expected_digest: str | None) -> RouterCheck:
    """Kind, config, entries and digests of a manifest (steps 1-2 of the module doc)."""
    kind = manifest.get("kind")
    if not isinstance(kind, str) or kind not in KIND_NAMES:
        raise UnknownRouterKindError(
            f"stored router kind {kind!r} is unknown; known kinds: {sorted(KIND_NAMES)}. "
            "It was written by a newer or foreign dpsn"
        )
    entries = check_entries(manifest["arrays"], where)
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise CorruptStoreError(f"router manifest in {where!r} has no config")
    digests = {n: e["blake2b"] for n, e in entries.items()}
    try:
        digest = manifest_digest(kind, config, digests)
    except (TypeError, ValueError, RecursionError) as e:
        raise CorruptStoreError(f"router manifest in {where!r} cannot be hashed: {e}") from e
    if digest != manifest.get("digest"):
        raise CorruptStoreError(f"router manifest in {where!r} fails its digest")
    if expected_digest is not None and digest != expected_digest:
        raise CorruptStoreError(
            f"router in {where!r} does not match the digest its commit recorded; the store is "
            "damaged: restore it from a copy or re-save the router"
        )
    check = RouterCheck(kind=kind, config=config, digest=digest, entries=entries)
    limit = max_router_bytes()
    if check.nbytes > limit:
        raise CorruptStoreError(
            f"router in {where!r} claims {check.nbytes} bytes of state, more than this dpsn "
            f"loads ({limit} bytes: half this machine's memory, at most 64 GiB)"
        )
    return check


def array_meta(
    group_dir: Path, name: str, entry: dict[str, Any], fs: FileSystem | None = None
) -> ArrayMeta:
    """An array's ``zarr.json`` checked against its manifest entry (step 3)."""
    where = str(group_dir)
    want = DTYPES[entry["dtype"]]
    try:
        meta = read_array_meta(
            array_dir(Path(group_dir), name), shape=tuple(entry["shape"]), codecs=CODECS, fs=fs
        )
    except StoreReadError:
        raise
    except CorruptStoreError as e:
        raise CorruptStoreError(
            f"router array {name!r} in {where!r} is not what its manifest says (its codecs, "
            f"dtype or shape): {e}"
        ) from e
    if meta.dtype.newbyteorder("=") != want.newbyteorder("="):
        raise CorruptStoreError(
            f"router array {name!r} in {where!r} is not what its manifest says (dtype "
            f"{meta.dtype}, not {entry['dtype']}); the store is damaged or was not written by dpsn"
        )
    return meta


def read_checked(
    group_dir: Path, name: str, entry: dict[str, Any], meta: ArrayMeta | None = None
) -> np.ndarray:
    """One array, read with bounded memory, its blake2b checked."""
    if meta is None:
        meta = array_meta(group_dir, name, entry)
    try:
        data = read_array(meta)
    except StoreReadError:
        raise
    except CorruptStoreError as e:
        raise CorruptStoreError(f"router array {name!r} cannot be read: {e}") from e
    if array_digest(data) != entry["blake2b"]:
        raise CorruptStoreError(
            f"router array {name!r} in {str(group_dir)!r} fails its blake2b check; the store "
            "is damaged: restore it from a snapshot or re-save the router"
        )
    return data


def check_router(
    group_dir: Path,
    *,
    expected_digest: str | None = None,
    read: bool = True,
    fs: FileSystem | None = None,
) -> RouterCheck:
    """Check the router saved in the Zarr group at ``group_dir`` (the module doc's steps);
    with ``read``, also read every array and return them. Raises ``StoreNotFoundError`` (no
    router there), ``StoreVersionError``, ``UnknownRouterError`` or ``CorruptStoreError``."""
    group_dir = Path(group_dir)
    manifest = read_manifest(group_dir, fs)
    check = check_header(manifest, str(group_dir), expected_digest)
    metas = {name: array_meta(group_dir, name, e, fs) for name, e in check.entries.items()}
    if read:  # every array's metadata was checked before the first byte of data is read
        for name, entry in check.entries.items():
            check.arrays[name] = read_checked(group_dir, name, entry, metas[name])
    return check
