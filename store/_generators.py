"""Generator versions: the generator's weights as named float32 Zarr arrays, one group per
version (``data.zarr/generator/vXXXXXXXX``), each version's record (shapes and checksums) in
LMDB's meta database. A commit with new weights writes a new version (fsynced before the commit
that names it); readers check every array against the manifest's generator config, its record
and its checksum before they use it. Part of ``PersistedStore`` (``store.generators``)."""

from __future__ import annotations

import math
import re
import weakref
from typing import Any

import numpy as np
import xxhash
import zarr

from dpsn.errors import (
    CorruptStoreError,
    InvalidArgumentError,
    SnapshotUnavailableError,
    StoreReadError,
)

from ._checks import commit_key
from ._format import (
    DB_META,
    GENERATOR_GROUP,
    META_GENERATOR_PREFIX,
    ZARR_DIR,
    fsync_tree,
    generator_name,
    u64_key,
)
from ._generator_shapes import generator_shapes
from ._records import generator_record, parse_record
from ._zarrsafe import read_array, read_array_meta

__all__ = [
    "GENERATOR_CHUNK_BYTES",
    "GeneratorVersions",
    "check_generator_state",
    "generator_chunks",
]

_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,127}")
# Generator arrays are written in chunks of at most this many bytes: readers refuse a chunk
# over 1 GiB (_zarrsafe.MAX_CHUNK_BYTES), and a smaller chunk keeps a read's buffers small.
GENERATOR_CHUNK_BYTES = 256 << 20
# What a reader accepts of a generator record (_records.generator_record): create refuses more.
_MAX_GENERATOR_ARRAYS, _MAX_GENERATOR_NDIM, _MAX_GENERATOR_ELEMENTS = 4096, 8, 1 << 40


def check_generator_state(state: dict[str, Any]) -> None:
    """Refuse generator weights a reader of the store would refuse (``InvalidArgumentError``),
    before anything is written."""
    if len(state) > _MAX_GENERATOR_ARRAYS:
        raise InvalidArgumentError(
            f"the generator has {len(state)} weight arrays; a store holds at most "
            f"{_MAX_GENERATOR_ARRAYS}"
        )
    for name, value in state.items():
        if not isinstance(name, str) or not _ARRAY_NAME.fullmatch(name):
            raise InvalidArgumentError(
                f"generator weight name {name!r} cannot be stored: use 1-128 of A-Z a-z 0-9 _ ."
            )
        shape = tuple(np.shape(value))
        if len(shape) > _MAX_GENERATOR_NDIM or math.prod(shape) >= _MAX_GENERATOR_ELEMENTS:
            raise InvalidArgumentError(
                f"generator weight {name!r} has shape {list(shape)}; a store holds weights of "
                f"at most {_MAX_GENERATOR_NDIM} dimensions and fewer than 2**40 elements"
            )


def generator_chunks(shape: tuple[int, ...], itemsize: int = 4) -> tuple[int, ...]:
    """The chunk shape of a generator array: whole trailing axes while they fit in
    ``GENERATOR_CHUNK_BYTES``, then as much of the next axis as fits, 1 along the rest."""
    if not shape:
        return (1,)
    budget = max(1, GENERATOR_CHUNK_BYTES // itemsize)
    chunks = [1] * len(shape)
    inner = 1
    for axis in range(len(shape) - 1, -1, -1):
        n = max(1, shape[axis])
        if inner * n <= budget:
            chunks[axis] = n
            inner *= n
        else:
            chunks[axis] = max(1, budget // inner)
            break
    return tuple(chunks)


class GeneratorVersions:
    """The generator versions of one store (its public operations only: no private member of
    the store is touched)."""

    def __init__(self, store: Any) -> None:
        # ``store``: the PersistedStore that owns this part (typed loosely: that module imports
        # this one, never the other way round). A weak proxy: no reference cycle, so a store
        # dropped without close() still goes (and releases its reader lease) at once.
        self._store = weakref.proxy(store)

    def write(self, version: int, state: dict[str, np.ndarray]) -> dict[str, Any]:
        check_generator_state(state)
        # A directory of this version can only be a crashed commit's leftover: not referenced.
        self._store.fs.rmtree(
            self._store.root / ZARR_DIR / GENERATOR_GROUP / generator_name(version),
            ignore_errors=True,
        )
        root = zarr.open_group(self._store.zarr_store, mode="a", zarr_format=3)
        arrays = {}
        for name, value in sorted(state.items()):
            value = np.ascontiguousarray(value, dtype="<f4")
            path = f"{GENERATOR_GROUP}/{generator_name(version)}/{name}"
            arr = root.create_array(
                path,
                shape=value.shape,
                chunks=generator_chunks(value.shape),
                dtype=value.dtype,
                fill_value=0,
                compressors=None,
            )
            arr[...] = value
            arrays[name] = {"shape": list(value.shape), "xxh64": xxhash.xxh64_intdigest(value.data)}
        # A generator without weights (kind "zeros") still gets its version's group: readers
        # take a missing one for a version removed by gc.
        root.require_group(f"{GENERATOR_GROUP}/{generator_name(version)}")
        fsync_tree(self._store.root / ZARR_DIR / GENERATOR_GROUP, self._store.fs)
        return {"version": version, "arrays": arrays}

    def record(self, version: int) -> dict[str, Any]:
        version = commit_key(version)
        key = META_GENERATOR_PREFIX + u64_key(version)
        raw = self._store.read(lambda txn: txn.get(key, db=self._store.db(DB_META)))
        record = parse_record(raw, f"generator version {version}")
        generator_record(record, version)
        return record

    def shapes(self) -> dict[str, list[int]] | None:
        """The weight shapes the manifest's generator config implies (None: an unknown kind)."""
        m = self._store.manifest
        try:
            return generator_shapes(m.generator["kind"], m.dim, m.generator["config"])
        except ValueError as e:
            raise CorruptStoreError(
                f"{self._store.root}: the manifest's generator config: {e}"
            ) from e

    def read(self, version: int) -> dict[str, np.ndarray]:
        """Generator weights, each checked against the manifest's config, its recorded shape
        (both before a byte is read) and its checksum."""
        record = self.record(version)
        arrays = generator_record(record, version)
        expected = self.shapes()
        if expected is not None and {n: a["shape"] for n, a in arrays.items()} != expected:
            raise CorruptStoreError(
                f"generator version {version} does not fit the manifest's generator config "
                f"({self._store.manifest.generator['kind']}); the store is damaged"
            )
        gen_dir = self._store.root / ZARR_DIR / GENERATOR_GROUP / generator_name(version)
        if not gen_dir.is_dir():
            raise SnapshotUnavailableError(
                f"generator version {version} was removed by gc; only HEAD and pinned snapshots "
                "keep theirs"
            )
        out = {}
        for name, meta in arrays.items():
            if not _ARRAY_NAME.fullmatch(name):
                raise CorruptStoreError(f"generator version {version} names a weight {name!r}")
            path = f"{GENERATOR_GROUP}/{generator_name(version)}/{name}"
            try:
                info = read_array_meta(
                    gen_dir / name,
                    dtypes={"float32"},
                    shape=tuple(meta["shape"]),
                    fs=self._store.fs,
                )
                value = read_array(info).astype("<f4", copy=False)
            except StoreReadError:
                raise
            except CorruptStoreError as e:
                raise CorruptStoreError(f"generator weight {path} cannot be read: {e}") from e
            if xxhash.xxh64_intdigest(np.ascontiguousarray(value).data) != meta["xxh64"]:
                raise CorruptStoreError(
                    f"generator weight {path} fails its checksum; the store is damaged"
                )
            out[name] = value
        return out
