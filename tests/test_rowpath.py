"""The row path: the id -> slot table, the executor contract (page_in -> RowBatch ->
apply_grads -> release) used by an executor written here from the public API alone, batches
bigger than the cache, and failures while filling."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpsn
from dpsn.hypernet import GENERATORS, HashedSlices
from dpsn.pool import PoolLayer, RowSGD
from dpsn.tiers import SlotTable

SMALL = {"kind": "hashed_slices", "memory_size": 512}


# -- grouping a batch's ids ------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    ids=st.lists(st.integers(0, 2**62), max_size=300),
    repeat=st.integers(1, 3),
    narrow=st.booleans(),
)
def test_native_grouping_matches_a_stable_sort(ids, repeat, narrow):
    """page_in's native grouping (a radix sort) gives what torch.sort(stable=True) and
    unique_consecutive give: distinct ids, counts, the inverse and the uses ordered by id."""
    from dpsn import kernels

    if kernels._lib is None:
        pytest.skip("dpsn._native was not built (no C compiler at install)")
    t = torch.tensor(ids * repeat, dtype=torch.int64)
    if narrow:  # small ids: fewer radix passes, many repeats
        t = t % 37
    uniq, counts, inverse, order = kernels.group_ids(t)
    ordered, want_order = torch.sort(t, stable=True)
    want_uniq, want_counts = torch.unique_consecutive(ordered, return_counts=True)
    assert torch.equal(uniq, want_uniq) and torch.equal(counts, want_counts)
    assert torch.equal(order, want_order) and torch.equal(uniq[inverse], t)


# -- the slot table against a dict ----------------------------------------------------------


@settings(max_examples=60, deadline=None)
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
