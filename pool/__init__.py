"""The pool: create and open stores, read rows, stage and commit deltas, and train rows as a
layer of a model."""

from dpsn.store import Commit, MaintenancePolicy, VerifyReport
from dpsn.tiers import ROW_OPTIMIZERS, Prefetch, RowAdagrad, RowAdam, RowBatch, RowOptimizer, RowSGD

from ._api import compact, create, gc, open
from ._collection import PoolEmbeddingCollection, TableRange
from ._config import OpenOptions, StoreSpec
from ._embedding import PoolEmbedding
from ._layer import PoolLayer
from ._levels import Level, LevelledPool
from ._lifecycle import Lifecycle
from ._merge import MergeReport, merge
from ._migration import Migration
from ._ngram import NgramMemory, prefetching
from ._pool import Pool
from ._profile import SCOPES as STEP_SCOPES
from ._profile import timing as step_timing
from ._selection import RowSelection, SparseFinetune
from ._validate import as_ids

__all__ = [
    "ROW_OPTIMIZERS",
    "STEP_SCOPES",
    "Commit",
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
    "RowAdagrad",
    "RowAdam",
    "RowBatch",
    "RowOptimizer",
    "RowSGD",
    "RowSelection",
    "SparseFinetune",
    "StoreSpec",
    "TableRange",
    "VerifyReport",
    "as_ids",
    "compact",
    "create",
    "gc",
    "merge",
    "open",
    "prefetching",
    "step_timing",
]
