"""Usage figures (fraction used, KL from uniform, Gini), sparse counting, and the budget map."""

from __future__ import annotations

import math

import pytest
import torch

from dpsn.index import Budget, RouterConfigError, usage_figures
from dpsn.index._usage import UsageCounter


def test_uniform_usage() -> None:
    fig = usage_figures(torch.full((100,), 7), 100)
    assert fig["fraction_used"] == 1.0
    assert fig["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert fig["gini"] == pytest.approx(0.0, abs=1e-12)


def test_one_row_takes_everything() -> None:
    n = 10**12
    fig = usage_figures(torch.tensor([5]), n)
    assert fig["fraction_used"] == 1e-12
    assert fig["kl_uniform"] == pytest.approx(math.log(n))
    assert fig["gini"] == pytest.approx(1 - 1 / n)


def test_gini_matches_dense_formula() -> None:
    counts = torch.tensor([0, 0, 3, 1, 0, 9, 2, 0])
    x = counts.double().sort().values
    n = len(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    want = float(((2 * i - n - 1) * x).sum() / (n * x.sum()))
    assert usage_figures(counts[counts > 0], n)["gini"] == pytest.approx(want)


def test_sparse_counter_matches_bincount() -> None:
    counter = UsageCounter(10**12)
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(30):  # enough distinct ids to force several consolidations
        ids = torch.randint(0, 40_000, (5_000,), generator=g) * 25_000_000
        counter.observe(ids)
        seen.append(ids)
    ids, counts = counter.counts()
    want_ids, want_counts = torch.unique(torch.cat(seen), return_counts=True)
    assert torch.equal(ids, want_ids) and torch.equal(counts, want_counts)


def test_budget_maps_complexity_to_k() -> None:
    b = Budget(k_min=2, k_max=10, signal="entropy", d_in=4)
    flat = torch.zeros(3, 10)
    peaked = torch.tensor([[50.0] + [0.0] * 9]).expand(3, 10)
    x = torch.zeros(3, 4)
    assert b.k_for(b.complexity(x, flat, None)).tolist() == [10, 10, 10]
    assert b.k_for(b.complexity(x, peaked, None)).tolist() == [2, 2, 2]
    b.observe(torch.tensor([2, 10]))
    assert b.mean_k == 6 and b.compute_saved == pytest.approx(0.4)


def test_calibrated_budget_spreads_over_the_range() -> None:
    b = Budget(k_min=4, k_max=20, signal="entropy", d_in=4)
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.05, 5.0, 400)[:, None]  # from flat to peaked score profiles
    scores = torch.randn(400, 20, generator=g) * scale
    x = torch.zeros(400, 4)
    raw = b.raw(x, scores, None)
    b.calibrate(raw)
    k = b.k_for(b.complexity(x, scores, None))
    assert int(k.min()) == 4 and int(k.max()) == 20
    assert abs(float(k.float().mean()) - 12) < 1.0  # even spread: mean near the midpoint
    # monotone: a flatter profile never gets fewer rows
    order = raw.argsort()
    assert bool((k[order][1:] >= k[order][:-1]).all())


def test_learned_budget_is_not_calibrated() -> None:
    b = Budget(k_min=1, k_max=4, signal="learned", d_in=4)
    with pytest.raises(RouterConfigError):
        b.calibrate(torch.rand(10))


def test_learned_head_is_seeded_and_leaves_the_global_rng_alone() -> None:
    rng = torch.get_rng_state()
    a = Budget(k_min=1, k_max=8, signal="learned", d_in=4, seed=3)
    torch.manual_seed(99)  # the global RNG must not matter
    b = Budget(k_min=1, k_max=8, signal="learned", d_in=4, seed=3)
    c = Budget(k_min=1, k_max=8, signal="learned", d_in=4, seed=4)
    torch.set_rng_state(rng)
    assert a.head is not None and b.head is not None and c.head is not None
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert bool((a.head.weight.abs() <= 0.5).all())  # default Linear init: U(-1/sqrt(d), ..)
    rng = torch.get_rng_state()
    Budget(k_min=1, k_max=8, signal="learned", d_in=4)
    assert torch.equal(rng, torch.get_rng_state())
