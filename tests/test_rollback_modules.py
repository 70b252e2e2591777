"""A rollback restores the module configurations of its target (issue 24): what
``PoolLayer.from_store`` rebuilds after a rollback is the layer that trained the target's rows,
and a configuration saved after the target is gone again."""

import torch

import dpsn
from dpsn.index import ProductKeyRouter
from dpsn.store import PersistedStore
from dpsn.store.rollback import roll_back

SMALL = {"kind": "hashed_slices", "memory_size": 256}


def roll(path, target):
    with PersistedStore.open(path, writable=True) as store:
        return roll_back(store, target)


def test_rollback_restores_the_module_configurations_of_its_target(tmp_path):
    path = tmp_path / "s"
    with dpsn.create(path, 100, 4, generator=SMALL) as p:
        p.commit("no modules")  # commit 2
        p.save_module("a", {"x": 1})
        p.write([1], torch.ones(1, 4))
        p.commit("a=1")  # commit 3
        p.save_module("a", {"x": 2})
        p.save_module("b", {"y": 1})
        p.write([2], torch.ones(1, 4))
        p.commit("a=2, b")  # commit 4
        assert p.modules() == {"a": {"x": 2}, "b": {"y": 1}}
    rec = roll(path, 3)
    assert rec is not None and rec.id == 5
    with dpsn.open(path) as r:
        assert r.modules() == {"a": {"x": 1}}  # b, saved after the target, is gone
        assert torch.equal(r.delta(torch.tensor([2])), torch.zeros(1, 4))
    roll(path, 2)
    with dpsn.open(path) as r:
        assert r.modules() == {}
    roll(path, 4)  # and forward again, as a rollback is an ordinary commit
    with dpsn.open(path) as r:
        assert r.modules() == {"a": {"x": 2}, "b": {"y": 1}}


def test_rollback_then_from_store_rebuilds_the_layer_of_the_target(tmp_path):
    path = tmp_path / "s"
    pool = dpsn.create(path, 256, 6 + 3, generator=SMALL)
    router = ProductKeyRouter(d_in=6, num_rows=256, k=4, seed=0)
    layer = dpsn.PoolLayer(pool, 6, 3, router=router, k=4)
    layer(torch.randn(5, 6)).sum().backward()
    target = layer.commit("k=4").id
    wide = dpsn.PoolLayer(pool, 6, 3, router=router, k=4, activation="relu")
    wide(torch.randn(5, 6)).sum().backward()
    wide.commit("relu")
    assert dpsn.PoolLayer.from_store(dpsn.open(path)).activation == "relu"
    pool.close()
    roll(path, target)
    with dpsn.open(path) as r:
        rebuilt = dpsn.PoolLayer.from_store(r)
        assert rebuilt.activation == layer.activation != "relu"
        assert rebuilt.config() == layer.config()
