"""Helpers for checking routers: structured sample inputs and recall. No pytest needed.

Used by ``tests/test_index_*.py`` and ``bench/routing.py`` (as zarr ships ``zarr.testing``), so
the tests and the benchmark measure the same thing the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import torch
from torch import Tensor

__all__ = ["mixture", "recall", "single_threaded"]


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch and faiss on one thread each inside the block, then restore both.

    torch and faiss-cpu each bring their own OpenMP runtime; on a small, shared machine their
    idle threads spin while the other works, and a barrier waits whenever one of its threads is
    descheduled. For test-sized problems (tens of inputs, thousands of keys) that overhead is
    all there is: one thread runs the index tests several times faster and checks the same.
    """
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


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
