"""Procedural base rows: vectorized seed hashing, hashed features and generators.

A row nobody trained costs no storage: its value is regenerated on demand as
``generator(features(hash(pool_seed, id)))``. Everything here is a pure function of the seed
and the id (no global RNG, no dependence on the rest of the batch), so the pool can page any
row in alone, on any device, and get the same values. This package never imports ``dpsn.pool``.
"""

from ._features import hashed_normal, hashed_offsets, hashed_uniform
from ._generator import Generator
from ._hash import derive_seed, xxh64_ids
from ._region_mlp import RegionMLP, novelty_from_counts, region_mlp_spec
from ._registry import GENERATORS, make_generator
from ._rf_mlp import RandomFeatureMLP
from ._slices import HashedSlices
from ._zeros import Zeros

__all__ = [
    "GENERATORS",
    "Generator",
    "HashedSlices",
    "RandomFeatureMLP",
    "RegionMLP",
    "Zeros",
    "derive_seed",
    "hashed_normal",
    "hashed_offsets",
    "hashed_uniform",
    "make_generator",
    "novelty_from_counts",
    "region_mlp_spec",
    "xxh64_ids",
]
