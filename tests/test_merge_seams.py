"""Where two features meet (found by a review of the merges of issues 20-27): levels and the
skip of non-finite row steps, config objects on every create/open path, rollback of protected
rows. Each test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpsn
from dpsn.errors import InvalidArgumentError, InvalidArgumentTypeError
from dpsn.pool import RowSGD
from dpsn.store import PersistedStore
from dpsn.store.rollback import roll_back


def test_a_skipped_row_step_on_a_levelled_pool_leaves_the_hierarchy_committable(tmp_path):
    p = dpsn.create(tmp_path / "s", 200, 6, levels=["slow", "fast"])
    g = torch.ones(3, 6)
    g[0, 0] = float("nan")
    with p.page_in(torch.tensor([1, 2, 3])) as b:
        b.apply_grads(g, RowSGD(lr=0.1))
    p.commit("after a skipped step")  # raised: NaN in the migration window's JSON
    assert torch.equal(p.delta(torch.tensor([1, 2, 3])), torch.zeros(3, 6))
    p.close()


def test_config_objects_are_checked_on_the_levelled_and_sharded_paths(tmp_path):
    with pytest.raises(InvalidArgumentError, match="sharded root has no levels"):
        dpsn.create(tmp_path / "a", 100, 4, shards=2, levels=["x", "y"])
    with pytest.raises(InvalidArgumentTypeError, match="StoreSpec"):
        dpsn.create(tmp_path / "b", 100, 4, shards=2, spec="x")
    with pytest.raises(InvalidArgumentError, match="rows"):
        dpsn.create(tmp_path / "c", 999, 4, levels=["x"], spec=dpsn.StoreSpec(rows=100, dim=4))
    with pytest.raises(InvalidArgumentTypeError, match="OpenOptions"):
        dpsn.create(tmp_path / "d", 100, 4, levels=["x"], options={"cache_rows": 0})
    for name in "abcd":
        assert not (tmp_path / name).exists()
    dpsn.create(tmp_path / "e", 100, 4, levels=["x", "y"]).close()
    with pytest.raises(InvalidArgumentTypeError, match="OpenOptions"):
        dpsn.open(tmp_path / "e", options="bad")
    with dpsn.open(tmp_path / "e", options=dpsn.OpenOptions(cache_rows=0)) as r:
        assert r.cache is None


def test_a_rollback_restores_the_protected_rows_of_its_target(tmp_path):
    p = dpsn.create(tmp_path / "s", 100, 4)
    p.write([1], torch.ones(1, 4))
    p.commit("two")
    p.protect([5])
    p.write([2], torch.ones(1, 4))
    p.commit("three")
    p.close()
    with PersistedStore.open(tmp_path / "s", writable=True) as store:
        roll_back(store, 2)
    with dpsn.open(tmp_path / "s") as r:
        assert np.asarray(r.protected).size == 0
        assert torch.equal(r.delta(torch.tensor([2])), torch.zeros(1, 4))


def test_a_gc_dry_run_needs_no_writer_in_python_either(tmp_path):
    path = tmp_path / "s"
    w = dpsn.create(path, 100, 4)
    for i in range(3):
        w.write([i], torch.ones(1, 4))
        w.commit(f"c{i}")
    before = sorted(p.name for p in (path / "data.zarr" / "segments").iterdir())
    plan = dpsn.gc(path, dry_run=True, keep_last=1)  # the writer still holds the lock
    assert plan["dry_run"] and "pinned" in plan
    with dpsn.open(path) as r:
        assert r.gc(dry_run=True)["dry_run"]
        with pytest.raises(dpsn.errors.ReadOnlyError):
            r.gc()
    assert sorted(p.name for p in (path / "data.zarr" / "segments").iterdir()) == before
    w.close()
