"""Shared machinery of the region routers (VQ, LSH): region beam + product keys inside.

The pool's ``N`` rows are cut into ``R`` regions of contiguous ids, sizes differing by at most one
(region r owns ``[r * q + min(r, rem), ...)`` with ``N = q * R + rem``), so a region maps to its
block with integer arithmetic and no table, at any N. A subclass finds, for each input, the
``B`` best regions (its beam) with a region score ``g(x, r)`` (negative distance to the VQ
reconstruction, or agreement with the LSH code). Inside a region, rows are ranked by product keys
(``_product_keys.ProductKeys``) shared by all regions: one exact local search per input serves
every region of the beam, and storage stays at ``2 * sqrt(N / R)`` sub-keys per head.

Row ``i`` in region ``r`` at local offset ``j`` scores ``g(x, r) + max_h pk_h(x, j)``; the router
returns the top-k of that over its beam. It is exact when the beam holds the regions the exact
top-k falls in, which is what ``bench/routing.py`` measures as recall.

``region_weight`` sets how much the region outweighs the local key score. It should be large
enough that an input's exact top-k lies in a few nearby regions, which is what the beam searches
and what makes a region mean something; the defaults (VQ 16, LSH 4, beam 16) reach recall >= 0.99
against brute force at 10**7 rows in ``bench/routing.py``. Trained sub-keys grow or shrink the
local scores, so watch recall (``exact_topk`` on a small pool) if you train with a small weight.

Why regions at all, when product keys alone are exact: the region is a cheap, stable name for
"what kind of input this is" (the hypernetwork conditions rows on it, usage is tracked per
region), and its distance gives the budget a novelty signal.

Axes: T inputs, B beam regions, k results, H heads, d = d_in.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from ._backend import BACKENDS, Backend
from ._base import Router
from ._config import RegionConfig
from ._errors import RouterConfigError, RouterNotFittedError
from ._product_keys import ProductKeys, default_d_key

__all__ = ["RegionRouter"]


class RegionRouter(Router):
    """Base of :class:`VQRouter` and :class:`LSHRouter` (see the module docstring)."""

    def __init__(self, config: RegionConfig, *, num_regions: int) -> None:
        d_key = default_d_key(config.d_in) if config.d_key is None else config.d_key
        super().__init__(config.with_(d_key=d_key))
        num_rows, k, beam = config.num_rows, config.k, config.beam
        if num_regions < 1 or num_rows // num_regions < k:
            raise RouterConfigError(
                f"{num_regions} regions over {num_rows} rows leave fewer than k={k} rows in a "
                "region; use fewer regions (levels/nbits) or a smaller k"
            )
        if beam < 1:
            raise RouterConfigError(f"beam must be >= 1, got {beam}")
        if config.backend not in BACKENDS:
            raise RouterConfigError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
        if not config.region_weight > 0:
            raise RouterConfigError(f"region_weight must be > 0, got {config.region_weight}")
        if config.refresh_every < 0 or not config.drift_tol >= 0:
            raise RouterConfigError(
                f"need refresh_every >= 0 (0: never on a count) and drift_tol >= 0 (inf: never "
                f"on drift), got refresh_every={config.refresh_every}, "
                f"drift_tol={config.drift_tol}"
            )
        self.num_regions = num_regions
        self.beam = min(beam, num_regions)
        self.block, self.rem = divmod(num_rows, num_regions)
        self.region_weight = float(config.region_weight)
        self.backend: Backend = config.backend
        self.seed = config.seed
        self.refresh_every = config.refresh_every
        self.drift_tol = config.drift_tol
        self.local = ProductKeys(
            d_in=config.d_in,
            grid_rows=self.block + (1 if self.rem else 0),
            heads=config.heads,
            d_key=d_key,
            query_batchnorm=config.query_batchnorm,
            seed=config.seed,
            max_elems=config.max_elems,
        )
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("updates_since_refresh", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("refreshes", torch.tensor(0, dtype=torch.int64))

    # -- region <-> id arithmetic -------------------------------------------------------------

    def region_start(self, regions: Tensor) -> Tensor:
        """First row id of each region (any shape, int64)."""
        return regions * self.block + regions.clamp(max=self.rem)

    def region_size(self, regions: Tensor) -> Tensor:
        """Rows in each region: ``block + 1`` for the first ``rem`` regions, else ``block``."""
        return self.block + (regions < self.rem).to(torch.int64)

    def region_of(self, ids: Tensor) -> Tensor:
        """Region owning each row id."""
        edge = self.rem * (self.block + 1)  # rows held by the larger regions
        big = ids // (self.block + 1)
        small = self.rem + (ids - edge) // self.block
        return torch.where(ids < edge, big, small)

    # -- what subclasses provide -------------------------------------------------------------

    @abstractmethod
    def _region_beam(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(regions [T, B], region scores [T, B] without grad, novelty [T] | None)``."""

    @abstractmethod
    def region_scores(self, x: Tensor, regions: Tensor) -> Tensor:
        """Differentiable region scores ``g(x, r)``, ``[T, B]``, for regions ``[T, B]``."""

    @abstractmethod
    def _dense_region_queries(self, x: Tensor) -> Tensor:
        """``[T, Dr]`` with ``g(x, r) = q . key_r + offset(x)``."""

    @abstractmethod
    def _dense_region_keys(self, regions: Tensor) -> Tensor:
        """``[n, Dr]`` region keys."""

    # -- routing ------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise RouterNotFittedError(
                f"{type(self).__name__} has no regions yet: call fit(x_sample) with a few "
                "thousand representative inputs first"
            )

    def _local_topk(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Exact local top-k for big regions (``block + 1`` rows) and, if ``rem``, small ones.

        One search serves both: the top-(k+1) over ``[0, block]`` holds the top-k over
        ``[0, block)`` once local id ``block`` (the row only big regions have) is dropped.
        Returns ``(ids, scores)`` ``[T, k]`` for big regions, then for small ones (or None).
        """
        k = self.k_max
        if not self.rem:
            lid, lsc = self.local.select(q, k, self.block)
            return lid, lsc, None, None
        lid, lsc = self.local.select(q, k + 1, self.block + 1)  # [T, k + 1], best first
        keep = lid != self.block  # all True but at most one entry per input
        # stable: kept entries first, in rank order; the dropped one (or the last) goes last
        order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :k]
        return lid[:, :k], lsc[:, :k], lid.gather(1, order), lsc.gather(1, order)

    def _candidates(
        self, x: Tensor, budgets: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        self._check_fitted()
        t, k = x.shape[0], self.k_max
        regions, rs, novelty = self._region_beam(x)  # [T, B]
        nb = regions.shape[1]
        lid, lsc, lid_s, lsc_s = self._local_topk(self.local.queries(x))  # [T, k]
        if lid_s is not None and lsc_s is not None:  # regions >= rem are one row shorter
            small = (regions >= self.rem)[..., None]  # [T, B, 1]
            lid_b = torch.where(small, lid_s[:, None], lid[:, None])  # [T, B, k]
            lsc_b = torch.where(small, lsc_s[:, None], lsc[:, None])
        else:
            lid_b = lid[:, None].expand(t, nb, k)
            lsc_b = lsc[:, None].expand(t, nb, k)
        comb = (rs[..., None] + lsc_b.detach()).reshape(t, nb * k)
        _, pos = comb.topk(k, dim=-1)  # [T, k] best (region, local) pairs
        b = pos // k
        chosen = regions.gather(1, b)
        ids = self.region_start(chosen) + lid_b.reshape(t, nb * k).gather(1, pos)
        g = self.region_scores(x, regions)  # [T, B], differentiable in x
        scores = g.gather(1, b) + lsc_b.reshape(t, nb * k).gather(1, pos)
        return ids, scores, novelty, regions

    # -- dense view ---------------------------------------------------------------------------

    def dense_queries(self, x: Tensor) -> Tensor:
        self._check_fitted()
        rq = self._dense_region_queries(x)  # [T, Dr]
        lq = self.local.dense_queries(self.local.queries(x))  # [T, H, H * d_key]
        return torch.cat([rq[:, None].expand(-1, lq.shape[1], -1), lq], dim=-1)

    def dense_keys(self, ids: Tensor) -> Tensor:
        regions = self.region_of(ids)
        local = ids - self.region_start(regions)
        return torch.cat([self._dense_region_keys(regions), self.local.dense_keys(local)], -1)

    # -- drift --------------------------------------------------------------------------------

    @abstractmethod
    def drift(self) -> float:
        """How far the live (online-updated) region state has moved from the indexed one."""

    @abstractmethod
    def refresh(self) -> None:
        """Make the live region state the routing state and rebuild the FAISS index."""

    def _after_fit(self, x: Tensor) -> None:
        """What every ``fit`` ends with: route from now on, calibrate the budget on ``x``."""
        self.fitted.fill_(True)
        self.updates_since_refresh.zero_()
        if self.budget.signal in ("entropy", "novelty"):
            self.calibrate_budget(x)

    def _after_update(self) -> dict[str, Any]:
        """What every ``update`` ends with: count it, refresh when due or drifted too far."""
        self.updates += 1
        self.updates_since_refresh += 1
        drift = self.drift()
        due = self.refresh_every > 0 and int(self.updates_since_refresh) >= self.refresh_every
        if due or drift > self.drift_tol:
            self.refresh()
            return {"drift": drift, "refreshed": True}
        return {"drift": drift, "refreshed": False}

    def _mark_refreshed(self) -> None:
        self.updates_since_refresh.zero_()
        self.refreshes += 1
