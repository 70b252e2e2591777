"""Co-use placement in compaction (format 4, placed segments) and the checks of persisted
co-use statistics (``verify``, ``dpsn repair``), on real LMDB + Zarr stores.

What must hold: a placed compaction changes no row's bits and no reader's view, leaves a store
``verify`` passes, puts rows that fire together in fewer chunks than id order does, marks the
store format 4 (a dpsn that reads only sorted segments refuses it) and compacts again over its
own placed segments; without statistics (or with ``placement=False``) nothing changes from
format 3. Damaged statistics are reported by ``verify`` and deleted by ``dpsn repair``.
"""

from __future__ import annotations

import hashlib
import json
import struct

import lmdb
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpsn
from dpsn.errors import CorruptStoreError, InvalidArgumentError, StoreVersionError
from dpsn.store import PersistedStore, cluster_order, couse_file

DIM = 4
ROWS = 4096
CHUNK = 16
SMALL = {"kind": "hashed_slices", "memory_size": 1024}


def _groups(n_groups: int, size: int, seed: int) -> np.ndarray:
    """``n_groups`` disjoint groups of ``size`` ids scattered over ``[0, ROWS)``."""
    rng = np.random.default_rng(seed)
    return rng.permutation(ROWS)[: n_groups * size].reshape(n_groups, size)


def _chunks_touched(store: PersistedStore, index, ids: np.ndarray) -> int:
    """Distinct (segment, chunk) pairs a cold read of ``ids`` reads."""
    found, seg, off, _ = index.lookup(ids)
    assert found.all()
    chunk_rows = {s: store.segment_record(int(s)).chunk_rows for s in np.unique(seg)}
    step = np.array([chunk_rows[int(s)] for s in seg])
    return len(set(zip(seg.tolist(), (off // step).tolist(), strict=True)))


def test_cluster_order_puts_groups_together():
    groups = _groups(8, CHUNK, seed=1)
    ids = np.sort(groups.reshape(-1))
    i, j = np.triu_indices(CHUNK, 1)
    a = np.minimum(groups[:, i], groups[:, j]).reshape(-1)
    b = np.maximum(groups[:, i], groups[:, j]).reshape(-1)
    w = np.full(len(a), 3.0)
    order = cluster_order(ids, a, b, w)
    assert np.array_equal(np.sort(order), np.arange(len(ids)))
    layout = ids[order]
    # each group's rows are one run of CHUNK consecutive rows
    pos = np.searchsorted(np.sort(layout), layout)
    where = np.empty(len(ids), dtype=np.int64)
    where[pos] = np.arange(len(ids))
    at = where[np.searchsorted(ids, groups)]  # (groups, CHUNK) positions in the layout
    assert np.all(at.max(axis=1) - at.min(axis=1) == CHUNK - 1)
    assert np.array_equal(cluster_order(ids, a, b, w), order)  # deterministic
    # pairs below min_weight, or naming rows outside ids, change nothing
    assert np.array_equal(cluster_order(ids, a, b, w, min_weight=4.0), np.arange(len(ids)))
    assert np.array_equal(cluster_order(ids[:1], a, b, w), [0])
    with pytest.raises(InvalidArgumentError):
        cluster_order(np.array([3, 3]), a, b, w)
    with pytest.raises(InvalidArgumentError):
        cluster_order(ids, a, b[:-1], w)


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.integers(0, 200), unique=True, max_size=40),
    pairs=st.lists(st.tuples(st.integers(0, 210), st.integers(0, 210), st.integers(1, 5))),
)
def test_cluster_order_is_a_permutation(ids, pairs):
    ids = np.array(ids, dtype=np.int64)
    a = np.array([min(x, y) for x, y, _ in pairs], dtype=np.int64)
    b = np.array([max(x, y) for x, y, _ in pairs], dtype=np.int64)
    w = np.array([c for _, _, c in pairs], dtype=np.float64)
    order = cluster_order(ids, a, b, w, min_weight=1.0)
    assert np.array_equal(np.sort(order), np.arange(len(ids)))


def _trained(path, *, commits: int = 4, track: bool = True):
    pool = dpsn.create(
        path, rows=ROWS, dim=DIM, chunk_rows=CHUNK, generator=SMALL, cache_rows=0,
        compact_above=None, keep_last=20,
    )  # fmt: skip
    pool.set_state_width(2)
    if track:
        pool.track_couse(1 << 14)
    groups = _groups(24, 8, seed=0)
    for k in range(commits):
        part = groups[k::commits]
        for _ in range(3):
            pool.record_couse(torch.from_numpy(groups))
        ids = torch.from_numpy(np.sort(part.reshape(-1)))
        pool.write(ids, torch.randn(len(ids), DIM, generator=torch.Generator().manual_seed(k)))
        pool.commit(f"c{k}")
    return pool, groups


def test_placed_compaction_keeps_bits_and_reads_fewer_chunks(tmp_path, monkeypatch):
    path = tmp_path / "s"
    pool, groups = _trained(path)
    everything = torch.arange(ROWS)
    before = pool.delta(everything).clone()
    with PersistedStore.open(path, writable=False) as ro:
        _, index = ro.load_head()
        by_id = sum(_chunks_touched(ro, index, g) for g in groups)
    result = pool.compact()
    assert result["rows_moved"] == len(groups.reshape(-1))
    assert torch.equal(pool.delta(everything), before)
    report = pool.verify()
    assert report.ok, report.problems
    with dpsn.open(path) as r:  # beside the writer: replays the compaction onto older runs
        assert torch.equal(r.delta(everything), before)
    pool.close()
    with PersistedStore.open(path, writable=False) as store:
        _head, index = store.load_head()
        rec = store.segment_record(result["new_segments"][0])
        assert rec.placed and rec.state_width == 2
        placed = sum(_chunks_touched(store, index, g) for g in groups)
        # 24 groups of 8 in chunks of 16: by id each group spans ~8 chunks; placed, 1 or 2
        assert placed <= 2 * len(groups) < by_id
        ids, _deltas, state = store.read_deltas(index, np.sort(groups.reshape(-1)), state_width=2)[
            :3
        ]
        assert ids.all() and state.shape == (len(groups.reshape(-1)), 2)
    env = lmdb.open(str(path / "index.lmdb"), readonly=True, max_dbs=16, lock=False)
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        assert txn.get(b"format_version", db=meta) == struct.pack(">Q", 4)
    env.close()
    with dpsn.open(path) as r:  # a fresh reader rebuilds the index from the placed segment
        assert torch.equal(r.delta(everything), before)
    # a dpsn that reads up to format 3 refuses the store instead of misreading it
    import dpsn.store._persisted as persisted

    monkeypatch.setattr(persisted, "FORMAT_VERSION", 3)
    with pytest.raises(StoreVersionError):
        PersistedStore.open(path, writable=False)
    monkeypatch.undo()
    # compacting again over a placed segment (half its rows superseded) keeps every bit
    with dpsn.open(path, "r+", cache_rows=0) as pool:
        some = torch.from_numpy(np.sort(groups[::2].reshape(-1)))
        pool.write(some, torch.ones(len(some), DIM))
        pool.commit("more")
        after = pool.delta(everything).clone()
        again = pool.compact()
        assert again["rows_moved"] > 0
        assert torch.equal(pool.delta(everything), after)
        assert pool.verify().ok
    with dpsn.open(path, at=result["commits"][0]) as old:  # rebuilt from the log
        assert torch.equal(old.delta(everything), before)


def test_no_statistics_or_placement_off_keeps_id_order(tmp_path):
    for track, flag in ((False, True), (True, False)):
        path = tmp_path / f"s{track}{flag}"
        pool, _ = _trained(path, track=track)
        result = pool.compact(placement=flag)
        pool.close()
        with PersistedStore.open(path, writable=False) as store:
            assert not store.segment_record(result["new_segments"][0]).placed
            raw = json.dumps(store.segment_record(result["new_segments"][0]).to_json())
            assert "placed" not in raw  # format 3's record bytes
        env = lmdb.open(str(path / "index.lmdb"), readonly=True, max_dbs=16, lock=False)
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            assert txn.get(b"format_version", db=meta) == struct.pack(">Q", 1)
        env.close()


def test_a_wrong_placement_is_refused(tmp_path):
    path = tmp_path / "s"
    pool, _ = _trained(path, track=False)
    pool.close()
    with PersistedStore.open(path, writable=True) as store:
        head, index = store.load_head()
        for bad in (lambda ids: np.zeros(len(ids), dtype=np.int64), lambda ids: ids[:-1] * 0.5):
            with pytest.raises(InvalidArgumentError):
                store.compact(index, head, placement=bad)
        assert store.head() == head and store.verify().ok


def _rewrite(path, commit: int, **changes: np.ndarray) -> None:
    """Rewrite a statistics file pair with some arrays changed and a valid header and SHA-256
    (damage the checksums cannot see: only the value checks can)."""
    arrays = couse_file.read_arrays(path, commit)
    arrays.update(changes)
    folder = path / couse_file.DIR
    blob = b"".join(np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes()
                    for v in arrays.values())  # fmt: skip
    meta = [[k, "int64" if v.dtype.kind == "i" else "float32", len(v)] for k, v in arrays.items()]
    (folder / (couse_file.name(commit) + ".bin")).write_bytes(blob)
    head = {"format": 1, "arrays": meta, "sha256": hashlib.sha256(blob).hexdigest()}
    (folder / (couse_file.name(commit) + ".json")).write_text(json.dumps(head))


@pytest.mark.parametrize(
    "damage",
    ["id_out_of_range", "nan_count", "wrong_dtype", "truncated"],
)
def test_verify_reports_damaged_couse_and_repair_drops_it(tmp_path, damage):
    from dpsn.tools._repair import repair

    path = tmp_path / "s"
    pool, _ = _trained(path, commits=2)
    pool.close()
    commit = couse_file.saved(path / couse_file.DIR)[-1]
    arrays = couse_file.read_arrays(path, commit)
    assert couse_file.check_arrays(arrays, ROWS) is None
    binary = path / couse_file.DIR / (couse_file.name(commit) + ".bin")
    if damage == "id_out_of_range":
        b = arrays["b"].copy()
        b[0] = ROWS + 5
        _rewrite(path, commit, b=b)
    elif damage == "negative_count":
        _rewrite(path, commit, count=-arrays["count"])
    elif damage == "nan_count":
        _rewrite(path, commit, count=np.full_like(arrays["count"], np.nan))
    elif damage == "wrong_dtype":
        _rewrite(path, commit, a=arrays["a"].astype(np.float32))
    elif damage == "flipped_byte":
        raw = bytearray(binary.read_bytes())
        raw[5] ^= 0x10
        binary.write_bytes(bytes(raw))
    else:
        binary.write_bytes(binary.read_bytes()[:-3])
    with PersistedStore.open(path, writable=False) as store:
        report = store.verify()
    assert not report.ok
    assert any("co-use statistics of commit" in p for p in report.problems), report.problems
    with pytest.raises(CorruptStoreError, match="co-use statistics are damaged"):
        dpsn.open(path)  # typed, naming the file and the fix
    out = repair(path)
    assert out["couse_dropped"] == [commit] and out["verify_ok"], out
    with dpsn.open(path) as r:  # the older commit's statistics, intact, are kept
        assert r.couse is not None and r.verify().ok


def test_a_miss_pages_in_its_partners_and_the_switch_turns_it_off(tmp_path):
    pool = dpsn.create(tmp_path / "s", rows=1 << 20, dim=4, generator=SMALL, cache_rows=256)
    pool.track_couse(1 << 12)
    for _ in range(4):
        pool.record_couse(torch.tensor([[1, 2, -1], [10, 11, -1], [20, 21, -1]]))
    pool.record_couse(torch.tensor([[30, 31, -1]]))  # seen once: below the bar

    def read(i: int) -> tuple[int, int]:
        """Read row i, let the advice (on the prefetch thread) finish: (hits, misses) added."""
        before = pool.stats()
        pool.read(torch.tensor([i]))
        pool.prefetch([]).wait()  # queued behind the advice job: it has run
        after = pool.stats()
        return after["hits"] - before["hits"], after["misses"] - before["misses"]

    assert read(1) == (0, 1) and pool.stats()["advised_rows"] == 1  # not counted as a miss
    assert read(2) == (1, 0)  # paged in by 1's miss
    assert read(30) == (0, 1) and pool.stats()["advised_rows"] == 1  # 30-31 seen once only
    pool.prefetch_partners_on_miss(0)
    assert read(10) == (0, 1) and read(11) == (0, 1) and pool.stats()["advised_rows"] == 1
    pool.prefetch_partners_on_miss(2, limit=1)
    assert read(20) == (0, 1) and read(21) == (1, 0) and pool.stats()["advised_rows"] == 2
    with pytest.raises(InvalidArgumentError):
        pool.prefetch_partners_on_miss(-1)
    pool.close()


@pytest.mark.parametrize("policy", ["lru", "lfu", "tinylfu"])
def test_advice_rows_are_admitted_cold(tmp_path, policy):
    """Rows a miss's advice pages in (its co-use partners) are new rows, not uses: the
    eviction policy counts no access for them (LFU's count stays the insert's 1, TinyLFU's
    sketch never saw them: a guess must not outrank rows really read), and the step's clock and
    counters stay the step's; the bytes the advice moved count in the totals (review of issue
    26: they were admitted by a full lookup)."""

    def run(advise: bool) -> tuple[dpsn.Pool, dict]:
        pool = dpsn.create(
            tmp_path / f"s{advise}",
            rows=1 << 20,
            dim=4,
            generator=SMALL,
            cache_rows=256,
            policy=policy,
        )
        pool.track_couse(1 << 12)
        for _ in range(4):
            pool.record_couse(torch.tensor([[1, 2, -1]]))
        pool.prefetch_partners_on_miss(2 if advise else 0)
        pool.read(torch.tensor([1]))
        pool.prefetch([]).wait()  # queued behind the advice job: it has run
        c = pool.cache
        got = {"step": c.step, "last": dict(c.stats.last), "total": dict(c.stats.total)}
        return pool, got

    plain, want = run(False)
    advised, got = run(True)
    cache = advised.cache
    slots, hit = cache.find(torch.tensor([1, 2]))
    assert hit.tolist() == [True, True] and advised.stats()["advised_rows"] == 1
    assert got["step"] == want["step"] and got["last"] == want["last"]
    row_bytes = 4 * 4  # one float32 row of dim 4, never trained: its row column only
    assert got["total"] == {
        **want["total"],
        "bytes_to_device": want["total"]["bytes_to_device"] + row_bytes,
    }
    p = cache.policy
    if policy == "lru":  # inserted at the step that missed: as recent as the row that missed
        assert float(p.last[slots[1]]) == float(p.last[slots[0]]) > 0
    elif policy == "lfu":  # the insert's count only; the row read has its access on top
        assert float(p.count[slots[1]]) == 1.0 and float(p.count[slots[0]]) == 2.0
    else:  # never counted in the sketch, no frequency
        assert int(p.estimate(torch.tensor([2]))[0]) == 0 and float(p.freq[slots[1]]) == 0.0
        assert int(p.estimate(torch.tensor([1]))[0]) == 1
    plain.close()
    advised.close()


def test_miss_partners_bounded_strongest_first():
    from dpsn.tiers import CoUse

    s = CoUse(1 << 10)
    for n, group in ((5, [1, 2]), (4, [1, 3]), (3, [1, 4]), (6, [7, 8]), (2, [7, 9])):
        for _ in range(n):
            s.record(torch.tensor([group]))
    got = s.miss_partners(torch.tensor([1, 7, 7]), k=2)
    assert got.tolist() == [8, 2, 3, 9]  # top 2 of each, strongest pair first
    assert s.miss_partners(torch.tensor([1, 7]), k=2, limit=2).tolist() == [8, 2]
    assert s.miss_partners(torch.tensor([1, 2]), k=3).tolist() == [3, 4]  # missed rows excluded
    assert s.miss_partners(torch.tensor([1]), k=3, rows=4).tolist() == [2, 3]
    assert s.miss_partners(torch.tensor([5]), k=2).tolist() == []


def test_dpsn_compact_places_by_the_saved_statistics(tmp_path):
    path = tmp_path / "s"
    pool, _ = _trained(path, commits=3)
    pool.close()
    result = dpsn.compact(path)
    with PersistedStore.open(path, writable=False) as store:
        assert store.segment_record(result["new_segments"][0]).placed
        assert store.verify().ok
