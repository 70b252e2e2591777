"""A learned budget trained against its cost (``budget_cost``): values unchanged, the penalty's
gradient exact, and a price that really buys fewer rows in a trained PoolLayer."""

from __future__ import annotations

import pytest
import torch
import zarr

import dpsn
from dpsn.index import ProductKeyRouter, RouterConfigError, load_router, save_router
from dpsn.pool import PoolLayer


def router(cost: float, **kw) -> ProductKeyRouter:
    return ProductKeyRouter(
        d_in=8, num_rows=400, k=6, k_min=1, budget="learned", budget_cost=cost, seed=1, **kw
    )


def test_cost_needs_a_learned_head_and_a_finite_price() -> None:
    with pytest.raises(RouterConfigError, match="learned"):
        ProductKeyRouter(d_in=8, num_rows=400, k=6, k_min=1, budget="entropy", budget_cost=0.1)
    with pytest.raises(RouterConfigError, match="learned"):
        ProductKeyRouter(d_in=8, num_rows=400, k=6, budget_cost=0.1)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(RouterConfigError, match="budget_cost"):
            router(bad)


def test_routing_values_are_unchanged_by_the_training_path() -> None:
    r = router(0.5)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = r(x)
    trained = r(x)
    assert plain.cost is None and trained.cost is not None
    assert torch.equal(plain.ids, trained.ids) and torch.equal(plain.k, trained.k)
    assert torch.equal(plain.scores, trained.scores.detach())


def test_penalty_is_price_times_expected_k_and_reaches_the_head() -> None:
    price = 0.3
    r = router(price)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    route = r(x)
    c = torch.sigmoid(r.budget.head(x).squeeze(-1)).detach()
    assert float(route.cost.detach()) == pytest.approx(price * float((1 + 5 * c).mean()), rel=1e-6)
    # a loss the scores reach with zero weight: only the penalty's gradient is left
    (torch.where(route.mask, route.scores, 0).sum() * 0).backward()
    want = price * float((5 * c * (1 - c)).mean())  # d mean(k_soft) / d bias
    assert float(r.budget.head.bias.grad) == pytest.approx(want, rel=1e-5)


def test_config_round_trips_through_a_saved_router(tmp_path) -> None:
    r = router(0.25)
    group = zarr.open_group(str(tmp_path / "r"), mode="w", zarr_format=3)
    save_router(r, group)
    back = load_router(group)
    assert back.budget.cost == 0.25 and back.config().budget_cost == 0.25


def _mean_k_after_training(tmp_path, price: float) -> float:
    d_in = d_out = 8
    pool = dpsn.create(tmp_path / f"s{price}", rows=4096, dim=d_in + d_out, seed=3, cache_rows=4096)
    r = ProductKeyRouter(
        d_in=d_in, num_rows=4096, k=8, k_min=1, budget="learned", budget_cost=price, seed=2
    )
    layer = PoolLayer(pool, d_in, d_out, router=r, k=8, row_lr=0.05)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_in, d_out, generator=g)
    for _ in range(40):
        x = torch.randn(64, d_in, generator=g)
        loss = (layer(x) - torch.tanh(x @ w)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        k = layer.router(torch.randn(256, d_in, generator=g)).k.float().mean()
    pool.close()
    return float(k)


def test_a_price_buys_fewer_rows(tmp_path) -> None:
    free = _mean_k_after_training(tmp_path, 0.0)
    dear = _mean_k_after_training(tmp_path, 0.05)
    assert dear < free - 1.0
    assert dear < 3.0  # the head moved well below its starting point (~4.5)
