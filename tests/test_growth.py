"""Growth: compaction, retention and reader leases, on real stores.

What must hold: compaction changes no row's bits and no kept commit's view, keeps the digests
exact and leaves a store ``verify`` passes; gc keeps HEAD, snapshots, the policy's window and
whatever a live reader in another process holds, and nothing else; the amplification figures
say what they count.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpsn
from dpsn.errors import InvalidArgumentError, SnapshotUnavailableError
from dpsn.store import PersistedStore, StoreFacts
from dpsn.store._leases import live_readers
from dpsn.store._policy import parse_duration

DIM = 8
ROWS = 2000
SMALL = {"kind": "hashed_slices", "memory_size": 1024}


def _store(path, **kw):
    kw.setdefault("compact_above", None)
    return dpsn.create(path, rows=ROWS, dim=DIM, chunk_rows=16, generator=SMALL, cache_rows=0, **kw)


def _commit(pool, k, n=40, drops=3):
    """Commit k: Zipf-chosen rows (a few hot rows rewritten often) and a few drops."""
    rng = np.random.default_rng(k)
    ids = np.unique(rng.zipf(1.4, n) % ROWS)
    pool.write(
        torch.from_numpy(ids),
        torch.randn(len(ids), DIM, generator=torch.Generator().manual_seed(k)),
    )
    gone = rng.integers(0, ROWS, drops)
    pool.drop(torch.from_numpy(gone[~np.isin(gone, ids)]))
    return pool.commit(f"c{k}")


def _all(pool):
    return pool.delta(torch.arange(ROWS)).clone()


def test_compaction_keeps_every_bit_and_verifies(tmp_path):
    path = tmp_path / "s"
    with _store(path) as pool:
        for k in range(12):
            _commit(pool, k)
        before = _all(pool)
        commits_before = pool.row_commits(torch.arange(ROWS))
        facts_before = pool.info()
        result = pool.compact()
        assert result["commits"] == [pool.head]
        assert result["rows_moved"] == facts_before["persisted_rows"]
        assert torch.equal(_all(pool), before)
        # rows now live in the compaction commit's segment; rows without a delta stay at 0
        moved = pool.row_commits(torch.arange(ROWS))
        assert set(np.unique(moved[commits_before > 0]).tolist()) == {pool.head}
        assert np.all(moved[commits_before == 0] == 0)
        assert result["after"]["space_amplification"] < result["before"]["space_amplification"]
        assert result["gc"]["removed_segments"] == result["source_segments"]
        report = pool.verify()
        assert report.ok and not report.notes, (report.problems, report.notes)
        head = pool.log()[-1]
        assert head.message == "compact" and head.rows_dropped == 0
        assert head.provenance == pool.log()[-2].provenance
    with dpsn.open(path) as r:  # a fresh reader loads the index and checks its digest
        assert torch.equal(_all(r), before)
        assert r.info()["compactions"] == 1


def test_compaction_carries_per_row_state(tmp_path):
    path = tmp_path / "s"
    with _store(path) as pool:
        pool.set_state_width(3)
        for k in range(6):
            _commit(pool, k)
    with PersistedStore.open(path, writable=True) as store:
        head, index = store.load_head()
        found, deltas, state = store.read_deltas(index, index.ids, state_width=3)[:3]
        result = store.compact(index, head)
        assert result.rows_moved == len(index)
        found2, deltas2, state2 = store.read_deltas(result.index, index.ids, state_width=3)[:3]
        assert found.all() and found2.all()
        assert np.array_equal(deltas.view(np.uint32), deltas2.view(np.uint32))
        assert np.array_equal(state.view(np.uint32), state2.view(np.uint32))
        assert store.segment_record(result.new_segments[0]).state_width == 3
        assert store.verify().ok


@given(
    writes=st.lists(st.lists(st.integers(0, 63), min_size=0, max_size=12), min_size=1, max_size=6),
    drops=st.lists(st.lists(st.integers(0, 63), max_size=3), min_size=6, max_size=6),
    keep_last=st.integers(1, 4),
)
def test_compaction_and_gc_keep_every_kept_view(tmp_path_factory, writes, drops, keep_last):
    """Property: after any history, compaction plus gc by keep_last leave HEAD bit-identical
    and every commit in the window rebuildable, equal to what it was."""
    path = tmp_path_factory.mktemp("p") / "s"
    views = {}
    with dpsn.create(
        path, rows=64, dim=4, chunk_rows=4, generator=SMALL, cache_rows=0, compact_above=None
    ) as pool:
        for k, ids in enumerate(writes):
            ids = sorted(set(ids))
            if ids:
                pool.write(torch.tensor(ids), torch.full((len(ids), 4), float(k + 1)))
            gone = sorted(set(drops[k]) - set(ids))
            if gone:
                pool.drop(torch.tensor(gone))
            rec = pool.commit(f"c{k}")
            views[rec.id] = pool.delta(torch.arange(64)).clone()
        pool.set_policy(keep_last=keep_last)
        pool.compact()
        pool.gc()
        assert pool.verify().ok
        head_view = pool.delta(torch.arange(64))
        assert torch.equal(head_view, views[max(views)])
    made = sorted(views)
    kept = made[-keep_last:]
    for c in kept:
        with dpsn.open(path, at=c) as r:
            assert torch.equal(r.delta(torch.arange(64)), views[c]), c


def test_retention_window_snapshots_and_what_goes(tmp_path):
    path = tmp_path / "s"
    with _store(path, keep_last=2) as pool:
        views = {}
        for k in range(8):
            rec = _commit(pool, k)
            views[rec.id] = _all(pool)
            if k == 2:
                pool.snapshot("early")
            if k == 4:  # the window (2 commits) still holds the compacted segments
                assert pool.compact()["gc"]["removed_segments"] == []
        assert pool.policy()["keep_last"] == 2
        dry = pool.gc(dry_run=True)
        assert dry["dry_run"] and dry["freed_bytes"] == 0
        out = pool.gc()
        assert out["removed_segments"] and out["freed_bytes"] > 0
        ids = sorted(views)
        assert out["kept_from"] == ids[-2]
        assert pool.verify().ok
        # a per-call override keeps less, never resurrects
        again = pool.gc(keep_last=1)
        assert again["kept_from"] == ids[-1]
    with dpsn.open(path, at="early") as r:
        assert torch.equal(_all(r), views[ids[2]])
    with dpsn.open(path, at=ids[-1]) as r:
        assert torch.equal(_all(r), views[ids[-1]])
    with pytest.raises(SnapshotUnavailableError):
        dpsn.open(path, at=ids[-2])
    with pytest.raises(SnapshotUnavailableError):
        dpsn.open(path, at=ids[3])


def test_keep_within_keeps_young_commits(tmp_path):
    path = tmp_path / "s"
    with _store(path, keep_within="7d") as pool:
        first = _commit(pool, 0)
        for k in range(1, 5):
            _commit(pool, k)
        views = _all(pool)
        assert pool.policy()["keep_within"] == 7 * 86400
        out = pool.gc()  # everything is younger than a week: nothing of history goes
        assert out["kept_from"] == 1 and not out["removed_segments"]
        with PersistedStore.open(path, writable=False) as store:
            assert store.load_index(first.id) is not None
        # a week later (the clock given explicitly), only HEAD is within the window
        from dpsn.store._retention import collect

        late = collect(pool._store, now=first.time + 8 * 86400)
        assert late["kept_from"] == pool.head
        assert torch.equal(_all(pool), views)
        assert pool.verify().ok


def test_policy_arguments_are_checked():
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("1.5h") == 5400
    assert parse_duration(30) == 30
    for bad in ("7 days", "-1d", "", "nan"):
        with pytest.raises(InvalidArgumentError):
            parse_duration(bad)
    with pytest.raises(InvalidArgumentError):
        dpsn.create("/nonexistent/never", rows=10, dim=2, keep_last=0)
    with pytest.raises(InvalidArgumentError):
        dpsn.create("/nonexistent/never", rows=10, dim=2, compact_above=1.0)
    assert not os.path.exists("/nonexistent/never")


def test_auto_compaction_bounds_space_amplification(tmp_path):
    path = tmp_path / "s"
    with _store(path) as pool:
        pool.set_policy(compact_above=2.0, compact_min_bytes=0)
        amps = []
        for k in range(30):
            _commit(pool, k, n=60)
            amps.append(pool.info()["space_amplification"])
        info = pool.info()
        assert info["compactions"] >= 1
        # bounded right after every commit: at most the threshold plus one commit's segment
        assert max(amps[5:]) < 2.0 * 1.8, amps
        assert info["write_amplification"] < 5, info
        messages = [c.message for c in pool.log()]
        assert "compact" in messages
        assert pool.verify().ok


def test_compact_with_nothing_to_do(tmp_path):
    path = tmp_path / "s"
    with _store(path) as pool:
        assert pool.compact()["commits"] == []
        pool.write(torch.arange(10), torch.ones(10, DIM))
        pool.commit()
        out = pool.compact()  # one whole segment: rewriting it would change nothing
        assert out["commits"] == []


def test_store_api_and_cli(tmp_path):
    path = tmp_path / "s"
    with _store(path) as pool:
        for k in range(6):
            _commit(pool, k)
        before = _all(pool)
    dpsn_cli = [sys.executable, "-m", "dpsn.tools.cli"]
    run = lambda *a: subprocess.run([*dpsn_cli, *a], capture_output=True, text=True)  # noqa: E731
    out = run("policy", str(path), "--keep-last", "2", "--keep-within", "none", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["keep_last"] == 2
    out = run("compact", str(path), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["rows_moved"] > 0 and result["after"]["write_amplification"] > 1
    out = run("gc", str(path), "--keep-last", "1", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["dry_run"] is True
    out = run("gc", str(path), "--keep-within", "7 parsecs")
    assert out.returncode == 2
    out = run("info", str(path), "--json")
    info = json.loads(out.stdout)
    assert info["compactions"] == 1 and info["space_amplification"] > 0
    out = run("stats", str(path), "--json")
    assert json.loads(out.stdout)["store"]["write_amplification"] == info["write_amplification"]
    assert dpsn.gc(path, keep_last=1)["kept_from"] == info["head"]
    assert dpsn.compact(path)["commits"] == []
    with dpsn.open(path) as r:
        assert torch.equal(_all(r), before)
    with StoreFacts(path) as facts:
        assert facts.info()["space_amplification"] < 2


READER = r"""
import sys, torch, dpsn
pool = dpsn.open(sys.argv[1])
print("HOLDING", pool.head, flush=True)
sys.stdin.readline()
d = pool.delta(torch.arange(int(sys.argv[2])))
print("SUM", repr(float(d.double().sum())), flush=True)
"""


def test_a_reader_in_another_process_survives_gc_and_compaction(tmp_path):
    path = tmp_path / "s"
    with _store(path) as pool:
        for k in range(5):
            _commit(pool, k)
        held = pool.head
        want = float(_all(pool).double().sum())
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(path), str(ROWS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = reader.stdout.readline()
            assert line.split() == ["HOLDING", str(held)], line
            assert live_readers(path).commits == {held}
            pool.compact()  # the reader's layout is rewritten at once
            for k in range(5, 10):  # and its rows overwritten
                _commit(pool, k, n=200)
            pool.compact()
            out = pool.gc(keep_last=1)
            assert out["reader_commits"] == [held] and out["kept_from"] == pool.head
            reader.stdin.write("go\n")
            reader.stdin.flush()
            line = reader.stdout.readline()
            assert line.startswith("SUM"), line
            assert float(line.split()[1]) == want
        finally:
            reader.kill()
            reader.wait()
        # the reader is gone: its commit is no longer kept, its lease is removed
        out = pool.gc(keep_last=1)
        assert out["reader_commits"] == [] and out["kept_from"] == pool.head
        assert not list((path / "readers").glob("*.lease"))
        assert pool.verify().ok


def test_gc_leaves_files_while_a_reader_is_choosing(tmp_path):
    from dpsn.store._leases import Lease

    path = tmp_path / "s"
    with _store(path) as pool:
        for k in range(6):
            _commit(pool, k, n=300)
        lease = Lease(path)  # a reader that has not named its commit yet
        try:
            assert lease.active and live_readers(path).choosing == 1
            out = pool.compact()
            gone = out["source_segments"]
            assert out["gc"]["deferred"] and out["gc"]["removed_segments"] == gone
            seg_dir = path / "data.zarr" / "segments"
            assert all((seg_dir / f"{s:016x}").is_dir() for s in gone)  # records forgotten
            lease.hold(pool.head)
            again = pool.gc()  # a reader is open: record-less segments wait
            assert again["orphan_segments"] == [] and not again["deferred"]
            assert all((seg_dir / f"{s:016x}").is_dir() for s in gone)
        finally:
            lease.release()
        last = pool.gc()
        assert last["orphan_segments"] == gone
        assert not any((seg_dir / f"{s:016x}").exists() for s in gone)
        assert pool.verify().ok


def test_compaction_carries_the_lifecycle_usage_column(tmp_path):
    path = tmp_path / "s"
    pool = dpsn.create(
        path,
        rows=ROWS,
        dim=DIM,
        chunk_rows=16,
        generator=SMALL,
        compact_above=None,
        lifecycle=dpsn.Lifecycle(),
    )
    with pool:
        for k in range(6):
            _commit(pool, k)
        before = _all(pool)
        lifecycle = pool.log()[-1].lifecycle
    with PersistedStore.open(path, writable=True) as store:
        head, index = store.load_head()
        widths = {store.segment_record(s).usage_width for s in index.segments().tolist()}
        assert widths and 0 not in widths  # every segment holds usage rows
        usage_before = _gather(store, index, "usage")
        result = store.compact(index, head)
        assert result.rows_moved == len(index)
        assert np.array_equal(_gather(store, result.index, "usage"), usage_before)
        assert store.commit_record(result.head).lifecycle == lifecycle
        assert store.verify().ok
    with dpsn.open(path) as r:
        assert torch.equal(_all(r), before)


def _gather(store, index, column):
    out = {}
    for s in index.segments().tolist():
        rec = store.segment_record(s)
        mine = np.flatnonzero(index.segment == s)
        out.update(
            zip(
                index.ids[mine].tolist(),
                store.segments.gather(rec, index.offset[mine], column),
                strict=True,
            )
        )
    return np.stack([out[i] for i in index.ids.tolist()]).view(np.uint64)
