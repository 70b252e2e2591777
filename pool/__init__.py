"""The pool: create and open stores, read rows, stage and commit deltas."""

from dpsn.tiers import Commit, VerifyReport

from ._pool import Pool, create, open

__all__ = ["Commit", "Pool", "VerifyReport", "create", "open"]
