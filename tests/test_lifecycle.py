"""The row lifecycle on real stores: usage statistics, FREE/SCREENED phases with hysteresis,
lazy decay and pruning back to procedural, warm-up, region budgets, homeostasis, health, and
persistence of all of it (issue 11)."""

import gc
import json
import math
import re
import shutil
import struct
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpsn
from dpsn.errors import CorruptStoreError, LifecycleError, ReadOnlyError
from dpsn.pool import RowSGD
from dpsn.pool._lifecycle import next_phase, region_of
from dpsn.store._digest import seal_record

SMALL = {"kind": "hashed_slices", "memory_size": 4096}
DIM = 8
ROWS = 10_000


def make(path, lifecycle=None, *, cache_rows=256, rows=ROWS, dtype=torch.float32):
    return dpsn.create(
        path,
        rows=rows,
        dim=DIM,
        seed=3,
        chunk_rows=16,
        generator=SMALL,
        cache_rows=cache_rows,
        lifecycle=dpsn.Lifecycle() if lifecycle is None else lifecycle,
        dtype=dtype,
    )


def step(pool, ids, grad=None, lr=0.1):
    """One executor step over ``ids``: a use, and with ``grad`` an SGD row step."""
    with pool.page_in(torch.as_tensor(ids)) as batch:
        if grad is not None:
            batch.apply_grads(torch.full((len(batch), DIM), float(grad)), RowSGD(lr=lr))


def bits(t):
    return t.float().contiguous().view(torch.int32)


# -- the policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"enter": 0.1, "exit": 0.2},  # no hysteresis gap
        {"enter": 0.6, "exit": 0.1},  # a row used in most steps must be able to screen
        {"decay": 1.0},
        {"decay": -0.1},
        {"max_idle": 0},
        {"regions": 0},
        {"budget": (1.0,)},
        {"budget": (-1.0, 0.0)},
        {"target": (0.5, 0.1)},
        {"homeostasis": 1},
        {"warmup": 1.5},
        {"half_life": float("nan")},
    ],
)
def test_invalid_policies_are_refused(kwargs):
    with pytest.raises(LifecycleError):
        dpsn.Lifecycle(**kwargs)


def test_policy_round_trips_and_stored_policies_are_checked():
    p = dpsn.Lifecycle(budget=(3.0, 0.5), regions=7, target=(0.1, 0.4))
    assert dpsn.Lifecycle.from_json(json.loads(json.dumps(p.to_json()))) == p
    raw = p.to_json()
    for bad in (
        [1, 2],
        {**raw, "surprise": 1},
        {**raw, "enter": "0.2"},
        {**raw, "exit": 0.9},
        {**raw, "budget": [1.0, 2.0, 3.0]},
    ):
        with pytest.raises(CorruptStoreError):
            dpsn.Lifecycle.from_json(bad)


def test_regions_are_the_region_routers_regions():
    from dpsn.index import VQRouter

    rows = 10_007  # not a multiple of the region count: sizes differ by one
    router = VQRouter(d_in=8, num_rows=rows, k=4, levels=(5,), seed=0)
    policy = dpsn.Lifecycle(regions=router)
    assert policy.regions == router.num_regions
    ids = torch.arange(rows)
    want = router.region_of(ids).numpy()
    assert np.array_equal(region_of(ids.numpy(), rows, policy.regions), want)


@given(
    enter=st.floats(0.01, 0.5),
    gap=st.floats(0.01, 0.99),
    scores=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60),
    screened=st.booleans(),
)
def test_a_score_between_the_thresholds_never_flips_the_phase(enter, gap, scores, screened):
    exit_ = enter * gap
    phase = np.array([screened])
    for s in scores:
        # anywhere in [exit, enter] (clamped: the sum can round one ulp past enter)
        s = min(max(exit_ + (enter - exit_) * s, exit_), enter)
        phase, entered, left = next_phase(
            phase, np.array([s]), np.array([100]), enter=enter, exit=exit_, min_uses=1
        )
        assert phase[0] == screened and not entered[0] and not left[0]


def test_hysteresis_on_a_store(tmp_path):
    """Two rows used every 5th step have scores between the thresholds at every
    consolidation: the FREE one stays FREE, the SCREENED one stays SCREENED."""
    policy = dpsn.Lifecycle(
        enter=0.3, exit=0.1, min_uses=1, half_life=8, homeostasis=False, prune_rms=0.0
    )
    with make(tmp_path / "s", policy) as pool:
        pool.write([10, 20], torch.ones(2, DIM))
        for _ in range(40):  # row 20 is used in every step: it screens in
            step(pool, [20])
        pool.consolidate()
        assert pool.phase([10, 20]).tolist() == [0, 1]
        scores = []
        for t in range(300):
            if t % 5 == 0:
                step(pool, [10, 20])
            else:
                step(pool, [30])
            if t >= 40:  # the averages have settled into the band
                scores.append(pool.usage([10, 20])["score"])
                assert pool.phase([10, 20]).tolist() == [0, 1]
            pool.consolidate()
        scores = torch.stack(scores)
        assert bool(((scores > 0.1) & (scores < 0.3)).all()), (scores.min(), scores.max())


# -- decay and pruning ----------------------------------------------------------------------------


def test_written_once_is_procedural_again_within_100_consolidations(tmp_path):
    """The issue's promise with the default policy, one consolidation per commit, whether or
    not anything else happens in the pool."""
    with make(tmp_path / "s") as pool:
        row = torch.tensor([1234])
        pool.write(row, torch.full((1, DIM), 3.0))
        pool.commit("written once")
        assert pool.info()["persisted_rows"] == 1
        assert torch.equal(pool.delta(row), torch.full((1, DIM), 3.0))  # no decay at its commit
        for n in range(1, 101):
            if n % 2:
                step(pool, [7, 8, 9], grad=0.01)  # other rows are used now and then
            pool.commit(f"c{n}")
            if pool.row_commits(row).tolist() == [0]:
                break
        assert n < 100, "still persisted after 100 consolidations"
        assert pool.row_commits(row).tolist() == [0]
        assert torch.equal(bits(pool.read(row)), bits(pool.base(row)))
    with dpsn.open(tmp_path / "s") as pool:
        assert torch.equal(bits(pool.read(row)), bits(pool.base(row)))
        assert pool.row_commits(row).tolist() == [0]


def test_idle_pool_prunes_by_idleness(tmp_path):
    """Nothing else happens: the row's recent-use figures stand still, and it goes by the idle
    clock (``max_idle`` consolidations)."""
    with make(tmp_path / "s") as pool:
        pool.write([5], torch.full((1, DIM), 1e6))  # far too large to decay below the floor
        pool.commit()  # (its first consolidation)
        n = 1
        while pool.usage([5])["has_delta"][0] and n < 100:
            pool.consolidate()
            n += 1
        assert n == dpsn.Lifecycle().max_idle
        pool.commit()
        assert pool.info()["persisted_rows"] == 0
        assert torch.equal(bits(pool.read([5])), bits(pool.base([5])))


def test_a_row_used_in_most_steps_is_never_returned_to_procedural(tmp_path):
    gen = torch.Generator().manual_seed(0)
    with make(tmp_path / "s") as pool:
        hot = 4321
        born = None
        for t in range(300):
            others = torch.randint(0, ROWS, (12,), generator=gen)
            used = bool(torch.rand(1, generator=gen) < 0.75)
            ids = torch.cat([others, torch.tensor([hot])]) if used else others
            step(pool, ids, grad=1e-4)  # tiny updates: its delta stays far below the floor
            pool.consolidate()
            u = pool.usage([hot])
            if born is None and bool(u["has_delta"][0]):
                born = float(u["born"][0])
            if born is not None:
                assert bool(u["has_delta"][0]), f"pruned at step {t}"
                assert float(u["born"][0]) == born, f"pruned and reborn by step {t}"
            if t % 50 == 49:
                pool.commit()
        assert pool.phase([hot]).tolist() == [1]
        assert pool.info()["persisted_rows"] > 0


def test_decay_is_lazy_exact_and_pruning_shrinks_the_store(tmp_path):
    policy = dpsn.Lifecycle(decay=0.25, prune_rms=0.05, homeostasis=False)
    q = 0.75
    ids = torch.arange(100, 140)
    values = torch.linspace(0.1, 4.0, len(ids))[:, None].expand(-1, DIM).contiguous()
    with make(tmp_path / "s", policy, cache_rows=16) as pool:
        pool.write(ids, values)
        for _ in range(33):  # other rows' steps: the written rows go cold
            step(pool, torch.arange(5000, 5020))
        pool.commit("written")  # consolidation 1: written in its window, no decay yet
        persisted = [pool.info()["persisted_rows"]]
        for k in range(1, 30):
            pool.commit(f"decay {k}")
            persisted.append(pool.info()["persisted_rows"])
            alive = pool.usage(ids)["has_delta"]
            want = (values.double() * q**k).float()
            got = pool.delta(ids)
            # the survivors hold exactly stored * q**k, however they were read
            assert torch.equal(got[alive], want[alive])
            assert torch.equal(bits(pool.read(ids[~alive])), bits(pool.base(ids[~alive])))
            floor = 0.05 * math.sqrt(DIM)
            assert bool((want[~alive].norm(dim=1) < floor).all())
        assert persisted == sorted(persisted, reverse=True) and persisted[-1] < persisted[0]
        assert persisted[-1] == 0
        assert pool.stats()["lifecycle"]["pruned_rows"] == len(ids)


@given(n=st.integers(1, 150), commit_every=st.integers(1, 7))
def test_screened_rows_survive_any_number_of_consolidations(tmp_path_factory, n, commit_every):
    path = tmp_path_factory.mktemp("s") / "store"
    policy = dpsn.Lifecycle(min_uses=4, half_life=4)
    with make(path, policy) as pool:
        keep = torch.tensor([11, 12])
        for _ in range(30):
            step(pool, keep, grad=0.5)
        pool.write([99], torch.ones(1, DIM))  # a FREE row beside them, decaying
        pool.consolidate()
        assert pool.phase(keep).tolist() == [1, 1]
        before = pool.delta(keep).clone()
        for i in range(n):
            pool.consolidate()
            if i % commit_every == 0:
                pool.commit()
        assert pool.phase(keep).tolist() == [1, 1]
        assert torch.equal(bits(pool.delta(keep)), bits(before))
        pool.commit()
    with dpsn.open(path) as pool:
        assert torch.equal(bits(pool.delta(keep)), bits(before))


def test_screened_updates_are_damped_by_inertia(tmp_path, row_kernels):
    policy = dpsn.Lifecycle(min_uses=4, half_life=4, inertia=0.5)
    with make(tmp_path / "s", policy) as pool:
        for _ in range(30):
            step(pool, [3], grad=0.0)
        pool.write([4], torch.zeros(1, DIM))
        pool.consolidate()
        assert pool.phase([3, 4]).tolist() == [1, 0]
        before = pool.delta([3, 4]).clone()
        uses = float(pool.usage([3])["uses"][0]) + 1  # this step's use counts first
        step(pool, [3, 4], grad=1.0, lr=0.1)
        change = pool.delta([3, 4]) - before
        damp = 1.0 / (1.0 + 0.5 * math.log1p(uses))
        assert torch.allclose(change[0], torch.full((DIM,), -0.1 * damp))
        assert torch.allclose(change[1], torch.full((DIM,), -0.1))


# -- warm-up, budgets, homeostasis --------------------------------------------------------------


def test_rows_touched_a_few_times_stay_in_memory(tmp_path):
    with make(tmp_path / "s") as pool:  # warmup 2
        step(pool, [1, 2], grad=0.1)
        step(pool, [2], grad=0.1)
        pool.commit()
        assert pool.row_commits([1, 2]).tolist()[0] == 0  # used once: not written
        assert pool.row_commits([1, 2]).tolist()[1] > 0
        assert pool.stats()["lifecycle"]["held_rows"] == 1
        assert not torch.equal(pool.read([1]), pool.base([1]))  # but there, in memory
        step(pool, [1], grad=0.1)
        pool.commit()
        assert pool.row_commits([1]).tolist()[0] > 0
    with make(tmp_path / "t") as pool:
        step(pool, [1], grad=0.1)
        pool.commit()
    with dpsn.open(tmp_path / "t") as pool:  # a held row does not outlive its session
        assert torch.equal(bits(pool.read([1])), bits(pool.base([1])))


def test_budgets_hold_per_region_weakest_free_rows_first(tmp_path):
    regions = 4
    policy = dpsn.Lifecycle(
        regions=regions, budget=(2.0, 0.0), min_uses=4, half_life=4, homeostasis=False
    )
    block = ROWS // regions
    with make(tmp_path / "s", policy, cache_rows=512) as pool:
        hot = torch.tensor([5, 6, block + 5])  # screened rows in regions 0 and 1
        for _ in range(30):
            step(pool, hot, grad=0.1)
        cold = torch.cat([torch.arange(100, 130), torch.arange(block + 100, block + 103)])
        pool.write(cold, torch.ones(len(cold), DIM))
        pool.consolidate()
        report = pool.consolidate()
        assert report["pruned_by_budget"] > 0
        everything = torch.cat([hot, cold])
        has = pool.usage(everything)["has_delta"]
        assert bool(has[: len(hot)].all())  # SCREENED rows kept while FREE ones can go
        reg = region_of(everything.numpy(), ROWS, regions)
        u = pool.usage(everything)
        for r in range(regions):
            mine = torch.from_numpy(reg == r) & has
            freq = float(u["recent"][mine].sum())
            cap = math.floor(2.0 * math.log1p(freq))
            assert int(mine.sum()) <= max(cap, 0), (r, int(mine.sum()), cap)
        pool.commit()
        assert pool.info()["persisted_rows"] == int(has.sum())


def test_homeostasis_nudges_the_thresholds(tmp_path):
    with make(tmp_path / "s") as pool:
        pool.write([1], torch.ones(1, DIM))  # nothing screened: rate 0 < 0.05
        pool.consolidate()
        pool.consolidate()
        lc = pool.stats()["lifecycle"]
        assert lc["enter"] == pytest.approx(0.2 * 0.81) and lc["exit"] == pytest.approx(0.081)
        assert any("screening rate" in f for f in lc["flags"]) and not lc["ok"]
    policy = dpsn.Lifecycle(min_uses=1, half_life=2)
    with make(tmp_path / "t", policy) as pool:
        for _ in range(10):
            step(pool, [1, 2], grad=0.1)
        pool.consolidate()  # everything screened: rate 1 > 0.5
        lc = pool.stats()["lifecycle"]
        assert lc["enter"] == pytest.approx(0.22) and lc["exit"] == pytest.approx(0.1)


# -- persistence ----------------------------------------------------------------------------------


def test_statistics_phases_and_policy_survive_a_reopen(tmp_path):
    policy = dpsn.Lifecycle(min_uses=3, half_life=5, regions=5, budget=(100.0, 1.0))
    path = tmp_path / "s"
    ids = torch.arange(0, 40)
    with make(path, policy, cache_rows=64) as pool:
        gen = torch.Generator().manual_seed(1)
        for _ in range(25):
            step(pool, ids[torch.randperm(40, generator=gen)[:10]], grad=0.1)
            step(pool, ids[:3], grad=0.1)
        pool.consolidate()
        step(pool, ids[:5])
        c = pool.commit()
        before = pool.usage(ids)
        phases = pool.phase(ids)
        lc = pool.stats()["lifecycle"]
    assert c.lifecycle["policy"] == policy.to_json()
    with dpsn.open(path) as pool:
        assert pool.lifecycle == policy
        after = pool.usage(ids)
        for name, value in before.items():
            assert torch.equal(value, after[name]), name
        assert torch.equal(pool.phase(ids), phases) and int(phases.sum()) > 0
        again = pool.stats()["lifecycle"]
        for key in ("step", "epoch", "enter", "exit", "screened_rows", "free_rows"):
            assert again[key] == lc[key], key
    with dpsn.open(path, "r+", lifecycle=dpsn.Lifecycle(decay=0.5)) as pool:
        assert pool.lifecycle.decay == 0.5
        pool.commit("new policy")
    with dpsn.open(path) as pool:
        assert pool.lifecycle.decay == 0.5


def test_snapshots_and_readers_see_their_commits_values(tmp_path):
    path = tmp_path / "s"
    with make(path) as pool:
        pool.write([7], torch.ones(1, DIM))
        pool.commit()
        pool.commit()
        pool.snapshot("early")
        early = pool.delta([7]).clone()
        reader = dpsn.open(path)
        for _ in range(5):
            pool.commit()
        late = pool.delta([7]).clone()
        assert float(late[0, 0]) < float(early[0, 0])
        assert torch.equal(reader.delta([7]), early)
        reader.refresh()
        assert torch.equal(reader.delta([7]), late)
        pool.close()
        with dpsn.open(path, "r+", lifecycle=dpsn.Lifecycle(decay=0.5)) as writer:
            writer.commit("a new policy")
        reader.refresh()  # a reader follows the store's policy
        assert reader.lifecycle.decay == 0.5
        reader.close()
    with dpsn.open(path, at="early") as old:
        assert torch.equal(old.delta([7]), early)


def test_format_version_and_usage_arrays(tmp_path):
    with make(tmp_path / "s") as pool:
        step(pool, [1], grad=0.1)
        step(pool, [1], grad=0.1)
        pool.commit()
    env = lmdb.open(str(tmp_path / "s" / "index.lmdb"), max_dbs=8, readonly=True, lock=False)
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        assert txn.get(b"format_version", db=meta) == struct.pack(">Q", 2)
        segs = env.open_db(b"segments", txn=txn, create=False)
        recs = [json.loads(v) for _, v in txn.cursor(db=segs)]
    env.close()
    assert recs[-1]["usage_width"] == 10 and "usage" in recs[-1]["checksums"]
    zarr_json = tmp_path / "s" / "data.zarr" / "segments" / f"{recs[-1]['id']:016x}" / "usage"
    assert json.loads((zarr_json / "zarr.json").read_text())["data_type"] == "float64"
    with dpsn.open(tmp_path / "s") as pool:
        assert pool.verify().ok
        assert pool.info()["format_version"] == 2


def test_a_format1_store_gets_a_lifecycle(tmp_path):
    """Rows written before the store had a lifecycle are FREE rows written at epoch 0."""
    src = Path(__file__).parent / "data" / "format1" / "f32"
    path = tmp_path / "f32"
    shutil.copytree(src, path)
    want = json.loads((src.parent / "expected.json").read_text())["f32"]
    ids = want["ids"]
    with dpsn.open(path, "r+", lifecycle=dpsn.Lifecycle(decay=0.5)) as pool:
        before = pool.delta(ids).clone()
        n = pool.info()["persisted_rows"]
        pool.consolidate()
        assert pool.stats()["lifecycle"]["free_rows"] == n
        assert torch.allclose(pool.delta(ids), before * 0.5)
        pool.commit("now with a lifecycle")  # its second consolidation
        assert torch.allclose(pool.delta(ids), before * 0.25)
    with dpsn.open(path) as pool:
        assert pool.lifecycle.decay == 0.5
        assert torch.allclose(pool.delta(ids), before * 0.25)
        assert pool.verify().ok


# -- the tier paths agree -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)]
)
def test_cached_and_uncached_pools_train_to_the_same_bits(tmp_path, dtype, row_kernels):
    from dpsn.index import ProductKeyRouter

    def run(name, cache_rows):
        pool = make(
            tmp_path / name,
            dpsn.Lifecycle(half_life=20, min_uses=2),
            cache_rows=cache_rows,
            rows=4096,
            dtype=dtype,
        )
        router = ProductKeyRouter(d_in=4, num_rows=4096, k=4, seed=0)
        layer = dpsn.PoolLayer(pool, 4, 4, router=router, k=4, row_optimizer="adagrad")
        g = torch.Generator().manual_seed(1)
        for s in range(24):
            layer(torch.randn(16, 4, generator=g)).pow(2).mean().backward()
            if s % 6 == 5:
                pool.commit()
        ids = torch.arange(4096)
        out = pool.delta(ids), pool.phase(ids), pool.info()["persisted_rows"]
        pool.close()
        return out

    big, small, none = run("big", 1024), run("small", 80), run("none", 0)
    for other in (small, none):
        assert torch.equal(bits(big[0]), bits(other[0]))
        assert torch.equal(big[1], other[1]) and big[2] == other[2]
    assert int(big[1].sum()) > 0


def test_a_step_counts_its_uses_once_whenever_they_are_counted(tmp_path, row_kernels):
    """A cached batch's uses are counted once: by its row step (the native loops count them
    there, in the same pass), or when it is released without one, or when something reads the
    statistics or commits while it is in flight; never twice."""
    from dpsn.pool import RowSGD

    pool = make(tmp_path / "p", dpsn.Lifecycle(half_life=10))
    ids = torch.tensor([3, 5, 5, 9])
    rows = [3, 5, 9]
    step = RowSGD(lr=0.1)

    def uses() -> list[float]:
        return pool.usage(rows)["uses"].tolist()

    with pool.page_in(ids) as batch:
        batch.apply_grads(torch.ones(len(batch), DIM), step)
    assert uses() == [1.0, 2.0, 1.0]
    with pool.page_in(ids):  # released without a row step
        pass
    assert uses() == [2.0, 4.0, 2.0]
    with pool.page_in(ids) as batch:  # read while in flight, then stepped
        assert uses() == [3.0, 6.0, 3.0]
        batch.apply_grads(torch.ones(len(batch), DIM), step)
    assert uses() == [3.0, 6.0, 3.0]
    with pool.page_in(ids) as batch:  # a commit while in flight, then stepped
        pool.commit()
        batch.apply_grads(torch.ones(len(batch), DIM), step)
    assert uses() == [4.0, 8.0, 4.0]
    batch = pool.page_in(ids)  # dropped without release: counted when collected
    del batch
    gc.collect()
    assert uses() == [5.0, 10.0, 5.0]
    last = pool.usage(rows)["last"].tolist()
    assert last[0] == last[1] == last[2] == float(pool._stack.clock.step)
    pool.close()


# -- errors and health ----------------------------------------------------------------------------


def test_lifecycle_operations_need_a_lifecycle_and_a_writer(tmp_path):
    with dpsn.create(tmp_path / "plain", rows=100, dim=DIM, generator=SMALL) as pool:
        assert pool.lifecycle is None and "lifecycle" not in pool.stats()
        assert pool.phase([1, 2]).tolist() == [0, 0]
        with pytest.raises(LifecycleError, match="no row lifecycle"):
            pool.consolidate()
        pool.commit()
    with dpsn.open(tmp_path / "plain") as pool:
        assert pool.lifecycle is None
    with make(tmp_path / "s") as pool:
        pool.commit()
    with dpsn.open(tmp_path / "s") as pool, pytest.raises(ReadOnlyError):
        pool.consolidate()
    with pytest.raises(TypeError):
        dpsn.open(tmp_path / "s", lifecycle={"decay": 0.1})
    with pytest.raises(LifecycleError):
        dpsn.open(tmp_path / "s", "r+", lifecycle=dpsn.Lifecycle(regions=ROWS + 1))


def _rewrite_head_record(path, change, *, seal):
    """Edit the lifecycle object of HEAD's commit record in place, resealing it (a valid
    ``record_xxh64``, as a crafted store would have) or not (plain damage)."""
    env = lmdb.open(str(path / "index.lmdb"), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            db = env.open_db(b"commits", txn=txn, create=False)
            key = txn.get(b"head", db=meta)
            rec = json.loads(txn.get(key, db=db))
            change(rec["lifecycle"])
            if seal:
                del rec["record_xxh64"]
                txn.put(key, seal_record(rec), db=db)
            else:  # the old record_xxh64 stays: it no longer matches
                txn.put(key, json.dumps(rec).encode(), db=db)
    finally:
        env.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda lc: lc.update(epoch=-3), "lifecycle record has an invalid epoch"),
        (lambda lc: lc.update(format=9), "lifecycle record is not an object of format 1"),
        (lambda lc: lc["policy"].update(decay=1.5), "lifecycle record has an invalid policy"),
        (lambda lc: lc.update(totals={"pruned": -1}), "lifecycle record has an invalid totals"),
        # Well-formed JSON, but a setting dpsn.Lifecycle refuses: the pool's own check.
        (lambda lc: lc.update(enter=0.9), "lifecycle threshold enter"),
        (lambda lc: lc["policy"].update(warmup=-1), "stored lifecycle policy is invalid"),
    ],
)
def test_a_damaged_lifecycle_record_is_refused(tmp_path, change, message):
    from dpsn.store import PersistedStore

    path = tmp_path / "s"
    with make(path) as pool:
        pool.commit()
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    _rewrite_head_record(damaged, change, seal=False)
    with pytest.raises(CorruptStoreError, match="fails its checksum"):
        dpsn.open(damaged)
    _rewrite_head_record(path, change, seal=True)
    with pytest.raises(CorruptStoreError, match=message):
        dpsn.open(path)
    store = PersistedStore.open(path, writable=False)
    try:
        report = store.verify()
    finally:
        store.close()
    assert not report.ok  # the digest of the commits database no longer matches, at least
    if message.startswith("lifecycle record"):  # what a reader without torch checks too
        assert any(message in p for p in report.problems), report.problems


def test_health_figures(tmp_path):
    policy = dpsn.Lifecycle(min_uses=2, half_life=3, regions=10)
    with make(tmp_path / "s", policy) as pool:
        for _ in range(10):
            step(pool, [1, 2, 3], grad=0.1)
        pool.write(torch.arange(5000, 5010), torch.ones(10, DIM))
        report = pool.consolidate()
        lc = pool.stats()["lifecycle"]
        assert report["screened"] == lc["screened_rows"] == 3
        assert lc["free_rows"] == 10
        assert lc["decayed_rows"] == 0 and lc["pruned_rows"] == 0  # used in this window
        row_bytes = DIM * 4 + 10 * 8
        assert lc["screened_bytes"] == 3 * row_bytes and lc["free_bytes"] == 10 * row_bytes
        regions = lc["regions"]
        assert regions["count"] == 10 and regions["with_rows"] == 2
        assert {r["region"]: r["rows"] for r in regions["top"]} == {5: 10, 0: 3}
        pool.consolidate()
        assert pool.stats()["lifecycle"]["decayed_rows"] == 10
        c = pool.commit()
    assert c.lifecycle["health"]["screened_rows"] == 3
    assert c.stats["lifecycle"]["free_rows"] == 10


def test_health_reader_takes_any_record_without_raising():
    from dpsn.store import lifecycle_health

    assert lifecycle_health(None) is None and lifecycle_health([1]) is None
    h = lifecycle_health({"health": {"screened_rows": "x", "flags": [1, "ok?"]}, "step": -4})
    assert h["screened_rows"] == 0 and h["step"] == 0 and h["flags"] == ["ok?"] and not h["ok"]


def test_dpsn_stats_prints_lifecycle_health(tmp_path, capsys):
    from dpsn.tools.cli import main

    with make(tmp_path / "s", dpsn.Lifecycle(regions=4)) as pool:
        pool.write([1, 2, 9000], torch.ones(3, DIM))
        pool.commit()
    assert main(["stats", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"lifecycle: screened / free / held rows\s+0 / 3 / 0", text)
    assert "2 of 4" in text and "outside the target band" in text
    assert main(["stats", "--json", str(tmp_path / "s")]) == 0
    out = json.loads(capsys.readouterr().out)
    lc = out["lifecycle"]
    assert lc["free_rows"] == 3 and lc["consolidations"] == 1 and lc["pruned_rows"] == 0
    for key in ("screened_rows", "free_rows", "decayed_rows", "pruned_rows"):
        assert key in lc


@given(
    start=st.sets(st.integers(0, 200), max_size=40),
    ops=st.lists(
        st.tuples(st.sets(st.integers(0, 200), max_size=20), st.sets(st.integers(0, 200))),
        max_size=6,
    ),
)
def test_the_committed_statistics_index_merges_like_a_dict(start, ops):
    from dpsn.tiers import UsageIndex

    def arr(ids, tag):
        ids = np.array(sorted(ids), dtype=np.int64)
        return ids, np.stack([ids * 0 + tag, ids.astype(float)], axis=1).reshape(-1, 2)

    ids, usage = arr(start, 0)
    index, model = UsageIndex(ids, usage), {int(i): (0.0, float(i)) for i in start}
    for n, (written, dropped) in enumerate(ops, 1):
        dropped = dropped - written  # a commit's drops and writes are disjoint
        w_ids, w_usage = arr(written, n)
        index = index.apply(w_ids, w_usage, np.array(sorted(dropped), dtype=np.int64))
        for i in dropped:
            model.pop(i, None)
        model.update({int(i): (float(n), float(i)) for i in written})
    assert index.ids.tolist() == sorted(model)
    assert [tuple(r) for r in index.usage.tolist()] == [model[i] for i in sorted(model)]


def test_region_usage(tmp_path):
    policy = dpsn.Lifecycle(regions=5, budget=(50.0, 2.0), min_uses=2, half_life=3)
    with make(tmp_path / "s", policy) as pool:
        with pytest.raises(LifecycleError, match="no consolidation"):
            pool.region_usage()
        for _ in range(6):
            step(pool, [1, 2, 2001], grad=0.1)
        pool.write([9999], torch.ones(1, DIM))
        pool.consolidate()
        r = pool.region_usage()
        assert r["rows"].tolist() == [2, 1, 0, 0, 1]
        assert r["screened"].tolist() == [2, 1, 0, 0, 0]
        assert r["bytes"].tolist() == [n * (DIM * 4 + 80) for n in (2, 1, 0, 0, 1)]
        assert r["novelty"].tolist() == [2, 1, 0, 0, 1]
        assert bool((r["freq"][[0, 1]] > 0).all()) and float(r["freq"][2]) == 0.0
        want = np.floor(50 * np.log1p(r["freq"].numpy()) + 2 * r["novelty"].numpy())
        assert r["budget"].tolist() == want.astype(int).tolist()


def test_dpsn_inspect_without_torch_shows_decayed_deltas(tmp_path, capsys):
    """``inspect --no-base`` reads the store without torch: it applies the lazy decay as the
    format says, and agrees with the pool."""
    from dpsn.tools.cli import main

    with make(tmp_path / "s", dpsn.Lifecycle(decay=0.5)) as pool:
        pool.write([3, 4], torch.full((2, DIM), 2.0))
        for _ in range(3):
            pool.commit()
        want = pool.delta([3, 4, 5]).norm(dim=1)
    assert float(want[0]) == pytest.approx(2.0 * math.sqrt(DIM) * 0.25)
    assert main(["inspect", "--no-base", "--json", str(tmp_path / "s"), "3", "4", "5"]) == 0
    got = [r["delta_norm"] for r in json.loads(capsys.readouterr().out)]
    assert got == pytest.approx(want.tolist())


def test_store_facts_count_the_usage_column(tmp_path):
    from dpsn.store import StoreFacts

    with make(tmp_path / "s") as pool:
        pool.write([1, 2, 3], torch.ones(3, DIM))
        pool.commit()
    with StoreFacts(tmp_path / "s") as facts:
        info = facts.info()
    assert info["format_version"] == 2
    assert info["live_bytes"] == 3 * (8 + DIM * 4 + 10 * 8) and info["live_bytes_exact"]
