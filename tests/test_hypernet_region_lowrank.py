"""``region_mlp``'s per-region low-rank factors (a hypernetwork per cluster) and novelty set
from usage: opt-in, deterministic, per region, trained jointly and persisted as a generator
version."""

from __future__ import annotations

import pytest
import torch

import dpsn
from dpsn.hypernet import RegionMLP, make_generator, novelty_from_counts
from dpsn.index import ProductKeyRouter
from dpsn.pool import PoolLayer

BLOCK = {"region_map": "block", "num_regions": 5, "hidden": 8, "layers": 1}


def test_rank_is_opt_in_and_starts_at_the_plain_rows() -> None:
    plain = RegionMLP(dim=6, seed=3, rows=500, **BLOCK)
    low = RegionMLP(dim=6, seed=3, rows=500, region_rank=2, **BLOCK)
    assert "region_rank" not in plain.config()  # older stores' manifests stay as they were
    assert low.config()["region_rank"] == 2
    assert len(plain.factors_a) == 0 and low.factors_b[0].shape == (5, 6, 2)
    ids = torch.arange(500)
    assert torch.equal(low(ids), plain(ids))  # B starts at zero
    again = make_generator(low.kind, dim=6, seed=3, **low.config())
    assert torch.equal(again.factors_a[0], low.factors_a[0])  # from the seed, deterministic
    with pytest.raises(ValueError, match="region_rank"):
        RegionMLP(dim=6, seed=3, rows=500, region_rank=-1, **BLOCK)


def test_a_regions_factors_move_only_that_regions_rows() -> None:
    g = RegionMLP(dim=6, seed=3, rows=500, region_rank=2, **BLOCK)
    ids = torch.arange(500)
    before = g(ids).detach()
    with torch.no_grad():
        g.factors_b[0][2].fill_(1.0)  # region 2 of 5: rows 200..299
    after = g(ids).detach()
    moved = (after - before).abs().amax(dim=1) > 0
    assert torch.equal(moved, (ids >= 200) & (ids < 300))


def test_factors_train_with_the_model_and_persist_as_a_generator_version(tmp_path) -> None:
    d_in = d_out = 4
    rows = 900
    spec = {"kind": "region_mlp", "hidden": 8, "layers": 1, "region_rank": 2}
    pool = dpsn.create(tmp_path / "s", rows=rows, dim=d_in + d_out, seed=1, generator=spec)
    router = ProductKeyRouter(d_in=d_in, num_rows=rows, k=4, seed=0)
    layer = PoolLayer(pool, d_in, d_out, router=router, k=4, train_generator=True)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(32, d_in, generator=g)
        loss = (layer(x) - x.flip(-1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(pool.generator.factors_b[0].detach().abs().sum()) > 0  # B got a gradient, moved
    ids = torch.tensor([0, 450, 899])
    commit = layer.commit("joint")  # (it folds the steps' uses into novelty: rows move here)
    assert commit.generator == commit.id
    want = pool.read(ids)
    pool.close()
    with dpsn.open(tmp_path / "s") as p:
        assert p.generator.config()["region_rank"] == 2
        torch.testing.assert_close(p.read(ids), want, rtol=0, atol=1e-6)


def test_novelty_from_usage_sums_uses_per_region() -> None:
    g = RegionMLP(dim=4, seed=0, rows=100, region_map="block", num_regions=4, hidden=8)
    ids = torch.tensor([0, 1, 30, 99])
    counts = torch.tensor([3, 4, 10, 1])
    g.set_novelty_from_usage(ids, counts)
    want = novelty_from_counts(torch.tensor([7.0, 10.0, 0.0, 1.0]))
    assert torch.allclose(g.novelty[0], want)
    assert float(g.novelty[0][2]) == 1.0  # a region nobody used is fully novel
    pk = RegionMLP(dim=4, seed=0, rows=100, hidden=8)  # product keys: 10 x 10 sub-keys
    pk.set_novelty_from_usage(torch.tensor([23, 27]), torch.tensor([1, 1]))
    assert torch.allclose(pk.novelty[0][2], novelty_from_counts(torch.tensor(2.0)))
    assert torch.allclose(pk.novelty[1][3], novelty_from_counts(torch.tensor(1.0)))
    with pytest.raises(ValueError, match="rows"):
        g.set_novelty_from_usage(torch.tensor([100]), torch.tensor([1]))


@pytest.mark.parametrize(
    "config",
    [
        {"rows": 1000, "region_rank": 3},
        {"rows": 50, "region_map": "block", "num_regions": 7, "layers": 0, "region_rank": 1},
    ],
)
def test_store_shape_table_knows_the_factors(config) -> None:
    from dpsn.store._generator_shapes import generator_shapes

    gen = make_generator("region_mlp", dim=6, seed=0, **config)
    want = {k: list(v.shape) for k, v in gen.state_dict().items()}
    assert generator_shapes("region_mlp", 6, gen.config()) == want
