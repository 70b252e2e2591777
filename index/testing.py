"""Helpers for checking routers: structured sample inputs and recall. No pytest needed.

Used by ``tests/test_index_*.py`` and ``bench/routing.py`` (as zarr ships ``zarr.testing``), so
the tests and the benchmark measure the same thing the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mixture", "recall"]


def mixture(
    n: int, *, d: int = 16, seed: int = 0, clusters: int = 32, spread: float = 3.0
) -> Tensor:
    """``[n, d]`` float32 inputs from a Gaussian mixture (fixed centres, unit noise).

    Regions need structure to find; isotropic noise has none. The centres depend only on
    ``(d, clusters, spread)``, the draws on ``seed``.
    """
    g = torch.Generator().manual_seed(1234)
    centres = torch.randn(clusters, d, generator=g) * spread
    g.manual_seed(seed)
    pick = torch.randint(0, clusters, (n,), generator=g)
    return centres[pick] + torch.randn(n, d, generator=g)


def recall(got: Tensor, want: Tensor) -> float:
    """Mean fraction of ``want [T, k]``'s ids that ``got [T, k']`` also holds (-1 ignored)."""
    hits = (got[:, :, None] == want[:, None, :]) & (want[:, None, :] >= 0)
    return float(hits.any(1).sum() / (want >= 0).sum().clamp_min(1))
