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
its array file has, and the one the config implies, so a crafted store cannot make the load
allocate what it likes) and codecs (a short allow-list, so no codec registered by some other
installed package decodes it) are checked; after, its blake2b. The torch-free part of these
checks lives in ``dpsn.tiers.router_format`` (``verify`` uses it alone). Building the module from a
config is itself bounded: its allocations may not exceed a few times the state its manifest
lists, so an edited config that asks for gigantic weights is refused before they exist. The
FAISS blobs are never deserialised at all: each router rebuilds
its index from its buffers and compares the bytes. Arrays are written before the manifest, so a
save killed half way leaves a manifest whose digests do not match and the load refuses it
(rather than routing with a mix of old and new state).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils._python_dispatch import TorchDispatchMode
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from dpsn.errors import CorruptStoreError
from dpsn.store import router_format as rf

from ._base import Router
from ._config import config_json
from ._errors import RouterConfigError, UnknownRouterError
from ._lsh import LSHRouter
from ._product_keys import ProductKeyRouter
from ._vq import VQRouter

__all__ = ["FORMAT_VERSION", "ROUTER_KINDS", "load_router", "router_digest", "save_router"]

# Persisted kind names -> classes. Never rename a key; add new kinds only.
ROUTER_KINDS: dict[str, type[Router]] = {
    "product_keys": ProductKeyRouter,
    "vq": VQRouter,
    "lsh": LSHRouter,
}
assert tuple(ROUTER_KINDS) == rf.KIND_NAMES
FORMAT_VERSION = rf.FORMAT_VERSION
_DTYPES = rf.DTYPES
_FLOATS = rf.FLOATS
_array_digest = rf.array_digest
_manifest_digest = rf.manifest_digest
_BUILD_SLACK = 64 << 20  # bytes a router's constructor may allocate beyond 4x its state


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
        "format_version": rf.FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "arrays": entries,
        "digest": digest,
    }
    group.attrs[rf.ATTR] = manifest
    for name in list(group.array_keys()):  # arrays of an older save that are no longer used
        if name.startswith(("state.", "extra.")) and name not in entries:
            del group[name]
    return digest


def _local_dir(group: zarr.Group) -> Path | None:
    """The directory of a group in a local store (every dpsn store), else None: such groups
    are read with bounded memory (the store engine's checked array reads), others through zarr."""
    store = group.store
    if isinstance(store, LocalStore):
        return Path(store.root).joinpath(*[p for p in group.path.split("/") if p])
    return None


def _read_array(group: zarr.Group, name: str, entry: dict[str, Any]) -> np.ndarray:
    """For groups outside a local store: read one array through zarr after checking what it
    claims to be (dtype, shape, codecs); check its blake2b after."""
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
        arr.dtype != rf.DTYPES[entry["dtype"]]
        or list(arr.shape) != entry["shape"]
        or not codecs <= rf.CODECS
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
    if rf.array_digest(data) != entry["blake2b"]:
        raise CorruptStoreError(
            f"router array {name!r} in {where!r} fails its blake2b check; the store "
            "is damaged: restore it from a snapshot or re-save the router"
        )
    return data


def _factory_bytes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Bytes an aten op is about to allocate for a new tensor, from its arguments: ``size``
    of factories (empty, zeros, rand, ...), the input of ``*_like``, the range of ``arange``.
    Other ops make outputs the size of their inputs, which were counted when made."""
    schema = func._schema
    values = dict(zip((a.name for a in schema.arguments), args, strict=False)) | kwargs
    dtype = values.get("dtype") or torch.get_default_dtype()
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 8
    size = values.get("size")
    if isinstance(size, list | tuple) and all(isinstance(s, int) for s in size):
        return math.prod(size) * itemsize
    if schema.name.endswith("_like") and isinstance(values.get("self"), torch.Tensor):
        return values["self"].numel() * itemsize
    if schema.name == "aten::arange":
        start, end, step = values.get("start", 0), values.get("end", 0), values.get("step", 1)
        if all(isinstance(v, int | float) for v in (start, end, step)) and step:
            return max(0, math.ceil((end - start) / step)) * itemsize
    return 0


class _AllocationBudget(TorchDispatchMode):
    """Refuses, before it happens, any allocation past ``budget`` bytes in total."""

    def __init__(self, budget: int, where: str) -> None:
        super().__init__()
        self.budget = budget
        self.used = 0
        self.where = where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        self.used += _factory_bytes(func, args, kwargs)
        if self.used > self.budget:
            raise CorruptStoreError(
                f"stored router config in {self.where!r} asks for more memory than its saved "
                f"state ({self.used} bytes so far, at most {self.budget} allowed); the store is "
                "damaged or crafted"
            )
        return func(*args, **kwargs)


def _build(cls: type[Router], check: rf.RouterCheck, where: str) -> Router:
    budget = 4 * check.nbytes + _BUILD_SLACK
    try:
        with _AllocationBudget(budget, where):
            return cls(cls.Config.from_json(check.config))
    except CorruptStoreError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        raise CorruptStoreError(
            f"stored router config cannot build a {check.kind!r}: {exc}"
        ) from exc


def load_router(group: zarr.Group, *, expected_digest: str | None = None) -> Router:
    """Rebuild the router saved in ``group``; every array is checked before use.

    ``expected_digest`` (the digest a store's commit recorded) is compared with the manifest's
    before anything is built. Raises ``UnknownRouterError`` for a kind this dpsn does not know,
    ``CorruptStoreError`` when the manifest or an array is malformed, missing, unreadable,
    fails its blake2b, or asks for more memory than its state, ``StoreNotFoundError`` when the
    group holds no router. The router comes back in training mode, like any new module, with
    the dtypes it was saved with.
    """
    local = _local_dir(group)
    where = group.path
    manifest = (
        rf.read_manifest(local)
        if local is not None
        else rf.check_manifest_structure(group.attrs.get(rf.ATTR), where)
    )
    try:
        check = rf.check_header(manifest, where, expected_digest)
    except rf.UnknownRouterKindError as e:
        raise UnknownRouterError(str(e)) from None
    metas = {}
    if local is not None:
        metas = {name: rf.array_meta(local, name, e) for name, e in check.entries.items()}
    cls = ROUTER_KINDS[check.kind]
    entries = check.entries
    router = _build(cls, check, where)
    # the config fixes every state shape and kind of dtype: compare before reading a byte
    # (a float tensor may come back in another float dtype, anything else in its own)
    expected = {
        f"state.{n}": (list(t.shape), _dtype_class(t)) for n, t in router.state_dict().items()
    }
    stored = {
        n: (e["shape"], e["dtype"] if e["dtype"] not in rf.FLOATS else "float")
        for n, e in entries.items()
        if n.startswith("state.")
    }
    if stored != expected:
        raise CorruptStoreError(
            f"stored router state in {where!r} does not fit its config (arrays or shapes "
            "differ); the store is damaged"
        )
    if local is not None:
        arrays = {n: rf.read_checked(local, n, e, metas[n]) for n, e in entries.items()}
    else:
        arrays = {n: _read_array(group, n, e) for n, e in entries.items()}
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
