"""No forgetting as a library feature: protected rows (every executor, persisted with the
commit, checked on open and by verify, kept by gc), the lifecycle holding them, row selection
(the row trainer's hook and SparseFinetune), and frozen routing."""

import json
import shutil

import lmdb
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpsn
from dpsn.errors import CorruptStoreError, LifecycleError
from dpsn.pool import RowAdam, RowSGD

DIM = 6
SMALL = {"kind": "hashed_slices", "memory_size": 512}


def make(path, *, lifecycle=None, rows=1000, cache_rows=256):
    return dpsn.create(
        path,
        rows=rows,
        dim=DIM,
        seed=5,
        generator=SMALL,
        cache_rows=cache_rows,
        lifecycle=lifecycle,
    )


def train_embedding(pool, ids, steps=3, **kw):
    emb = dpsn.PoolEmbedding(pool, mode="sum", row_optimizer="adam", row_lr=0.1, **kw)
    for _ in range(steps):
        emb(ids).sum().backward()
    return emb


def test_protected_rows_take_no_update_from_an_embedding(tmp_path):
    pool = make(tmp_path / "s")
    ids = torch.tensor([[1, 5, 9], [2, 6, 9]])
    assert pool.protect([1, 2, 9]) == 3
    before = pool.read(torch.arange(12)).clone()
    train_embedding(pool, ids)  # Adam: momentum would move a row that got a zero gradient
    changed = (pool.read(torch.arange(12)) != before).any(1)
    assert changed.nonzero().flatten().tolist() == [5, 6]
    assert pool.stats()["rows_held"] == 3 * 3
    assert torch.equal(pool.delta([1, 2, 9]), torch.zeros(3, DIM))


def test_protected_rows_take_no_update_from_a_layer(tmp_path):
    pool = dpsn.create(tmp_path / "s", rows=4096, dim=8 + 4, seed=1, generator=SMALL)
    layer = dpsn.PoolLayer(pool, 8, 4, k=4, row_optimizer="adam", row_lr=0.05)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    layer(x).sum().backward()
    pool.commit()
    used = torch.from_numpy(pool.row_commits(torch.arange(4096)) > 0).nonzero().flatten()
    half = used[::2]
    pool.protect(half)
    before, others = pool.read(half).clone(), pool.read(used[1::2]).clone()
    for _ in range(3):
        layer(x).sum().backward()
    assert torch.equal(pool.read(half), before)
    assert not torch.equal(pool.read(used[1::2]), others)


def test_own_executor_on_the_public_contract_is_held_too(tmp_path):
    pool = make(tmp_path / "s")
    pool.set_state_width(RowAdam().state_width(DIM))
    pool.protect([3])
    with pool.page_in(torch.tensor([3, 4, 3])) as batch:
        batch.apply_grads(torch.ones(len(batch), DIM), RowAdam(lr=0.1))
    assert torch.equal(pool.delta([3]), torch.zeros(1, DIM))
    assert bool((pool.delta([4]) != 0).all())


def test_apply_grads_rows_mask(tmp_path):
    pool = make(tmp_path / "s")
    with pool.page_in(torch.tensor([1, 2, 3])) as batch:
        with pytest.raises(ValueError, match="bool tensor of shape"):
            batch.apply_grads(torch.ones(3, DIM), RowSGD(lr=1.0), rows=torch.tensor([1, 0, 1]))
        batch.apply_grads(
            torch.ones(3, DIM), RowSGD(lr=1.0), rows=torch.tensor([True, False, True])
        )
    assert pool.delta([1, 2, 3]).abs().sum(1).tolist() == [DIM, 0.0, DIM]


@given(
    protected=st.sets(st.integers(0, 40), max_size=20),
    used=st.lists(st.integers(0, 40), min_size=1, max_size=30),
)
def test_property_protected_rows_stay_bit_identical(tmp_path_factory, protected, used):
    pool = make(tmp_path_factory.mktemp("p") / "s", rows=64, cache_rows=16)
    try:
        pool.write([7, 11], torch.randn(2, DIM))
        pool.set_state_width(RowAdam().state_width(DIM))
        if protected:
            pool.protect(sorted(protected))
        before = pool.read(torch.arange(41)).clone()
        for _ in range(2):
            with pool.page_in(torch.tensor(used)) as batch:
                batch.apply_grads(torch.randn(len(batch), DIM), RowAdam(lr=0.1))
        after = pool.read(torch.arange(41))
        for i in protected:
            assert torch.equal(after[i], before[i])
        for i in set(used) - protected:
            assert not torch.equal(after[i], before[i])
    finally:
        pool.close()


# -- persistence -----------------------------------------------------------------------------------


def test_protected_set_is_persisted_with_the_commit(tmp_path):
    path = tmp_path / "s"
    pool = make(path)
    pool.protect(torch.tensor([[4, 2], [2, 900]]))
    assert pool.protected.tolist() == [2, 4, 900]
    pool.commit("protect")
    pool.snapshot("p1")
    pool.unprotect([4])
    pool.discard()  # back to the committed set
    assert pool.protected.tolist() == [2, 4, 900]
    assert pool.unprotect([4, 5]) == 2
    pool.commit("less")
    pool.close()
    with dpsn.open(path) as reader:
        assert reader.protected.tolist() == [2, 900]
        assert reader.verify().ok
    with dpsn.open(path, at="p1") as old:
        assert old.protected.tolist() == [2, 4, 900]
    with dpsn.open(path, mode="r+") as pool:
        assert pool.unprotect() == 0
        pool.commit()
        assert pool.protected.numel() == 0
        result = pool.gc()
        # the snapshot's set is kept, the one only an old commit used is gone
        assert [p for p in result["stale_versions"] if "protected" in p] == [
            "data.zarr/protected/0000000000000003"
        ]
    with dpsn.open(path, at="p1") as old:
        assert old.protected.tolist() == [2, 4, 900]


def test_damaged_protected_set_is_a_typed_error_and_a_verify_problem(tmp_path):
    path = tmp_path / "s"
    with make(path) as pool:
        pool.protect([1, 2, 3])
        pool.commit()
    chunk = next((path / "data.zarr" / "protected").rglob("c/0"))
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="protected rows"):
        dpsn.open(path)
    from dpsn.store import PersistedStore

    with PersistedStore.open(path, writable=False) as store:
        report = store.verify()
    assert any("protected rows" in p for p in report.problems)


def test_malformed_protected_record_is_corruption():
    from dpsn.store import Commit

    good = Commit(1, None, 0.0, "", 0, 0, 0, None, 1, "x").to_json()
    Commit.from_json(good)
    for bad in ({"version": 0, "rows": 1, "xxh64": 1}, {"version": 2}, [1], "x"):
        with pytest.raises(CorruptStoreError, match="protected"):
            Commit.from_json({**good, "protected": bad})


def test_protect_needs_ids_or_phase_and_a_writable_pool(tmp_path):
    path = tmp_path / "s"
    with make(path) as pool:
        with pytest.raises(ValueError, match="needs ids"):
            pool.protect()
        with pytest.raises(ValueError, match="phase must be"):
            pool.protect(phase="hot")
        with pytest.raises(LifecycleError):
            pool.protect(phase="screened")
        with pytest.raises(IndexError):
            pool.protect([10**6])
        pool.commit()
    with dpsn.open(path) as reader, pytest.raises(dpsn.errors.ReadOnlyError):
        reader.protect([1])


# -- the lifecycle ---------------------------------------------------------------------------------


def test_screened_rows_protected_neither_train_nor_fade(tmp_path):
    life = dpsn.Lifecycle(
        enter=0.05, exit=0.01, min_uses=2, decay=0.5, prune_rms=1e-2, max_idle=2, warmup=1
    )
    pool = make(tmp_path / "s", lifecycle=life)
    pool.set_state_width(0)
    old = torch.tensor([10, 11, 12])
    for _ in range(20):
        with pool.page_in(old) as batch:
            batch.apply_grads(torch.full((3, DIM), -0.1), RowSGD(lr=1.0))
    pool.consolidate()
    assert pool.phase(old).tolist() == [1, 1, 1]
    assert pool.protect(phase="screened") == 3
    kept = pool.delta(old).clone()
    new = torch.tensor([20, 21])
    for _ in range(12):  # a new task: old rows unused, consolidations every few steps
        for _ in range(5):
            with pool.page_in(torch.cat([new, old[:1]])) as batch:
                batch.apply_grads(torch.ones(len(batch), DIM), RowSGD(lr=0.1))
        pool.consolidate()
        pool.commit()
    assert torch.equal(pool.delta(old), kept)
    assert pool.phase(old).tolist() == [1, 1, 1]
    pool.unprotect(phase="screened")
    assert pool.protected.numel() == 0
    pool.close()


# -- row selection ---------------------------------------------------------------------------------


def test_row_selection_hook_sees_the_batch_and_may_change_grads(tmp_path):
    pool = make(tmp_path / "s")
    seen = []

    def only_even(pool_, batch, grads):
        seen.append(batch.ids.tolist())
        grads.mul_(2.0)
        return batch.ids % 2 == 0

    emb = dpsn.PoolEmbedding(pool, mode="sum", row_optimizer="sgd", row_lr=1.0)
    emb.trainer = type(emb.trainer)(pool, emb.row_optimizer, row_selection=only_even)
    emb(torch.tensor([[1, 2, 3, 4]])).sum().backward()
    assert seen == [[1, 2, 3, 4]]
    d = pool.delta([1, 2, 3, 4])
    assert d[[0, 2]].abs().sum() == 0 and torch.allclose(d[[1, 3]], torch.full((2, DIM), -2.0))
    with pytest.raises(TypeError, match="row_selection"):
        dpsn.PoolEmbedding(pool, row_selection=3)


def test_sparse_finetune_updates_the_rows_new_against_the_background(tmp_path):
    life = dpsn.Lifecycle(warmup=1)
    pool = make(tmp_path / "s", lifecycle=life)
    emb = dpsn.PoolEmbedding(pool, mode="sum", row_optimizer="sgd", row_lr=0.1)
    for _ in range(30):  # background: rows 1 and 2 used every step
        emb(torch.tensor([[1, 2]])).sum().backward()
    pool.commit()
    pool.snapshot("background")
    bg = dpsn.open(tmp_path / "s", at="background")
    for background in (None, bg):
        sel = dpsn.SparseFinetune(top=1, background=background)
        emb.trainer = type(emb.trainer)(pool, emb.row_optimizer, row_selection=sel)
        before = pool.read([1, 2, 7]).clone()
        emb(torch.tensor([[1, 2, 7]])).sum().backward()
        changed = (pool.read([1, 2, 7]) != before).any(1).tolist()
        assert changed == [False, False, True]  # 7: unused by the background
    half = dpsn.SparseFinetune(top=0.5)
    emb.trainer = type(emb.trainer)(pool, emb.row_optimizer, row_selection=half)
    emb(torch.tensor([[1, 2, 7, 8]])).sum().backward()
    assert pool.stats()["rows_held"] == 2 + 2 + 2
    bg.close()
    with pytest.raises(ValueError):
        dpsn.SparseFinetune(top=0)
    with pytest.raises(ValueError):
        dpsn.SparseFinetune(top=1.5)
    no_life = make(tmp_path / "n")
    with pytest.raises(LifecycleError):
        dpsn.SparseFinetune(top=1, background=no_life)
    e2 = dpsn.PoolEmbedding(no_life, row_selection=dpsn.SparseFinetune(top=1))
    with pytest.raises(LifecycleError, match="no row lifecycle"):
        e2(torch.tensor([[1, 2]])).sum().backward()


def test_sparse_finetune_changes_at_a_task_boundary_without_a_new_layer(tmp_path):
    pool = make(tmp_path / "s", lifecycle=dpsn.Lifecycle(warmup=1))
    sel = dpsn.SparseFinetune(top=1.0)  # the first task: every row
    emb = dpsn.PoolEmbedding(pool, mode="sum", row_optimizer="sgd", row_lr=0.1, row_selection=sel)
    for _ in range(30):
        before = pool.read([1, 2]).clone()
        emb(torch.tensor([[1, 2]])).sum().backward()
        assert (pool.read([1, 2]) != before).all(1).tolist() == [True, True]
    pool.commit()
    pool.snapshot("task-1")
    with dpsn.open(tmp_path / "s", at="task-1") as bg:
        sel.background, sel.top = bg, 1  # the next task: what the first one used stays
        before = pool.read([1, 2, 7]).clone()
        emb(torch.tensor([[1, 2, 7]])).sum().backward()
        assert (pool.read([1, 2, 7]) != before).any(1).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="fraction"):
        sel.top = 1.5
    with pytest.raises(TypeError):
        sel.top = True
    with pytest.raises(ValueError, match="smooth"):
        sel.smooth = 0.0
    with pytest.raises(LifecycleError):
        sel.background = make(tmp_path / "n")
    assert sel.top == 1 and sel.smooth == 0.01


# -- frozen routing --------------------------------------------------------------------------------


def test_freeze_routing_keeps_router_and_batchnorm_still(tmp_path):
    pool = dpsn.create(tmp_path / "s", rows=4096, dim=8 + 4, seed=1, generator=SMALL)
    layer = dpsn.PoolLayer(pool, 8, 4, k=4)
    model = torch.nn.Sequential(layer)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert layer.freeze_routing() is layer
    state = {k: v.clone() for k, v in layer.router.state_dict().items()}
    model.train()
    assert not layer.router.training and layer.training
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    for k, v in layer.router.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(not p.requires_grad for p in layer.router.parameters())
    layer.freeze_routing(False)
    model.train()
    assert layer.router.training
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    assert any(not torch.equal(v, state[k]) for k, v in layer.router.state_dict().items())


def test_commit_record_lists_the_protected_set(tmp_path):
    path = tmp_path / "s"
    with make(path) as pool:
        pool.protect([5])
        pool.commit()
    env = lmdb.open(str(path / "index.lmdb"), readonly=True, lock=False, max_dbs=8)
    with env.begin() as txn:
        raw = txn.get((2).to_bytes(8, "big"), db=env.open_db(b"commits", txn=txn))
    env.close()
    assert json.loads(raw)["protected"]["rows"] == 1
    shutil.rmtree(path)
