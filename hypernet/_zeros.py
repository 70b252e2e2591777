"""Zeros: a generator whose every base row is zero, for tables imported whole.

Why: ``dpsn import`` moves an existing dense table (an ``nn.Embedding`` weight) into a store.
With any other generator the stored delta would be ``row - base`` in float32, and
``base + (row - base)`` is not always ``row`` again (rounding), so an imported row could read
back a few ulps off. With a zero base the delta *is* the row and the sum is exact.

The zero is negative zero: ``-0.0 + x == x`` bit for bit for every float ``x``, including
``+0.0`` and ``-0.0`` (IEEE 754 round-to-nearest), while ``+0.0 + -0.0`` is ``+0.0``. So a
table holding ``-0.0`` also reads back bit-identical. A row never written reads as ``-0.0``
(equal to ``0.0`` under ``==``).

No parameters and nothing to train: the store's generator record lists no arrays.
"""

from __future__ import annotations

from typing import Any

import torch

from ._generator import Generator
from ._hash import as_int64_ids

__all__ = ["Zeros"]


class Zeros(Generator):
    """Base rows all zero (-0.0), so a row is its delta: imported tables read back exactly.

    ``forward(ids [...]) -> float32 [..., dim]`` filled with ``-0.0``.
    """

    kind = "zeros"  # persisted in stores: never rename

    def __init__(self, *, dim: int, seed: int) -> None:
        super().__init__(dim=dim, seed=seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # No parameters to say where rows belong: make them where the ids are.
        ids = as_int64_ids(ids)
        return torch.full((*ids.shape, self.dim), -0.0, dtype=torch.float32, device=ids.device)

    def config(self) -> dict[str, Any]:
        return {}
