"""A pool sharded row-wise over ``torch.distributed`` ranks: see :mod:`dpsn.pool.distributed`.

``import dpsn.distributed`` is the short name users reach for; everything lives in
``dpsn.pool.distributed`` beside the pool it shards.
"""

from dpsn.pool.distributed import *  # noqa: F403 (this module is that one's short name)
from dpsn.pool.distributed import __all__  # noqa: F401
