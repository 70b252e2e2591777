"""Levelled stores: base + sum of level deltas, the train level, context levels, the root
commit log, snapshots, provenance, crash rollback, and executors training one level."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import dpsn
from dpsn.errors import (
    CorruptStoreError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    ReadOnlyError,
    SnapshotNotFoundError,
)
from dpsn.pool import _levels

GEN = {"kind": "hashed_slices", "memory_size": 4096}
LEVELS = ["foundation", "domain", "agent", dpsn.Level("context", persist=False)]


def make(path: Path, dim: int = 8, **kw):
    kw.setdefault("levels", LEVELS)
    return dpsn.create(path, rows=1000, dim=dim, seed=3, generator=GEN, chunk_rows=8, **kw)


def test_rows_are_base_plus_every_level(tmp_path):
    with make(tmp_path / "r", model_id="m") as p:
        assert p.levels == ["foundation", "domain", "agent", "context"]
        assert p.train_level == "agent"  # the fastest persisted level
        ids = torch.tensor([4, 9, 4])
        vals = {n: torch.randn(3, 8) for n in p.levels}
        vals_u = {n: v.clone() for n, v in vals.items()}
        for n, v in vals_u.items():
            v[2] = v[0]  # id 4 twice: same value
            p.write(ids, v, level=n)
        total = sum(vals_u.values())
        assert torch.equal(p.delta(ids, level="domain"), vals_u["domain"])
        torch.testing.assert_close(p.delta(ids), total)
        torch.testing.assert_close(p.read(ids), p.base(ids) + total)
        p.write([7], torch.ones(1, 8))  # no level: the train level
        assert torch.equal(p.delta([7], level="agent"), torch.ones(1, 8))
        assert torch.equal(p.delta([7], level="foundation"), torch.zeros(1, 8))


def test_bad_levels_are_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="distinct"):
        make(tmp_path / "a", levels=["x", "x"])
    with pytest.raises(InvalidArgumentError, match="persisted"):
        make(tmp_path / "b", levels=[dpsn.Level("c", persist=False)])
    with pytest.raises(InvalidArgumentError, match="level name"):
        make(tmp_path / "c", levels=["Bad Name"])
    with pytest.raises(InvalidArgumentTypeError):
        make(tmp_path / "d", levels="foundation")
    with pytest.raises(InvalidArgumentError, match="inertia"):
        dpsn.Level("x", inertia=1.0)
    with pytest.raises(InvalidArgumentError, match="need levels"):
        dpsn.create(tmp_path / "e", rows=10, dim=4, model_id="m")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with make(tmp_path / "f") as p, pytest.raises(InvalidArgumentError, match="no level"):
        p.delta([1], level="nope")


def test_single_level_stores_are_unchanged(tmp_path):
    with dpsn.create(tmp_path / "s", rows=100, dim=4, generator=GEN) as p:
        assert isinstance(p, dpsn.Pool)
    assert not _levels.is_levelled(tmp_path / "s")


def test_commit_reopen_snapshot(tmp_path):
    path = tmp_path / "r"
    ids = torch.tensor([1, 2, 3])
    with make(path) as p:
        p.write(ids, torch.full((3, 8), 1.0), level="foundation")
        p.write(ids, torch.full((3, 8), 2.0))
        p.write(ids, torch.full((3, 8), 5.0), level="context")
        rec = p.commit("one")
        assert rec["levels"] == {"foundation": 2, "domain": 2, "agent": 2}
        p.snapshot("first")
        p.clear_level("context")
        first = p.read(ids)
        p.write(ids, torch.full((3, 8), 10.0), level="domain")
        p.commit("two")
        assert [c["id"] for c in p.log()] == [1, 2, 3]
        head_rows = p.read(ids)
    with dpsn.open(path) as q:
        assert isinstance(q, dpsn.LevelledPool) and q.head == 3 and not q.writable
        assert torch.equal(q.read(ids), head_rows)
        assert torch.equal(q.delta(ids, level="context"), torch.zeros(3, 8))  # never persisted
        with pytest.raises(ReadOnlyError):
            q.write(ids, torch.zeros(3, 8))
    with dpsn.open(path, at="first") as q:
        assert q.head == 2 and torch.equal(q.read(ids), first)
    with dpsn.open(path, at=2) as q:
        assert torch.equal(q.read(ids), first)
    with pytest.raises(SnapshotNotFoundError):
        dpsn.open(path, at="nope")
    with pytest.raises(InvalidArgumentError):
        dpsn.open(path, "r+", at=2)
    with pytest.raises(InvalidArgumentError, match="levelled"):
        dpsn.open(path, lifecycle=dpsn.Lifecycle())
    assert sorted(p.name for p in (path / "levels").iterdir()) == ["agent", "domain", "foundation"]


def test_context_level_lives_in_memory_and_clears(tmp_path):
    with make(tmp_path / "r") as p:
        p.write([5], torch.ones(1, 8), level="context")
        scratch = p.level("context").path
        assert not str(scratch).startswith(str(tmp_path))
        p.commit("c")
        assert p.level("context").head == 1  # never committed
        assert torch.equal(p.delta([5], level="context"), torch.ones(1, 8))
        p.clear_level("context")
        assert torch.equal(p.delta([5], level="context"), torch.zeros(1, 8))
        p.write([5], torch.ones(1, 8), level="domain")
        p.commit("d")
        p.clear_level("domain")
        p.commit("e")
        assert torch.equal(p.delta([5], level="domain"), torch.zeros(1, 8))
    assert not scratch.exists()


def test_provenance_is_recomputed_and_detects_tampering(tmp_path):
    path = tmp_path / "r"
    with make(path, model_id="model-a", config={"lr": 0.1}) as p:
        p.write([1], torch.ones(1, 8))
        p.commit("x")
        prov = p.provenance
        assert p.verify().ok, p.verify().problems
    with make(tmp_path / "other", model_id="model-b", config={"lr": 0.1}) as o:
        o.write([1], torch.ones(1, 8))
        o.commit("x")
        assert o.provenance != prov  # the model id is covered
    # A resealed root log naming another level commit: checksums pass, provenance does not.
    log_path = path / _levels.LOG_FILE
    log = json.loads(log_path.read_bytes())
    log["commits"][1]["levels"]["domain"] = 1
    _levels.write_atomic(log_path, log)
    problems = _levels.verify_root(path)
    assert any("provenance" in x for x in problems), problems
    # A byte edit without resealing: the checksum catches it.
    raw = log_path.read_bytes().replace(b'"message":"x"', b'"message":"y"')
    log_path.write_bytes(raw)
    assert any("checksum" in x for x in _levels.verify_root(path))
    with pytest.raises(CorruptStoreError, match="checksum"):
        dpsn.open(path)


def test_model_id_tampering_in_root_file_is_detected(tmp_path):
    path = tmp_path / "r"
    with make(path, model_id="model-a") as p:
        p.commit("x")
    spec_path = path / _levels.LEVELS_FILE
    spec = json.loads(spec_path.read_bytes())
    spec["model_id"] = "model-z"
    _levels.write_atomic(spec_path, spec)
    with dpsn.open(path) as q:
        report = q.verify()
    assert not report.ok and any("provenance" in x for x in report.problems)


def test_unfinished_root_commit_is_rolled_back(tmp_path):
    """A crash after the level commits but before the root log: the orphan level commits are
    not read, and a writable open restores the named values."""
    path = tmp_path / "r"
    ids = torch.tensor([1, 2])
    with make(path) as p:
        p.write(ids, torch.ones(2, 8), level="domain")
        p.commit("named")
        named = p.read(ids)
        # what a migration's half-finished commit would leave: one level moved, root log not
        p.write(ids, torch.full((2, 8), 9.0), level="domain")
        p.write([3], torch.ones(1, 8), level="domain")
        p.level("domain").commit("orphan")
    with dpsn.open(path) as q:
        assert torch.equal(q.read(ids), named)
    with dpsn.open(path, "r+") as q:
        assert torch.equal(q.read(ids), named)
        assert torch.equal(q.delta([3], level="domain"), torch.zeros(1, 8))
        assert q.log()[-1]["message"].startswith("recover")
        assert q.verify().ok
    with dpsn.open(path) as q:
        assert torch.equal(q.read(ids), named)


def test_pool_layer_trains_only_the_train_level(tmp_path):
    d_in, d_out = 6, 4
    p = make(tmp_path / "r", dim=d_in + d_out)
    ids = torch.arange(0, 1000)
    fixed = torch.randn(1000, d_in + d_out) * 0.1
    p.write(ids, fixed, level="foundation")
    p.commit("foundation")
    layer = dpsn.PoolLayer(p, d_in, d_out, k=4, row_optimizer="sgd", row_lr=0.5)
    x = torch.randn(16, d_in)
    rows_before = p.read(ids)
    # the executor sees base + every level
    with torch.no_grad():
        batch = p.page_in(torch.tensor([[3, 5]]))
        torch.testing.assert_close(batch.rows().float(), rows_before[[3, 5]])
        batch.release()
    for _ in range(3):
        layer(x).square().sum().backward()
    trained = p.level("agent").staged_rows
    assert trained > 0
    assert p.level("foundation").staged_rows == 0 and p.level("domain").staged_rows == 0
    assert torch.equal(p.delta(ids, level="foundation"), fixed)
    assert torch.equal(p.delta(ids, level="domain"), torch.zeros(1000, d_in + d_out))
    changed = (p.read(ids) != rows_before).any(dim=1)
    assert int(changed.sum()) == trained
    layer.commit("trained")
    p.close()
    with dpsn.open(tmp_path / "r") as q:
        assert q.level("agent").persisted_rows == trained
        assert q.level("foundation").persisted_rows == 1000


def test_train_level_is_settable_and_lr_scale_damps(tmp_path):
    p = make(
        tmp_path / "r",
        levels=["foundation", dpsn.Level("domain", lr_scale=0.5), "agent"],
    )
    emb = dpsn.PoolEmbedding(p, "sum", row_optimizer="sgd", row_lr=1.0)
    ids = torch.tensor([[10, 11]])
    emb(ids).sum().backward()
    full = p.delta([10], level="agent").clone()
    assert full.abs().sum() > 0
    p.train_level = "domain"
    emb(ids).sum().backward()
    torch.testing.assert_close(p.delta([10], level="domain"), 0.5 * full)
    with pytest.raises(InvalidArgumentError):
        p.train_level = "nope"
    p.close()


def test_stats_and_info_cover_each_level(tmp_path):
    with make(tmp_path / "r", levels=["a", dpsn.Level("b", lifecycle=dpsn.Lifecycle())]) as p:
        p.write([1], torch.ones(1, 8))
        p.commit("x")
        s = p.stats()["levels"]
        assert set(s) == {"a", "b"}
        for key in (
            "screening_rate",
            "entropy_ratio",
            "migration_backlog",
            "conflict_rate",
            "effective_inertia",
        ):
            assert key in s["a"]
        assert s["b"]["lifecycle"] is not None and s["a"]["lifecycle"] is None
        info = p.info()
        assert info["commit"] == 2 and set(info["level_info"]) == {"a", "b"}


DATA = Path(__file__).parent / "data" / "levels1"


def test_checked_in_levelled_store_reads_bit_for_bit(tmp_path):
    """tests/data/levels1 was written by tests/data/make_levels_store.py; its deltas (float32
    bit patterns, what the format stores) must read back unchanged by every later dpsn, and its
    rows equal them summed over the base within float32 rounding: the order in which a row's
    levels are added is not part of the format (the train level's cache holds
    ``(base + other levels) + its delta``, one gather a hot read)."""
    expected = json.loads((DATA / "expected.json").read_text())
    shutil.copytree(DATA / "store", tmp_path / "store")  # opening writes LMDB lock files
    with dpsn.open(tmp_path / "store") as p:
        assert p.levels == expected["levels"]
        assert p.head == expected["head"] and p.provenance == expected["provenance"]
        ids = torch.tensor(expected["ids"])
        want = torch.tensor([int(h, 16) for h in expected["rows"]], dtype=torch.int64)
        want = want.to(torch.int32).view(torch.float32).reshape(len(ids), -1)
        torch.testing.assert_close(p.read(ids).float(), want, rtol=2.4e-7, atol=1e-7)
        for name, bits in expected["deltas"].items():
            d = p.delta(ids, level=name).float().contiguous().view(torch.int32).reshape(-1)
            assert [f"{v & 0xFFFFFFFF:08x}" for v in d.tolist()] == bits
        assert p.verify().ok
        assert p.migrations() == expected["migrations"]


def test_cli_log_migrations_stats_and_verify_on_a_levelled_root(tmp_path):
    """``dpsn log --migrations``, ``dpsn stats`` and ``dpsn verify`` read a levelled root
    without importing torch."""
    import subprocess
    import sys

    shutil.copytree(DATA / "store", tmp_path / "store")
    path = str(tmp_path / "store")
    code = (
        "import json, sys, io, contextlib\n"
        "from dpsn.tools.cli import main\n"
        "out = {}\n"
        "for cmd in (['log', '--migrations'], ['stats'], ['verify'], ['log'], ['info']):\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        rc = main([*cmd, '--json', sys.argv[1]])\n"
        "    out[cmd[-1]] = [rc, json.loads(buf.getvalue())]\n"
        "out['torch'] = 'torch' in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, path], capture_output=True, text=True, check=True
    )
    out = json.loads(res.stdout)
    assert out["torch"] is False
    expected = json.loads((DATA / "expected.json").read_text())
    assert out["--migrations"] == [0, expected["migrations"]]
    rc, stats = out["stats"]
    assert rc == 0 and set(stats["levels"]) == {"slow", "fast", "context"}
    assert stats["channels"]["fast->slow"]["rows"] == 2
    assert out["verify"] == [0, {"ok": True, "problems": []}]
    assert [c["id"] for c in out["log"][1]] == [1, 2, 3]
    rc, info = out["info"]
    assert rc == 0 and info["commit"] == 3 and info["provenance"] == expected["provenance"]
    assert [lv["name"] for lv in info["levels"]] == expected["levels"]


def test_gc_and_compact_keep_every_pinned_level(tmp_path):
    path = tmp_path / "r"
    ids = torch.arange(0, 40)
    with make(path, keep_last=1) as p:
        p.write(ids, torch.ones(40, 8), level="domain")
        p.commit("a")
        p.snapshot("a")
        pinned = p.read(ids)
        for i in range(3):
            p.write(ids, torch.full((40, 8), float(i)), level="domain")
            p.commit(f"b{i}")
        head = p.read(ids)
        p.gc()
        p.compact()
        assert torch.equal(p.read(ids), head)
        assert p.verify().ok
    with dpsn.open(path, at="a") as q:
        assert torch.equal(q.read(ids), pinned)


def test_rows_held_by_a_slow_level_resist_training(tmp_path):
    """A row with a delta in a slower level takes the train level's updates damped by that
    level's inertia (its gradients scaled by 1 - hold)."""
    levels = [dpsn.Level("foundation", inertia=0.75), "agent"]
    with make(tmp_path / "r", levels=levels) as p:
        p.write([10], torch.ones(1, 8), level="foundation")
        emb = dpsn.PoolEmbedding(p, "sum", row_optimizer="sgd", row_lr=1.0)
        emb(torch.tensor([[10, 11]])).sum().backward()
        held = p.delta([10], level="agent")
        free = p.delta([11], level="agent")
        assert free.abs().sum() > 0
        torch.testing.assert_close(held, 0.25 * free)


def test_a_held_row_is_damped_under_an_adaptive_optimizer(tmp_path):
    """Adagrad's step ignores a constant factor on the gradient, so a hold damps the update
    itself: a row held by a slow level (inertia 0.9) moves a tenth of what a free row moves."""
    levels = [dpsn.Level("slow", inertia=0.9), "fast"]
    mig = dpsn.Migration(consolidate_every=0)
    with make(tmp_path / "r", levels=levels, migration=mig, cache_rows=64) as p:
        p.write([1], torch.ones(1, 8), level="slow")
        opt = dpsn.pool.RowAdagrad(lr=0.1)
        p.set_state_width(opt.state_width(8))
        for _ in range(3):
            with p.page_in(torch.tensor([1, 2])) as batch:
                batch.apply_grads(torch.ones(2, 8), opt)
        fast = p.delta([1, 2], level="fast")
        torch.testing.assert_close(fast[0], 0.1 * fast[1], rtol=1e-5, atol=1e-7)
        assert float(fast[1].abs().min()) > 0.1  # the free row moved a full Adagrad step


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
def test_train_level_inertia_damps_an_adaptive_step(tmp_path, row_kernels, optimizer):
    """The train level's own damping, ``lr_scale * (1 - a_eff)`` of a row's region, scales the
    row's *update*: Adagrad and Adam normalise a gradient by its size, so a scaled gradient
    would move a row of high effective inertia as far as one of low inertia. A region whose
    inertia rose with use (a written window, then a consolidation) moves less, by the factor
    the inertias give, against the same step on a level with no inertia."""
    levels = [dpsn.Level("slow"), dpsn.Level("fast", inertia=0.2, lr_scale=0.5)]
    mig = dpsn.Migration(consolidate_every=0, regions=2)  # region 0: ids < 500
    make_opt = {"adagrad": dpsn.pool.RowAdagrad, "adam": dpsn.pool.RowAdam}[optimizer]
    moved = {}
    for label, lv in (("damped", levels), ("free", ["slow", "fast"])):
        with make(tmp_path / label, levels=lv, migration=mig, cache_rows=64) as p:
            if label == "damped":
                p.write(torch.arange(0, 50), torch.ones(50, 8), level="fast")
                p.consolidate()  # region 0 was used: its effective inertia rises
                low, high = p.stats()["levels"]["fast"]["inertia_range"]
                assert low == pytest.approx(0.2) and high > 0.5
            opt = make_opt(lr=0.1)
            p.set_state_width(opt.state_width(8))
            for _ in range(3):
                with p.page_in(torch.tensor([100, 600])) as batch:
                    batch.apply_grads(torch.ones(2, 8), opt)
            moved[label] = p.delta([100, 600], level="fast")
    free = moved["free"]
    assert float(free.abs().min()) > 0.1  # a full adaptive step
    expect = torch.tensor([0.5 * (1 - high), 0.5 * (1 - low)])[:, None] * free
    torch.testing.assert_close(moved["damped"], expect, rtol=1e-5, atol=1e-7)


def test_a_write_to_another_level_refreshes_only_its_rows(tmp_path):
    """The train level's cache holds ``base + the other levels``: a write to another level
    re-makes the cached rows it touched, not the whole cache (the stack's count of generated
    base rows grows by the rows written), and every row reads its new value."""
    with make(tmp_path / "r", cache_rows=512) as p:
        ids = torch.arange(0, 300)
        p.write(ids, torch.full((300, 8), 0.5), level="domain")
        before = p.read(ids).clone()
        made = p.level(p.train_level).stats()["rows_generated"]
        d = torch.randn(3, 8)
        p.write([5, 7, 299], d, level="foundation")
        p.write([5], d[:1], level="domain", add=True)
        after = p.read(ids)
        assert p.level(p.train_level).stats()["rows_generated"] - made <= 3 + 1
        expect = before.clone()
        expect[[5, 7, 299]] += d
        expect[5] += d[0]
        torch.testing.assert_close(after, expect)
        torch.testing.assert_close(after, p.base(ids) + p.delta(ids))
        p.drop([7], level="foundation")
        torch.testing.assert_close(p.read(ids), p.base(ids) + p.delta(ids))


def test_a_skipped_step_records_nothing_in_the_window(tmp_path):
    """Non-finite row gradients skip the step (counted): no row moves and the migration
    window records no update for it."""
    with make(tmp_path / "r", levels=["slow", "fast"], cache_rows=64) as p:
        opt = dpsn.pool.RowSGD(lr=0.1)
        bad = torch.ones(2, 8)
        bad[0, 0] = float("nan")
        with p.page_in(torch.tensor([1, 2])) as batch:
            batch.apply_grads(bad, opt)
        assert p.level("fast").stats()["skipped_row_steps"] == 1
        assert torch.equal(p.delta([1, 2]), torch.zeros(2, 8))
        assert p._windows["fast"].updates()[0].numel() == 0
