"""Tiers: the row path, where rows live between the store and the compute device.

``RowStack`` is the whole read/write-back path (device cache <- host staging <- persisted store
<- procedural generator) and ``RowBatch`` the handle executors compute with. The persisted store
itself (LMDB index + Zarr segments, commits, maintenance, verify) is the torch-free store engine
in ``dpsn.store``. ``usage`` (a module) holds how uses, updates and consolidations change the
per-row usage statistics; the policy that reads them is ``dpsn.pool``'s.

The names below load on first use. The cache, the stack and the policies need torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "ADJACENCY_REFRESH": "._couse",
    "SECOND_BACKWARD": "._stack",
    "CacheStats": "._cache",
    "Column": "._columns",
    "CoUse": "._couse",
    "DeviceCache": "._cache",
    "EvictionPolicy": "._policies",
    "OverlayBase": "._overlay",
    "Prefetch": "._stack",
    "ProceduralTier": "._procedural",
    "RowBatch": "._stack",
    "RowLayout": "._columns",
    "ROW_OPTIMIZERS": "._optimizer",
    "RowAdagrad": "._optimizer",
    "RowAdam": "._optimizer",
    "RowOptimizer": "._optimizer",
    "RowSGD": "._optimizer",
    "RowStack": "._stack",
    "SlotTable": "._slot_table",
    "UsageClock": "._usage",
    "UsageIndex": "._usage",
    "UsageRules": "._usage",
    "check_policy": "._policies",
    "check_row_mask": "._stack",
    "check_update_scale": "._stack",
    "load_generator": "._procedural",
    "make_row_optimizer": "._optimizer",
    "make_policy": "._policies",
    "policies": "._policies",
    "register_policy": "._policies",
}

if TYPE_CHECKING:
    from . import _usage as usage
    from ._cache import CacheStats, DeviceCache
    from ._columns import Column, RowLayout
    from ._couse import ADJACENCY_REFRESH, CoUse
    from ._optimizer import (
        ROW_OPTIMIZERS,
        RowAdagrad,
        RowAdam,
        RowOptimizer,
        RowSGD,
        make_row_optimizer,
    )
    from ._overlay import OverlayBase
    from ._policies import EvictionPolicy, check_policy, make_policy, policies, register_policy
    from ._procedural import ProceduralTier, load_generator
    from ._slot_table import SlotTable
    from ._stack import (
        SECOND_BACKWARD,
        Prefetch,
        RowBatch,
        RowStack,
        check_row_mask,
        check_update_scale,
    )
    from ._usage import UsageClock, UsageIndex, UsageRules


_MODULES = {"usage": "._usage"}  # public modules, also lazy


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
    "ADJACENCY_REFRESH",
    "ROW_OPTIMIZERS",
    "SECOND_BACKWARD",
    "CacheStats",
    "CoUse",
    "Column",
    "DeviceCache",
    "EvictionPolicy",
    "OverlayBase",
    "Prefetch",
    "ProceduralTier",
    "RowAdagrad",
    "RowAdam",
    "RowBatch",
    "RowLayout",
    "RowOptimizer",
    "RowSGD",
    "RowStack",
    "SlotTable",
    "UsageClock",
    "UsageIndex",
    "UsageRules",
    "check_policy",
    "check_row_mask",
    "check_update_scale",
    "load_generator",
    "make_policy",
    "make_row_optimizer",
    "policies",
    "register_policy",
    "usage",
]
