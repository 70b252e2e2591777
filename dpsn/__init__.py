"""dpsn: a parameter storage engine for large sparse neural models.

>>> import dpsn
>>> pool = dpsn.create("store", rows=10**12, dim=64)   # doctest: +SKIP
>>> pool.write([3, 7], deltas); pool.commit("first")   # doctest: +SKIP

The public names below are loaded on first use, so ``import dpsn.index`` or ``dpsn.tiers`` does
not drag in the pool (the dependency arrows point pool -> index/tiers/hypernet, never back).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dpsn import errors
from dpsn.errors import DpsnError, LeaseWarning

__version__ = "0.1.0"

_LAZY = {
    "Commit": "dpsn.pool",
    "Level": "dpsn.pool",
    "LevelledPool": "dpsn.pool",
    "Lifecycle": "dpsn.pool",
    "MaintenancePolicy": "dpsn.pool",
    "OpenOptions": "dpsn.pool",
    "NgramMemory": "dpsn.pool",
    "Migration": "dpsn.pool",
    "MergeReport": "dpsn.pool",
    "Pool": "dpsn.pool",
    "PoolEmbedding": "dpsn.pool",
    "PoolEmbeddingCollection": "dpsn.pool",
    "PoolLayer": "dpsn.pool",
    "Prefetch": "dpsn.pool",
    "StoreSpec": "dpsn.pool",
    "RowSelection": "dpsn.pool",
    "SparseFinetune": "dpsn.pool",
    "TableRange": "dpsn.pool",
    "VerifyReport": "dpsn.pool",
    "compact": "dpsn.pool",
    "create": "dpsn.pool",
    "gc": "dpsn.pool",
    "merge": "dpsn.pool",
    "open": "dpsn.pool",
}

if TYPE_CHECKING:
    from dpsn.pool import (
        Commit,
        Level,
        LevelledPool,
        Lifecycle,
        MaintenancePolicy,
        MergeReport,
        Migration,
        NgramMemory,
        OpenOptions,
        Pool,
        PoolEmbedding,
        PoolEmbeddingCollection,
        PoolLayer,
        Prefetch,
        RowSelection,
        SparseFinetune,
        StoreSpec,
        TableRange,
        VerifyReport,
        compact,
        create,
        gc,
        merge,
        open,
    )


def __getattr__(name: str) -> Any:
    if name == "distributed":  # a public submodule (sharded pools), loaded on first use
        return importlib.import_module("dpsn.distributed")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dpsn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Commit",
    "DpsnError",
    "LeaseWarning",
    "Level",
    "LevelledPool",
    "Lifecycle",
    "MaintenancePolicy",
    "MergeReport",
    "Migration",
    "NgramMemory",
    "OpenOptions",
    "Pool",
    "PoolEmbedding",
    "PoolEmbeddingCollection",
    "PoolLayer",
    "Prefetch",
    "RowSelection",
    "SparseFinetune",
    "StoreSpec",
    "TableRange",
    "VerifyReport",
    "__version__",
    "compact",
    "create",
    "errors",
    "gc",
    "merge",
    "open",
]
