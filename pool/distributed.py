"""A pool sharded row-wise over ``torch.distributed`` ranks, with two-phase commits.

Every rank runs (one shard per rank; executors need no change)::

    torch.distributed.init_process_group("gloo")
    pool = dpsn.distributed.create("root", rows=10**9, dim=64)
    emb = dpsn.PoolEmbedding(pool)
    ...
    pool.commit("step 1000")   # every shard, then the global record

``dpsn.create(root, ..., shards=N)`` and ``dpsn.open(root, ..., process_group=pg)`` do the same.
See ``docs/distributed.md`` for the layout, the commit protocol and the measured costs.
"""

from dpsn.errors import DistributedError
from dpsn.store.shards import GlobalCommit, global_log, is_sharded, read_global

from ._reshard import reshard
from ._sharded import ShardedPool, ShardedRowBatch, owner_of
from ._sharded_api import ShardedReader, create, create_root, open, publish, read_rows

__all__ = [
    "DistributedError",
    "GlobalCommit",
    "ShardedPool",
    "ShardedReader",
    "ShardedRowBatch",
    "create",
    "create_root",
    "global_log",
    "is_sharded",
    "open",
    "owner_of",
    "publish",
    "read_global",
    "read_rows",
    "reshard",
]
