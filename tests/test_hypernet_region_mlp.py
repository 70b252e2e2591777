"""The region-conditioned generator: regions of ids, shared style, novelty, and a store whose
generator trains with its rows (what a trained row's value does when its base moves)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpsn
from dpsn.hypernet import RegionMLP, make_generator, novelty_from_counts, region_mlp_spec
from dpsn.index import LSHRouter, ProductKeyRouter
from dpsn.index._product_keys import grid_shape
from dpsn.pool import PoolLayer


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 10**9), seed=st.integers(0, 2**31))
def test_product_key_regions_are_the_routers_sub_keys(rows: int, seed: int) -> None:
    n1, n2 = grid_shape(rows)
    g = RegionMLP(dim=1, seed=0, rows=rows, region_dim=1, features=1, hidden=1, layers=0)
    assert [e.shape[0] for e in g.embeddings] == [n1, n2]
    ids = torch.randint(0, rows, (64,), generator=torch.Generator().manual_seed(seed))
    a, b = g.regions(ids)
    assert torch.equal(a * n2 + b, ids)
    assert int(a.max()) < n1 and int(b.max()) < n2


@pytest.mark.parametrize("rows", [1003, 4096, 5000])
def test_block_regions_are_the_region_routers(rows: int) -> None:
    router = LSHRouter(d_in=8, num_rows=rows, k=2, nbits=3)
    g = RegionMLP(dim=4, seed=0, rows=rows, region_map="block", num_regions=router.num_regions)
    ids = torch.arange(rows)
    (mine,) = g.regions(ids)
    assert torch.equal(mine, router.region_of(ids))
    spec = region_mlp_spec(router, region_dim=4)
    assert spec == {
        "kind": "region_mlp",
        "rows": rows,
        "region_map": "block",
        "num_regions": router.num_regions,
        "region_dim": 4,
    }
    pk = region_mlp_spec(ProductKeyRouter(d_in=8, num_rows=rows, k=2))
    assert pk["region_map"] == "product_keys" and pk["rows"] == rows


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="num_regions"):
        RegionMLP(dim=4, seed=0, rows=100, region_map="block")
    with pytest.raises(ValueError, match="exceeds rows"):
        RegionMLP(dim=4, seed=0, rows=5, region_map="block", num_regions=6)
    with pytest.raises(ValueError, match="region_map"):
        RegionMLP(dim=4, seed=0, rows=5, region_map="lsh")
    with pytest.raises(ValueError, match="exceeds"):
        RegionMLP(dim=4, seed=0, rows=2**62)
    with pytest.raises(ValueError, match="region_dim"):
        RegionMLP(dim=4, seed=0, rows=100, region_dim=0)


def test_initial_scale_is_close_to_std() -> None:
    g = make_generator("region_mlp", dim=64, seed=3, rows=10**6)
    rows = g(torch.arange(4000) * 250).detach()
    assert 0.8 < float(rows.std()) * math.sqrt(64) < 1.25


def test_a_step_on_some_rows_moves_their_region_only() -> None:
    """Training the region embeddings through rows of one sub-key moves the untrained rows
    that share a sub-key with them, and no row that shares none."""
    g = RegionMLP(dim=8, seed=1, rows=10_000)  # 100 x 100 grid
    g.requires_grad_(True)
    for p in (*g.weights, *g.biases):
        p.requires_grad_(False)  # only the region style trains here
    trained = torch.tensor([3 * 100 + 7, 3 * 100 + 9])  # sub-key a = 3
    same_a = torch.tensor([3 * 100 + 50])
    other = torch.tensor([40 * 100 + 60])
    before = g(torch.cat([same_a, other])).detach()
    opt = torch.optim.SGD(g.parameters(), lr=0.5)
    g(trained).sum().backward()
    opt.step()
    after = g(torch.cat([same_a, other])).detach()
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[1], before[1])


def test_novelty_is_a_frozen_input() -> None:
    g = RegionMLP(dim=8, seed=1, rows=400, region_map="block", num_regions=4)
    g.requires_grad_(True)
    assert not g.novelty[0].requires_grad and g.weights[0].requires_grad
    ids = torch.tensor([0, 150, 399])
    before = g(ids).detach()
    g.set_novelty(0, novelty_from_counts(torch.tensor([0.0, 10.0, 1e4, 5.0])))
    after = g(ids).detach()
    assert not torch.allclose(before, after)
    assert torch.allclose(novelty_from_counts(torch.tensor([0.0])), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="takes"):
        g.set_novelty(0, torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        g.set_novelty(0, torch.tensor([0.0, math.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="table"):
        g.set_novelty(1, torch.zeros(4))


def test_create_fills_in_rows_and_reopens_bit_identical(tmp_path) -> None:
    with dpsn.create(tmp_path / "s", rows=10_000, dim=6, seed=9, generator="region_mlp") as p:
        assert p.generator.config()["rows"] == 10_000
        want = p.read(torch.tensor([0, 5, 9_999]))
    with dpsn.open(tmp_path / "s") as p:
        assert p.generator.kind == "region_mlp"
        assert torch.equal(p.read(torch.tensor([0, 5, 9_999])), want)
    with pytest.raises(dpsn.errors.InvalidArgumentError, match="rows"):
        dpsn.create(
            tmp_path / "t",
            rows=99,
            dim=6,
            generator=RegionMLP(dim=6, seed=0, rows=100),
        )


def test_trained_generator_rows_follow_it_and_trained_rows_keep_base_plus_delta(tmp_path):
    """The rule of docs/generators.md: a row's value is always the current generator's base
    plus its delta. Untrained rows follow a new generator version for free; a trained row's
    delta is kept as it is, so its value moves with its base, which is what joint training
    optimised (every forward used the current base + the delta)."""
    d_in = d_out = 4
    rows = 2_500
    path = tmp_path / "s"
    pool = dpsn.create(path, rows=rows, dim=d_in + d_out, seed=2, generator="region_mlp")
    router = ProductKeyRouter(d_in=d_in, num_rows=rows, k=4, seed=0)
    layer = PoolLayer(pool, d_in, d_out, router=router, k=4, train_generator=True)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    untrained = torch.tensor([7, 1_234, 2_499])
    base0 = pool.read(untrained)
    g = torch.Generator().manual_seed(0)
    used = []
    for _ in range(4):
        x = torch.randn(32, d_in, generator=g)
        loss = (layer(x) - x.flip(-1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        used.append(layer.last_route.ids[layer.last_route.mask])
    trained = torch.unique(torch.cat(used))
    untrained = untrained[~torch.isin(untrained, trained)]
    assert len(untrained) > 0
    commit = layer.commit("joint")
    assert commit.generator == commit.id  # a new generator version
    with torch.no_grad():
        gen_now = pool.generator(untrained)
        value_trained = pool.read(trained)
        delta_trained = pool.delta(trained)
        base_trained = pool.generator(trained)
    assert not torch.allclose(gen_now, base0[: len(untrained)])  # the generator moved
    assert torch.equal(pool.read(untrained), gen_now)  # untrained rows followed it
    torch.testing.assert_close(value_trained, base_trained + delta_trained)
    pool.close()
    with dpsn.open(path) as p:  # the version persisted: the same values come back
        torch.testing.assert_close(p.read(trained), value_trained, rtol=0, atol=1e-6)
        torch.testing.assert_close(p.read(untrained), gen_now, rtol=0, atol=1e-6)


def test_novelty_set_on_an_open_pool_is_committed_as_a_generator_version(tmp_path) -> None:
    spec = {"kind": "region_mlp", "region_map": "block", "num_regions": 4, "hidden": 8}
    ids = torch.tensor([0, 30, 99])
    with dpsn.create(tmp_path / "s", rows=100, dim=4, generator=spec) as p:
        before = p.read(ids)
        p.generator.set_novelty(0, torch.tensor([1.0, 0.5, 0.25, 0.0]))
        after = p.read(ids)  # cached bases are refreshed: the weights' versions moved
        assert not torch.equal(before, after)
        c = p.commit("novelty")
        assert c.generator == c.id
    with dpsn.open(tmp_path / "s") as p:
        assert torch.equal(p.generator.novelty[0], torch.tensor([1.0, 0.5, 0.25, 0.0]))
        assert torch.equal(p.read(ids), after)
