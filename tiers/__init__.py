"""Tiers: where rows live between the procedural generator and the compute device.

``PersistedStore`` is the disk tier (LMDB index + Zarr segments); it knows rows, segments and
commits, nothing of models. The device cache builds on it.
"""

from ._cache import CacheStats, DeviceCache
from ._format import FORMAT_VERSION, Manifest
from ._policies import EvictionPolicy, make_policy, policies, register_policy
from ._persisted import Commit, PersistedStore, VerifyReport, storage_dtype
from ._rowindex import RowIndex
from ._segments import COMPRESSORS

__all__ = [
    "COMPRESSORS",
    "CacheStats",
    "DeviceCache",
    "EvictionPolicy",
    "make_policy",
    "policies",
    "register_policy",
    "FORMAT_VERSION",
    "Commit",
    "Manifest",
    "PersistedStore",
    "RowIndex",
    "VerifyReport",
    "storage_dtype",
]
