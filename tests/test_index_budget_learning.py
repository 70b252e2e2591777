"""How a learned budget gets its task signal: through each row's *output* (``RouteResult.keep``
and ``RouteResult.gates()``), not through the softmax scores, so that it does not collapse to
``k_min`` without a price; and a price still buys fewer rows."""

from __future__ import annotations

import pytest
import torch

import dpsn
from dpsn.index import ProductKeyRouter
from dpsn.index._budget import KEEP_TEMPERATURE
from dpsn.pool import PoolLayer


def _router(cost: float = 0.0) -> ProductKeyRouter:
    return ProductKeyRouter(
        d_in=8, num_rows=400, k=6, k_min=1, budget="learned", budget_cost=cost, seed=1
    )


def _edge(r: ProductKeyRouter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s [T, K], dk_soft/dbias [T]) of the module docstring's formula."""
    c = torch.sigmoid(r.budget.head(x).squeeze(-1)).detach()
    k_soft = 1 + 5 * c
    s = torch.sigmoid((k_soft[:, None] - torch.arange(6) - 0.5) / KEEP_TEMPERATURE)
    return s, 5 * c * (1 - c)


def test_keep_is_the_soft_edge_on_kept_rows_and_absent_outside_training() -> None:
    r = _router()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    route = r(x)
    s, _ = _edge(r, x)
    assert route.keep is not None
    torch.testing.assert_close(route.keep.detach(), torch.where(route.mask, s, 0))
    kept = route.keep.detach()[route.mask]
    assert float(kept.min()) >= 0.5 - 1e-6  # every kept row weighs at least half
    want = torch.softmax(route.scores.detach(), -1) * route.keep.detach()
    torch.testing.assert_close(route.gates().detach(), want)
    with torch.no_grad():
        plain = r(x)
    assert plain.keep is None  # nothing to train: every kept row weighs fully
    assert torch.equal(plain.gates(), torch.softmax(plain.scores, -1))


def test_the_head_gradient_is_each_rows_output_share_at_the_budget_edge() -> None:
    """d/d(bias) of sum(gates * w) is sum_j softmax_j w_j ds_j/dk_soft dk_soft/dbias over kept
    rows: the budget scales the rows' outputs and is not renormalised by the softmax (the old
    path put it on the scores, where the softmax made every edge row look harmful)."""
    r = _router()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    route = r(x)
    w = torch.randn(route.ids.shape, generator=torch.Generator().manual_seed(2))
    torch.where(route.mask, route.gates() * w, 0).sum().backward()
    s, dk = _edge(r, x)
    g = torch.softmax(route.scores.detach(), -1)
    per = torch.where(route.mask, g * w * s * (1 - s) / KEEP_TEMPERATURE, 0).sum(1) * dk
    assert float(r.budget.head.bias.grad) == pytest.approx(float(per.sum()), rel=1e-4)
    # the scores' own gradient no longer carries a budget term
    r.zero_grad()
    route = r(x)
    torch.where(route.mask, route.scores, 0).sum().backward()
    assert r.budget.head.bias.grad is None or float(r.budget.head.bias.grad.abs()) == 0.0


def _mean_k(tmp_path, price: float, steps: int = 40) -> tuple[float, float]:
    d_in = d_out = 8
    pool = dpsn.create(tmp_path / f"s{price}", rows=4096, dim=d_in + d_out, seed=3, cache_rows=4096)
    r = ProductKeyRouter(
        d_in=d_in, num_rows=4096, k=8, k_min=1, budget="learned", budget_cost=price, seed=2
    )
    layer = PoolLayer(pool, d_in, d_out, router=r, k=8, row_lr=0.05)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_in, d_out, generator=g)
    start = None
    for _ in range(steps):
        x = torch.randn(64, d_in, generator=g)
        loss = (layer(x) - torch.tanh(x @ w)).square().mean()
        start = float(layer.last_route.k.float().mean()) if start is None else start
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        k = layer.router(torch.randn(256, d_in, generator=g)).k.float().mean()
    pool.close()
    return float(k), start


@pytest.mark.slow  # two short trainings: ~6 s alone, more on a loaded machine
def test_without_a_price_the_budget_does_not_collapse_and_a_price_lowers_it(tmp_path) -> None:
    free, start = _mean_k(tmp_path, 0.0)
    dear, _ = _mean_k(tmp_path, 0.05)
    # at price 0 more rows help this task: the head grows k (the score-path signal ended at
    # ~4.9 here and a straight-through one at ~5.3, from ~4.6; this one at ~6.0)
    assert free > start + 1.0
    assert dear < free - 1.0  # a price buys fewer rows
