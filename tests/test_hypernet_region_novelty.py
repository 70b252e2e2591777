"""``region_mlp``'s automatic novelty: the pool's row steps feed it, commits fold it in and
persist it, so nobody calls ``set_novelty_from_usage`` and a reopened store reads the same rows."""

from __future__ import annotations

import torch

import dpsn
from dpsn.hypernet import RegionMLP, make_generator, novelty_from_counts
from dpsn.index import ProductKeyRouter
from dpsn.pool import PoolLayer

D = 4
SPEC = {"kind": "region_mlp", "region_map": "block", "num_regions": 4, "hidden": 8}


def _train(layer: PoolLayer, steps: int, seed: int = 0) -> torch.Tensor:
    """``steps`` steps of a toy regression; the ids the router used, with repeats."""
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    used = []
    for _ in range(steps):
        x = torch.randn(16, D, generator=g)
        loss = (layer(x) - x.flip(-1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        used.append(layer.last_route.ids[layer.last_route.mask])
    return torch.cat(used)


def test_novelty_follows_row_steps_at_commit_and_reopens_bit_for_bit(tmp_path) -> None:
    path = tmp_path / "s"
    pool = dpsn.create(path, rows=100, dim=2 * D, seed=3, generator=SPEC, cache_rows=256)
    gen = pool.generator
    assert gen.config()["novelty_source"] == "usage"  # the default of a new generator
    assert torch.equal(gen.novelty[0], torch.ones(4))  # no region trained yet
    layer = PoolLayer(pool, D, D, router=ProductKeyRouter(d_in=D, num_rows=100, k=4), k=4)
    probe = torch.arange(100)
    before = pool.read(probe)
    used = _train(layer, 3)
    # a frozen generator's bases are cached: uses wait for the commit, no row moved yet
    assert torch.equal(gen.novelty[0], torch.ones(4))
    untrained = probe[~torch.isin(probe, used)]
    assert len(untrained) and torch.equal(pool.read(untrained), before[untrained])
    commit = layer.commit("trained")
    assert commit.generator == commit.id  # the refreshed novelty is a generator version
    want = torch.bincount(gen.regions(used)[0], minlength=4).float()
    assert torch.equal(gen.uses[0], want)
    assert torch.equal(gen.novelty[0], novelty_from_counts(want))
    assert bool((gen.novelty[0] < 1).any())
    after = pool.read(probe)
    assert not torch.equal(after[untrained], before[untrained])  # untrained rows followed it
    pool.close()
    with dpsn.open(path) as p:
        assert torch.equal(p.generator.uses[0], want)
        assert torch.equal(p.read(probe), after)


def test_a_generator_that_trains_moves_its_novelty_at_commits_only(tmp_path) -> None:
    pool = dpsn.create(tmp_path / "s", rows=100, dim=2 * D, seed=3, generator=SPEC)
    router = ProductKeyRouter(d_in=D, num_rows=100, k=4)
    layer = PoolLayer(pool, D, D, router=router, k=4, train_generator=True)
    gen = pool.generator
    used = _train(layer, 2)
    assert torch.equal(gen.novelty[0], torch.ones(4))  # not under the steps: at the commit
    layer.commit("trained")
    want = torch.bincount(gen.regions(used)[0], minlength=4).float()
    assert torch.equal(gen.uses[0], want)
    assert not gen.uses[0].requires_grad and not gen.novelty[0].requires_grad
    assert all(p.requires_grad for p in gen.weights)
    pool.close()


def test_manual_novelty_ignores_uses_and_a_config_without_the_option_is_manual() -> None:
    from dpsn.store._generator_shapes import generator_shapes

    manual = RegionMLP(dim=4, seed=0, rows=100, novelty_source="manual")
    manual.observe_uses(torch.tensor([0, 99]), torch.tensor([3, 1]))
    assert not manual.refresh_from_uses() and torch.equal(manual.novelty[0], torch.zeros(10))
    old = {k: v for k, v in manual.config().items() if k != "novelty_source"}  # a 2026 manifest
    want = {k: list(v.shape) for k, v in manual.state_dict().items()}
    assert generator_shapes("region_mlp", 4, old) == want
    assert RegionMLP.manifest_defaults == {"novelty_source": "manual"}
    auto = make_generator("region_mlp", dim=4, seed=0, rows=100)
    assert generator_shapes("region_mlp", 4, auto.config()) == {
        k: list(v.shape) for k, v in auto.state_dict().items()
    }
