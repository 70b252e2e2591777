"""Sparse usage counts of selected rows, and the figures the PKM code reports from them.

Lample et al. 2019 (Product Key Memory, section 4.4) judge a memory by the fraction of its slots
ever selected and by the KL divergence of the selection distribution from uniform; Gini is added
because it reads the same at any N. Counts are kept sparsely (sorted unique ids + counts, merged
lazily) so that the counter costs memory for the rows that were seen, not for the pool: it works
at N = 10**12.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["UsageCounter", "usage_figures"]

_MIN_CONSOLIDATE = 1 << 16
_DENSE_ROWS = 1 << 20  # up to this many rows, counts are one dense array (8 MiB at most)


class UsageCounter:
    """Counts how often each row id was selected; memory grows with distinct ids seen.

    Batches are buffered as they come and merged into the sorted table only when the buffer
    grows past the table's size (amortised doubling): ``observe`` costs nothing but keeping a
    reference (a ``torch.unique`` per batch had been 10-30% of a routing step).
    """

    def __init__(self, num_rows: int) -> None:
        self.num_rows = int(num_rows)
        self.reset()

    def reset(self) -> None:
        """Forget all counts."""
        self._dense: Tensor | None = None  # [num_rows] counts, for pools small enough
        self._ids: Tensor | None = None  # [M] sorted unique ids
        self._counts: Tensor | None = None  # [M] int64
        self._pending: list[Tensor] = []  # raw ids of batches not merged yet
        self._pending_n = 0

    @torch.no_grad()
    def observe(self, ids: Tensor) -> None:
        """Count the ids of one batch (any shape, int64); negative ids (padding) are not."""
        flat = ids.reshape(-1)
        if flat.numel() == 0:
            return
        if self.num_rows <= _DENSE_ROWS:  # one bincount-style add, no sort, no compaction
            if self._dense is None:
                self._dense = torch.zeros(self.num_rows, dtype=torch.int64, device=flat.device)
            self._dense.index_add_(0, flat.clamp(min=0), (flat >= 0).to(torch.int64))
            return
        self._pending.append(flat.detach())
        self._pending_n += flat.numel()
        seen = 0 if self._ids is None else self._ids.numel()
        if self._pending_n > max(_MIN_CONSOLIDATE, 4 * seen):
            self._consolidate()

    def _consolidate(self) -> None:
        if not self._pending:
            return
        device = self._pending[0].device
        u, c = torch.unique(torch.cat(self._pending), return_counts=True)
        if len(u) and int(u[0]) < 0:  # padding, sorted first
            keep = u >= 0
            u, c = u[keep], c[keep]
        if self._ids is not None:
            u, inv = torch.unique(torch.cat([self._ids.to(device), u]), return_inverse=True)
            counts = torch.cat([self._counts.to(device), c])  # type: ignore[union-attr]
            c = torch.zeros_like(u).index_add_(0, inv, counts)
        self._ids = u
        self._counts = c
        self._pending = []
        self._pending_n = 0

    def counts(self) -> tuple[Tensor, Tensor]:
        """``(ids [M], counts [M])`` of every row selected at least once, ids ascending."""
        if self._dense is not None:
            ids = torch.nonzero(self._dense).flatten()
            return ids, self._dense[ids]
        self._consolidate()
        if self._ids is None:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty.clone()
        return self._ids, self._counts  # type: ignore[return-value]

    def figures(self) -> dict[str, float]:
        """See :func:`usage_figures`."""
        return usage_figures(self.counts()[1], self.num_rows)


def usage_figures(counts: Tensor, num_rows: int) -> dict[str, float]:
    """Usage figures of ``counts`` (the nonzero selection counts) over ``num_rows`` rows.

    - ``fraction_used``: rows selected at least once / num_rows.
    - ``kl_uniform``: KL(p || uniform) of the selection distribution p, in nats (0 is perfectly
      even; log(num_rows) is one row taking everything). Rows never seen contribute 0.
    - ``gini``: Gini coefficient of the counts over all num_rows rows (0 even, -> 1 concentrated).
    - ``rows_seen``, ``selections``: the raw totals.
    """
    c = counts.detach().to(torch.float64).cpu().sort().values  # ascending
    m = c.numel()
    total = float(c.sum()) if m else 0.0
    if total == 0.0:
        return {
            "rows_seen": 0.0,
            "selections": 0.0,
            "fraction_used": 0.0,
            "kl_uniform": 0.0,
            "gini": 0.0,
        }
    n = float(num_rows)
    p = c / total
    kl = float((p * (p * n).log()).sum())
    # Gini over N values of which N - m are zero and sorted first: the nonzero ones have ranks
    # N - m + 1 .. N, so sum_i (2 i - N - 1) x_i = sum_j (N - 2 m + 2 j - 1) x_j, j = 1..m.
    j = torch.arange(1, m + 1, dtype=torch.float64)
    gini = float(((n - 2 * m + 2 * j - 1) * c).sum() / (n * total))
    return {
        "rows_seen": float(m),
        "selections": total,
        "fraction_used": m / n,
        "kl_uniform": max(kl, 0.0),
        "gini": gini,
    }
