"""The row index in layers and run files (``store/_layered.py``, ``store/_runs.py``).

What must hold: a layered index answers every lookup as the one sorted index it stands for;
a store whose index lives in run files opens, reads, commits, compacts and gcs to exactly the
rows LMDB holds, in the writer and in readers; run files that are missing, stale, foreign or
damaged never change what a read returns (an opener falls back to LMDB), and ``verify`` names
them. Thresholds are lowered so that small stores take every path; one test runs at the real
threshold.
"""

import itertools
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpsn
from dpsn.store import LayeredIndex, PersistedStore, RowIndex
from dpsn.store import _runs as runs
from dpsn.store._rowindex import FENCE_STEP

SMALL = {"kind": "hashed_slices", "memory_size": 1024}
ROWS = 64


@contextmanager
def small_runs(min_rows=4, flush_rows=6, flush_commits=2):
    with (
        mock.patch.object(runs, "RUN_MIN_ROWS", min_rows),
        mock.patch.object(runs, "FLUSH_ROWS", flush_rows),
        mock.patch.object(runs, "FLUSH_COMMITS", flush_commits),
    ):
        yield


def _columns(index):
    flat = index.flat()
    return tuple(np.asarray(getattr(flat, c)) for c in ("ids", "segment", "offset", "commit"))


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_columns(a), _columns(b), strict=True))


# -- the layered index alone -------------------------------------------------------------------

commits = st.lists(
    st.tuples(
        st.sets(st.integers(0, 40), max_size=10),  # written
        st.sets(st.integers(0, 40), max_size=4),  # dropped
        st.booleans(),  # then write the overlay out as runs
    ),
    min_size=1,
    max_size=12,
)


@given(history=commits)
def test_layered_index_answers_as_the_sorted_index_it_stands_for(history):
    """Property: after any commits, with runs written and merged at any points, lookups,
    counts, rows per segment and the flat columns equal a plain model of the index."""
    model: dict[int, tuple[int, int, int]] = {}
    index = LayeredIndex.empty()
    with tempfile.TemporaryDirectory() as tmp, small_runs(min_rows=0):
        root = Path(tmp)
        for k, (written, dropped, flush) in enumerate(history):
            commit, segment = k + 2, k + 1
            ids = np.array(sorted(written), dtype=np.int64)
            drops = np.array(sorted(dropped - written), dtype=np.int64)
            drops = drops[index.contains(drops)]  # as a commit does: only rows that have one
            index = index.apply(ids, segment, commit, drops)
            for off, i in enumerate(ids.tolist()):
                model[i] = (segment, off, commit)
            for i in drops.tolist():
                del model[i]
            if flush:
                index = runs.save(root, "u", index, commit, None)
            probe = np.arange(-2, 44, dtype=np.int64)
            found, seg, off, com = index.lookup(probe)
            assert found.tolist() == [int(i) in model for i in probe]
            want = [model.get(int(i), (0, 0, 0)) for i in probe]
            assert list(zip(seg.tolist(), off.tolist(), com.tolist(), strict=True)) == want
            assert len(index) == len(model)
            per_segment: dict[int, int] = {}
            for s, _, _ in model.values():
                per_segment[s] = per_segment.get(s, 0) + 1
            assert index.live_rows() == per_segment
            flat = index.flat()
            assert flat.ids.tolist() == sorted(model)
            assert [tuple(x) for x in zip(flat.segment, flat.offset, flat.commit, strict=True)] == [
                model[i] for i in sorted(model)
            ]
        assert len(index.layers) <= runs.MAX_RUNS


@given(
    ids=st.sets(st.integers(0, 5000), max_size=700),
    probe=st.lists(st.integers(-5, 5005), max_size=300),
)
def test_a_fenced_search_finds_what_a_binary_search_finds(ids, probe):
    """Property: a run's fence search (one page per id) gives ``searchsorted``'s answer."""
    col = np.array(sorted(ids), dtype=np.int64)
    plain = RowIndex(col, col, col, col)
    fenced = RowIndex(col, col, col, col, fences=col[::FENCE_STEP].copy())
    q = np.array(probe, dtype=np.int64)
    (p1, f1), (p2, f2) = plain.find(q), fenced.find(q)
    assert np.array_equal(f1, f2) and np.array_equal(p1[f1], p2[f2])


def test_runs_merge_by_size_and_leave_only_named_files(tmp_path):
    index = LayeredIndex.empty()
    with small_runs(min_rows=0):
        for k in range(40):
            index = index.apply(np.arange(k * 10, k * 10 + 10, dtype=np.int64), k + 1, k + 2, [])
            index = runs.save(tmp_path, "u", index, k + 2, None)
    sizes = [len(layer) for layer in index.layers]
    assert sum(sizes) == 400 and len(sizes) <= 4  # merged by size: a few runs, not 40
    assert all(a > b for a, b in itertools.pairwise(sizes))
    named = {n for n, _, _ in runs.read_runset(tmp_path, "u").files}
    assert {p.name for p in (tmp_path / runs.RUNS_DIR).iterdir()} == named | {runs.RUNS_MANIFEST}


# -- stores ------------------------------------------------------------------------------------


def _create(path, **kw):
    kw.setdefault("compact_above", None)
    return dpsn.create(path, rows=ROWS, dim=4, chunk_rows=4, generator=SMALL, cache_rows=0, **kw)


def _check_store(path, want: torch.Tensor):
    """Readers see ``want``, and the index opened through the runs equals LMDB's."""
    with dpsn.open(path) as r:
        assert torch.equal(r.delta(torch.arange(ROWS)), want)
    store = PersistedStore.open(Path(path), writable=False)
    try:
        head, layered = store.load_head()
        flat_head, flat = store.load_flat_head()
        assert head == flat_head and _same(layered, flat)
    finally:
        store.close()


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("commit"),
            st.sets(st.integers(0, ROWS - 1), max_size=12),
            st.sets(st.integers(0, ROWS - 1), max_size=4),
        ),
        st.tuples(st.just("compact")),
        st.tuples(st.just("gc")),
        st.tuples(st.just("reopen")),
    ),
    min_size=1,
    max_size=10,
)


@given(history=ops)
def test_a_store_on_run_files_keeps_every_row(tmp_path_factory, history):
    """Property: commits, compactions, gc and reopens of a store whose index lives in run
    files leave the writer, a reader and the runs exactly at LMDB's rows; verify is clean."""
    path = tmp_path_factory.mktemp("runs") / "s"
    with small_runs():
        pool = _create(path, keep_last=2)
        try:
            for k, op in enumerate(history):
                if op[0] == "commit":
                    ids = sorted(op[1])
                    if ids:
                        pool.write(torch.tensor(ids), torch.full((len(ids), 4), float(k + 1)))
                    gone = sorted(op[2] - op[1])
                    if gone:
                        pool.drop(torch.tensor(gone))
                    pool.commit(f"c{k}")
                elif op[0] == "compact":
                    pool.compact()
                elif op[0] == "gc":
                    pool.gc()
                else:
                    pool.close()
                    pool = dpsn.open(path, mode="r+", cache_rows=0)
                want = pool.delta(torch.arange(ROWS)).clone()
                _check_store(path, want)
            report = pool.verify()
            assert report.ok, report.problems
        finally:
            pool.close()


def _grow(path, commits=8):
    with _create(path) as pool:
        for k in range(commits):
            ids = torch.arange(k * 6, k * 6 + 8) % ROWS
            pool.write(ids, torch.full((8, 4), float(k + 1)))
            pool.commit(f"c{k}")
        return pool.delta(torch.arange(ROWS)).clone()


def test_a_clean_close_leaves_nothing_to_replay(tmp_path):
    with small_runs(flush_commits=100, flush_rows=1000):
        want = _grow(tmp_path / "s")
        store = PersistedStore.open(tmp_path / "s", writable=False)
        try:
            head, index = store.load_from_runs()
            assert index.since == 0 and index.base_commit == head
            assert index.describe()["files"] >= 1
        finally:
            store.close()
        _check_store(tmp_path / "s", want)


@pytest.mark.parametrize(
    "damage",
    ["garbage manifest", "foreign manifest", "flipped byte", "truncated run", "missing run"],
)
def test_damaged_run_files_never_change_a_read_and_verify_names_them(tmp_path, damage):
    path = tmp_path / "s"
    with small_runs():
        want = _grow(path)
        folder = path / runs.RUNS_DIR
        manifest = folder / runs.RUNS_MANIFEST
        doc = json.loads(manifest.read_text())
        run = folder / doc["runs"][0]["file"]
        if damage == "garbage manifest":
            manifest.write_text("{not json")
        elif damage == "foreign manifest":
            doc["store"] = "another store"
            manifest.write_text(json.dumps(doc))
        elif damage == "flipped byte":
            raw = bytearray(run.read_bytes())
            raw[64 + 8 + 3] ^= 0x40  # the first entry's segment id
            run.write_bytes(bytes(raw))
        elif damage == "truncated run":
            run.write_bytes(run.read_bytes()[:-8])
        else:
            run.unlink()
        with dpsn.open(path) as r:
            report = r.verify()
            assert not report.ok
            assert any("run" in p for p in report.problems), report.problems
            # Openers notice these and read LMDB instead; a flipped byte is noticed by the
            # block checksum when a lookup first touches its block, and that lookup is
            # answered from LMDB (the reader's commit is still HEAD).
            assert torch.equal(r.delta(torch.arange(ROWS)), want)
        # A writer's open (which checks every run file whole) writes the set anew from LMDB.
        with dpsn.open(path, mode="r+") as w:
            assert torch.equal(w.delta(torch.arange(ROWS)), want)
            assert w.verify().ok
        _check_store(path, want)


def test_runs_at_the_real_threshold(tmp_path):
    """No lowered thresholds: a store past ``RUN_MIN_ROWS`` rows writes runs, a reader maps
    them, later commits replay on top, and every row reads back."""
    path = tmp_path / "s"
    n = runs.RUN_MIN_ROWS + 1000
    rng = np.random.default_rng(0)
    with dpsn.create(
        path, rows=4 * n, dim=2, generator=SMALL, cache_rows=0, compact_above=None
    ) as pool:
        ids = torch.from_numpy(np.sort(rng.choice(4 * n, n, replace=False)))
        pool.write(ids, torch.randn(n, 2))
        pool.commit("bulk")
        assert (path / runs.RUNS_DIR / runs.RUNS_MANIFEST).exists()
        for k in range(3):
            few = torch.from_numpy(rng.integers(0, 4 * n, 50))
            pool.write(few, torch.randn(50, 2))
            pool.drop(ids[k * 10 : k * 10 + 5])
            pool.commit(f"c{k}")
        probe = torch.from_numpy(rng.integers(0, 4 * n, 20_000))
        want = pool.delta(probe).clone()
        persisted = len(pool._stack.index)
        with dpsn.open(path) as r:  # the writer still open: the reader replays 3 commits
            assert torch.equal(r.delta(probe), want)
            assert r.info()["persisted_rows"] == persisted
    store = PersistedStore.open(path, writable=False)
    try:
        _, index = store.load_from_runs()
        assert index.since == 0 and len(index) == persisted
        assert isinstance(index.layers[0].ids, np.memmap)
        assert _same(index, store.load_flat_head()[1])
    finally:
        store.close()
