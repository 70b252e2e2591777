"""Router state in a Zarr v3 group: arrays + a JSON manifest, every array digest-checked.

Layout of the group the caller passes (e.g. ``routers/main`` of the store's Zarr group)::

    <group>/zarr.json              attributes["dpsn_router"] = manifest (below), written last
    <group>/state.<param-name>     one array per state_dict entry (parameters and buffers)
    <group>/extra.<name>           uint8 arrays: faiss.serialize_index blobs

    manifest = {
      "format_version": 1,                    # never renumber
      "kind": "product_keys" | "vq" | "lsh",  # persisted names: never rename
      "config": {...},                        # constructor keyword arguments
      "arrays": {name: {"blake2b": hex, "dtype": "float32", "shape": [...]}},
      "digest": hex,                          # blake2b over config and arrays, fixed order
    }

Nothing is pickled and nothing is ``torch.load``-ed: a router read from a stranger's store can
only fill tensors. Before an array is read, its name, dtype (plain numbers only), shape (the one
the config implies, so a crafted store cannot make the load allocate what it likes) and codecs
(a short allow-list, so no codec registered by some other installed package decodes it) are
checked; after, its blake2b. The FAISS blobs are never deserialised at all: each router rebuilds
its index from its buffers and compares the bytes. Arrays are written before the manifest, so a
save killed half way leaves a manifest whose digests do not match and the load refuses it
(rather than routing with a mix of old and new state).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from dpsn.errors import CorruptStoreError, StoreNotFoundError, StoreVersionError

from ._base import Router
from ._config import config_json
from ._errors import RouterConfigError, UnknownRouterError
from ._lsh import LSHRouter
from ._product_keys import ProductKeyRouter
from ._vq import VQRouter

__all__ = ["FORMAT_VERSION", "ROUTER_KINDS", "load_router", "router_digest", "save_router"]

FORMAT_VERSION = 1  # never renumber
ATTR = "dpsn_router"
# Persisted kind names -> classes. Never rename a key; add new kinds only.
ROUTER_KINDS: dict[str, type[Router]] = {
    "product_keys": ProductKeyRouter,
    "vq": VQRouter,
    "lsh": LSHRouter,
}
_DIGEST_SIZE = 32
# Persisted dtype names (the manifest's "dtype") -> the numpy dtype the zarr array holds.
_DTYPES: dict[str, np.dtype] = {
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
_FLOATS = frozenset({"float16", "bfloat16", "float32", "float64"})
_CODECS = frozenset({"bytes", "zstd", "gzip", "blosc", "crc32c", "transpose"})
_ARRAY_NAME = re.compile(r"(state|extra)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _array_digest(arr: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    h.update(f"{arr.dtype.str}|{list(arr.shape)}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _manifest_digest(kind: str, config: dict[str, Any], digests: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    head = {"format_version": FORMAT_VERSION, "kind": kind, "config": config}
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(digests):
        h.update(b"\0" + name.encode() + b"\0" + digests[name].encode())
    return h.hexdigest()


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise RouterConfigError(f"cannot persist a {t.dtype} tensor; cast the router to float32")
    if t.dtype == torch.bfloat16:  # zarr has no bfloat16: store the bits
        return t.view(torch.int16).numpy(), dtype
    return t.numpy(), dtype


def _dtype_class(t: torch.Tensor) -> str:
    return "float" if t.is_floating_point() else str(t.dtype).removeprefix("torch.")


def _from_numpy(arr: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(arr))  # copy: never alias zarr's buffers
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _collect(router: Router) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for key, t in router.state_dict().items():
        arrays[f"state.{key}"], dtypes[f"state.{key}"] = _to_numpy(t)
    for key, blob in router.extra_arrays().items():
        arrays[f"extra.{key}"] = np.ascontiguousarray(blob, dtype=np.uint8)
        dtypes[f"extra.{key}"] = "uint8"
    return arrays, dtypes


def _kind_of(router: Router) -> str:
    kind = getattr(type(router), "kind", None)
    if ROUTER_KINDS.get(kind) is not type(router):  # type: ignore[arg-type]
        raise UnknownRouterError(
            f"cannot persist {type(router).__name__}: only {sorted(ROUTER_KINDS)} are known"
        )
    return kind  # type: ignore[return-value]


def router_digest(router: Router) -> str:
    """blake2b hex of the router's kind, config and state: what ``save_router`` returns."""
    kind = _kind_of(router)
    arrays, _ = _collect(router)
    config = config_json(router.config())
    return _manifest_digest(kind, config, {n: _array_digest(a) for n, a in arrays.items()})


def save_router(router: Router, group: zarr.Group) -> str:
    """Write the router's state into ``group`` (Zarr v3) and return its digest.

    Overwrites a router saved there before. The caller owns durability (fsync and making the
    group visible through its commit), as for every other Zarr write in dpsn.
    """
    kind = _kind_of(router)
    config = config_json(router.config())
    arrays, dtypes = _collect(router)
    entries: dict[str, dict[str, Any]] = {}
    for name, arr in arrays.items():
        dig = _array_digest(arr)
        group.create_array(  # codecs pinned: they must stay inside what load_router allows
            name, data=arr, overwrite=True, compressors=ZstdCodec(), attributes={"blake2b": dig}
        )
        entries[name] = {"blake2b": dig, "dtype": dtypes[name], "shape": list(arr.shape)}
    digest = _manifest_digest(kind, config, {n: e["blake2b"] for n, e in entries.items()})
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "arrays": entries,
        "digest": digest,
    }
    group.attrs[ATTR] = manifest
    for name in list(group.array_keys()):  # arrays of an older save that are no longer used
        if name.startswith(("state.", "extra.")) and name not in entries:
            del group[name]
    return digest


def _read_manifest(group: zarr.Group) -> dict[str, Any]:
    manifest = group.attrs.get(ATTR)
    if manifest is None:
        raise StoreNotFoundError(
            f"zarr group {group.path!r} holds no dpsn router (no {ATTR!r} attribute); "
            "save one there with save_router"
        )
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), dict):
        raise CorruptStoreError(f"router manifest in {group.path!r} is malformed")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreVersionError(
            f"router in {group.path!r} has format_version {version!r}; this dpsn reads "
            f"{FORMAT_VERSION}: upgrade dpsn"
        )
    return manifest


def _check_entries(raw: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The manifest's array entries, validated as data from a stranger would be."""
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in raw.items():
        ok = (
            isinstance(name, str)
            and _ARRAY_NAME.fullmatch(name) is not None
            and isinstance(entry, dict)
            and isinstance(entry.get("blake2b"), str)
            and entry.get("dtype") in _DTYPES
            and (not name.startswith("extra.") or entry.get("dtype") == "uint8")
            and isinstance(entry.get("shape"), list)
            and all(type(n) is int and n >= 0 for n in entry["shape"])
        )
        if not ok:
            raise CorruptStoreError(f"router manifest in {where!r} has a malformed entry {name!r}")
        entries[name] = entry
    return entries


def _read_array(group: zarr.Group, name: str, entry: dict[str, Any]) -> np.ndarray:
    """Read one array after checking what it claims to be; check its blake2b after."""
    where = group.path
    try:
        arr = group.get(name)
        meta = arr.metadata.to_dict() if isinstance(arr, zarr.Array) else None
    except Exception as exc:  # any decode or I/O failure is damage to the store
        raise CorruptStoreError(f"router array {name!r} cannot be opened: {exc}") from exc
    if meta is None:
        raise CorruptStoreError(f"router array {name!r} is missing from {where!r}")
    codecs = {c.get("name") if isinstance(c, dict) else None for c in meta.get("codecs", ())}
    if (
        arr.dtype != _DTYPES[entry["dtype"]]
        or list(arr.shape) != entry["shape"]
        or not codecs <= _CODECS
    ):
        raise CorruptStoreError(
            f"router array {name!r} in {where!r} is not what its manifest says (dtype "
            f"{arr.dtype}, shape {list(arr.shape)}, codecs {sorted(map(str, codecs))}); the "
            "store is damaged or was not written by dpsn"
        )
    try:
        data = np.asarray(arr[...])
    except Exception as exc:
        raise CorruptStoreError(f"router array {name!r} cannot be read: {exc}") from exc
    if _array_digest(data) != entry["blake2b"]:
        raise CorruptStoreError(
            f"router array {name!r} in {where!r} fails its blake2b check; the store "
            "is damaged: restore it from a snapshot or re-save the router"
        )
    return data


def load_router(group: zarr.Group) -> Router:
    """Rebuild the router saved in ``group``; every array is checked before use.

    Raises ``UnknownRouterError`` for a kind this dpsn does not know, ``CorruptStoreError``
    when the manifest or an array is malformed, missing, unreadable or fails its blake2b,
    ``StoreNotFoundError`` when the group holds no router. The router comes back in training
    mode, like any new module, with the dtypes it was saved with.
    """
    manifest = _read_manifest(group)
    kind = manifest.get("kind")
    cls = ROUTER_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownRouterError(
            f"stored router kind {kind!r} is unknown; known kinds: {sorted(ROUTER_KINDS)}. "
            "It was written by a newer or foreign dpsn"
        )
    entries = _check_entries(manifest["arrays"], group.path)
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise CorruptStoreError(f"router manifest in {group.path!r} has no config")
    digests = {n: e["blake2b"] for n, e in entries.items()}
    if _manifest_digest(kind, config, digests) != manifest.get("digest"):  # type: ignore[arg-type]
        raise CorruptStoreError(f"router manifest in {group.path!r} fails its digest")
    try:
        router = cls(cls.Config.from_json(config))
    except (TypeError, ValueError) as exc:
        raise CorruptStoreError(f"stored router config cannot build a {kind!r}: {exc}") from exc
    # the config fixes every state shape and kind of dtype: compare before reading a byte
    # (a float tensor may come back in another float dtype, anything else in its own)
    expected = {
        f"state.{n}": (list(t.shape), _dtype_class(t)) for n, t in router.state_dict().items()
    }
    stored = {
        n: (e["shape"], e["dtype"] if e["dtype"] not in _FLOATS else "float")
        for n, e in entries.items()
        if n.startswith("state.")
    }
    if stored != expected:
        raise CorruptStoreError(
            f"stored router state in {group.path!r} does not fit its config (arrays or shapes "
            "differ); the store is damaged"
        )
    arrays = {name: _read_array(group, name, entry) for name, entry in entries.items()}
    state = {
        n.removeprefix("state."): _from_numpy(a, entries[n]["dtype"])
        for n, a in arrays.items()
        if n.startswith("state.")
    }
    try:
        # assign: keep the stored dtypes (a float64 router comes back float64, routing alike)
        router.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CorruptStoreError(f"stored router state does not fit its config: {exc}") from exc
    router.load_extra_arrays(
        {n.removeprefix("extra."): a for n, a in arrays.items() if n.startswith("extra.")}
    )
    return router
