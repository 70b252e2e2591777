"""dpsn: a parameter storage engine for large sparse neural models.

>>> import dpsn
>>> pool = dpsn.create("store", rows=10**12, dim=64)   # doctest: +SKIP
>>> pool.write([3, 7], deltas); pool.commit("first")   # doctest: +SKIP
"""

from dpsn import errors
from dpsn.errors import DpsnError
from dpsn.pool import Commit, Pool, VerifyReport, create, open

__version__ = "0.1.0"

__all__ = ["Commit", "DpsnError", "Pool", "VerifyReport", "__version__", "create", "errors", "open"]
