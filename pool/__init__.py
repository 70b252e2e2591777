"""The pool: create and open stores, read rows, stage and commit deltas, and train rows as a
layer of a model."""

from dpsn.tiers import Commit, Prefetch, RowBatch, VerifyReport

from ._api import compact, create, gc, open
from ._embedding import PoolEmbedding
from ._layer import PoolLayer
from ._lifecycle import Lifecycle
from ._merge import MergeReport, merge
from ._optim import ROW_OPTIMIZERS, RowAdagrad, RowAdam, RowOptimizer, RowSGD
from ._pool import Pool
from ._selection import RowSelection, SparseFinetune

__all__ = [
    "ROW_OPTIMIZERS",
    "Commit",
    "Lifecycle",
    "MergeReport",
    "Pool",
    "PoolEmbedding",
    "PoolLayer",
    "Prefetch",
    "RowAdagrad",
    "RowAdam",
    "RowBatch",
    "RowOptimizer",
    "RowSGD",
    "RowSelection",
    "SparseFinetune",
    "VerifyReport",
    "compact",
    "create",
    "gc",
    "merge",
    "open",
]
