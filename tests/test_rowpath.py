"""The row path: the id -> slot table, the executor contract (page_in -> RowBatch ->
apply_grads -> release) used by an executor written here from the public API alone, batches
bigger than the cache, and failures while filling."""

import contextlib
import gc

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpsn
from dpsn.hypernet import GENERATORS, HashedSlices
from dpsn.pool import PoolLayer, RowSGD
from dpsn.tiers import SlotTable

SMALL = {"kind": "hashed_slices", "memory_size": 512}


# -- grouping a batch's ids ------------------------------------------------------------------


@given(
    ids=st.lists(st.integers(0, 2**62), max_size=300),
    repeat=st.integers(1, 3),
    narrow=st.booleans(),
)
def test_native_grouping_matches_a_stable_sort(ids, repeat, narrow):
    """page_in's native grouping (a radix sort) gives what torch.sort(stable=True) and
    unique_consecutive give: distinct ids, counts, the inverse and the uses ordered by id."""
    from dpsn import _kernels

    if _kernels._lib is None:
        pytest.skip("dpsn._native was not built (no C compiler at install)")
    t = torch.tensor(ids * repeat, dtype=torch.int64)
    if narrow:  # small ids: fewer radix passes, many repeats
        t = t % 37
    uniq, counts, inverse, order = _kernels.group_ids(t)
    ordered, want_order = torch.sort(t, stable=True)
    want_uniq, want_counts = torch.unique_consecutive(ordered, return_counts=True)
    assert torch.equal(uniq, want_uniq) and torch.equal(counts, want_counts)
    assert torch.equal(order, want_order) and torch.equal(uniq[inverse], t)


# -- the slot table against a dict ----------------------------------------------------------


@given(
    capacity=st.integers(1, 12),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["insert", "insert", "evict", "clear", "rebuild"]),
            st.integers(0, 2**62),
        ),
        max_size=80,
    ),
)
def test_slot_table_answers_like_a_dict(capacity, ops):
    """Inserts into free slots, evictions, clears; with tiny tables, collisions in both places
    and cuckoo evictions are common."""
    slot_ids = torch.full((capacity + 1,), -1, dtype=torch.int64)  # + the sentinel
    table = SlotTable(capacity, slot_ids)
    model: dict[int, int] = {}
    rng = np.random.default_rng(len(ops))
    for op, key in ops:
        if op == "insert" and key not in model:
            free = [s for s in range(capacity) if s not in model.values()]
            if not free:
                continue
            slot = int(rng.choice(free))
            slot_ids[slot] = key
            table.insert(torch.tensor([key]), torch.tensor([slot]))
            model[key] = slot
        elif op == "evict" and model:
            victim = sorted(model)[key % len(model)]
            slot = model.pop(victim)
            slot_ids[slot] = -1
            table.release(torch.tensor([slot]))
        elif op == "clear":
            slot_ids.fill_(-1)
            table.clear()
            model.clear()
        elif op == "rebuild":  # what a failed cuckoo insert does: other hash functions
            table.rebuild()
        probe = torch.tensor([*model, key, key + 1])
        slots, hit = table.find(probe)
        want = torch.tensor([k in model for k in probe.tolist()])
        assert torch.equal(hit, want)
        for k, s, h in zip(probe.tolist(), slots.tolist(), hit.tolist(), strict=True):
            if h:
                assert model[k] == s


def test_slot_table_reuses_entries_of_evicted_rows():
    """320 insertions into 8 slots: entries of released slots are free for the next insert,
    and every row is found in one of its two places."""
    slot_ids = torch.full((9,), -1, dtype=torch.int64)
    table = SlotTable(8, slot_ids)
    for round_ in range(40):
        ids = torch.arange(8) * 7919 + 8 * round_
        table.release(torch.arange(8))
        slot_ids[:8] = ids
        table.insert(ids, torch.arange(8))
        slots, hit = table.find(ids)
        assert bool(hit.all()) and torch.equal(slots, torch.arange(8))
        assert not bool(table.find(ids + 1)[1].any())


@contextlib.contextmanager
def _kernels(native):
    """Run a block on the native loops (True) or on the PyTorch ops they replace (False)."""
    from dpsn import _kernels

    if native and _kernels._lib is None:
        pytest.skip("dpsn._native was not built (no C compiler at install)")
    before = _kernels.ENABLED
    _kernels.ENABLED = native
    try:
        yield
    finally:
        _kernels.ENABLED = before


@pytest.mark.parametrize("native", [True, False])
@given(
    capacity=st.integers(1, 40),
    batches=st.lists(
        st.tuples(st.lists(st.integers(0, 2**62), max_size=40), st.integers(0, 2**16)),
        max_size=12,
    ),
    max_kicks=st.sampled_from([1, 500]),
)
def test_slot_table_batch_inserts_answer_like_a_dict(native, capacity, batches, max_kicks):
    """Batches of new ids inserted at once, into free and just-evicted slots, on both insertion
    paths (the C loop one id after another, the vectorized rounds), the C loop also with its
    chains of moves capped at one."""
    from dpsn.tiers import _slot_table

    slot_ids = torch.full((capacity + 1,), -1, dtype=torch.int64)
    table = SlotTable(capacity, slot_ids)
    model: dict[int, int] = {}
    rng = np.random.default_rng(len(batches))
    with _kernels(native), pytest.MonkeyPatch.context() as mp:
        mp.setattr(_slot_table, "_MAX_KICKS", max_kicks)
        for keys, evict in batches:
            gone = [k for k in sorted(model) if (k ^ evict) % 3 == 0]
            if gone:
                slots = torch.tensor([model.pop(k) for k in gone])
                slot_ids[slots] = -1
                table.release(slots)
            new = list(dict.fromkeys(k for k in keys if k not in model))
            free = [s for s in range(capacity) if s not in model.values()]
            new = new[: len(free)]
            if new:
                slots = torch.from_numpy(rng.permutation(free)[: len(new)].astype(np.int64))
                slot_ids[slots] = torch.tensor(new)
                table.insert(torch.tensor(new), slots)
                model.update(zip(new, slots.tolist(), strict=True))
            probe = torch.tensor([*model, *keys, 2**62 + 1], dtype=torch.int64)
            found, hit = table.find(probe)
            assert hit.tolist() == [k in model for k in probe.tolist()]
            assert found[hit].tolist() == [model[k] for k in probe[hit].tolist()]


def test_a_native_insertion_that_does_not_settle_rebuilds_the_table(monkeypatch):
    """With no moves allowed, 4000 new ids cannot all settle in their two places: the C loop
    gives up, the table is rebuilt with other hash functions, and every id is still found."""
    from dpsn.tiers import _slot_table

    monkeypatch.setattr(_slot_table, "_MAX_KICKS", 0)
    capacity = 4000
    slot_ids = torch.full((capacity + 1,), -1, dtype=torch.int64)
    table = SlotTable(capacity, slot_ids)
    ids = torch.from_numpy(np.random.default_rng(0).choice(2**62, capacity, replace=False))
    slots = torch.randperm(capacity, generator=torch.Generator().manual_seed(0))
    slot_ids[slots] = ids
    with _kernels(True):
        table.insert(ids, slots)
    assert table.rebuilds >= 1
    for native in (True, False):
        with _kernels(native):
            found, hit = table.find(ids)
        assert bool(hit.all()) and torch.equal(found, slots)


# -- cold reads: filled in batch order, copied out as a block --------------------------------


@pytest.mark.parametrize("generator", [SMALL, {"kind": "rf_mlp"}])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cold_reads_give_the_rows_the_sorted_fill_gave(tmp_path, generator, dtype, row_kernels):
    """A cold read of distinct ids fills them in batch order (it used to fill them sorted) into
    a run of fresh slots and copies them out as one block: every row is bit for bit what the
    generator makes of the sorted batch plus the row's delta (committed or staged), and so are
    the hot read after it and a partly cached read with repeats."""
    pool = dpsn.create(
        tmp_path / "s",
        rows=10**9,
        dim=16,
        seed=3,
        generator=generator,
        dtype=dtype,
        cache_rows=8192,
    )
    rng = np.random.default_rng(1)
    ids = torch.from_numpy(rng.choice(10**9, 3000, replace=False))
    trained = ids[::7]
    deltas = torch.from_numpy(rng.standard_normal((len(trained), 16), dtype=np.float32))
    pool.write(trained[:200], deltas[:200].to(pool.dtype))
    pool.commit("some rows on disk")
    pool.write(trained[200:], deltas[200:].to(pool.dtype))  # the rest staged
    assert len(pool.cache) == 0

    def expected(batch):
        uniq, inverse = torch.unique(batch, return_inverse=True)
        base = pool.generator(uniq)[inverse]  # the generator on the sorted batch
        has = torch.isin(batch, trained)
        base[has] += pool.delta(batch[has])
        return base.to(pool.dtype)

    want = expected(ids)
    got = pool.read(ids)
    assert got.dtype == pool.dtype and torch.equal(got, want)
    slots, hit = pool.cache.find(ids)
    assert bool(hit.all()) and torch.equal(slots, torch.arange(len(ids)))  # one run, in order
    assert torch.equal(pool.read(ids), want)  # hot
    more = torch.from_numpy(rng.choice(10**9, 500, replace=False))
    mixed = torch.cat([ids[:300], more, more[:50], ids[:10]])[torch.randperm(860)]
    # the misses are generated as one batch (sorted, as they repeat): compare with exactly that
    known, rows = torch.sort(torch.cat([ids, more]))
    table = torch.cat([want, expected(more)])[rows]
    assert torch.equal(pool.read(mixed), table[torch.searchsorted(known, mixed)])
    pool.close()


def test_a_cold_batch_fills_in_batch_order_and_repeats_once_sorted(tmp_path):
    """What the fill callback is handed: a batch's misses in its own order when none repeats,
    else each once, sorted; the slots of an all-miss batch are its run of fresh slots."""
    from dpsn.tiers import Column, DeviceCache

    col = Column("v", 1, torch.float32, persisted=False)
    cache = DeviceCache(16, [col])
    calls = []

    def fill(ids, slots):
        calls.append((ids.tolist(), slots.tolist()))
        cache.column(col)[slots] = ids[:, None].float()

    def evict(slots):
        raise AssertionError("nothing is dirty")

    assert cache.lookup(torch.tensor([9, 3, 7]), fill, evict).tolist() == [0, 1, 2]
    assert calls[-1] == ([9, 3, 7], [0, 1, 2])
    slots = cache.lookup(torch.tensor([8, 3, 5, 8, 4]), fill, evict)
    assert calls[-1] == ([4, 5, 8], [3, 4, 5])
    assert cache.column(col)[slots, 0].tolist() == [8, 3, 5, 8, 4]
    slots = cache.lookup(torch.tensor([11, 9, 10]), fill, evict)  # a hit among misses
    assert calls[-1] == ([11, 10], [6, 7])
    assert cache.column(col)[slots, 0].tolist() == [11, 9, 10]
    # a negative id (the cache's own callers never have one; -1 marks an empty slot): refused
    # before anything is filled or changed
    before = cache.slot_ids.clone()
    with pytest.raises(IndexError, match="negative"):
        cache.lookup(torch.tensor([-5, 12, -5]), fill, evict)
    assert calls[-1] == ([11, 10], [6, 7]) and torch.equal(cache.slot_ids, before)
    slots, hit = cache.find(torch.tensor([-1, -5, 11]))
    assert hit.tolist() == [False, False, True]


# -- an executor of our own, from the public contract only ------------------------------------


class DotScorer(torch.nn.Module):
    """``score[t] = sum_j rows[ids[t, j]] . q[t]``: the smallest useful executor. It pages rows
    in, computes from ``batch.table[batch.use_index]``, and in backward hands each row's summed
    gradient to ``batch.apply_grads``, then releases the batch."""

    def __init__(self, pool, lr):
        super().__init__()
        self.pool, self.optimizer = pool, RowSGD(lr=lr)
        pool.set_state_width(self.optimizer.state_width(pool.dim))

    def forward(self, ids, q):
        batch = self.pool.page_in(ids)
        return _Score.apply(batch.anchor, q, batch, self)


class _Score(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, q, batch, module):
        rows = batch.table[batch.use_index]  # (T, K, D)
        ctx.batch, ctx.module = batch, module
        ctx.save_for_backward(q, rows)
        return torch.einsum("tkd,td->t", rows, q)

    @staticmethod
    def backward(ctx, ds):
        q, rows = ctx.saved_tensors
        batch = ctx.batch
        per_use = (ds[:, None] * q)[:, None, :].expand(rows.shape).reshape(-1, q.shape[1])
        grads = torch.zeros((len(batch), q.shape[1]))
        grads.index_add_(0, batch.inverse.reshape(-1), per_use)
        batch.apply_grads(grads, ctx.module.optimizer)
        batch.release()
        return None, torch.einsum("tkd,t->td", rows, ds), None, None


def test_a_users_own_executor_trains_rows_through_the_contract(tmp_path):
    pool = dpsn.create(tmp_path / "s", rows=100, dim=3, generator=SMALL, cache_rows=16)
    ids = torch.tensor([[1, 2], [2, 2], [7, 1]])
    q = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 2]])
    before = pool.base(torch.arange(10))  # procedural so far (base reads pin nothing)
    DotScorer(pool, lr=0.5)(ids, q).sum().backward()
    assert pool.stats()["locked_rows"] == 0  # the batch was released
    # d(sum of scores)/d row = sum of q over the row's uses; SGD moves it by -lr times that
    expected = before.clone()
    for (a, b), qt in zip(ids.tolist(), q, strict=True):
        expected[a] -= 0.5 * qt
        expected[b] -= 0.5 * qt
    assert torch.allclose(pool.read(torch.arange(10)), expected)
    pool.close()


def test_a_batch_collected_without_release_lets_its_rows_go(tmp_path):
    """Its finalizer only queues (it may run inside the stack's own operations); the next
    read, prefetch or page-in lets the rows go before looking anything up."""
    pool = dpsn.create(tmp_path / "s", rows=1000, dim=3, generator=SMALL, cache_rows=64)
    batch = pool.page_in(torch.arange(60))
    del batch
    gc.collect()
    pool.read(torch.arange(100, 160))  # needs the slots the collected batch held
    assert pool.stats()["spilled_batches"] == 0  # they were free: read through the cache
    pool.close()


def test_row_batch_describes_its_uses(tmp_path):
    pool = dpsn.create(tmp_path / "s", rows=100, dim=3, generator=SMALL, cache_rows=16)
    ids = torch.tensor([[5, 3], [3, 9], [5, 5]])
    with pool.page_in(ids) as batch:
        assert batch.ids.tolist() == [3, 5, 9] and batch.counts.tolist() == [2, 3, 1]
        assert torch.equal(batch.ids[batch.inverse], ids)
        assert torch.equal(batch.table[batch.use_index], pool.base(ids))  # procedural rows
        # uses grouped by row: row i's request positions are order[offsets[i]:offsets[i+1]]
        flat = ids.reshape(-1)
        for i, row in enumerate(batch.ids.tolist()):
            used = batch.order[batch.offsets[i] : batch.offsets[i + 1]]
            assert bool((flat[used] == row).all()) and len(used) == batch.counts[i]
        assert pool.stats()["locked_rows"] == 3
    assert pool.stats()["locked_rows"] == 0
    pool.close()


# -- batches bigger than the cache, and pools without one ------------------------------------


def _train_layer(pool, steps=6):
    layer = PoolLayer(pool, 4, 6, k=8, row_optimizer="adam", row_lr=0.05)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(32, 4, generator=g)
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer


@pytest.mark.parametrize("cache_rows", [16, 0])
def test_a_layer_trains_the_same_through_a_tiny_cache_or_none(tmp_path, cache_rows, row_kernels):
    """32 tokens x 8 rows need up to 256 distinct rows a step: through a 16-row cache every
    step spills, through no cache every step is uncached; both train bit for bit like a cache
    that holds everything."""
    out = []
    for rows in (cache_rows, 4096):
        pool = dpsn.create(
            tmp_path / f"s{rows}", rows=5000, dim=10, seed=1, generator=SMALL, cache_rows=rows
        )
        _train_layer(pool)
        out.append(pool.delta(torch.arange(5000)).clone())
        pool.close()
    assert torch.equal(out[0], out[1])
    assert bool((out[0] != 0).any())


class _FlakyGenerator(HashedSlices):
    """Hashed slices that run out of device memory once, when told to (a fault injector)."""

    kind = "test_flaky"
    fail_next = False

    @staticmethod
    def _maybe_fail():
        if _FlakyGenerator.fail_next:
            _FlakyGenerator.fail_next = False
            raise torch.OutOfMemoryError("injected: out of memory while filling")

    def forward(self, ids):
        self._maybe_fail()
        return super().forward(ids)

    def generate_into(self, ids, out):
        self._maybe_fail()
        super().generate_into(ids, out)


def test_an_out_of_memory_fill_falls_back_to_the_spilled_path(tmp_path, monkeypatch):
    monkeypatch.setitem(GENERATORS, _FlakyGenerator.kind, _FlakyGenerator)
    gen = _FlakyGenerator(dim=4, seed=0, memory_size=512)
    pool = dpsn.create(tmp_path / "s", rows=1000, dim=4, generator=gen, cache_rows=32)
    plain = dpsn.create(tmp_path / "p", rows=1000, dim=4, generator=gen, cache_rows=0)
    for p in (pool, plain):
        p.write([1, 2], torch.ones(2, 4))
    _FlakyGenerator.fail_next = True
    ids = torch.arange(10)
    assert torch.equal(pool.read(ids), plain.read(ids))
    assert pool.stats()["spilled_batches"] == 1
    assert len(pool.cache) == 0  # the failed fill left nothing half-written behind
    assert torch.equal(pool.read(ids), plain.read(ids))  # and the next read caches normally
    assert len(pool.cache) == 10
    pool.close()
    plain.close()


def test_a_failed_fill_keeps_dirty_rows_it_evicted(tmp_path, monkeypatch):
    """A fill that fails after its victims were evicted: their dirty rows were staged first."""
    monkeypatch.setitem(GENERATORS, _FlakyGenerator.kind, _FlakyGenerator)
    gen = _FlakyGenerator(dim=4, seed=0, memory_size=512)
    pool = dpsn.create(tmp_path / "s", rows=1000, dim=4, generator=gen, cache_rows=4)
    pool.read([1, 2, 3, 4])
    pool.write([1, 2, 3, 4], torch.full((4, 4), 2.0))  # all dirty in the cache
    _FlakyGenerator.fail_next = True
    pool.read([5, 6])  # evicts two dirty rows, then the fill fails: served spilled
    assert torch.equal(pool.delta([1, 2, 3, 4]), torch.full((4, 4), 2.0))
    pool.commit()
    assert pool.info()["persisted_rows"] == 4
    pool.close()


def test_no_step_walks_back_up_a_file(tmp_path):
    """The road from an executor to its rows runs one way (issue 20): in a hot step, a miss
    and a hot read no two library files call each other (the cache once called the stack back
    to fill and evict), and a commit does not call from tiers/ back into pool/ (it once did,
    for the routers). bench/rowpath_files.py prints the counts."""
    from dpsn.bench.rowpath_files import _library_root, operations, trace

    ops = operations(tmp_path, lifecycle=False)
    root = _library_root()
    for name in ("hot step", "miss step", "miss, full cache", "hot read"):
        assert trace(ops[name], root)["both_ways"] == [], name
    commit = trace(ops["commit"], root)
    assert not [p for p in commit["both_ways"] if "pool/" in p and "tiers/" in p]


def test_a_hot_step_and_a_miss_cross_few_files(tmp_path):
    """Issue 20: a hot step enters at most 10 of the library's files and a miss at most 18
    (15 and 25 before; docs/row-path.md has the walk): no per-step call into the store for its
    ``closed``, the policy for LRU's stamp, the column declarations, the step-timing scope
    nobody watches, a second optimizer module, or an adapter in front of staging. A new stop on
    the walk has to be one the step needs (raise the ceiling with the docs' table)."""
    from dpsn.bench.rowpath_files import _library_root, operations, trace

    ops = operations(tmp_path, lifecycle=False)
    root = _library_root()
    hot, miss = trace(ops["hot step"], root), trace(ops["miss step"], root)
    assert hot["files"] <= 10, sorted(hot["walk"])
    assert miss["files"] <= 18, sorted(miss["walk"])
    assert "store/_persisted.py" not in hot["walk"]  # (a miss reads the store: it must)
    for name in ("tiers/_columns.py", "pool/_profile.py", "tiers/_policies.py"):
        assert name not in hot["walk"] and name not in miss["walk"], name


def test_a_closed_pool_refuses_every_step(tmp_path):
    """The pool keeps its own closed flag (a step no longer asks the store): after close(),
    reads, page-ins and commits raise, a second close is a no-op."""
    pool = dpsn.create(tmp_path / "s", rows=100, dim=4, cache_rows=16)
    pool.read([1, 2])
    pool.close()
    for call in (
        lambda: pool.read([1]),
        lambda: pool.page_in(torch.tensor([1])),
        lambda: pool.commit(),
    ):
        with pytest.raises(ValueError, match="closed"):
            call()
    pool.close()


def test_the_usage_statistics_never_call_the_stack_back(tmp_path):
    """With a lifecycle the stack calls its usage component (tiers/_stack_usage.py) through
    hooks and the component never calls the stack back (issue 20: it was a mixin, the two
    called each other both ways)."""
    from dpsn.bench.rowpath_files import _library_root, operations, trace

    walk = trace(operations(tmp_path)["hot step, lifecycle"], _library_root())
    assert "tiers/_stack_usage.py" in walk["walk"]  # the hooks are on the walk
    assert walk["both_ways"] == []


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "spilled"])
@pytest.mark.parametrize("opt", ["adagrad", "adam"])
def test_an_update_scale_scales_the_step_not_the_state(tmp_path, opt, cached, row_kernels):
    """``apply_grads(scale=)`` moves each row ``scale[i]`` times what the step alone would move
    it (Adagrad and Adam included, which a gradient scale would not damp), and the optimizer
    state is updated as without it: a next step at scale 1 moves the rows as an unscaled
    pool's."""
    from dpsn.pool import RowAdagrad, RowAdam

    ids = torch.tensor([1, 5, 9])
    g1 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    g2 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor([1.0, 0.1, 0.0])
    moved = {}
    for name, first in (("scaled", scale), ("free", None)):
        kw = {"cache_rows": 16} if cached else {}
        pool = dpsn.create(tmp_path / name, rows=100, dim=4, generator=SMALL, **kw)
        o = {"adagrad": RowAdagrad, "adam": RowAdam}[opt](lr=0.1)
        pool.set_state_width(o.state_width(4))
        with pool.page_in(ids) as batch:
            batch.apply_grads(g1, o, scale=first)
        d1 = pool.delta(ids)
        with pool.page_in(ids) as batch:
            batch.apply_grads(g2, o, scale=torch.ones(3))
        moved[name] = (d1, pool.delta(ids) - d1)
        pool.close()
    (s1, s2), (f1, f2) = moved["scaled"], moved["free"]
    assert bool((f1.abs() > 1e-4).all())  # the free step moved every row
    torch.testing.assert_close(s1, f1 * scale[:, None], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s2, f2, rtol=1e-4, atol=1e-6)  # the same state after step 1
