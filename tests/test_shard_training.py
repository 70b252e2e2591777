"""Row steps on a sharded pool: ``strict=`` and ``rows=`` on ``ShardedRowBatch.apply_grads``,
and a row selection (``SparseFinetune``) run at each row's owner against its usage statistics.

A one-rank gloo group in this process, with the all-to-alls forced on
(``exchange_when_alone``): every row goes through the exchange and the owner's code path that
several ranks take, and one rank's rows must equal one process's bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import dpsn
import dpsn.distributed as dd
from dpsn.errors import InvalidDeltaError

GEN = {"kind": "hashed_slices", "memory_size": 4096}
ROWS, DIM = 10**9, 8


@pytest.fixture
def group(tmp_path):
    store = dist.FileStore(str(tmp_path / "pg"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _sharded(path, **kwargs):
    pool = dd.create(path, ROWS, DIM, seed=3, generator=GEN, **kwargs)
    pool.exchange_when_alone = True
    return pool


def _train(pool, selection, steps=6):
    emb = dpsn.PoolEmbedding(
        pool, mode="sum", row_optimizer="sgd", row_lr=0.1, row_selection=selection
    )
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        # rows 0..7 in every step (the background), then new rows 8..40
        ids = torch.cat([torch.arange(8), torch.randint(8, 40, (8,), generator=g)])
        (emb(ids.reshape(4, 4)) * torch.randn(4, DIM, generator=g)).sum().backward()


@pytest.mark.slow  # ~10-15 s on 2 shared cores
def test_sparse_finetune_runs_at_the_owner_and_matches_one_process(group, tmp_path):
    life = dpsn.Lifecycle(warmup=1)
    ids = torch.arange(40)
    with _sharded(tmp_path / "root", lifecycle=life) as pool:
        _train(pool, None)  # background statistics: rows 0..7 used in every step
        _train(pool, dpsn.SparseFinetune(top=0.25))
        pool.commit("finetuned")
        sharded = pool.read(ids)
        held = pool.local.stats()["rows_held"]
    with dpsn.create(tmp_path / "one", ROWS, DIM, seed=3, generator=GEN, lifecycle=life) as one:
        _train(one, None)
        _train(one, dpsn.SparseFinetune(top=0.25))
        single = one.read(ids)
        assert one.stats()["rows_held"] == held > 0  # the selection held rows back
    torch.testing.assert_close(sharded, single, rtol=0, atol=0)


def test_apply_grads_strict_and_rows(group, tmp_path):
    opt = dpsn.pool.RowSGD(lr=1.0)
    ids = torch.tensor([1, 2, 3])
    with _sharded(tmp_path / "root") as pool:
        before = pool.read(ids).clone()
        bad = torch.ones(3, DIM)
        bad[1, 2] = float("nan")
        with torch.enable_grad():
            batch = pool.page_in(ids)
        with pytest.raises(InvalidDeltaError, match="not finite"):
            batch.apply_grads(bad, opt, strict=True)
        batch.release()
        torch.testing.assert_close(pool.read(ids), before, rtol=0, atol=0)
        skipped = pool.local.stats()["skipped_row_steps"]
        with torch.enable_grad():
            batch = pool.page_in(ids)
        batch.apply_grads(bad, opt)  # not strict: skipped and counted
        batch.release()
        assert pool.local.stats()["skipped_row_steps"] == skipped + 1
        torch.testing.assert_close(pool.read(ids), before, rtol=0, atol=0)
        # rows= steps only the rows it marks
        with torch.enable_grad():
            batch = pool.page_in(ids)
        batch.apply_grads(torch.ones(3, DIM), opt, rows=torch.tensor([True, False, True]))
        batch.release()
        after = pool.read(ids)
        assert torch.equal(after[1], before[1])
        torch.testing.assert_close(after[[0, 2]], before[[0, 2]] - 1.0)
        with torch.enable_grad():
            batch = pool.page_in(ids)
        with pytest.raises(ValueError, match="bool tensor"):
            batch.apply_grads(torch.ones(3, DIM), opt, rows=torch.tensor([1, 0, 1]))
        batch.release()


def test_apply_grads_scale_damps_each_rows_update(group, tmp_path):
    """``scale=`` scales each row's update at its owner, under Adagrad too (which a scaled
    gradient would not damp); a bad scale is refused before the exchange."""
    opt = dpsn.pool.RowAdagrad(lr=0.1)
    ids = torch.tensor([1, 2, 3])
    with _sharded(tmp_path / "root") as pool:
        pool.set_state_width(opt.state_width(DIM))
        before = pool.read(ids).clone()
        with torch.enable_grad():
            batch = pool.page_in(ids)
        with pytest.raises(dpsn.errors.InvalidArgumentError, match="scale="):
            batch.apply_grads(torch.ones(3, DIM), opt, scale=torch.tensor([1.0, -1.0, 1.0]))
        batch.apply_grads(torch.ones(3, DIM), opt, scale=torch.tensor([1.0, 0.25, 0.0]))
        batch.release()
        moved = pool.read(ids) - before
        assert float(moved[0].abs().min()) > 0.05
        torch.testing.assert_close(moved[1], 0.25 * moved[0])
        assert torch.equal(moved[2], torch.zeros(DIM))


@pytest.mark.slow  # ~10-15 s on 2 shared cores
def test_reshard_carries_the_lifecycle(tmp_path):
    """Rows, usage statistics, pending decay and protected rows survive 1 -> 2 -> 1 shards,
    with the two shards' clocks made to differ in between (one trained on alone)."""
    from dpsn.store.shards import write_global

    life = dpsn.Lifecycle(warmup=1, decay=0.3, min_uses=1000)  # FREE rows decay each commit
    root = tmp_path / "root"
    ids = torch.arange(40)
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "pg"), 1), rank=0, world_size=1
    )
    try:
        with _sharded(root, lifecycle=life) as pool:
            _train(pool, None)
            pool.local.protect([3, 5])
            pool.commit("trained")
    finally:
        dist.destroy_process_group()
    trained = dd.read_rows(root, ids)
    assert dd.reshard(root, 2)["new_shards"] == 2
    torch.testing.assert_close(dd.read_rows(root, ids), trained, rtol=0, atol=0)
    # shard 1 trains on alone (a store like any other) and commits twice, so its clocks run
    # ahead of shard 0's; then a global record names both heads
    rec = dd.read_global(root)
    (d0, c0), (d1, _c1) = rec.shards
    mine = ids[dd.owner_of(ids, 2) == 1]  # only the rows shard 1 owns
    with dpsn.open(root / d1, "r+") as p1:
        emb = dpsn.PoolEmbedding(p1, mode="sum", row_optimizer="sgd", row_lr=0.1)
        for _ in range(3):
            emb(mine[:8].reshape(2, 4)).sum().backward()
        p1.commit()
        p1.commit()
        head1 = p1.head
    write_global(root, [(d0, c0), (d1, head1)], "shard 1 ahead")
    before = dd.read_rows(root, ids)
    own = dd.owner_of(ids, 2) == 0
    with dpsn.open(root / d0) as p0, dpsn.open(root / d1) as p1:
        u0, u1 = p0.usage(ids), p1.usage(ids)
        assert int(u1["last"].max()) > int(u0["last"].max())  # the clocks differ
        want = {k: torch.where(own, u0[k], u1[k]) for k in ("uses", "recent", "history", "phase")}
        age = torch.where(own, p0.usage(ids)["last"], p1.usage(ids)["last"])
    dd.reshard(root, 1)
    # FREE rows' pending decay and every row's value: as before
    torch.testing.assert_close(dd.read_rows(root, ids), before, rtol=0, atol=0)
    ((d, _c),) = dd.read_global(root).shards
    with dpsn.open(root / d) as p:
        assert p.lifecycle is not None
        got = p.usage(ids)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
        # "last used n steps ago" is kept: the rebased clocks differ by the same amount
        assert bool((got["last"] - age >= 0).all())
        assert sorted(p.protected.tolist()) == [3, 5]


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    """Rank 1's gradients are NaN under strict=True: it raises, rank 0 does not wait for ever,
    and no row changes; then both train with SparseFinetune at the owners."""
    import datetime
    import traceback
    from pathlib import Path

    torch.set_num_threads(1)
    status = Path(out) / f"rank{rank}.txt"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=datetime.timedelta(seconds=60),
        )
        life = dpsn.Lifecycle(warmup=1)
        with dd.create(Path(out) / "root", ROWS, DIM, seed=3, generator=GEN, lifecycle=life) as p:
            ids = torch.arange(16)
            before = p.read(ids)
            grads = torch.ones(16, DIM)
            if rank == 1:
                grads[3, 0] = float("nan")
            with torch.enable_grad():
                batch = p.page_in(ids)
            raised = ""
            try:
                batch.apply_grads(grads, dpsn.pool.RowSGD(lr=1.0), strict=True)
            except InvalidDeltaError:
                raised = "InvalidDeltaError"
            batch.release()
            assert raised == ("InvalidDeltaError" if rank == 1 else ""), raised
            assert torch.equal(p.read(ids), before)
            assert p.local.stats()["skipped_row_steps"] == 1
            # each requester's strict travels with its rows: rank 1 asks for strict, rank 0
            # does not; the gradients summed at rank 0 (the owner) of some rows overflow, so
            # rank 0 skips (counts) its batch and rank 1, whose rows those were too, raises
            mine = dd.owner_of(ids, 2) == 0
            grads = torch.ones(16, DIM)
            grads[int(torch.nonzero(mine)[0]), 0] = 3e38  # finite; 6e38 summed over ranks
            with torch.enable_grad():
                batch = p.page_in(ids)
            raised = ""
            try:
                batch.apply_grads(grads, dpsn.pool.RowSGD(lr=1.0), strict=rank == 1)
            except InvalidDeltaError:
                raised = "InvalidDeltaError"
            batch.release()
            assert raised == ("InvalidDeltaError" if rank == 1 else ""), raised
            after = p.read(ids)
            assert torch.equal(after[mine], before[mine])  # the owner refused its batch
            torch.testing.assert_close(after[~mine], before[~mine] - 2.0)  # 1 + 1, lr 1
            assert p.local.stats()["skipped_row_steps"] == (2 if rank == 0 else 1)
            _train(p, None, steps=3)
            _train(p, dpsn.SparseFinetune(top=0.25), steps=3)
            assert p.local.stats()["rows_held"] > 0
            p.commit("done")
        dist.destroy_process_group()
        status.write_text("ok")
    except BaseException:
        status.write_text(traceback.format_exc())
        raise


@pytest.mark.slow
def test_two_ranks_strict_and_selection_at_the_owners(tmp_path):
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
            p.join()
    for r in (0, 1):
        got = (tmp_path / f"rank{r}.txt").read_text()
        assert got == "ok", got
    assert dd.read_global(tmp_path / "root").message == "done"


@pytest.mark.slow  # ~10 s on 2 shared cores
def test_reshard_carries_routers_and_modules(tmp_path):
    """Routers (replicated to every new shard) and module configurations survive a reshard."""
    from dpsn.index import ProductKeyRouter
    from dpsn.store.shards import write_global

    root = tmp_path / "root"
    dd.create_root(root, ROWS, DIM, shards=1, generator=GEN)
    ((d, _c),) = dd.read_global(root).shards
    torch.manual_seed(0)
    router = ProductKeyRouter(d_in=6, num_rows=ROWS, k=4, heads=1, query_batchnorm=False)
    with dpsn.open(root / d, "r+") as p:
        p.save_router("router", router)
        p.write([1, 2], torch.ones(2, DIM))
        p.commit("router")
        head, modules = p.head, p.modules()
    write_global(root, [(d, head)], "router")
    rows = dd.read_rows(root, [1, 2])
    dd.reshard(root, 2)
    for d2, c2 in dd.read_global(root).shards:
        with dpsn.open(root / d2, at=c2) as p:
            got = p.load_router("router")
            for a, b in zip(got.state_dict().values(), router.state_dict().values(), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert p.modules() == modules
    torch.testing.assert_close(dd.read_rows(root, [1, 2]), rows, rtol=0, atol=0)
