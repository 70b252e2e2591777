"""The fields of the ``usage`` column (a row lifecycle's per-row statistics), without torch:
``_usage.py`` says how they change, ``_health.py`` reads stores with them. Persisted in every
segment written with a lifecycle (float64; counts and steps are exact integers below 2**53):
never renumber.
"""

from __future__ import annotations

import numpy as np

PHASE = 0  # FREE (0) or SCREENED (1)
USES = 1  # uses since the row got its delta (a page-in counts each use, a write one)
LAST = 2  # the step of its last use: RECENT and HISTORY are as of that step
RECENT = 3  # exponential moving average of "used in this step" (0..1), as of LAST
HISTORY = 4  # bit i set: used at step LAST - i (HISTORY_BITS bits; the rolling history)
UPDATE = 5  # moving average of its row gradients' norms (the size of its recent updates)
NORM = 6  # norm of the stored delta (set when the delta leaves the cache): pruning needs no read
EPOCH = 7  # the first consolidation that may decay the stored delta (FREE rows)
SINCE = 8  # the consolidation of its last use, write or phase change: the idle clock
BORN = 9  # the consolidation at which it got its delta (novelty of its region)
WIDTH = 10
FIELDS = ("phase", "uses", "last", "recent", "history", "update", "norm", "epoch", "since", "born")

FREE, SCREENED = 0, 1
HISTORY_BITS = 32

# The one table of bounds a writer and its readers share (issue 21): every count and clock a
# store holds (usage fields, a commit's lifecycle step and epoch) is an integer below
# CLOCK_LIMIT, exact in float64; readers refuse anything at or above it, and a writer refuses to
# commit a clock that reached it. Integer lifecycle settings (warmup, min_uses, max_idle, ...)
# are at most SETTING_LIMIT, so a count that starts at a setting has 2**52 steps of room.
CLOCK_LIMIT = 1 << 53
SETTING_LIMIT = 1 << 52
HISTORY_MASK = (1 << HISTORY_BITS) - 1


def usage_problem(usage: np.ndarray) -> str | None:
    """What is wrong with ``[n, WIDTH]`` usage rows read from a store, None if nothing: each row
    is either all NaN (no statistics: the row has them made up as a legacy row) or holds a
    phase of 0 or 1 and finite, non-negative fields, with counts and clocks below 2**53 and a
    history of HISTORY_BITS bits (recent use is a fraction)."""
    if usage.ndim != 2 or usage.shape[1] != WIDTH:
        return f"have shape {list(usage.shape)}, not [n, {WIDTH}]"
    if len(usage) == 0:
        return None
    none = np.isnan(usage).all(axis=1)
    u = usage[~none]
    if len(u) == 0:
        return None
    with np.errstate(invalid="ignore"):
        ok = (
            np.isfinite(u).all(axis=1)
            & ((u[:, PHASE] == FREE) | (u[:, PHASE] == SCREENED))
            & (u >= 0).all(axis=1)
            & (u[:, [USES, LAST, EPOCH, SINCE, BORN]] < float(CLOCK_LIMIT)).all(axis=1)
            & (u[:, HISTORY] <= HISTORY_MASK)
            & (u[:, RECENT] <= 1.0 + 1e-9)  # a moving average of 0s and 1s, give or take an ulp
        )
    if ok.all():
        return None
    return f"hold {int((~ok).sum())} rows with out-of-range values"
