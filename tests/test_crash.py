"""Crash safety, for real: SIGKILL a writer at random moments during commits and check that the
store always opens, verifies clean, and holds exactly a commit that was made.

Runs 12 kills by default, so CI stays within its 10 minutes, and as many as DPSN_CRASH_KILLS
says for a longer run (the compaction loop runs a quarter of them, at least 4). Each commit k
writes rows whose values are a function of k alone, so the expected content of every commit is
known without trusting the store.
"""

import inspect
import os
import random
import signal
import time

import pytest
import torch
from _zygote import Zygote

import dpsn

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("DPSN_CRASH_KILLS", "12"))
DIM = 8

# Writers keep the row index in run files from a few hundred rows on (``_runs.py``; the default
# is 65536), so that kills land in run writes and merges too and every check opens through them.
SMALL_RUNS = (
    "import dpsn.store._runs as r\nr.RUN_MIN_ROWS, r.FLUSH_ROWS, r.FLUSH_COMMITS = 256, 400, 3\n"
)

WRITER = r"""
import sys, torch, dpsn
path = sys.argv[1]
pool = dpsn.open(path, mode="r+")
k = pool.head
print("READY", k, flush=True)
while True:
    k += 1
    ids, deltas, drops = EXPECTED(k)
    pool.write(ids, deltas)
    pool.drop(drops)
    pool.commit(f"c{k}")
    print("COMMITTED", k, flush=True)
"""


def expected_change(k: int):
    """Commit k writes 300 rows (some overlap earlier commits) and drops a few."""
    g = torch.Generator().manual_seed(k)
    ids = torch.unique(torch.randint(0, 5000, (300,), generator=g))
    deltas = torch.full((len(ids), DIM), float(k)) + ids[:, None].float() / 1e4
    drops = torch.randint(0, 5000, (5,), generator=g)
    drops = drops[~torch.isin(drops, ids)]
    return ids, deltas, drops


def expected_state(head: int) -> dict[int, float]:
    state: dict[int, float] = {}
    for k in range(3, head + 1):  # commit 2 is the seed commit below
        ids, deltas, drops = expected_change(k)
        for i, d in zip(ids.tolist(), deltas[:, 0].tolist(), strict=True):
            state[i] = d
        for i in drops.tolist():
            state.pop(i, None)
    return state


def _writer_source() -> str:
    return (
        inspect.getsource(expected_change).replace("def expected_change", "def EXPECTED")
        + f"\nDIM = {DIM}\n"
        + SMALL_RUNS
        + WRITER
    )


def test_sigkill_during_commits_never_loses_or_exposes_anything(tmp_path):
    path = tmp_path / "store"
    with dpsn.create(path, rows=5000, dim=DIM, chunk_rows=64) as p:
        p.commit("seed")
    script = tmp_path / "writer.py"
    script.write_text("import torch\n" + _writer_source())
    rng = random.Random(1234)
    last_returned = 2
    zygote = Zygote(tmp_path, dict(os.environ, PYTHONUNBUFFERED="1"))
    for _ in range(KILLS):
        proc = zygote.spawn(script, str(path))  # a fork: torch is imported already
        line = proc.readline()
        assert line.startswith("READY"), line
        assert int(line.split()[1]) >= last_returned
        time.sleep(rng.uniform(0.0, 0.25))
        proc.kill(signal.SIGKILL)
        out = proc.wait()
        for ln in out.splitlines():
            if ln.startswith("COMMITTED"):
                last_returned = int(ln.split()[1])
        with dpsn.open(path) as r:
            head = r.head
            # The commit that returned is there; one more may be durable but not yet reported.
            assert head in (last_returned, last_returned + 1), (head, last_returned)
            state = expected_state(head)
            ids = torch.arange(5000)
            got = r.delta(ids)[:, 0]
            want = torch.zeros(5000)
            if state:
                want[torch.tensor(list(state))] = torch.tensor(list(state.values()))
            assert torch.equal(got, want), f"content differs from commit {head}"
            assert r.info()["persisted_rows"] == len(state)
            report = r.verify()
            assert report.ok, report.problems
        last_returned = head
    zygote.close()
    with dpsn.open(path, mode="r+") as w:  # leftovers of killed commits are garbage, not data
        w.gc()
        assert w.verify().ok


MAINTAINER = r"""
import sys, torch, dpsn
path = sys.argv[1]
pool = dpsn.open(path, mode="r+")
n = max(int(c.message[7:]) for c in pool.log() if c.message.startswith("change "))
print("READY", n, flush=True)
while True:
    n += 1
    ids, deltas, drops = EXPECTED(n)
    pool.write(ids, deltas)
    pool.drop(drops)
    pool.commit(f"change {n}")  # the policy compacts after some commits on its own
    print("COMMITTED", n, flush=True)
    pool.compact()
    print("COMPACTED", n, flush=True)
    if n % 2 == 0:
        pool.gc()
"""


def _made_commits(log) -> list[tuple[int, int]]:
    """(commit id, change number) of the commits the writer made (compactions excluded)."""
    return [(c.id, int(c.message[7:])) for c in log if c.message.startswith("change ")]


def test_sigkill_during_compaction_and_gc_never_loses_a_kept_commit(tmp_path):
    """Kills land in commits, automatic and explicit compactions and gc: the store opens,
    verifies clean, HEAD holds the newest change made, and every commit the policy keeps
    (the last 3 changes) still opens with exactly its rows."""
    path = tmp_path / "store"
    with dpsn.create(path, rows=5000, dim=DIM, chunk_rows=64, keep_last=3) as p:
        p.set_policy(compact_above=1.3, compact_min_bytes=0)
        p.commit("change 2")  # change 2 is empty, like the seed commit above
    script = tmp_path / "maintainer.py"
    script.write_text(
        "import torch\n"
        + inspect.getsource(expected_change).replace("def expected_change", "def EXPECTED")
        + f"\nDIM = {DIM}\n"
        + SMALL_RUNS
        + MAINTAINER
    )
    rng = random.Random(4321)
    zygote = Zygote(tmp_path, dict(os.environ, PYTHONUNBUFFERED="1"))
    last_returned = 2
    compacted = 0
    made_runs: list[str] = []
    ids = torch.arange(5000)

    def content(state: dict[int, float]) -> torch.Tensor:
        want = torch.zeros(5000)
        if state:
            want[torch.tensor(list(state))] = torch.tensor(list(state.values()))
        return want

    for _ in range(max(4, KILLS // 4)):
        proc = zygote.spawn(script, str(path))
        line = proc.readline()
        assert line.startswith("READY"), line
        # every other run is killed only after a compaction: kills then land in later commits,
        # compactions and gc, however slow the machine
        seen = proc.read_until("COMPACTED" if len(made_runs) % 2 else "COMMITTED")
        made_runs.append(seen)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill(signal.SIGKILL)
        out = seen + proc.wait()
        for ln in out.splitlines():
            if ln.startswith("COMMITTED"):
                last_returned = int(ln.split()[1])
            compacted += ln.startswith("COMPACTED")
        with dpsn.open(path) as r:
            made = _made_commits(r.log())
            newest = made[-1][1]
            assert newest in (last_returned, last_returned + 1), (newest, last_returned)
            assert torch.equal(r.delta(ids)[:, 0], content(expected_state(newest)))
            report = r.verify()
            assert report.ok, report.problems
        for commit, change in made[-3:]:  # the window the policy keeps
            with dpsn.open(path, at=commit) as r:
                got = r.delta(ids)[:, 0]
                assert torch.equal(got, content(expected_state(change))), (commit, change)
        last_returned = newest
    zygote.close()
    with dpsn.open(path, mode="r+") as w:
        w.gc()
        assert w.verify().ok
    assert compacted > 0, "no kill came after a compaction: the loop tested nothing new"
