"""The sharded pool over real gloo process groups (forked workers on localhost), its global
commits, rollback of a shard that got ahead, reshard, and the CLI on a sharded root.

Sharding changes placement, not the math: a 2-rank run and a one-process run over the same
data end with the same rows (within float32 rounding of the per-rank partial sums)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given
from hypothesis import strategies as st

import dpsn
import dpsn.distributed as dd
from dpsn.errors import CorruptStoreError, DistributedError, InvalidArgumentError
from dpsn.index import ProductKeyRouter
from dpsn.store import PersistedStore
from dpsn.store.rollback import roll_back
from dpsn.store.shards import GLOBAL_DIR, PLACEMENT_SEED, read_global, write_global
from dpsn.tools.cli import main as cli

GEN = {"kind": "hashed_slices", "memory_size": 4096}
ROWS, DIM, SEED = 10**9, 8, 3
D_IN, D_OUT = 6, 4
STEPS, BAGS, PER_BAG, ID_SPACE = 3, 8, 4, 64
TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, ID_SPACE, (BAGS, PER_BAG), generator=g)
    target = torch.randn(BAGS, DIM, generator=g)
    return ids, target


def _tokens(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(TOKENS, D_IN, generator=g), torch.randn(TOKENS, D_OUT, generator=g)


def _router() -> ProductKeyRouter:
    torch.manual_seed(0)  # the same dense router on every rank and in the reference
    return ProductKeyRouter(d_in=D_IN, num_rows=ROWS, k=4, heads=1, query_batchnorm=False)


def _train_embedding(pool, part: slice, steps=range(STEPS)) -> None:
    emb = dpsn.PoolEmbedding(pool, mode="sum", row_optimizer="adagrad", row_lr=0.1)
    for s in steps:
        ids, target = _batches(s)
        (emb(ids[part]) * target[part]).sum().backward()


def _train_layer(pool, part: slice) -> None:
    layer = dpsn.PoolLayer(pool, D_IN, D_OUT, router=_router(), row_optimizer="sgd", row_lr=0.05)
    for s in range(STEPS):
        x, t = _tokens(s)
        (layer(x[part]) * t[part]).sum().backward()


def _worker(rank: int, world: int, port: int, out: str, job: str, backend: str) -> None:
    """One rank: join the gloo group, run ``job``, write "ok" or the traceback to ``out``."""
    torch.set_num_threads(1)
    status = Path(out) / f"rank{rank}.txt"
    try:
        import datetime

        torch.distributed.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        part = slice(rank, None, world)
        root = Path(out)
        if job == "train":
            pool = dpsn.create(
                root / "emb", ROWS, DIM, seed=SEED, generator=GEN, process_group=None, shards=world
            )
            _train_embedding(pool, part)
            pool.commit("emb")
            pool.close()
            with dd.create(root / "layer", ROWS, D_IN + D_OUT, seed=SEED, generator=GEN) as p:
                _train_layer(p, part)
                p.commit("layer")
            # a read-only view (a collective read), and bad ids on one rank only
            with dpsn.open(root / "emb", process_group=torch.distributed.group.WORLD) as r:
                assert not r.writable and r.head == 2
                np.save(root / f"read{rank}.npy", r.read(torch.arange(ID_SPACE)).numpy())
                try:
                    r.read(torch.tensor([-1 if rank == 1 else 0]))
                    raise AssertionError("a bad id was read")
                except (DistributedError, dpsn.errors.InvalidIdsError) as e:
                    (root / f"error{rank}.txt").write_text(type(e).__name__)
                np.save(root / f"again{rank}.npy", r.read(torch.tensor([5, 7])).numpy())
        elif job in ("gpu", "one"):  # NCCL on CUDA tensors; or one gloo rank (no exchange)
            dev = "cuda" if job == "gpu" else "cpu"
            with dd.create(root / "emb", ROWS, DIM, seed=SEED, generator=GEN, device=dev) as p:
                p.exchange_when_alone = job == "gpu"  # NCCL's all-to-alls run on one GPU
                _train_embedding(p, part)
                p.commit("emb")
        elif job == "resume":  # the crash test's third run: train on from the global commit
            with dpsn.open(root / "emb", "r+") as pool:
                _train_embedding(pool, part, steps=range(STEPS, STEPS + 2))
                pool.commit("resumed")
        elif job == "crash":  # rank 1 dies after its shard commit, before the global record
            with dpsn.open(root / "emb", "r+") as pool:
                _train_embedding(pool, part, steps=range(STEPS + 5, STEPS + 7))
                if rank == 1:
                    real = pool.local.commit

                    def commit_then_die(message: str = ""):
                        real(message)
                        os.kill(os.getpid(), signal.SIGKILL)

                    pool.local.commit = commit_then_die
                pool.commit("never global")
        torch.distributed.destroy_process_group()
        status.write_text("ok")
    except BaseException:
        status.write_text(traceback.format_exc())
        raise


def _run(
    world: int, out: Path, job: str, timeout: float = 120, backend: str = "gloo"
) -> list[int | None]:
    ctx = multiprocessing.get_context("fork")  # torch is imported already: no re-import
    port = _free_port()
    args = [(r, world, port, str(out), job, backend) for r in range(world)]
    procs = [ctx.Process(target=_worker, args=a) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


def _reference_embedding(path: Path, steps=range(STEPS)) -> torch.Tensor:
    with dpsn.create(path, ROWS, DIM, seed=SEED, generator=GEN) as pool:
        _train_embedding(pool, slice(None), steps)
        pool.commit()
        return pool.read(torch.arange(ID_SPACE))


# Each forked gloo run costs ~10-20 s on 2 shared cores: everything that needs one is slow.
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    codes = _run(2, out, "train")
    for r in range(2):
        assert (out / f"rank{r}.txt").read_text() == "ok", (out / f"rank{r}.txt").read_text()
    assert codes == [0, 0]
    return out


@pytest.mark.slow
def test_sharded_embedding_matches_one_process(trained, tmp_path):
    ids = torch.arange(ID_SPACE)
    sharded = dd.read_rows(trained / "emb", ids)
    single = _reference_embedding(tmp_path / "single")
    assert sharded.shape == (ID_SPACE, DIM)
    assert not torch.equal(single, dd.read_rows(trained / "emb", ids, at=1))  # rows trained
    torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6)
    # each shard holds only the rows it owns
    rec = read_global(trained / "emb")
    assert rec.count == 2 and rec.message == "emb"
    for i, (d, c) in enumerate(rec.shards):
        store = PersistedStore.open(trained / "emb" / d, writable=False)
        persisted = torch.from_numpy(np.asarray(store.load_index(c).ids, dtype=np.int64))
        store.close()
        assert len(persisted) > 0
        assert bool((dd.owner_of(persisted, 2) == i).all())


@pytest.mark.slow
def test_read_only_view_and_bad_ids_on_one_rank(trained):
    ids = torch.arange(ID_SPACE)
    want = dd.read_rows(trained / "emb", ids).numpy()
    for r in range(2):
        np.testing.assert_array_equal(np.load(trained / f"read{r}.npy"), want)
    # the rank with the bad id gets its error; the other is told, instead of waiting forever
    assert (trained / "error1.txt").read_text() == "RowIdOutOfRangeError"
    assert (trained / "error0.txt").read_text() == "DistributedError"
    # and both go on in step afterwards
    for r in range(2):
        np.testing.assert_array_equal(np.load(trained / f"again{r}.npy"), want[[5, 7]])


@pytest.mark.slow
def test_sharded_layer_matches_one_process(trained, tmp_path):
    with dpsn.create(tmp_path / "single", ROWS, D_IN + D_OUT, seed=SEED, generator=GEN) as pool:
        _train_layer(pool, slice(None))
        pool.commit()
        ids = torch.arange(0, ROWS, ROWS // 4096)
        routed = _router()(_tokens(0)[0]).ids.reshape(-1)
        probe = torch.cat([routed, ids[:64]])
        single = pool.read(probe)
    sharded = dd.read_rows(trained / "layer", probe)
    torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6)
    assert not torch.equal(sharded, dd.read_rows(trained / "layer", probe, at=1))


@pytest.mark.slow
def test_reshard_keeps_every_row(trained, tmp_path):
    root = tmp_path / "emb"
    shutil.copytree(trained / "emb", root)
    ids = torch.arange(ID_SPACE)
    before = dd.read_rows(root, ids)
    out = dd.reshard(root, 3)
    assert out["new_shards"] == 3 and out["rows_moved"] > 0
    assert read_global(root).count == 3
    torch.testing.assert_close(dd.read_rows(root, ids), before, rtol=0, atol=0)
    assert cli(["reshard", str(root), "--shards", "1"]) == 0
    torch.testing.assert_close(dd.read_rows(root, ids), before, rtol=0, atol=0)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("shard-")) == [
        f"shard-0000.{read_global(root).id}"
    ]


@pytest.mark.slow
def test_cli_reads_a_sharded_root(trained, capsys):
    root = str(trained / "emb")
    assert cli(["info", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["global_commit"] == 2 and len(info["shards"]) == 2
    used = torch.unique(torch.cat([_batches(s)[0].reshape(-1) for s in range(STEPS)]))
    assert info["persisted_rows"] == len(used)  # every trained row, each on one shard
    assert cli(["log", root, "--json"]) == 0
    log = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in log] == [1, 2]
    assert cli(["verify", root]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_between_the_phases_keeps_the_global_commit(trained, tmp_path):
    """Rank 1 is SIGKILLed after its shard's commit is durable and before the global record:
    readers still see the previous global commit whole, and a resumed run rolls shard 1 back
    and ends where a one-process run over the same data ends."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(trained / "emb", out / "emb")
    ids = torch.arange(ID_SPACE)
    before = dd.read_rows(out / "emb", ids)
    g = read_global(out / "emb")
    codes = _run(2, out, "crash", timeout=90)
    assert codes[1] == -signal.SIGKILL
    assert read_global(out / "emb").id == g.id  # no half-made global commit
    heads = []
    for d, c in g.shards:
        s = PersistedStore.open(out / "emb" / d, writable=False)
        heads.append((s.head(), c))
        s.close()
    assert heads[1][0] == heads[1][1] + 1  # shard 1 got ahead of the global commit
    torch.testing.assert_close(dd.read_rows(out / "emb", ids), before, rtol=0, atol=0)
    assert cli(["verify", str(out / "emb")]) == 0
    for f in out.glob("rank*.txt"):
        f.unlink()
    assert _run(2, out, "resume") == [0, 0]
    single = _reference_embedding(tmp_path / "single", steps=range(STEPS + 2))
    torch.testing.assert_close(dd.read_rows(out / "emb", ids), single, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_rank_matches_one_process(tmp_path):
    """A group of one: the all-to-alls are skipped, the rows are those of one process."""
    assert _run(1, tmp_path, "one") == [0]
    ids = torch.arange(ID_SPACE)
    single = _reference_embedding(tmp_path / "single")
    torch.testing.assert_close(dd.read_rows(tmp_path / "emb", ids), single, rtol=0, atol=0)


@pytest.mark.gpu
def test_nccl_one_rank_matches_one_process(tmp_path):
    """The NCCL path (CUDA tensors in every all-to-all); one rank, as one GPU allows."""
    assert _run(1, tmp_path, "gpu", backend="nccl") == [0]
    ids = torch.arange(ID_SPACE)
    single = _reference_embedding(tmp_path / "single")
    torch.testing.assert_close(dd.read_rows(tmp_path / "emb", ids), single, rtol=1e-5, atol=1e-5)


def test_rollback_restores_rows_state_and_drops(tmp_path):
    path = tmp_path / "s"
    with dpsn.create(path, 1000, 4, generator=GEN) as p:
        p.write([1, 2, 3], torch.ones(3, 4))
        c2 = p.commit().id
        p.write([2, 5], torch.full((2, 4), 7.0))
        p.drop([3])
        p.commit()
        want = None
    with dpsn.open(path, at=c2) as r:
        want = r.read(torch.arange(10))
    store = PersistedStore.open(path, writable=True)
    rec = roll_back(store, c2)
    assert rec is not None and rec.id == c2 + 2
    assert roll_back(store, rec.id) is None
    store.close()
    with dpsn.open(path) as p:
        torch.testing.assert_close(p.read(torch.arange(10)), want, rtol=0, atol=0)
        assert p.head == c2 + 2


def test_offline_create_and_global_records(tmp_path):
    root = tmp_path / "root"
    rec = dpsn.create(root, 100, 4, shards=3, generator=GEN)
    assert rec.id == 1 and rec.count == 3 and dd.is_sharded(root)
    with pytest.raises(dpsn.errors.StoreExistsError):
        dd.create_root(root, 100, 4, shards=2)
    with pytest.raises(InvalidArgumentError):
        dd.create_root(tmp_path / "bad", 100, 4, shards=0)
    assert not (tmp_path / "bad").exists()
    # a torn temp file is not a record; a damaged record is refused, naming it
    (root / GLOBAL_DIR / ".tmp-x.json").write_text("{")
    assert read_global(root).id == 1
    write_global(root, list(rec.shards), "second")
    assert read_global(root).id == 2
    (root / GLOBAL_DIR / f"{2:016d}.json").write_text('{"id": 2, "shards": [{"dir": "../x"}]}')
    with pytest.raises(CorruptStoreError, match="shard"):
        read_global(root)
    # rows of an untrained root are the procedural base of a plain store with that spec
    ref = dpsn.create(tmp_path / "plain", 100, 4, generator=GEN)
    ids = torch.arange(100)
    torch.testing.assert_close(dd.read_rows(root, ids, at=1), ref.read(ids), rtol=0, atol=0)
    ref.close()


def test_without_a_process_group_is_a_clear_error(tmp_path):
    root = tmp_path / "root"
    dd.create_root(root, 100, 4, shards=2, generator=GEN)
    with pytest.raises(DistributedError, match="init_process_group"):
        dpsn.open(root)


def test_owner_of_spreads_ids_and_is_stable():
    ids = torch.arange(100_000)
    counts = torch.bincount(dd.owner_of(ids, 4), minlength=4)
    assert int(counts.min()) > 24_000 and int(counts.max()) < 26_000
    again = dd.owner_of(ids.clone(), 4)
    assert torch.equal(again, dd.owner_of(ids, 4))
    # persisted placement: these values must never change (golden)
    assert dd.owner_of(torch.tensor([0, 1, 2, 3, 2**62]), 7).tolist() == GOLDEN_OWNERS


@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50), st.integers(1, 300))
def test_owner_of_is_xxh64_of_the_id_mod_shards(ids, shards):
    want = [
        (xxhash.xxh64_intdigest(i.to_bytes(8, "little", signed=True), PLACEMENT_SEED) & (2**63 - 1))
        % shards
        for i in ids
    ]
    assert dd.owner_of(torch.tensor(ids), shards).tolist() == want


GOLDEN_OWNERS = [4, 2, 6, 6, 1]  # xxh64(id, PLACEMENT_SEED) with the top bit cleared, mod 7
