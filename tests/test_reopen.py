"""Modules that reopen with their store: a trained PoolLayer / PoolEmbedding, committed,
rebuilt by ``from_store`` from the configuration and router saved in the store, gives
bit-equal outputs; a fresh router on a store that holds a trained one warns; a damaged or
missing configuration is a typed error."""

import json
import warnings

import pytest
import torch

import dpsn
from dpsn.errors import CorruptStoreError, FreshRouterWarning, ModuleNotSavedError

SMALL = {"kind": "hashed_slices", "memory_size": 512}


def _train_layer(path, steps=4):
    torch.manual_seed(0)
    pool = dpsn.create(path, rows=10**6, dim=16, seed=1, generator=SMALL, cache_rows=4096)
    layer = dpsn.PoolLayer(pool, 8, 8, k=4, row_optimizer="adam", row_lr=0.05, row_clip=2.0)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(32, 8)
        loss = (layer(x) - x.flip(1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.commit("trained")
    return pool, layer


def test_layer_reopens_bit_equal(tmp_path):
    pool, layer = _train_layer(tmp_path / "s")
    x = torch.randn(64, 8)
    layer.eval()
    with torch.no_grad():
        want = layer(x)
    pool.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FreshRouterWarning)
        again = dpsn.PoolLayer.from_store(tmp_path / "s")
    assert not again.training and not again.pool.writable
    assert again.config() == layer.config()
    with torch.no_grad():
        got = again(x)
    assert torch.equal(got, want)
    again.pool.close()


def test_fresh_router_on_trained_store_warns_and_differs(tmp_path):
    pool, layer = _train_layer(tmp_path / "s")
    x = torch.randn(16, 8)
    layer.eval()
    with torch.no_grad():
        want = layer(x)
    pool.close()
    with dpsn.open(tmp_path / "s") as ro:
        with pytest.warns(FreshRouterWarning, match="from_store"):
            fresh = dpsn.PoolLayer(ro, 8, 8, k=4).eval()
        with torch.no_grad():
            assert not torch.equal(fresh(x), want)


def test_no_warning_on_untrained_store(tmp_path):
    with (
        dpsn.create(tmp_path / "s", rows=1000, dim=16, generator=SMALL) as pool,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error", FreshRouterWarning)
        dpsn.PoolLayer(pool, 8, 8, k=4)


def test_layer_reopens_writable_and_resumes(tmp_path):
    pool, layer = _train_layer(tmp_path / "s")
    pool.close()
    again = dpsn.PoolLayer.from_store(tmp_path / "s", mode="r+", cache_rows=1024)
    assert again.training and again.pool.writable
    assert again.row_optimizer.config() == layer.row_optimizer.config()
    x = torch.randn(8, 8)
    again(x).sum().backward()
    again.commit("more")
    assert again.pool.modules()["module"]["kind"] == "PoolLayer"
    again.pool.close()


def test_embedding_reopens_bit_equal(tmp_path):
    pool = dpsn.create(tmp_path / "e", rows=10**9, dim=8, seed=3, generator=SMALL)
    emb = dpsn.PoolEmbedding(pool, "max", padding_idx=0, include_last_offset=True, row_lr=0.3)
    ids = torch.tensor([5, 0, 9, 10**8, 5, 7])
    offsets = torch.tensor([0, 2, 4, 6])
    for _ in range(3):
        emb(ids, offsets).pow(2).sum().backward()
    emb.commit("emb")
    with torch.no_grad():
        want = emb(ids, offsets)
    pool.close()
    again = dpsn.PoolEmbedding.from_store(tmp_path / "e")
    assert (again.mode, again.padding_idx, again.include_last_offset) == ("max", 0, True)
    with torch.no_grad():
        assert torch.equal(again(ids, offsets), want)
    again.pool.close()


def test_from_store_errors(tmp_path):
    with dpsn.create(tmp_path / "s", rows=1000, dim=16, generator=SMALL) as pool:
        pool.commit("nothing")
    with pytest.raises(ModuleNotSavedError, match="no saved module"):
        dpsn.PoolLayer.from_store(tmp_path / "s")
    pool, _ = _train_layer(tmp_path / "t", steps=1)
    with pytest.raises(ModuleNotSavedError, match="PoolLayer"):
        dpsn.PoolEmbedding.from_store(pool)
    pool.close()
    with pytest.raises(TypeError, match=r"store path or a dpsn\.Pool"):
        dpsn.PoolLayer.from_store(42)


def test_damaged_config_is_corrupt_store(tmp_path):
    with dpsn.create(tmp_path / "s", rows=1000, dim=16, generator=SMALL) as pool:
        emb = dpsn.PoolEmbedding(pool)
        bad = emb.config() | {"row_optimizer": {"name": "adam", "lr": -1}}
        pool.save_module("module", bad)
        pool.commit("bad")
    with pytest.raises(CorruptStoreError, match="row optimizer"):
        dpsn.PoolEmbedding.from_store(tmp_path / "s")


def test_save_module_checks_json(tmp_path):
    with dpsn.create(tmp_path / "s", rows=1000, dim=16, generator=SMALL) as pool:
        with pytest.raises(TypeError, match="plain JSON"):
            pool.save_module("m", {"x": torch.zeros(1)})
        with pytest.raises(ValueError, match="JSON object"):
            pool.save_module("m", [1, 2])
        pool.save_module("m", {"a": 1})
        pool.commit("c")
        assert pool.modules() == {"m": {"a": 1}}
        # unchanged: the next commit carries it over from its parent
        pool.commit("d")
        assert pool.modules() == {"m": {"a": 1}}
        assert json.dumps(pool.modules())
