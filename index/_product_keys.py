"""Product keys: exact top-k over n1 * n2 rows by scoring only n1 + n2 sub-keys.

Lample et al. 2019, "Large Memory Layers with Product Keys" (PKM), and He 2024, "Mixture of A
Million Experts" (PEER). A query is split in two halves; half a is scored against ``n1`` sub-keys
and half b against ``n2``; row ``i = i1 * n2 + i2`` has the score ``s1[i1] + s2[i2]``. Because the
score is a sum, the top-k rows lie in (top-k of half a) x (top-k of half b): k*k candidates
instead of n1*n2 scores. At N = 10**12 that is 2 * 10**6 sub-keys per head.

``num_rows`` need not be n1 * n2. With ``n2 = ceil(sqrt(N))`` and ``n1 = ceil(N / n2)`` only the
last grid row ``f = N // n2`` is partial (``r = N % n2`` valid entries). The search stays exact:
full rows ``[0, f)`` x all of half b, plus row ``f`` x the first ``r`` sub-keys of half b, each a
product set whose top-k is found as above. Ids >= N are never produced.

Axes: T inputs, H heads, k results, e = d_key / 2 (half width), n1 / n2 sub-keys per half.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from dpsn import _kernels

from ._base import Router
from ._config import ProductKeyConfig, build_config
from ._errors import RouterConfigError
from ._topk import merge_heads, merge_topk, sorted_pair_candidates, topk_ip

# Grids up to this many rows use the native search (dpsn._kernels); it scans every sub-key of
# both halves per query, which is what the chunked PyTorch search does too, but beyond ~10**8
# rows (10**4 sub-keys a half) the latter's batched matmuls win.
_NATIVE_GRID = 1 << 27

__all__ = ["ProductKeyRouter", "ProductKeys", "grid_shape"]


def grid_shape(n: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1 * n2 >= n``, ``n2 = ceil(sqrt(n))``, and at most one partial row."""
    r = math.isqrt(n)
    n2 = r if r * r == n else r + 1
    return -(-n // n2), n2


class _NativeScores(torch.autograd.Function):
    """The scores the native search computed, as a function of the query and the sub-keys:
    forward returns them as they are (no re-scoring), backward is one C loop that adds each
    selected score's gradient to its query and its two sub-keys."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, keys1: Tensor, keys2: Tensor, ids: Tensor, vals: Tensor
    ) -> Tensor:
        ctx.save_for_backward(q, keys1, keys2, ids)
        return vals

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, keys1, keys2, ids = ctx.saved_tensors
        dq, dk1, dk2 = _kernels.pk_scores_backward(
            q.contiguous(), keys1.contiguous(), keys2.contiguous(), ids, grad.float().contiguous()
        )
        return dq, dk1, dk2, None, None


class ProductKeys(nn.Module):
    """Learned query and two sub-key sets per head, with the exact chunked product search.

    The query is ``Linear(d_in, heads * d_key)``, optionally followed by batch norm (PKM section
    3.3: BN on the query spreads it over the keys and raises key usage; off by default because
    in training mode it makes one token's route depend on the rest of the batch). The sub-key
    search runs without autograd in bounded memory (``_topk.topk_ip``); the selected scores are
    then recomputed from the gathered keys, so gradients reach the query and exactly the
    selected sub-keys, as if autograd had gone through ``topk``.
    """

    def __init__(
        self,
        *,
        d_in: int,
        grid_rows: int,
        heads: int,
        d_key: int,
        query_batchnorm: bool = False,
        seed: int = 0,
        max_elems: int = 1 << 22,
    ) -> None:
        super().__init__()
        if heads < 1:
            raise RouterConfigError(f"heads must be >= 1, got {heads}")
        if d_key < 2 or d_key % 2:
            raise RouterConfigError(f"d_key must be an even int >= 2, got {d_key}")
        self.heads = heads
        self.d_key = d_key
        self.half = d_key // 2
        self.seed = seed
        self.n1, self.n2 = grid_shape(grid_rows)
        self.max_elems = max_elems
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(d_in)
        # seeded init: two routers of one config start identical, and building one neither
        # reads nor advances torch's global RNG (skip_init: nn.Linear's own init would)
        self.query = torch.nn.utils.skip_init(nn.Linear, d_in, heads * d_key)
        with torch.no_grad():
            w = torch.rand(heads * d_key, d_in, generator=g) * 2 * bound - bound
            self.query.weight.copy_(w)
            self.query.bias.zero_()
        self.query_bn = nn.BatchNorm1d(heads * d_key) if query_batchnorm else None
        std = 1.0 / math.sqrt(self.half)
        self.keys1 = nn.Parameter(torch.randn(heads, self.n1, self.half, generator=g) * std)
        self.keys2 = nn.Parameter(torch.randn(heads, self.n2, self.half, generator=g) * std)

    def queries(self, x: Tensor) -> Tensor:
        """``[T, H, d_key]`` queries of ``x [T, d_in]``."""
        q = self.query(x)
        if self.query_bn is not None:
            q = self.query_bn(q)
        return q.view(x.shape[0], self.heads, self.d_key)

    def _native(self, q: Tensor) -> bool:
        return (
            _kernels.usable(q, self.keys1)
            and q.dtype == self.keys1.dtype == torch.float32
            and self.n1 * self.n2 <= _NATIVE_GRID
        )

    @torch.no_grad()
    def search(
        self, q: Tensor, k: int, n_valid: int, budgets: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Exact per-head top-k over grid ids ``[0, n_valid)``: ``(ids, vals)``, ``[T, H, k]``.

        ``budgets [T]``: query ``t`` needs only its best ``budgets[t]``; the native search then
        stops there and pads the rest (id -1, value -inf), the PyTorch one finds all ``k``.
        """
        if not 1 <= n_valid <= self.n1 * self.n2:
            raise RouterConfigError(f"n_valid={n_valid} outside the {self.n1}x{self.n2} grid")
        if self._native(q):  # one C loop per query: score both halves, keep each top-k, merge
            return _kernels.pk_search(
                q.contiguous(), self.keys1.detach(), self.keys2.detach(), k, n_valid, budgets
            )
        e, n2 = self.half, self.n2
        q1 = q[..., :e].transpose(0, 1).contiguous()  # [H, T, e]
        q2 = q[..., e:].transpose(0, 1).contiguous()
        k1s, k2s = self.keys1.detach(), self.keys2.detach()
        f, r = divmod(n_valid, n2)  # full grid rows, valid entries of the partial row
        me = self.max_elems
        v1, i1 = topk_ip(q1, k1s, k, stop=f, max_elems=me)  # [H, T, k1]
        if r:
            va, ia = topk_ip(q2, k2s, k, stop=r, max_elems=me)
            vb, ib = topk_ip(q2, k2s, k, start=r, max_elems=me)
            v2, i2 = merge_topk([va, vb], [ia, ib], k)
        else:
            v2, i2 = topk_ip(q2, k2s, k, max_elems=me)
        # Only pairs that can make the top-k of the sum (v1, v2 are sorted): ~k ln k, not k**2
        pairs = sorted_pair_candidates(v1.shape[-1], v2.shape[-1], k, q.device)
        first, second = pairs // v2.shape[-1], pairs % v2.shape[-1]
        vals = [v1[..., first] + v2[..., second]]  # [H, T, P]
        idx = [i1[..., first] * n2 + i2[..., second]]
        if r:  # the partial row f, paired with the first r sub-keys of half b
            s1f = torch.einsum("hte,he->ht", q1, k1s[:, f])
            vals.append(s1f[..., None] + va)
            idx.append(f * n2 + ia)
        v, i = merge_topk(vals, idx, k)
        return i.transpose(0, 1), v.transpose(0, 1)

    def score(self, q: Tensor, ids: Tensor) -> Tensor:
        """Differentiable scores ``[T, H, k]`` of grid ids ``[T, H, k]`` under each head."""
        e = self.half
        h = torch.arange(self.heads, device=ids.device)[None, :, None]
        # index_select on the flattened keys, not keys[h, i]: its backward is an index_add
        # instead of an accumulating index_put (which sorts), about 2x faster forward + back
        k1 = torch.index_select(
            self.keys1.reshape(-1, e), 0, (h * self.n1 + ids // self.n2).flatten()
        )
        k2 = torch.index_select(
            self.keys2.reshape(-1, e), 0, (h * self.n2 + ids % self.n2).flatten()
        )
        k1, k2 = k1.view(*ids.shape, e), k2.view(*ids.shape, e)  # [T, H, k, e]
        # products summed over e, not [T, H, k, e] @ [T, H, e, 1]: a batch of T * H tiny
        # matrix-vector products is the slowest shape for bmm on the CPU (3-4x here)
        return (k1 * q[..., None, :e]).sum(-1) + (k2 * q[..., None, e:]).sum(-1)

    def select(
        self, q: Tensor, k: int, n_valid: int, budgets: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Top-k rows of ``max_h score_h`` over ``[0, n_valid)``: ``(ids, scores)``, ``[T, k]``.

        Heads are merged into one ranked list (a row two heads both chose appears once, with
        its better score): the consumer sees one list of rows per input. With ``budgets``,
        only each input's first ``budgets[t]`` entries are exact (see :meth:`search`).
        """
        ids, vals = self.search(q, k, n_valid, budgets)  # [T, H, k]
        if self._native(q):  # the search's own scores, with a fused backward
            scores = _NativeScores.apply(q, self.keys1, self.keys2, ids, vals)
        else:
            scores = self.score(q, ids)
        if self.heads == 1:
            return ids[:, 0], scores[:, 0]
        flat_ids = ids.flatten(1)
        pos = merge_heads(flat_ids, vals.flatten(1), k)
        return flat_ids.gather(1, pos), scores.flatten(1).gather(1, pos)

    def dense_queries(self, q: Tensor) -> Tensor:
        """``[T, H, H * d_key]``: head h's query in block h, zeros elsewhere."""
        t, h, dk = q.shape
        eye = torch.eye(h, dtype=q.dtype, device=q.device)
        return (eye[None, :, :, None] * q[:, :, None, :]).reshape(t, h, h * dk)

    def dense_keys(self, ids: Tensor) -> Tensor:
        """``[n, H * d_key]`` materialised keys of grid ids ``[n]`` (all heads side by side)."""
        k1 = self.keys1[:, ids // self.n2]  # [H, n, e]
        k2 = self.keys2[:, ids % self.n2]
        return torch.cat([k1, k2], dim=-1).transpose(0, 1).reshape(ids.shape[0], -1)


def default_d_key(d_in: int) -> int:
    """An even key width: d_in clipped to [8, 64]."""
    return max(8, min(64, d_in)) // 2 * 2


class ProductKeyRouter(Router):
    """Exact, differentiable product-key routing over ``num_rows`` rows (up to 2**62).

    Each head finds its exact top-k rows; heads are merged into one ranked list of ``k``
    distinct rows, i.e. the exact top-k of ``max_h score_h(row)`` (checked against brute force
    in the tests). The sub-key search is chunked (``max_elems`` scores alive at once), so memory
    stays bounded at 10**6 sub-keys per half.
    """

    kind = "product_keys"
    Config = ProductKeyConfig
    stops_at_budget = True

    def __init__(self, config: ProductKeyConfig | None = None, /, **kwargs: Any) -> None:
        """``ProductKeyRouter(ProductKeyConfig(...))`` or the same fields as keywords."""
        config = build_config(ProductKeyConfig, config, kwargs)
        d_key = default_d_key(config.d_in) if config.d_key is None else config.d_key
        super().__init__(config.with_(d_key=d_key))
        self.pk = ProductKeys(
            d_in=config.d_in,
            grid_rows=config.num_rows,
            heads=config.heads,
            d_key=d_key,
            query_batchnorm=config.query_batchnorm,
            seed=config.seed,
            max_elems=config.max_elems,
        )

    def _candidates(
        self, x: Tensor, budgets: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Any, Any]:
        q = self.pk.queries(x)
        ids, scores = self.pk.select(q, self.k_max, self.num_rows, budgets)
        return ids, scores, None, None

    def dense_queries(self, x: Tensor) -> Tensor:
        return self.pk.dense_queries(self.pk.queries(x))

    def dense_keys(self, ids: Tensor) -> Tensor:
        return self.pk.dense_keys(ids)
