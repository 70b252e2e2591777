"""The store engine: a pool's rows on disk, apart from the row path that serves them.

``PersistedStore`` is the disk tier (an LMDB environment for the row index, commit log,
snapshots and records; Zarr v3 segments for the deltas); it knows rows, segments and commits,
nothing of models or torch. Around it: ``StoreFacts`` (what ``dpsn info`` prints, read from the
records alone), the format (``Manifest``, ``read_manifest``, ``FORMAT_VERSION``), maintenance
(``MaintenancePolicy``, retention, ``maybe_compact``), the row lifecycle's stored policy and
health, and ``router_format`` (a module: the router format's checks, which ``dpsn.index`` saves
and loads routers with and ``verify`` uses alone). ``dpsn.store.fs`` (a module) is the file seam
the engine's file I/O goes through (writes, reads of its own files, the writer lock and reader
leases; what it does not reach is listed there): ``PersistedStore.create/open(fs=)`` or
``dpsn.store.fs.using(fs)`` put another file system (a fault-injecting one in the tests) under
a store.

This package never imports torch (a test keeps it so), and ``import dpsn.store`` imports neither
zarr nor LMDB until a name that needs them is used, so that the ``dpsn`` commands that only read
a store's records answer in a fraction of a second. ``dpsn.tiers`` holds the row path (device
cache, host staging, the stack) that sits on top of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "FORMAT_OVERLAY": "._format",
    "OVERLAY_PIN_PREFIX": "._overlay_facts",
    "base_chain": "._overlay_facts",
    "CLOCK_LIMIT": ".usage_fields",
    "SETTING_LIMIT": ".usage_fields",
    "NotRegularFileError": "._files",
    "file_kind": "._files",
    "COMPRESSORS": "._segments",
    "DEFAULT_MIN_WEIGHT": "._placement",
    "cluster_order": "._placement",
    "FORMAT_VERSION": "._format",
    "LIFECYCLE_DEFAULTS": "._lifecycle_policy",
    "MAX_ENTER": "._lifecycle_policy",
    "MIN_ENTER": "._lifecycle_policy",
    "Commit": "._persisted",
    "CommitRequest": "._persisted",
    "LayeredIndex": "._layered",
    "MaintenancePolicy": "._policy",
    "Manifest": "._format",
    "PersistedStore": "._persisted",
    "ROW_VALUE_DTYPE": "._format",
    "RowIndex": "._rowindex",
    "RowLookup": "._layered",
    "StoreFacts": "._info",
    "VerifyReport": "._persisted",
    "check_lifecycle_settings": "._lifecycle_policy",
    "check_router_name": "._names",
    "check_stored_policy": "._lifecycle_policy",
    "fsync_tree": "._format",
    "lifecycle_health": "._health",
    "maybe_compact": "._compact",
    "parse_duration": "._policy",
    "pending_decay": "._health",
    "read_manifest": "._format",
    "segment_name": "._format",
    "u64_key": "._format",
    "read_policy": "._retention",
    "read_protected": "._protected",
    "storage_dtype": "._persisted",
    "tree_bytes": "._info",
    "write_policy": "._retention",
}

_MODULES = {"router_format": "._router_check"}  # public modules, also lazy

if TYPE_CHECKING:
    from . import _router_check as router_format
    from ._compact import maybe_compact
    from ._files import NotRegularFileError, file_kind
    from ._format import (
        FORMAT_OVERLAY,
        FORMAT_VERSION,
        ROW_VALUE_DTYPE,
        Manifest,
        read_manifest,
        segment_name,
        u64_key,
    )
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
    from ._overlay_facts import OVERLAY_PIN_PREFIX, base_chain
    from ._persisted import Commit, CommitRequest, PersistedStore, VerifyReport, storage_dtype
    from ._placement import DEFAULT_MIN_WEIGHT, cluster_order
    from ._policy import MaintenancePolicy, parse_duration
    from ._protected import read_protected
    from ._retention import read_policy, write_policy
    from ._rowindex import RowIndex
    from ._segments import COMPRESSORS
    from .usage_fields import CLOCK_LIMIT, SETTING_LIMIT


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dpsn.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_MODULES])


__all__ = [
    "CLOCK_LIMIT",
    "COMPRESSORS",
    "DEFAULT_MIN_WEIGHT",
    "FORMAT_OVERLAY",
    "FORMAT_VERSION",
    "LIFECYCLE_DEFAULTS",
    "MAX_ENTER",
    "MIN_ENTER",
    "OVERLAY_PIN_PREFIX",
    "ROW_VALUE_DTYPE",
    "SETTING_LIMIT",
    "Commit",
    "CommitRequest",
    "LayeredIndex",
    "MaintenancePolicy",
    "Manifest",
    "NotRegularFileError",
    "PersistedStore",
    "RowIndex",
    "RowLookup",
    "StoreFacts",
    "VerifyReport",
    "base_chain",
    "check_lifecycle_settings",
    "check_router_name",
    "check_stored_policy",
    "cluster_order",
    "file_kind",
    "fsync_tree",
    "lifecycle_health",
    "maybe_compact",
    "parse_duration",
    "pending_decay",
    "read_manifest",
    "read_policy",
    "read_protected",
    "router_format",
    "segment_name",
    "storage_dtype",
    "tree_bytes",
    "u64_key",
    "write_policy",
]
