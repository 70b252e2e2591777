"""Co-use statistics: the bounded pair sketch against exact counts, circuits, partners,
placement, and their persistence with commits (checked like the rest of a store)."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpsn
from dpsn.errors import CorruptStoreError, InvalidArgumentError, InvalidIdsError
from dpsn.tiers import CoUse

SMALL = {"kind": "hashed_slices", "memory_size": 4096}


def exact(groups: list[list[int]]) -> Counter:
    c: Counter = Counter()
    for g in groups:
        for a, b in combinations(sorted({x for x in g if x >= 0}), 2):
            c[(a, b)] += 1
    return c


def held(s: CoUse) -> dict[tuple[int, int], float]:
    a, b, c = s.pairs()
    return {(int(x), int(y)): float(z) for x, y, z in zip(a, b, c, strict=True)}


def test_counts_exact_when_room():
    s = CoUse(1 << 12)
    groups = [[1, 2, 3], [1, 2, -1], [3, 2, 1], [4, 4, 5]]
    for g in groups:
        s.record(torch.tensor([g]))
    assert held(s) == {k: float(v) for k, v in exact(groups).items()}
    assert s.groups_seen == 4


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(-1, 40), min_size=1, max_size=5).map(lambda g: (g + [-1] * 5)[:5]),
        min_size=1,
        max_size=40,
    ),
    st.integers(1, 8),
)
def test_bounded_and_never_overstated(groups, steps):
    """However many pairs come, the sketch holds at most ``slots`` of them, every held pair is
    a real pair, and its count never exceeds the true count (HeavyKeeper's guarantee)."""
    s = CoUse(16)
    chunks = np.array_split(np.array(groups), steps)
    for ch in chunks:
        if len(ch):
            s.record(torch.tensor(ch))
    truth = exact(groups)
    got = held(s)
    assert len(got) <= 16
    for pair, count in got.items():
        assert pair in truth and 0 < count <= truth[pair]


def test_heavy_pairs_survive_churn():
    s = CoUse(64)
    rng = np.random.default_rng(0)
    for _ in range(50):
        noise = rng.integers(1000, 10**6, size=(40, 3))
        hot = np.array([[1, 2, 3]] * 5)
        s.record(torch.tensor(np.concatenate([hot, noise])))
    got = held(s)  # 120 noise pairs a step churn through 64 slots, decrementing what they hit
    a, b, _ = s.pairs()
    assert {(int(a[i]), int(b[i])) for i in range(3)} == {(1, 2), (1, 3), (2, 3)}
    assert all(150 <= got[p] <= 250 for p in ((1, 2), (1, 3), (2, 3)))


def test_circuits_and_partners():
    s = CoUse(1 << 10)
    for _ in range(5):
        s.record(torch.tensor([[10, 11, -1], [11, 12, -1], [50, 51, 52]]))
    s.record(torch.tensor([[10, 99, -1]]))  # a weak link: below min_support
    circuits = s.circuits(min_support=3)
    assert [c[0].tolist() for c in circuits] == [[10, 11, 12], [50, 51, 52]]
    assert circuits[0][1] == 5.0
    assert next(c[0].tolist() for c in s.circuits(min_support=1)) == [10, 11, 12, 99]
    row, partner, count = s.partners(torch.tensor([11, 10]), k=1)
    assert row.tolist() == [10, 11] and count.tolist() == [5.0, 5.0]
    assert partner.tolist()[0] == 11 and partner.tolist()[1] in (10, 12)
    ids = np.array([99, 51, 12, 10, 50, 7, 11, 52])
    order = ids[s.placement(ids, min_support=3)]
    assert order.tolist() == [7, 10, 11, 12, 50, 51, 52, 99]


def test_bad_input():
    s = CoUse(64)
    with pytest.raises(InvalidIdsError):
        s.record(torch.tensor([1.0, 2.0]))
    with pytest.raises(InvalidIdsError):
        s.record(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(InvalidArgumentError):
        CoUse(3)
    with pytest.raises(InvalidArgumentError):
        s.partners(torch.tensor([1]), k=0)
    with pytest.raises(InvalidArgumentError):
        s.decay(1.5)


def test_arrays_round_trip_and_checks():
    s = CoUse(256)
    s.record(torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 9]]))
    arrays = s.to_arrays()
    back = CoUse.from_arrays(arrays)
    assert held(back) == held(s) and back.groups_seen == 3
    for name, bad in (
        ("a", arrays["a"].astype(np.float64)),
        ("b", arrays["a"]),  # b <= a
        ("count", -arrays["count"]),
        ("count", np.full_like(arrays["count"], np.nan)),
        ("slots", np.array([1 << 40])),
        ("a", arrays["a"][:-1]),
    ):
        with pytest.raises(CorruptStoreError):
            CoUse.from_arrays({**arrays, name: bad})


def test_pool_saves_couse_with_commits(tmp_path):
    path = tmp_path / "s"
    pool = dpsn.create(path, rows=1 << 30, dim=4, generator=SMALL)
    assert pool.couse is None and pool.circuits() == []
    pool.track_couse(1 << 10)
    for _ in range(3):
        pool.record_couse(torch.tensor([[5, 6, 7], [100, 200, -1]]))
    pool.commit("one")
    pool.record_couse(torch.tensor([[5, 6, 7]]))
    pool.commit("two")
    after_two = held(pool.couse)
    pool.record_couse(torch.tensor([[5, 6, 7]]))
    pool.commit("three")
    files = sorted(p.name for p in (path / "couse").iterdir())
    assert len(files) == 4  # the newest two commits' statistics are kept, each a pair of files
    pool.close()
    with dpsn.open(path) as ro:
        assert held(ro.couse)[(5, 6)] == 5.0
        assert [c[0].tolist() for c in ro.circuits(4)] == [[5, 6, 7]]
    with dpsn.open(path, at=3) as old:  # the statistics as of that commit
        assert held(old.couse) == after_two
    with dpsn.open(path, at=2) as older:  # only the newest two commits' are kept
        assert older.couse is None
    # damage: a flipped byte is caught by the checksum, a wrong length by the header
    data = sorted((path / "couse").glob("*.bin"))[-1]
    raw = bytearray(data.read_bytes())
    raw[3] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError):
        dpsn.open(path)
    data.write_bytes(bytes(raw[:-1]))
    with pytest.raises(CorruptStoreError):
        dpsn.open(path)


def test_prefetch_brings_partners(tmp_path):
    pool = dpsn.create(tmp_path / "s", rows=1 << 30, dim=4, generator=SMALL, cache_rows=1024)
    pool.track_couse()
    for _ in range(4):
        pool.record_couse(torch.tensor([[1, 2, 3]]))
    with pool.prefetch([1], partners=2) as h:
        h.wait()
        pool.read([2, 3])
    assert pool.stats()["last_step"]["misses"] == 0
    pool.close()
