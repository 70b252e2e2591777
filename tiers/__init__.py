"""Tiers: where rows live between the procedural generator and the compute device.

``PersistedStore`` is the disk tier (LMDB index + Zarr segments); it knows rows, segments and
commits, nothing of models. The device cache builds on it.
"""

from ._cache import CacheStats, DeviceCache
from ._format import FORMAT_VERSION, Manifest
from ._persisted import Commit, PersistedStore, VerifyReport, storage_dtype
from ._policies import EvictionPolicy, check_policy, make_policy, policies, register_policy
from ._rowindex import RowIndex
from ._segments import COMPRESSORS

__all__ = [
    "COMPRESSORS",
    "FORMAT_VERSION",
    "CacheStats",
    "Commit",
    "DeviceCache",
    "EvictionPolicy",
    "Manifest",
    "PersistedStore",
    "RowIndex",
    "VerifyReport",
    "check_policy",
    "make_policy",
    "policies",
    "register_policy",
    "storage_dtype",
]
