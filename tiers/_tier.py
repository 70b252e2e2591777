"""The lower tiers of the row stack: one small protocol, held in order by ``RowStack``.

Below the device cache a row's delta lives in the first tier that has it: host staging
(uncommitted rows: ``Staging``, ``_staging.py``, is a tier itself), then the persisted store
(HEAD's segments in ``dpsn.store``, read through :class:`PersistedTier`, which turns the store's
arrays into tensors).
Each answers :meth:`Tier.read` for a batch of ids: which it holds (their delta, optimizer state
and usage statistics) and which it *ends* without a delta (a row staged for dropping: the tiers
below must not be asked). The stack asks them in order, each for the ids the ones above left
open (``RowStack._host_rows``), so a fill, a spilled read and a row step all find a row the
same way. Rows no tier holds are procedural: their value is their base.

The procedural generator is not a tier of this protocol: it holds no deltas but gives every
row its base, so the stack asks it for every filled row, not for the ones left open. Writes are
not part of it either: only staging takes rows (``Staging.put``, an eviction or a row step
on a row not cached); the persisted store changes only by a commit of the whole staging area.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from dpsn._dtypes import storage_reader
from dpsn.store import PersistedStore, RowLookup

from ._columns import RowLayout


@dataclass(frozen=True, slots=True)
class TierRead:
    """What one tier holds of ``ids``: ``found`` (positions into ``ids``) and their
    ``delta`` (pool dtype), ``state`` and ``usage`` rows (CPU, in the order of ``found``;
    usage ``[n, 0]`` without a lifecycle), and ``ended``: positions whose search ends here
    without a delta (dropped rows). ``nbytes``: bytes read from disk for them."""

    found: np.ndarray
    ended: np.ndarray
    delta: torch.Tensor
    state: torch.Tensor
    usage: torch.Tensor
    nbytes: int = 0


class Tier(Protocol):
    """A lower tier of the row stack (see the module docstring)."""

    name: str

    def read(self, ids: np.ndarray, layout: RowLayout) -> TierRead:
        """What this tier holds of ``ids`` (int64, any order, repeats allowed), with the
        columns of ``layout`` (its state and usage widths)."""
        ...


class PersistedTier:
    """The persisted store at one commit as a tier: rows with a delta in its row index.

    ``index`` is the commit's row index; the stack replaces it when it commits or moves to
    another commit."""

    name = "persisted"

    def __init__(self, store: PersistedStore, index: RowLookup, dtype_name: str) -> None:
        self.store, self.index, self.dtype_name = store, index, dtype_name
        self._to_tensor = storage_reader(dtype_name)  # stored deltas -> pool dtype, chosen once

    def read(self, ids: np.ndarray, layout: RowLayout) -> TierRead:
        found, values, state, usage = self.store.read_deltas(
            self.index, ids, state_width=layout.state_width, usage_width=layout.usage_width
        )
        return TierRead(
            np.flatnonzero(found),
            np.zeros(0, dtype=np.int64),
            self._to_tensor(values),
            torch.from_numpy(state),
            torch.from_numpy(usage),
            values.nbytes + state.nbytes + usage.nbytes,
        )
