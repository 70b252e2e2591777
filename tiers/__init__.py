"""Tiers: where rows live between the procedural generator and the compute device.

``RowStack`` is the whole read/write-back path (device cache <- host staging <- persisted store
<- procedural generator) and ``RowBatch`` the handle executors compute with. ``PersistedStore``
is the disk tier (LMDB index + Zarr segments); it knows rows, segments and commits, nothing of
models.
"""

from ._cache import CacheStats, DeviceCache
from ._columns import Column, RowLayout
from ._format import FORMAT_VERSION, Manifest
from ._names import check_router_name
from ._persisted import Commit, PersistedStore, VerifyReport, storage_dtype
from ._policies import EvictionPolicy, check_policy, make_policy, policies, register_policy
from ._procedural import ProceduralTier, load_generator
from ._rowindex import RowIndex
from ._segments import COMPRESSORS
from ._slot_table import SlotTable
from ._stack import SECOND_BACKWARD, Prefetch, RowBatch, RowOptimizer, RowStack

__all__ = [
    "COMPRESSORS",
    "FORMAT_VERSION",
    "SECOND_BACKWARD",
    "CacheStats",
    "Column",
    "Commit",
    "DeviceCache",
    "EvictionPolicy",
    "Manifest",
    "PersistedStore",
    "Prefetch",
    "ProceduralTier",
    "RowBatch",
    "RowIndex",
    "RowLayout",
    "RowOptimizer",
    "RowStack",
    "SlotTable",
    "VerifyReport",
    "check_policy",
    "check_router_name",
    "load_generator",
    "make_policy",
    "policies",
    "register_policy",
    "storage_dtype",
]
