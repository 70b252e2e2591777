"""Weight initialisation from a seed alone, by hashing element indices.

Why not ``torch.Generator().manual_seed(seed)``: torch does not promise that its samplers keep
their output across versions or CPU capabilities (the normal sampler has separate scalar and
vectorised paths). Hashing each element's flat index with the same XXH64 stream used for rows
depends on nothing but the seed: a generator rebuilt from its config anywhere gets the same
weights (bit-identical for uniform init, which is exact integer scaling; within float tolerance
for normal init across devices, bit-identical on one). Neither touches the global RNG.
"""

from __future__ import annotations

import math

import torch

from ._features import hashed_normal, hashed_uniform

__all__ = ["hashed_normal_init", "hashed_uniform_init"]


def _indices(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.int64)


def hashed_normal_init(shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """float32 ``shape`` with entries ``std * N(0, 1)``, element ``i`` from ``hash(i, seed)``."""
    values = hashed_normal(_indices(shape), seed, 1).view(shape)
    return values.mul_(std)


def hashed_uniform_init(shape: tuple[int, ...], seed: int, bound: float) -> torch.Tensor:
    """float32 ``shape`` with entries uniform in ``[-bound, bound)``, from ``hash(i, seed)``."""
    values = hashed_uniform(_indices(shape), seed, 1).view(shape)
    return values.mul_(bound)
