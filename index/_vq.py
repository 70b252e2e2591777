"""VQ routing: hierarchical residual codebooks trained with FAISS k-means.

Level 1 quantises the input (``faiss.Kmeans``, fixed seed), level 2 quantises what level 1 left
over, and so on (residual quantisation, as in RQ-VAE). A region is the tuple of codes
``(a1, ..., aL)``, numbered ``a1 * c2 * ... * cL + ... + aL``, so every coarse code owns one
contiguous run of finer regions and of row ids. The search is a beam over levels, each an exact
FAISS ``IndexFlatL2`` search of ``c_l`` centroids: ``L * c_l`` distances per beam entry for
``prod(c_l)`` regions, so the cost grows with the log of the pool size.

The region score is ``-region_weight * ||x - recon(r)||^2 / scale``, ``scale`` being the mean
squared residual at ``fit`` time; the same normalised distance to the nearest region is the
novelty signal of the budget.

Drift and refresh. The codebooks follow the inputs online with exponential moving averages
(VQ-VAE, van den Oord et al. 2017, appendix A.1): ``update(x)`` changes the *live* codebooks
only. Routing uses the *indexed* codebooks (the buffers ``codebook{l}`` and the FAISS indexes
built from them), because moving a centroid moves region boundaries and so re-assigns inputs to
other rows; that should happen in steps, not at every batch. ``refresh()`` copies live into
indexed and rebuilds the FAISS indexes; ``update`` calls it itself every ``refresh_every``
updates, or as soon as ``drift()`` (the largest centroid move, in units of ``sqrt(scale)``)
exceeds ``drift_tol``. The product sub-keys inside regions are trained by gradient but searched
exactly (no approximate index over them), so they never go stale.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from dpsn.errors import CorruptStoreError

from ._backend import FlatL2Index
from ._config import VQConfig, build_config
from ._errors import RouterConfigError
from ._regions import RegionRouter

__all__ = ["VQRouter", "default_levels"]

_TARGET_BLOCK = 4096  # rows per region the default levels aim for (64 x 64 local sub-keys)
_LAPLACE_EPS = 1e-5


def default_levels(num_rows: int, k: int) -> tuple[int, ...]:
    """Codebook sizes giving regions of about ``max(4096, 4k)`` rows, 1-3 levels of <= ~1000."""
    target = max(1, num_rows // max(_TARGET_BLOCK, 4 * k))
    depth = 1 if target <= 256 else 2 if target <= 256**2 else 3
    c = max(2, round(target ** (1.0 / depth)))
    while c > 2 and c**depth > num_rows // k:
        c -= 1
    return (c,) * depth


class VQRouter(RegionRouter):
    """Hierarchical VQ regions (FAISS k-means, residual levels) + product keys inside.

    Call ``fit(x_sample)`` once with representative inputs (at least ``max(levels)`` of them,
    ideally 40x that), then route. ``update(x)`` tracks the inputs online; see the module
    docstring for when the routing state is refreshed.
    """

    kind = "vq"
    default_signal = "novelty"
    provides_novelty = True

    Config = VQConfig

    def __init__(self, config: VQConfig | None = None, /, **kwargs: Any) -> None:
        """``VQRouter(VQConfig(...))`` or the same fields as keywords."""
        config = build_config(VQConfig, config, kwargs)
        levels = config.levels or default_levels(config.num_rows, config.k)
        levels = tuple(int(c) for c in levels)
        if not levels or any(c < 1 for c in levels) or len(levels) > 4:
            raise RouterConfigError(f"levels must be 1-4 codebook sizes >= 1, got {levels}")
        if not 0.0 <= config.ema_decay < 1.0:
            raise RouterConfigError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
        super().__init__(config.with_(levels=levels), num_regions=math.prod(levels))
        niter, ema_decay, d_in = config.niter, config.ema_decay, config.d_in
        self.levels = levels
        self.niter = niter
        self.ema_decay = ema_decay
        for lvl, c in enumerate(levels):
            self.register_buffer(f"codebook{lvl}", torch.zeros(c, d_in))  # indexed (routing)
            self.register_buffer(f"ema_count{lvl}", torch.zeros(c))  # live, EMA of shares
            self.register_buffer(f"ema_sum{lvl}", torch.zeros(c, d_in))  # live, EMA of sums
        self.register_buffer("scale", torch.tensor(1.0))
        self._indexes: list[FlatL2Index] = []
        # codebooks replaced wholesale (load_state_dict): rebuild the FAISS indexes from them
        self.register_load_state_dict_post_hook(lambda module, _: module._rebuild_if_fitted())

    def _codebook(self, lvl: int) -> Tensor:
        return getattr(self, f"codebook{lvl}")

    @staticmethod
    def _smooth(n: Tensor) -> Tensor:
        """Laplace-smoothed EMA counts (VQ-VAE): no centroid divides by zero."""
        total = n.sum()
        return ((n + _LAPLACE_EPS) / (total + n.numel() * _LAPLACE_EPS) * total).clamp_min(1e-12)

    def _live(self, lvl: int) -> Tensor:
        """Live codebook of a level: EMA sums over smoothed EMA counts."""
        n = getattr(self, f"ema_count{lvl}")
        return getattr(self, f"ema_sum{lvl}") / self._smooth(n)[:, None]

    # -- training the regions -----------------------------------------------------------------

    @torch.no_grad()
    def fit(self, x_sample: Tensor) -> VQRouter:
        """Train the level codebooks with ``faiss.Kmeans`` (seed ``seed + level``) on a sample.

        ``x_sample [n, d_in]``; each level clusters the residual the previous one left.
        """
        x = self.check_input(x_sample)
        n = x.shape[0]
        if n < max(self.levels):
            raise RouterConfigError(
                f"fit needs at least max(levels)={max(self.levels)} samples, got {n}"
            )
        res = np.ascontiguousarray(x.detach().float().cpu().numpy())
        for lvl, c in enumerate(self.levels):
            km = faiss.Kmeans(
                self.d_in, c, niter=self.niter, seed=self.seed + lvl, min_points_per_centroid=1
            )
            km.train(res)
            cents = np.ascontiguousarray(km.centroids, dtype=np.float32)
            _, assign = km.index.search(res, 1)
            share = np.bincount(assign[:, 0], minlength=c).astype(np.float32) / n
            res = res - cents[assign[:, 0]]
            cb = torch.from_numpy(cents).to(self._codebook(lvl))
            count = torch.from_numpy(share).to(cb)
            self._codebook(lvl).copy_(cb)
            getattr(self, f"ema_count{lvl}").copy_(count)
            # sums over the *smoothed* counts, so that live == indexed: drift() is 0 after fit
            # (with raw shares, an empty cluster's live centroid would sit at the origin)
            getattr(self, f"ema_sum{lvl}").copy_(cb * self._smooth(count)[:, None])
        self.scale.fill_(max(float((res**2).sum(1).mean()), 1e-12))
        self._build_indexes()
        self._after_fit(x)
        return self

    def _rebuild_if_fitted(self) -> None:
        self._indexes = []
        if bool(self.fitted):
            self._build_indexes()

    def _build_indexes(self) -> None:
        self._indexes = [
            FlatL2Index.build(self._codebook(lvl).detach().float().cpu().numpy())
            for lvl in range(len(self.levels))
        ]

    @torch.no_grad()
    def update(self, x: Tensor) -> dict[str, Any]:
        """One EMA step of the live codebooks on inputs ``x [T, d_in]``; may refresh.

        Returns ``{"drift": float, "refreshed": bool}``.
        """
        self._check_fitted()
        x = self.check_input(x)
        t = x.shape[0]
        gamma = self.ema_decay
        res = x
        for lvl, c in enumerate(self.levels):
            live = self._live(lvl)
            d = (res * res).sum(-1, keepdim=True) - 2 * res @ live.T + (live * live).sum(-1)
            a = d.argmin(dim=-1)  # [T]
            share = torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(
                0, a, torch.ones_like(a, dtype=x.dtype)
            )
            sums = torch.zeros_like(live).index_add_(0, a, res)
            cnt = getattr(self, f"ema_count{lvl}")
            cnt.mul_(gamma).add_(share / max(t, 1), alpha=1 - gamma)
            getattr(self, f"ema_sum{lvl}").mul_(gamma).add_(sums / max(t, 1), alpha=1 - gamma)
            res = res - live[a]
        return self._after_update()

    @torch.no_grad()
    def drift(self) -> float:
        """Largest move of a live centroid from its indexed position, in ``sqrt(scale)`` units."""
        worst = 0.0
        for lvl in range(len(self.levels)):
            move = (self._live(lvl) - self._codebook(lvl)).norm(dim=-1).max()
            worst = max(worst, float(move))
        return worst / math.sqrt(float(self.scale))

    @torch.no_grad()
    def refresh(self) -> None:
        """Route with the live codebooks from now on: copy them in, rebuild the FAISS indexes."""
        self._check_fitted()
        for lvl in range(len(self.levels)):
            self._codebook(lvl).copy_(self._live(lvl))
        self._build_indexes()
        self._mark_refreshed()

    # -- routing ------------------------------------------------------------------------------

    def _digits(self, regions: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        r = regions
        for c in reversed(self.levels):
            out.append(r % c)
            r = r // c
        return out[::-1]

    def _recon(self, regions: Tensor) -> Tensor:
        """``[..., d]`` reconstruction (sum of level centroids) of regions ``[...]``."""
        digits = self._digits(regions)
        return sum(self._codebook(lvl)[a] for lvl, a in enumerate(digits))  # type: ignore[return-value]

    @torch.no_grad()
    def _region_beam(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if len(self._indexes) != len(self.levels):
            self._build_indexes()
        t, d = x.shape
        res = x.detach()[:, None, :]  # [T, M, d], M = current beam width
        regions = torch.zeros(t, 1, dtype=torch.int64, device=x.device)
        dist = x.new_zeros(t, 1)
        for lvl, c in enumerate(self.levels):
            m = res.shape[1]
            bl = min(self.beam, c)
            dl, il = self._indexes[lvl].search(
                res.reshape(t * m, d), bl, codebook=self._codebook(lvl), backend=self.backend
            )  # [T * M, bl]: ||x - recon||^2 after this level
            nb = min(self.beam, m * bl)
            dist, pos = dl.reshape(t, m * bl).topk(nb, dim=-1, largest=False)  # [T, nb]
            parent = pos // bl
            code = il.reshape(t, m * bl).gather(1, pos)
            regions = regions.gather(1, parent) * c + code
            res = res.gather(1, parent[..., None].expand(t, nb, d)) - self._codebook(lvl)[code]
        norm = dist / self.scale
        return regions, -self.region_weight * norm, norm[:, 0]

    def region_scores(self, x: Tensor, regions: Tensor) -> Tensor:
        diff = x[:, None, :] - self._recon(regions)  # [T, B, d]
        return -self.region_weight * (diff * diff).sum(-1) / self.scale

    def _dense_region_queries(self, x: Tensor) -> Tensor:
        w = self.region_weight / self.scale
        return torch.cat([2 * w * x, (-w).expand(x.shape[0], 1)], dim=-1)  # [T, d + 1]

    def _dense_region_keys(self, regions: Tensor) -> Tensor:
        rec = self._recon(regions)  # [n, d]
        return torch.cat([rec, (rec * rec).sum(-1, keepdim=True)], dim=-1)

    def dense_offset(self, x: Tensor) -> Tensor:
        return -self.region_weight * (x * x).sum(-1) / self.scale

    # -- persistence --------------------------------------------------------------------------

    def extra_arrays(self) -> dict[str, np.ndarray]:
        if not bool(self.fitted):
            return {}
        if len(self._indexes) != len(self.levels):
            self._build_indexes()
        return {f"faiss_level{lvl}": ix.to_bytes() for lvl, ix in enumerate(self._indexes)}

    def load_extra_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Check the stored FAISS indexes against the codebooks, without deserialising them.

        A flat index is a function of its codebook: it is rebuilt from the (digest-checked)
        buffer and its serialisation compared byte for byte with the stored blob, so no bytes
        from the store ever reach faiss's parser.
        """
        if not bool(self.fitted):
            return
        self._build_indexes()
        for lvl, ix in enumerate(self._indexes):
            name = f"faiss_level{lvl}"
            if name not in arrays:
                raise CorruptStoreError(f"stored VQ router lacks its FAISS index {name!r}")
            if not np.array_equal(ix.to_bytes(), arrays[name]):
                raise CorruptStoreError(
                    f"stored FAISS index {name!r} disagrees with codebook{lvl}; the store is "
                    "damaged: restore it from a snapshot"
                )
