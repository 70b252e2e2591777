"""Membership in a sorted id column: the one batched lookup that staging, the row index and
the stack share (one ``searchsorted``, no dict, no loop per id)."""

from __future__ import annotations

import numpy as np


def sorted_find(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``ids`` in the sorted unique ``sorted_ids`` and a mask of which are there
    (positions are meaningless, but in range, where the mask is False)."""
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == ids
