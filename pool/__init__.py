"""The pool: create and open stores, read rows, stage and commit deltas."""

from dpsn.tiers import Commit, VerifyReport

from ._api import create, open
from ._pool import Pool, Prefetch

__all__ = ["Commit", "Pool", "Prefetch", "VerifyReport", "create", "open"]
