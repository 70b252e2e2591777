"""The pool: create and open stores, read rows, stage and commit deltas, and train rows as a
layer of a model."""

from dpsn.tiers import Commit, Prefetch, RowBatch, VerifyReport

from ._api import compact, create, gc, open
from ._embedding import PoolEmbedding
from ._layer import PoolLayer
from ._levels import Level, LevelledPool
from ._lifecycle import Lifecycle
from ._migration import Migration
from ._optim import ROW_OPTIMIZERS, RowAdagrad, RowAdam, RowOptimizer, RowSGD
from ._pool import Pool

__all__ = [
    "ROW_OPTIMIZERS",
    "Commit",
    "Level",
    "LevelledPool",
    "Lifecycle",
    "Migration",
    "Pool",
    "PoolEmbedding",
    "PoolLayer",
    "Prefetch",
    "RowAdagrad",
    "RowAdam",
    "RowBatch",
    "RowOptimizer",
    "RowSGD",
    "VerifyReport",
    "compact",
    "create",
    "gc",
    "open",
]
