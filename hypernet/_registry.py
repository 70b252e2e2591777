"""Generators by ``kind``: how a store's manifest names the generator that rebuilds its rows.

Why a plain dict: the kind string is persisted in every store, so the mapping must be explicit
and stable; a new kind is added here, an existing one is never renamed or removed.
"""

from __future__ import annotations

from typing import Any

from ._generator import Generator
from ._region_mlp import RegionMLP
from ._rf_mlp import RandomFeatureMLP
from ._slices import HashedSlices
from ._zeros import Zeros

__all__ = ["GENERATORS", "make_generator"]

GENERATORS: dict[str, type[Generator]] = {
    HashedSlices.kind: HashedSlices,
    RandomFeatureMLP.kind: RandomFeatureMLP,
    RegionMLP.kind: RegionMLP,
    Zeros.kind: Zeros,
}


def make_generator(kind: str, *, dim: int, seed: int, **config: Any) -> Generator:
    """Build the generator ``kind`` with ``config``; ``ValueError`` for an unknown kind or option.

    ``make_generator(g.kind, dim=g.dim, seed=g.seed, **g.config())`` rebuilds ``g`` with
    identical initial weights.
    """
    cls = GENERATORS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown generator kind {kind!r}; known kinds: {sorted(GENERATORS)}")
    try:
        return cls(dim=dim, seed=seed, **config)
    except TypeError as exc:
        # An unknown or positional option: name the ones this kind accepts.
        import inspect

        params = inspect.signature(cls.__init__).parameters
        accepted = sorted(p for p in params if p not in ("self", "dim", "seed"))
        raise ValueError(
            f"bad options for generator {kind!r} ({sorted(config)}): {exc}; "
            f"it accepts dim, seed and {accepted}"
        ) from exc
