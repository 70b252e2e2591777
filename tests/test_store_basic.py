"""The pool API on real stores: rows, staging, commits, history, info."""

import numpy as np
import pytest
import torch

import dpsn


def test_unwritten_rows_are_procedural_and_deterministic(pool, store_path):
    ids = torch.tensor([0, 5, 10**12 - 1, 5])
    rows = pool.read(ids)
    assert rows.shape == (4, 16) and rows.dtype == torch.float32
    assert torch.equal(rows, pool.base(ids))
    assert torch.equal(rows[1], rows[3])
    assert torch.equal(pool.delta(ids), torch.zeros(4, 16))
    pool.close()
    with dpsn.open(store_path) as again:
        assert torch.equal(again.read(ids), rows)


def test_write_stages_and_commit_persists(pool, store_path):
    ids = torch.tensor([3, 99, 10**11])
    d = torch.randn(3, 16)
    pool.write(ids, d)
    assert torch.equal(pool.delta(ids), d)
    assert torch.allclose(pool.read(ids), pool.base(ids) + d)
    c = pool.commit("first")
    assert c.id == 2 and c.rows_written == 3 and c.persisted_rows == 3 and c.message == "first"
    assert len(c.provenance) == 32
    pool.close()
    with dpsn.open(store_path) as r:
        assert torch.equal(r.delta(ids), d)
        assert torch.equal(r.read(ids), (r.base(ids) + d))
        assert [x.id for x in r.log()] == [1, 2]


def test_read_accepts_any_shape_and_numpy(pool):
    ids = np.array([[1, 2], [3, 4]], dtype=np.int32)
    assert pool.read(ids).shape == (2, 2, 16)
    assert pool.read(7).shape == (1, 16)
    assert pool.read([]).shape == (0, 16)


def test_add_accumulates_and_duplicates_sum(pool):
    ids = torch.tensor([1, 1, 2])
    pool.write(ids, torch.ones(3, 16), add=True)
    assert torch.equal(pool.delta([1, 2]), torch.tensor([[2.0] * 16, [1.0] * 16]))
    pool.commit()
    pool.write([2], torch.ones(1, 16), add=True)  # adds to the committed delta
    assert torch.equal(pool.delta([2]), torch.full((1, 16), 2.0))


def test_replace_with_duplicates_keeps_last(pool):
    d = torch.arange(3 * 16, dtype=torch.float32).reshape(3, 16)
    pool.write([5, 6, 5], d)
    assert torch.equal(pool.delta([5, 6]), d[[2, 1]])


def test_drop_returns_rows_to_procedural(pool, store_path):
    pool.write([1, 2, 3], torch.ones(3, 16))
    pool.commit()
    pool.drop([2, 777])
    assert torch.equal(pool.read([2]), pool.base([2]))
    c = pool.commit("drop")
    assert c.rows_dropped == 1 and c.persisted_rows == 2
    pool.write([2], torch.full((1, 16), 5.0))  # a write after a drop brings the row back
    assert torch.equal(pool.delta([2]), torch.full((1, 16), 5.0))
    pool.discard()
    assert torch.equal(pool.delta([2]), torch.zeros(1, 16))


def test_snapshot_and_time_travel(pool, store_path):
    pool.write([1], torch.ones(1, 16))
    first = pool.commit("one")
    pool.snapshot("v1")
    pool.write([1], torch.full((1, 16), 2.0))
    pool.write([9], torch.full((1, 16), 3.0))
    pool.commit("two")
    pool.drop([1])
    pool.commit("three")
    with dpsn.open(store_path, at="v1") as v1:
        assert v1.head == first.id
        assert torch.equal(v1.delta([1, 9]), torch.stack([torch.ones(16), torch.zeros(16)]))
        with pytest.raises(dpsn.errors.ReadOnlyError):
            v1.write([1], torch.ones(1, 16))
    with dpsn.open(store_path, at=4) as v3:  # an unpinned commit, rebuilt from history
        assert torch.equal(v3.delta([1, 9]), torch.stack([torch.zeros(16), torch.full((16,), 3.0)]))
    with dpsn.open(store_path, at=3) as v2:
        assert torch.equal(v2.delta([1]), torch.full((1, 16), 2.0))
    assert pool.snapshots() == {"v1": first.id}


def test_gc_keeps_head_and_snapshots(pool, store_path):
    pool.write([1], torch.ones(1, 16))
    pool.commit()
    pool.snapshot("keep")
    pool.write([1], torch.full((1, 16), 2.0))
    pool.commit()
    pool.write([1], torch.full((1, 16), 3.0))  # supersedes the previous segment entirely
    pool.commit()
    result = pool.gc()
    assert len(result["removed_segments"]) == 1
    assert pool.verify().ok
    with dpsn.open(store_path, at="keep") as k:
        assert torch.equal(k.delta([1]), torch.ones(1, 16))
    with pytest.raises(dpsn.errors.SnapshotUnavailableError):
        dpsn.open(store_path, at=3)
    assert torch.equal(pool.delta([1]), torch.full((1, 16), 3.0))


def test_reader_keeps_its_snapshot_until_refresh(pool, store_path):
    pool.write([1], torch.ones(1, 16))
    pool.commit()
    with dpsn.open(store_path) as reader:
        pool.write([1], torch.full((1, 16), 2.0))
        pool.commit()
        assert torch.equal(reader.delta([1]), torch.ones(1, 16))
        assert reader.refresh() == 3
        assert torch.equal(reader.delta([1]), torch.full((1, 16), 2.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_round_trip(tmp_path, dtype):
    with dpsn.create(tmp_path / "s", rows=1000, dim=8, dtype=dtype) as p:
        d = torch.randn(4, 8).to(dtype)
        p.write([1, 2, 3, 999], d)
        p.commit()
    with dpsn.open(tmp_path / "s") as r:
        assert r.dtype == dtype
        assert torch.equal(r.delta([1, 2, 3, 999]), d)
        assert r.read([1]).dtype == dtype


def test_info_reports_size_and_compression(pool):
    ids = torch.arange(0, 4096)
    pool.write(ids, torch.zeros(4096, 16).index_fill_(1, torch.tensor([0]), 1.0))
    pool.commit()
    info = pool.info()
    assert info["virtual_parameters"] == 10**12 * 16
    assert info["persisted_rows"] == 4096
    assert info["delta_bytes_raw"] == 4096 * 16 * 4
    assert info["compression_ratio"] > 2  # mostly-zero deltas compress well
    assert info["bytes_on_disk"] > 0


def test_context_manager_releases_writer_lock(store_path):
    with dpsn.create(store_path, rows=10, dim=4), pytest.raises(dpsn.errors.StoreLockedError):
        dpsn.open(store_path, mode="r+")
    with dpsn.open(store_path, mode="r+") as again:
        assert again.writable


def test_generators_persist_and_reload(tmp_path):
    for kind in ("hashed_slices", "rf_mlp"):
        p = dpsn.create(tmp_path / kind, rows=10**6, dim=32, seed=3, generator=kind)
        rows = p.read(torch.arange(100))
        p.close()
        with dpsn.open(tmp_path / kind) as r:
            assert r.generator.kind == kind
            assert torch.equal(r.read(torch.arange(100)), rows)


def test_commit_with_nothing_staged_is_a_valid_empty_commit(pool):
    c = pool.commit("noop")
    assert c.rows_written == 0 and c.segment is None
    assert pool.verify().ok


def test_routers_persist_with_commits_and_join_provenance(pool, store_path):
    from dpsn.index import ProductKeyRouter

    router = ProductKeyRouter(d_in=8, num_rows=pool.rows, k=4)
    x = torch.randn(5, 8)
    expected = router(x).ids
    pool.save_router("main", router)
    c1 = pool.commit("router")
    assert c1.routers["main"]["version"] == c1.id
    c2 = pool.commit("unchanged router is not written again")
    assert c2.routers == c1.routers
    with torch.no_grad():
        next(router.parameters()).add_(1.0)
    changed = router(x).ids
    c3 = pool.commit("changed router")
    assert c3.routers["main"]["version"] == c3.id
    assert c3.provenance != c2.provenance
    pool.close()
    with dpsn.open(store_path, at=c1.id) as old:
        assert torch.equal(old.load_router("main")(x).ids, expected)
        assert old.verify().ok
    with dpsn.open(store_path) as r:
        assert torch.equal(r.load_router("main")(x).ids, changed)
        assert r.routers()["main"]["version"] == c3.id
        with pytest.raises(dpsn.errors.SnapshotNotFoundError):
            r.load_router("other")


def test_trained_generator_weights_are_committed_as_a_new_version(pool, store_path):
    ids = torch.arange(10)
    with torch.no_grad():
        pool.generator.memory.mul_(3.0)
    trained = pool.read(ids).clone()
    c = pool.commit("generator trained")
    assert c.generator == c.id
    pool.close()
    with dpsn.open(store_path) as r:
        assert torch.equal(r.read(ids), trained)
    with dpsn.open(store_path, at=1) as original:
        assert torch.equal(original.read(ids) * 3.0, trained)
    with dpsn.open(store_path, mode="r+") as w:
        result = w.gc()
        assert result["stale_versions"] == ["data.zarr/generator/v00000001"]
    with pytest.raises(dpsn.errors.SnapshotUnavailableError):
        dpsn.open(store_path, at=1)
