"""Tiers: where rows live between the procedural generator and the compute device.

``RowStack`` is the whole read/write-back path (device cache <- host staging <- persisted store
<- procedural generator) and ``RowBatch`` the handle executors compute with. ``PersistedStore``
is the disk tier (LMDB index + Zarr segments); it knows rows, segments and commits, nothing of
models. ``StoreFacts`` reads a store's records alone (what ``dpsn info`` prints), and
``lifecycle_health`` the row lifecycle's figures from a commit record. ``usage`` (a module)
holds the fields of the per-row usage statistics and how uses, updates and consolidations
change them; the policy that reads them is ``dpsn.pool``'s. ``router_format`` (a module) holds
the router format's torch-free checks (``dpsn.index`` saves and loads routers with it,
``verify`` checks them with it alone).

The names below load on first use: ``import dpsn.tiers`` (or one of its torch-free modules, such
as ``dpsn.tiers._format`` or ``dpsn.tiers._info``) must not import torch or zarr, so that the
``dpsn`` commands that only read a store's records answer in a fraction of a second. The cache,
the stack and the policies need torch; the persisted store needs zarr.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "COMPRESSORS": "._segments",
    "FORMAT_OVERLAY": "._format",
    "FORMAT_VERSION": "._format",
    "OVERLAY_PIN_PREFIX": "._overlay_facts",
    "OverlayBase": "._overlay",
    "base_chain": "._overlay_facts",
    "SECOND_BACKWARD": "._stack",
    "CacheStats": "._cache",
    "Column": "._columns",
    "Commit": "._persisted",
    "DeviceCache": "._cache",
    "EvictionPolicy": "._policies",
    "MaintenancePolicy": "._policy",
    "LIFECYCLE_DEFAULTS": "._lifecycle_policy",
    "MAX_ENTER": "._lifecycle_policy",
    "MIN_ENTER": "._lifecycle_policy",
    "check_lifecycle_settings": "._lifecycle_policy",
    "check_stored_policy": "._lifecycle_policy",
    "LayeredIndex": "._layered",
    "Manifest": "._format",
    "PersistedStore": "._persisted",
    "Prefetch": "._stack",
    "ProceduralTier": "._procedural",
    "RowBatch": "._stack",
    "RowIndex": "._rowindex",
    "RowLayout": "._columns",
    "RowLookup": "._layered",
    "RowOptimizer": "._stack",
    "RowStack": "._stack",
    "SlotTable": "._slot_table",
    "StoreFacts": "._info",
    "UsageClock": "._usage",
    "UsageIndex": "._usage",
    "UsageRules": "._usage",
    "VerifyReport": "._persisted",
    "check_policy": "._policies",
    "check_router_name": "._names",
    "lifecycle_health": "._health",
    "pending_decay": "._health",
    "load_generator": "._procedural",
    "make_policy": "._policies",
    "maybe_compact": "._compact",
    "parse_duration": "._policy",
    "policies": "._policies",
    "read_manifest": "._format",
    "read_policy": "._retention",
    "read_protected": "._protected",
    "register_policy": "._policies",
    "storage_dtype": "._persisted",
    "tree_bytes": "._info",
    "write_policy": "._retention",
}

if TYPE_CHECKING:
    from . import _router_check as router_format
    from . import _usage as usage
    from ._cache import CacheStats, DeviceCache
    from ._columns import Column, RowLayout
    from ._compact import maybe_compact
    from ._format import FORMAT_OVERLAY, FORMAT_VERSION, Manifest, read_manifest
    from ._health import lifecycle_health, pending_decay
    from ._info import StoreFacts, tree_bytes
    from ._layered import LayeredIndex, RowLookup
    from ._lifecycle_policy import (
        LIFECYCLE_DEFAULTS,
        MAX_ENTER,
        MIN_ENTER,
        check_lifecycle_settings,
        check_stored_policy,
    )
    from ._names import check_router_name
    from ._overlay import OverlayBase
    from ._overlay_facts import OVERLAY_PIN_PREFIX, base_chain
    from ._persisted import Commit, PersistedStore, VerifyReport, storage_dtype
    from ._policies import EvictionPolicy, check_policy, make_policy, policies, register_policy
    from ._policy import MaintenancePolicy, parse_duration
    from ._procedural import ProceduralTier, load_generator
    from ._protected import read_protected
    from ._retention import read_policy, write_policy
    from ._rowindex import RowIndex
    from ._segments import COMPRESSORS
    from ._slot_table import SlotTable
    from ._stack import SECOND_BACKWARD, Prefetch, RowBatch, RowOptimizer, RowStack
    from ._usage import UsageClock, UsageIndex, UsageRules


_MODULES = {"router_format": "._router_check", "usage": "._usage"}  # public modules, also lazy


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dpsn.tiers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_MODULES])


__all__ = [
    "COMPRESSORS",
    "FORMAT_OVERLAY",
    "FORMAT_VERSION",
    "LIFECYCLE_DEFAULTS",
    "MAX_ENTER",
    "MIN_ENTER",
    "OVERLAY_PIN_PREFIX",
    "SECOND_BACKWARD",
    "CacheStats",
    "Column",
    "Commit",
    "DeviceCache",
    "EvictionPolicy",
    "LayeredIndex",
    "MaintenancePolicy",
    "Manifest",
    "OverlayBase",
    "PersistedStore",
    "Prefetch",
    "ProceduralTier",
    "RowBatch",
    "RowIndex",
    "RowLayout",
    "RowLookup",
    "RowOptimizer",
    "RowStack",
    "SlotTable",
    "StoreFacts",
    "UsageClock",
    "UsageIndex",
    "UsageRules",
    "VerifyReport",
    "base_chain",
    "check_lifecycle_settings",
    "check_policy",
    "check_router_name",
    "check_stored_policy",
    "lifecycle_health",
    "load_generator",
    "make_policy",
    "maybe_compact",
    "parse_duration",
    "pending_decay",
    "policies",
    "read_manifest",
    "read_policy",
    "read_protected",
    "register_policy",
    "router_format",
    "storage_dtype",
    "tree_bytes",
    "usage",
    "write_policy",
]
