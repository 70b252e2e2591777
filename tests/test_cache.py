"""The device cache: lookups, policies, write-back, locking, prefetch, staleness; and a
property test that a cached pool always answers exactly like an uncached one."""

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import dpsn
from dpsn.errors import CacheCapacityError
from dpsn.tiers import Column, DeviceCache, EvictionPolicy, policies, register_policy

SMALL = {"kind": "hashed_slices", "memory_size": 1024}
V = Column("v", 2, torch.float32, persisted=False)


class Filler:
    """A fill callback that records what it was asked for and writes each id as its value."""

    def __init__(self):
        self.calls = []
        self.cache = None

    def __call__(self, ids, slots):
        self.calls.append(ids.tolist())
        self.cache.column(V)[slots] = ids[:, None].float().expand(-1, 2)


def make_cache(capacity=4, policy="lru"):
    c = DeviceCache(capacity, [V], policy=policy)
    return c


def filler(c):
    f = Filler()
    f.cache = c
    return f


def no_evict(slots):
    raise AssertionError("nothing is dirty")


def test_hits_and_misses_and_duplicate_ids_filled_once():
    c = make_cache()
    fill = filler(c)
    slots = c.lookup(torch.tensor([5, 7, 5, 5]), fill, no_evict)
    assert fill.calls == [[5, 7]]
    assert torch.equal(c.column(V)[slots][:, 0], torch.tensor([5.0, 7, 5, 5]))
    c.lookup(torch.tensor([7, 5]), fill, no_evict)
    assert fill.calls == [[5, 7]]
    assert c.stats.total["misses"] == 2 and c.stats.total["hits"] == 4
    assert c.stats.last == {**c.stats.last, "hits": 2, "misses": 0}


def test_lru_evicts_least_recently_used():
    c = make_cache(3)
    fill = filler(c)
    for i in (1, 2, 3):
        c.lookup(torch.tensor([i]), fill, no_evict)
    c.lookup(torch.tensor([1]), fill, no_evict)  # 2 is now the oldest
    c.lookup(torch.tensor([4]), fill, no_evict)
    assert sorted(c.occupied_ids()[0].tolist()) == [1, 3, 4]
    assert c.stats.total["evictions"] == 1


def test_lfu_evicts_least_frequently_used():
    c = make_cache(3, "lfu")
    fill = filler(c)
    for batch in ([1], [1], [1], [2], [2], [3]):
        c.lookup(torch.tensor(batch), fill, no_evict)
    c.lookup(torch.tensor([3]), fill, no_evict)  # 3 is now the most recent, but seen twice
    c.lookup(torch.tensor([4]), fill, no_evict)
    assert sorted(c.occupied_ids()[0].tolist()) == [1, 3, 4] or sorted(
        c.occupied_ids()[0].tolist()
    ) == [1, 2, 4]
    assert 1 in c.occupied_ids()[0].tolist()


@pytest.mark.parametrize(("policy", "kept"), [("lfu", [3, 5]), ("tinylfu", [1, 5])])
def test_tinylfu_remembers_rows_it_evicted(policy, kept):
    """Row 1 is read often, pushed out (the other row is pinned), then read once more: in-cache
    LFU starts it again from one and drops it before row 3; TinyLFU's sketch still knows it."""
    c = make_cache(2, policy)
    fill = filler(c)
    for _ in range(3):
        c.lookup(torch.tensor([1]), fill, no_evict)
    c.pin("step", c.lookup(torch.tensor([2]), fill, no_evict))
    c.lookup(torch.tensor([3]), fill, no_evict)  # evicts 1, the only unpinned row
    c.unpin("step")
    c.lookup(torch.tensor([1]), fill, no_evict)  # evicts 2 (seen once, longest ago)
    c.lookup(torch.tensor([3]), fill, no_evict)
    c.lookup(torch.tensor([5]), fill, no_evict)
    assert sorted(c.occupied_ids()[0].tolist()) == kept


def test_tinylfu_sketch_counts_and_halves():
    c = make_cache(4, "tinylfu")
    fill = filler(c)
    sketch = c.policy
    sketch.sample_size = 12
    c.lookup(torch.tensor([7, 7, 8]), fill, no_evict)
    c.lookup(torch.tensor([7, 9]), fill, no_evict)
    est = sketch.estimate(torch.tensor([7, 8, 9, 10]))
    assert (est >= torch.tensor([3, 1, 1, 0], dtype=est.dtype)).all()  # count-min: never below
    c.lookup(torch.tensor([7] * 7), fill, no_evict)  # 12 accesses: everything halves
    assert sketch.counted == 6
    assert 5 <= int(sketch.estimate(torch.tensor([7]))) <= 6  # (3 + 7) // 2, or one more
    c.lookup(torch.tensor([], dtype=torch.int64), fill, no_evict)  # an empty batch is fine


def test_dirty_rows_are_handed_back_before_eviction():
    c = make_cache(2)
    fill = filler(c)
    evicted = []
    slots = c.lookup(torch.tensor([1, 2]), fill, no_evict)
    c.column(V)[slots[0]] = 42.0
    c.mark_dirty(slots[:1])

    def evict(slots):  # called before the slots are reused: they still hold the old rows
        evicted.append((c.slot_ids[slots].clone(), c.column(V)[slots].clone()))

    c.lookup(torch.tensor([3, 4]), fill, evict)
    assert len(evicted) == 1 and evicted[0][0].tolist() == [1]
    assert torch.equal(evicted[0][1], torch.full((1, 2), 42.0))
    assert c.stats.total["writebacks"] == 1


def test_batch_larger_than_capacity_is_a_clear_error():
    c = make_cache(3)
    fill = filler(c)
    c.lookup(torch.tensor([1]), fill, no_evict)
    with pytest.raises(CacheCapacityError, match="4 distinct rows but the cache holds 3"):
        c.lookup(torch.tensor([1, 2, 3, 4]), fill, no_evict)
    assert c.occupied_ids()[0].tolist() == [1]  # unchanged


def test_locked_rows_are_never_evicted():
    c = make_cache(2)
    fill = filler(c)
    slots = c.lookup(torch.tensor([1, 2]), fill, no_evict)
    c.pin("step", slots)
    with pytest.raises(CacheCapacityError, match="can be evicted"):
        c.lookup(torch.tensor([3]), fill, no_evict)
    c.unpin("step")
    c.lookup(torch.tensor([3]), fill, no_evict)


def test_pins_are_per_holder_and_replaced_not_stacked():
    c = make_cache(3)
    fill = filler(c)
    a = c.lookup(torch.tensor([1, 2]), fill, no_evict)
    c.pin("layer", a)
    c.pin("read", a[:1])
    c.pin("layer", c.lookup(torch.tensor([3]), fill, no_evict))  # the layer's next step
    assert sorted(c.slot_ids[c.pinned()].tolist()) == [1, 3]  # 2 is free again, 1 still read's
    c.lookup(torch.tensor([4]), fill, no_evict)  # evicts 2, the only unpinned row
    assert sorted(c.occupied_ids()[0].tolist()) == [1, 3, 4]
    c.unpin("read")
    c.unpin("never-pinned")  # a no-op, not an error
    assert sorted(c.slot_ids[c.pinned()].tolist()) == [3]
    c.unpin_all()
    assert not bool(c.pinned().any())


@given(
    batches=st.lists(
        st.lists(st.integers(0, 2**62), min_size=1, max_size=24), min_size=1, max_size=12
    ),
    capacity=st.integers(24, 40),
)
def test_find_is_exact_whatever_the_guess_tables_hold(batches, capacity):
    """The guess tables are tiny here (16x capacity buckets, ids up to 2**62): collisions in
    both tables are common, and every answer must still match the cache's contents."""
    c = make_cache(capacity)
    fill = filler(c)
    for batch in batches:
        ids = torch.tensor(batch)
        slots = c.lookup(ids, fill, no_evict)
        assert torch.equal(c.slot_ids[slots], ids)
        cached = c.occupied_ids()[0]
        probe = torch.cat([ids, ids + 1, cached])
        got, hit = c.find(probe)
        assert torch.equal(hit, torch.isin(probe, cached))
        assert torch.equal(c.slot_ids[got[hit]], probe[hit])


def test_policies_are_pluggable_by_name():
    assert {"lru", "lfu"} <= set(policies())

    class MRU(EvictionPolicy):
        name = "mru-test"

        def __init__(self, capacity, device):
            super().__init__(capacity, device)
            self.last = torch.zeros(capacity, dtype=torch.float64)

        def touch(self, slots, step):
            self.last[slots] = step

        insert = touch

        def score(self):
            return -self.last

    register_policy(MRU)
    c = make_cache(2, "mru-test")
    fill = filler(c)
    c.lookup(torch.tensor([1]), fill, no_evict)
    c.lookup(torch.tensor([2]), fill, no_evict)
    c.lookup(torch.tensor([3]), fill, no_evict)
    assert sorted(c.occupied_ids()[0].tolist()) == [1, 3]
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_cache(2, "nope")


def test_unknown_policy_is_an_error_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown eviction policy 'lur'; known: lfu, lru"):
        dpsn.create(tmp_path / "s", rows=10, dim=2, policy="lur")
    assert not (tmp_path / "s").exists()
    dpsn.create(tmp_path / "s", rows=10, dim=2).close()
    with pytest.raises(ValueError, match="unknown eviction policy"):
        dpsn.open(tmp_path / "s", cache_rows=0, policy="lur")  # even with no cache
    from dpsn.tools.cli import main

    assert main(["stats", str(tmp_path / "s"), "--policy", "lur"]) == 2
    assert "unknown eviction policy 'lur'" in capsys.readouterr().err


# -- the pool with a cache -------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    """A cached pool and an uncached one over identical stores."""
    kw = dict(rows=1000, dim=4, seed=3, generator=SMALL, chunk_rows=4)
    cached = dpsn.create(tmp_path / "a", cache_rows=4, **kw)
    plain = dpsn.create(tmp_path / "b", cache_rows=0, **kw)
    yield cached, plain
    cached.close()
    plain.close()


def test_eviction_of_a_dirty_row_stages_it(pair):
    cached, _ = pair
    cached.read([1, 2, 3, 4])
    cached.write([1], torch.ones(1, 4))  # in cache, dirty
    assert cached.stats()["dirty_rows"] == 1
    cached.read([5, 6, 7, 8])  # evicts 1..4
    assert cached.stats()["writebacks"] == 1
    assert torch.equal(cached.delta([1]), torch.ones(1, 4))
    c = cached.commit()
    assert c.rows_written == 1
    cached.close()
    with dpsn.open(cached.path) as r:
        assert torch.equal(r.delta([1]), torch.ones(1, 4))


def test_commit_writes_back_dirty_rows_and_store_equals_cache(pair):
    cached, _ = pair
    cached.read([1, 2])
    cached.write([1, 2], torch.randn(2, 4))
    expected = cached.read([1, 2]).clone()
    cached.commit()
    assert cached.stats()["dirty_rows"] == 0
    with dpsn.open(cached.path, cache_rows=0) as r:
        assert torch.equal(r.read([1, 2]), expected)


def test_a_batch_bigger_than_the_cache_is_served_from_the_lower_tiers(pair):
    """FBGEMM's TBE and HugeCTR serve such batches through a slower path; so does dpsn, and the
    rows it returns are the newest wherever they live (a dirty cached row included)."""
    cached, plain = pair
    for p in pair:
        p.write([1, 9], torch.ones(2, 4))
        p.commit()
        p.read([0, 1, 2, 3])
        p.write([2], torch.full((1, 4), 3.0))  # dirty in the cache, newer than anything below
    ids = torch.arange(10)
    assert torch.equal(cached.read(ids), plain.read(ids))
    assert cached.stats()["spilled_batches"] == 1 and cached.stats()["spilled_rows"] == 10
    assert cached.read(torch.arange(4)).shape == (4, 4)
    assert cached.stats()["spilled_batches"] == 1  # this one fitted


def test_frozen_generator_changed_in_place_is_rematerialized(pair):
    cached, plain = pair
    ids = torch.tensor([1, 2, 3])
    cached.read(ids)
    with torch.no_grad():
        cached.generator.memory.mul_(2.0)
        plain.generator.memory.mul_(2.0)
    assert torch.equal(cached.read(ids), plain.read(ids))


def test_trainable_generator_regenerates_bases_every_read(pair):
    cached, _ = pair
    ids = torch.tensor([1, 2])
    cached.read(ids)
    cached.generator.requires_grad_(True)
    before = cached.read(ids)
    with torch.no_grad():
        cached.generator.memory.add_(1.0)
    after = cached.read(ids)
    assert not torch.equal(before, after)
    assert torch.equal(after, cached.base(ids))


def test_prefetch_pages_rows_in_and_locks_them(pair):
    cached, _ = pair
    cached.read([1, 2])
    with cached.prefetch([10, 11]) as pf:
        pf.wait()
        assert cached.stats()["locked_rows"] == 4  # the step in flight and the prefetch
        hits = cached.stats()["hits"]
        cached.read([10, 11])  # served from the cache
        assert cached.stats()["hits"] == hits + 2
        # 10, 11 are locked by the prefetch: this batch cannot all be resident, so it spills
        cached.read([20, 21, 22])
        assert cached.stats()["spilled_batches"] == 1
    cached.read([20, 21, 22])
    assert cached.stats()["spilled_batches"] == 1


def test_stats_keys_and_cli(pair, capsys):
    cached, _ = pair
    cached.read([1, 1, 2])
    s = cached.stats()
    for key in (
        "hits",
        "misses",
        "evictions",
        "hit_rate",
        "bytes_to_device",
        "rows_generated",
        "bytes_from_disk",
        "last_step",
    ):
        assert key in s
    assert s["misses"] == 2 and s["hits"] == 1
    from dpsn.tools.cli import main

    assert main(["stats", str(cached.path), "--json", "--replay", "1,2,3,1"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["replay"]["misses"] == 3 and out["replay"]["hits"] == 1
    cached.commit("with stats")
    assert main(["stats", str(cached.path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["writer"]["misses"] == 2 and out["store"]["persisted_rows"] == 0


# -- property: a cached pool is indistinguishable from an uncached one -----------------------

ids_st = st.lists(st.integers(0, 30), min_size=1, max_size=7)


class CachedVsPlain(RuleBasedStateMachine):
    CAPACITY = 6

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="dpsn-cache-"))
        kw = dict(rows=31, dim=3, seed=1, generator=SMALL, chunk_rows=4)
        self.cached = dpsn.create(self.dir / "a", cache_rows=self.CAPACITY, policy="lru", **kw)
        self.plain = dpsn.create(self.dir / "b", cache_rows=0, **kw)

    def both(self, fn):
        a, b = fn(self.cached), fn(self.plain)
        if a is not None:
            assert torch.equal(a, b), (a, b)

    @rule(ids=ids_st)
    def read(self, ids):  # batches bigger than the cache are served too (spilled)
        self.both(lambda p: p.read(ids))

    @rule(ids=ids_st, value=st.floats(-4, 4, width=32), add=st.booleans())
    def write(self, ids, value, add):
        d = torch.full((len(ids), 3), value) + torch.arange(len(ids))[:, None].float() / 8
        self.both(lambda p: p.write(ids, d, add=add))

    @rule(ids=ids_st)
    def drop(self, ids):
        self.both(lambda p: p.drop(ids))

    @rule()
    def commit(self):
        self.cached.commit()
        self.plain.commit()

    @rule()
    def discard(self):
        self.both(lambda p: p.discard())

    @rule(policy=st.sampled_from(["lru", "lfu", "tinylfu"]))
    def reopen(self, policy):
        self.cached.close()
        self.plain.close()
        self.cached = dpsn.open(self.dir / "a", "r+", cache_rows=self.CAPACITY, policy=policy)
        self.plain = dpsn.open(self.dir / "b", "r+", cache_rows=0)

    @rule(ids=st.lists(st.integers(0, 30), min_size=1, max_size=3))
    def prefetch(self, ids):
        try:
            with self.cached.prefetch(ids) as pf:
                pf.wait()
        except CacheCapacityError:
            pass

    @invariant()
    def all_rows_agree(self):
        self.both(lambda p: p.delta(torch.arange(31)))

    def teardown(self):
        self.cached.close()
        self.plain.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestCachedVsPlain = CachedVsPlain.TestCase


def test_large_columns_ask_for_huge_pages_and_hold_what_torch_full_would():
    """The cache's big arrays live in their own mappings advised onto transparent huge pages
    (best effort: the kernel may say no); their values are torch.full's either way."""
    from dpsn.tiers import _hugepages

    cpu = torch.device("cpu")
    small = _hugepages.full((10, 3), 7, torch.int32, cpu)
    assert torch.equal(small, torch.full((10, 3), 7, dtype=torch.int32))
    zeros = _hugepages.full((1 << 20, 3), 0, torch.float32, cpu)  # 12 MiB
    ones = _hugepages.full((3 << 20,), 1, torch.int32, cpu)
    assert not bool(zeros.any()) and bool((ones == 1).all())
    zeros[12345, 1] = 2.5  # an ordinary writable tensor
    assert float(zeros.sum()) == 2.5
    if not (_hugepages.ENABLED and Path("/sys/kernel/mm/transparent_hugepage").exists()):
        return
    start = zeros.data_ptr()
    flags = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's header line: "lo-hi perms ..."
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= start < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
                break
    assert flags is not None and "hg" in flags  # MADV_HUGEPAGE was given


def test_an_admission_changes_nothing_until_its_owner_places_it():
    """The owner drives a miss (issue 20: the cache calls nothing of its owner's): ``admit``
    changes no slot, names the dirty victims while their columns still hold the rows;
    ``place`` makes the ids found; ``abandon`` forgets them again; ``finish`` counts."""
    c = make_cache(capacity=2)
    fill = filler(c)
    c.lookup(torch.tensor([1, 2]), fill, no_evict)
    c.column(V)[c.find(torch.tensor([1]))[0]] = 10.0  # row 1 changed: dirty
    c.mark_dirty(c.find(torch.tensor([1]))[0])
    c.lookup(torch.tensor([2]), fill, no_evict)  # 1 is now the least recent
    a = c.admit(torch.tensor([3]))
    assert not isinstance(a, torch.Tensor)
    assert a.missing.tolist() == [3] and len(a.dirty) == 1
    assert c.find(torch.tensor([1]))[1].tolist() == [True]  # nothing changed yet
    assert c.column(V)[a.dirty].tolist() == [[10.0, 10.0]]  # the dirty row, still there
    c.place(a)
    assert c.find(torch.tensor([1, 3]))[1].tolist() == [False, True]
    c.abandon(a)  # the owner could not fill: the slot is forgotten
    assert c.find(torch.tensor([3]))[1].tolist() == [False] and len(c) == 1
    b = c.admit(torch.tensor([3]))
    c.place(b)
    fill(b.missing.cpu(), b.victims)
    assert c.finish(b).tolist() == b.victims.tolist()
    assert c.stats.last["misses"] == 1 and len(c) == 2
