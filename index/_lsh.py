"""LSH routing: the sign pattern of random projections names the region (FAISS ``IndexLSH``).

``faiss.IndexLSH(d_in, nbits, rotate_data=True, train_thresholds=True)`` projects the input with a
seeded random rotation ``A [nbits, d_in]`` and compares each coordinate with a per-bit threshold
(the median over the ``fit`` sample, so each bit splits the inputs in half and regions fill
evenly). Bit b of the code is ``m_b > 0`` with margins ``m = A x - thr``; the region is the code
read as an integer, first bit most significant, so the first bits are the coarse levels of a
binary tree and every prefix owns a contiguous run of rows. Finding the region costs ``nbits``
projections: the log of the number of regions.

Multi-probe: the region score of code ``c`` (as +-1) is ``region_weight * (c . m - sum|m|) /
scale``: 0 for the input's own region and minus twice the margins of the flipped bits for its
neighbours. The best ``beam`` codes are found exactly by a beam over bits (the score is a sum of
one term per bit, so top-B prefixes extend to top-B codes, as in product keys).

Drift and refresh. Inputs drift, so the bit medians do. ``update(x)`` moves *live* thresholds
towards the running median (stochastic quantile tracking); routing keeps using the *indexed*
thresholds (the buffer ``thresholds`` and the FAISS index) because changing a threshold moves
inputs across region boundaries, onto other rows. ``refresh()`` installs the live thresholds in
both; ``update`` calls it every ``refresh_every`` updates or once ``drift()`` (largest threshold
move, in units of ``scale``, the mean |margin| at fit) exceeds ``drift_tol``. The rotation is
random and never trained, so it never drifts; the product sub-keys are searched exactly.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from dpsn.errors import CorruptStoreError

from ._backend import _use_torch, index_to_bytes
from ._config import LSHConfig, build_config
from ._errors import RouterConfigError
from ._regions import RegionRouter

__all__ = ["LSHRouter", "default_nbits"]

_TARGET_BLOCK = 4096


def default_nbits(num_rows: int, k: int) -> int:
    """Bits giving regions of about ``max(4096, 4k)`` rows (at least 1, at most 62)."""
    most = int(math.log2(max(num_rows // k, 1)))
    target = int(math.log2(max(num_rows // max(_TARGET_BLOCK, 4 * k), 1)))
    return max(1, min(target, most, 62))


class LSHRouter(RegionRouter):
    """LSH regions (FAISS ``IndexLSH`` with trained thresholds) + product keys inside.

    Call ``fit(x_sample)`` once (it trains the thresholds), then route. See the module docstring
    for the region score, multi-probe beam and refresh policy.
    """

    kind = "lsh"

    Config = LSHConfig

    def __init__(self, config: LSHConfig | None = None, /, **kwargs: Any) -> None:
        """``LSHRouter(LSHConfig(...))`` or the same fields as keywords."""
        config = build_config(LSHConfig, config, kwargs)
        nbits = config.nbits
        nbits = default_nbits(config.num_rows, config.k) if nbits is None else int(nbits)
        if not 1 <= nbits <= 62:
            raise RouterConfigError(f"nbits must be in [1, 62], got {nbits}")
        super().__init__(config.with_(nbits=nbits), num_regions=1 << nbits)
        threshold_rate, d_in = config.threshold_rate, config.d_in
        self.nbits = nbits
        self.threshold_rate = threshold_rate
        self.register_buffer("proj", torch.zeros(nbits, d_in))  # A, copied from faiss
        self.register_buffer("thresholds", torch.zeros(nbits))  # indexed (routing)
        self.register_buffer("live_thresholds", torch.zeros(nbits))  # tracked online
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("bit_weights", 2 ** torch.arange(nbits - 1, -1, -1))  # MSB first
        self._index: faiss.IndexLSH | None = None
        # buffers replaced wholesale (load_state_dict): rebuild the FAISS index from them
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_index", None))

    # -- training -----------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, x_sample: Tensor) -> LSHRouter:
        """Draw the rotation (seeded) and train the per-bit median thresholds on a sample."""
        x = self.check_input(x_sample)
        if x.shape[0] < 2:
            raise RouterConfigError("fit needs at least 2 samples to set the bit thresholds")
        xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
        index = faiss.IndexLSH(self.d_in, self.nbits, True, True)
        index.rrot.init(self.seed)
        index.train(xn)
        self._index = index
        a = faiss.vector_to_array(index.rrot.A).reshape(self.nbits, self.d_in)
        thr = faiss.vector_to_array(index.thresholds)
        self.proj.copy_(torch.from_numpy(a))
        self.thresholds.copy_(torch.from_numpy(thr))
        self.live_thresholds.copy_(self.thresholds)
        margins = xn @ a.T - thr
        self.scale.fill_(max(float(np.abs(margins).mean()), 1e-12))
        self._after_fit(x)
        return self

    @torch.no_grad()
    def update(self, x: Tensor) -> dict[str, Any]:
        """Move the live thresholds towards the bit medians of ``x [T, d_in]``; may refresh.

        ``thr += threshold_rate * scale * (2 * share_above - 1)``: a stochastic median tracker.
        Returns ``{"drift": float, "refreshed": bool}``.
        """
        self._check_fitted()
        x = self.check_input(x)
        above = (x @ self.proj.T > self.live_thresholds).to(x.dtype).mean(0)  # [nbits]
        self.live_thresholds.add_(self.threshold_rate * self.scale * (2 * above - 1))
        return self._after_update()

    @torch.no_grad()
    def drift(self) -> float:
        """Largest live-vs-indexed threshold gap, in units of ``scale``."""
        return float((self.live_thresholds - self.thresholds).abs().max() / self.scale)

    @torch.no_grad()
    def refresh(self) -> None:
        """Route with the live thresholds from now on (buffer and FAISS index together)."""
        self._check_fitted()
        self.thresholds.copy_(self.live_thresholds)
        index = self._faiss_index()
        faiss.copy_array_to_vector(
            np.ascontiguousarray(self.thresholds.detach().float().cpu().numpy()), index.thresholds
        )
        self._mark_refreshed()

    def _faiss_index(self) -> faiss.IndexLSH:
        if self._index is None:  # after load_state_dict: the same index, from the buffers
            index = faiss.IndexLSH(self.d_in, self.nbits, True, True)
            proj = self.proj.detach().float().cpu().numpy()
            faiss.copy_array_to_vector(np.ascontiguousarray(proj).ravel(), index.rrot.A)
            faiss.copy_array_to_vector(
                np.ascontiguousarray(self.thresholds.detach().float().cpu().numpy()),
                index.thresholds,
            )
            index.is_trained = True
            self._index = index
        return self._index

    # -- routing ------------------------------------------------------------------------------

    def _margins(self, x: Tensor) -> Tensor:
        """``[T, nbits]`` margins ``A x - thr`` (FAISS on CPU tensors, torch otherwise)."""
        if _use_torch(x, self.backend) or x.is_cuda:
            return x @ self.proj.T - self.thresholds
        proj = self._faiss_index().rrot.apply(np.ascontiguousarray(x.detach().float().numpy()))
        return torch.from_numpy(proj).to(x.dtype) - self.thresholds

    def _codes_pm(self, regions: Tensor) -> Tensor:
        """``[..., nbits]`` +-1 codes of regions."""
        bits = (regions[..., None] // self.bit_weights) % 2
        return (2 * bits - 1).to(self.proj.dtype)

    @torch.no_grad()
    def _region_beam(self, x: Tensor) -> tuple[Tensor, Tensor, None]:
        m = self._margins(x)  # [T, nbits]
        t = x.shape[0]
        score = m.new_zeros(t, 1)
        codes = torch.zeros(t, 1, dtype=torch.int64, device=x.device)
        for b in range(self.nbits):  # beam over bits, exact (scores add per bit)
            mb = m[:, b : b + 1]
            score = torch.cat([score + mb, score - mb], dim=1)  # [T, 2M]: bit 1, then bit 0
            codes = torch.cat([codes * 2 + 1, codes * 2], dim=1)
            if score.shape[1] > self.beam:
                score, pos = score.topk(self.beam, dim=-1)
                codes = codes.gather(1, pos)
        order = score.argsort(dim=-1, descending=True, stable=True)
        score, codes = score.gather(1, order), codes.gather(1, order)
        rs = self.region_weight * (score - m.abs().sum(-1, keepdim=True)) / self.scale
        return codes, rs, None

    def region_scores(self, x: Tensor, regions: Tensor) -> Tensor:
        m = x @ self.proj.T - self.thresholds  # [T, nbits], differentiable in x
        agree = (self._codes_pm(regions) * m[:, None, :]).sum(-1)  # [T, B]
        return self.region_weight * (agree - m.abs().sum(-1, keepdim=True)) / self.scale

    def _dense_region_queries(self, x: Tensor) -> Tensor:
        w = self.region_weight / self.scale
        return torch.cat([w * x, (-w).expand(x.shape[0], 1)], dim=-1)  # [T, d + 1]

    def _dense_region_keys(self, regions: Tensor) -> Tensor:
        c = self._codes_pm(regions)  # [n, nbits]
        return torch.cat([c @ self.proj, (c * self.thresholds).sum(-1, keepdim=True)], dim=-1)

    def dense_offset(self, x: Tensor) -> Tensor:
        m = x @ self.proj.T - self.thresholds
        return -self.region_weight * m.abs().sum(-1) / self.scale

    # -- persistence --------------------------------------------------------------------------

    def extra_arrays(self) -> dict[str, np.ndarray]:
        if not bool(self.fitted):
            return {}
        return {"faiss_lsh": index_to_bytes(self._faiss_index())}

    def load_extra_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Check the stored FAISS index against the buffers, without deserialising it.

        The index is a function of ``proj`` and ``thresholds``: it is rebuilt from those
        (digest-checked) buffers and its serialisation compared byte for byte with the stored
        blob, so no bytes from the store ever reach faiss's parser.
        """
        if not bool(self.fitted):
            return
        if "faiss_lsh" not in arrays:
            raise CorruptStoreError("stored LSH router lacks its FAISS index 'faiss_lsh'")
        self._index = None
        if not np.array_equal(index_to_bytes(self._faiss_index()), arrays["faiss_lsh"]):
            raise CorruptStoreError(
                "stored FAISS LSH index disagrees with the router's buffers; the store is "
                "damaged: restore it from a snapshot"
            )
