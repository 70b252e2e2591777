"""Configuration as objects: what a store is, and how a process opens it.

``dpsn.create`` took sixteen keyword arguments from four concerns. They are three frozen
dataclasses now, which ``create``/``open`` accept whole (``spec=``, ``options=``,
``maintenance=``) and which the simple keyword call builds for you:

- :class:`StoreSpec`: what a store *is*, fixed at creation and recorded in its manifest (rows,
  dim, seed, generator, dtype, chunking, compressor, the LMDB map size);
- :class:`OpenOptions`: how *this process* serves it (device, cache size, eviction policy);
  the same store can be opened with other options by another process;
- :class:`dpsn.store.MaintenancePolicy`: retention and compaction, persisted with the store
  and changeable later (``Pool.set_policy``).

The row lifecycle keeps its own object (:class:`dpsn.Lifecycle`). Objects are checked when they
are built, so a spec that exists is one ``create`` can use; a config kept in a file round-trips
through :meth:`StoreSpec.to_json` / :meth:`StoreSpec.from_json` (no pickle).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dpsn._dtypes import parse_pool_dtype
from dpsn.errors import InvalidArgumentError, InvalidArgumentTypeError
from dpsn.hypernet import Generator
from dpsn.store import COMPRESSORS
from dpsn.tiers import check_policy

from ._validate import MAX_ROWS

MIN_MAP_SIZE = 64 << 10
MAX_MAP_SIZE = 1 << 44


def _int(name: str, value: Any, lo: int, hi: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"{name} must be in {hint}, got {value}")


@dataclass(frozen=True)
class StoreSpec:
    """What a store is: fixed at ``dpsn.create`` and recorded in its manifest.

    ``rows`` may be up to 2**63-1 (rows are virtual until written); ``seed`` fixes every base
    row; ``generator`` is a kind name (``"hashed_slices"``, ``"rf_mlp"``), a dict
    ``{"kind": ..., **config}`` or a Generator module; ``chunk_rows=None`` picks ~256 KiB
    chunks; ``map_size=None`` lets the store size its LMDB map.
    """

    rows: int
    dim: int
    seed: int = 0
    generator: str | dict[str, Any] | Generator = "hashed_slices"
    dtype: str | torch.dtype = "float32"
    chunk_rows: int | None = None
    compressor: Literal["lz4", "zstd", "none"] = "lz4"
    map_size: int | None = None

    def __post_init__(self) -> None:
        _int("rows", self.rows, 1, MAX_ROWS, "1..2**63-1")
        _int("dim", self.dim, 1, 1 << 20, "1..2**20")
        _int("seed", self.seed, 0, (1 << 64) - 1, "0..2**64-1")
        if self.compressor not in COMPRESSORS:
            raise InvalidArgumentError(
                f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}"
            )
        parse_pool_dtype(self.dtype)
        cr = self.chunk_rows
        if cr is not None and (isinstance(cr, bool) or not isinstance(cr, int) or cr < 1):
            raise InvalidArgumentError(f"chunk_rows must be a positive int, got {cr!r}")
        ms = self.map_size
        if ms is not None and (
            isinstance(ms, bool)
            or not isinstance(ms, int)
            or not MIN_MAP_SIZE <= ms <= MAX_MAP_SIZE
        ):
            raise InvalidArgumentError(
                f"map_size must be an int in {MIN_MAP_SIZE}..2**44 bytes, got {ms!r}"
            )

    def replace(self, **changes: Any) -> StoreSpec:
        """This spec with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (a Generator module is named by its kind and config)."""
        gen = self.generator
        if isinstance(gen, Generator):
            gen = {"kind": gen.kind, **gen.config()}
        return {
            "rows": self.rows,
            "dim": self.dim,
            "seed": self.seed,
            "generator": gen,
            "dtype": parse_pool_dtype(self.dtype),
            "chunk_rows": self.chunk_rows,
            "compressor": self.compressor,
            "map_size": self.map_size,
        }

    @classmethod
    def from_json(cls, data: Any) -> StoreSpec:
        """The spec :meth:`to_json` wrote; unknown or missing keys are an error."""
        if not isinstance(data, dict):
            raise InvalidArgumentTypeError(f"a StoreSpec is read from a dict, not {type(data)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidArgumentError(f"StoreSpec has no field(s) {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class OpenOptions:
    """How this process serves a store: the device cache (``device``, ``cache_rows``,
    eviction ``policy``). ``cache_rows=None`` sizes the cache to about 64 MiB and
    ``cache_rows=0`` reads without one; whether the cache fits the device is checked when the
    store's row size is known (at ``create``/``open``)."""

    device: str | torch.device | None = None
    cache_rows: int | None = None
    policy: str = "lru"

    def __post_init__(self) -> None:
        check_policy(self.policy)
        cr = self.cache_rows
        if cr is not None and (isinstance(cr, bool) or not isinstance(cr, int) or cr < 0):
            raise InvalidArgumentError(
                f"cache_rows must be None (about 64 MiB), 0 (no cache) or a positive int; "
                f"got {cr!r}"
            )

    def replace(self, **changes: Any) -> OpenOptions:
        """These options with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)


def merge_object(
    kind: type, given: Any, keywords: dict[str, Any], defaults: dict[str, Any], arg: str
) -> Any:
    """The config object a call uses: ``given`` whole, or one built from the keywords. Mixing
    both is refused when a keyword differs from its default, because one of the two would be
    silently ignored."""
    if given is None:
        return kind(**keywords)
    if not isinstance(given, kind):
        raise InvalidArgumentTypeError(
            f"{arg}= takes a dpsn.{kind.__name__}, got {type(given).__name__}"
        )
    clash = sorted(k for k, v in keywords.items() if v is not defaults[k] and v != defaults[k])
    if clash:
        raise InvalidArgumentError(
            f"{', '.join(clash)} given both as keyword(s) and in {arg}=; pass one of the two"
        )
    return given
