"""The pool: create and open stores, read rows, stage and commit deltas, and train rows as a
layer of a model."""

from dpsn.tiers import Commit, Prefetch, RowBatch, VerifyReport

from ._api import compact, create, gc, open
from ._collection import PoolEmbeddingCollection, TableRange
from ._embedding import PoolEmbedding
from ._layer import PoolLayer
from ._lifecycle import Lifecycle
from ._optim import ROW_OPTIMIZERS, RowAdagrad, RowAdam, RowOptimizer, RowSGD
from ._pool import Pool

__all__ = [
    "ROW_OPTIMIZERS",
    "Commit",
    "Lifecycle",
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
    "TableRange",
    "VerifyReport",
    "compact",
    "create",
    "gc",
    "open",
]
