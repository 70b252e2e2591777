"""The weight shapes a generator's manifest entry implies, without building it (no torch).

Why here and not by building the module: ``verify`` and the CLI check a store without importing
torch, and a load must refuse a manifest that asks for gigantic weights *before* allocating
them. The table mirrors ``dpsn.hypernet`` (a test holds the two side by side for both kinds);
a kind missing here is reported as unchecked, never as damage.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

__all__ = ["generator_shapes"]

MAX_GENERATOR_FLOATS = 1 << 33  # 32 GiB of float32: a sane maximum for any generator


def _int(config: dict[str, Any], name: str, default: int, lo: int, hi: int = 1 << 40) -> int:
    v = config.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise ValueError(f"generator option {name}={v!r} is not an int in [{lo}, {hi})")
    return v


def _region_mlp_shapes(dim: int, config: dict[str, Any]) -> dict[str, list[int]]:
    """``region_mlp``: region tables (``dpsn.hypernet.region_tables``'s sizes), then the MLP."""
    rows = _int(config, "rows", 1, 1, 1 << 63)
    region_map = config.get("region_map", "product_keys")
    if region_map == "product_keys":
        r = math.isqrt(rows)
        n2 = r if r * r == rows else r + 1
        sizes = [-(-rows // n2), n2]
    elif region_map == "block":
        sizes = [_int(config, "num_regions", 0, 1, rows + 1)]
    else:
        raise ValueError(f"generator option region_map={region_map!r} is unknown")
    if max(sizes) > 1 << 26:
        raise ValueError(f"a region table of {max(sizes)} entries is past sane size")
    e = _int(config, "region_dim", 16, 1)
    widths = [
        _int(config, "features", 64, 1) + e + 1,
        *[_int(config, "hidden", 128, 1)] * _int(config, "layers", 2, 0, 1 << 12),
        dim,
    ]
    shapes: dict[str, list[int]] = {}
    for t, size in enumerate(sizes):
        shapes[f"embeddings.{t}"] = [size, e]
        shapes[f"novelty.{t}"] = [size]
    # per-region use counts of automatic novelty; a config without the option predates it
    source = config.get("novelty_source", "manual")
    if source not in ("usage", "manual"):
        raise ValueError(f"generator option novelty_source={source!r} is unknown")
    if source == "usage":
        shapes.update({f"uses.{t}": [size] for t, size in enumerate(sizes)})
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        shapes[f"weights.{i}"] = [fan_out, fan_in]
        shapes[f"biases.{i}"] = [fan_out]
    rank = _int(config, "region_rank", 0, 0, 1 << 16)  # per-region low-rank output factors
    if rank:
        for t, size in enumerate(sizes):
            shapes[f"factors_a.{t}"] = [size, rank, widths[-2]]
            shapes[f"factors_b.{t}"] = [size, dim, rank]
    return shapes


def generator_shapes(kind: str, dim: int, config: Any) -> dict[str, list[int]] | None:
    """``{name: shape}`` of the generator's state, None for a kind this table does not know.
    ``ValueError`` for a config no generator of that kind accepts, or one past sane size."""
    if not isinstance(config, dict):
        raise ValueError("the generator config is not an object")
    if kind == "hashed_slices":
        slice_size = _int(config, "slice_size", 32, 1)
        shapes = {"memory": [_int(config, "memory_size", 1 << 20, slice_size)]}
    elif kind == "rf_mlp":
        widths = [
            _int(config, "features", 64, 1),
            *[_int(config, "hidden", 128, 1)] * _int(config, "layers", 2, 0, 1 << 12),
            dim,
        ]
        shapes = {}
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            shapes[f"weights.{i}"] = [fan_out, fan_in]
            shapes[f"biases.{i}"] = [fan_out]
    elif kind == "region_mlp":
        shapes = _region_mlp_shapes(dim, config)
    elif kind == "zeros":
        shapes = {}  # no weights: every base row is zero
    else:
        return None
    floats = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        floats += n
    if floats > MAX_GENERATOR_FLOATS:
        raise ValueError(f"the generator config asks for {floats} floats of weights")
    return shapes
