"""The crash loop with a row lifecycle: SIGKILL a writer that trains, writes, drops and commits
(each commit consolidating: decay, phases, pruning), and check after every kill that the store
opens, verifies clean, and holds bit for bit what an uninterrupted writer holds at that commit.

The reference is a second store the test advances itself with the same operations. Besides
durability this checks that the lifecycle's state is entirely in the commit: a restarted writer
(cold cache, statistics reloaded from segments, clocks from the commit record) goes on exactly
as one that never stopped.
"""

import os
import random
import signal
import time

import pytest
import torch
from _zygote import Zygote

import dpsn

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("DPSN_LIFECYCLE_KILLS", "10"))
ROWS, DIM = 2000, 8
SMALL = {"kind": "hashed_slices", "memory_size": 4096}
POLICY = dict(warmup=0, min_uses=2, half_life=4, decay=0.3, prune_rms=0.05, max_idle=6)


def operations(pool, k: int) -> None:
    """What the writer does before commit k: a deterministic function of k."""
    g = torch.Generator().manual_seed(k)
    hot = torch.arange(0, 20)
    with pool.page_in(torch.cat([hot, torch.randint(0, ROWS, (20,), generator=g)])) as batch:
        grads = torch.randn(len(batch), DIM, generator=g)
        batch.apply_grads(grads, dpsn.pool.RowSGD(lr=0.05))
    ids = torch.unique(torch.randint(0, ROWS, (30,), generator=g))
    pool.write(ids, torch.randn(len(ids), DIM, generator=g))
    pool.drop(torch.randint(0, ROWS, (2,), generator=g))


WRITER = r"""
import sys, torch, dpsn
path = sys.argv[1]
pool = dpsn.open(path, mode="r+", cache_rows=64)
k = pool.head
print("READY", k, flush=True)
while True:
    k += 1
    operations(pool, k)
    pool.commit(f"c{k}")
    print("COMMITTED", k, flush=True)
"""


def _writer_source() -> str:
    import inspect

    return (
        "import torch, dpsn\n"
        + f"ROWS, DIM = {ROWS}, {DIM}\n"
        + inspect.getsource(operations)
        + WRITER
    )


def _create(path):
    with dpsn.create(
        path,
        rows=ROWS,
        dim=DIM,
        seed=5,
        chunk_rows=32,
        generator=SMALL,
        cache_rows=64,
        lifecycle=dpsn.Lifecycle(**POLICY),
    ) as p:
        p.commit("seed")


def _snapshot(pool):
    ids = torch.arange(ROWS)
    lc = pool.stats()["lifecycle"]
    return (
        pool.delta(ids).view(torch.int32),
        pool.phase(ids),
        pool.info()["persisted_rows"],
        (lc["step"], lc["epoch"], lc["enter"], lc["exit"], lc["pruned_rows"]),
    )


def test_sigkill_with_a_lifecycle_never_loses_or_diverges(tmp_path):
    path, ref_path = tmp_path / "store", tmp_path / "reference"
    _create(path)
    _create(ref_path)
    reference = dpsn.open(ref_path, "r+", cache_rows=500)  # a warm cache, never restarted
    script = tmp_path / "writer.py"
    script.write_text(_writer_source())
    rng = random.Random(99)
    zygote = Zygote(tmp_path, dict(os.environ, PYTHONUNBUFFERED="1"))
    last = 2
    try:
        for _ in range(KILLS):
            proc = zygote.spawn(script, str(path))  # a fork: torch is imported already
            line = proc.readline()
            assert line.startswith("READY"), line
            seen = proc.read_until("COMMITTED")  # at least one commit a run, however slow
            time.sleep(rng.uniform(0.0, 0.6))
            proc.kill(signal.SIGKILL)
            out = seen + proc.wait()
            for ln in out.splitlines():
                if ln.startswith("COMMITTED"):
                    last = int(ln.split()[1])
            with dpsn.open(path) as r:
                head = r.head
                assert head in (last, last + 1), (head, last)
                while reference.head < head:
                    operations(reference, reference.head + 1)
                    reference.commit(f"c{reference.head + 1}")
                got, want = _snapshot(r), _snapshot(reference)
                assert torch.equal(got[0], want[0]), f"deltas differ at commit {head}"
                assert torch.equal(got[1], want[1]), f"phases differ at commit {head}"
                assert got[2:] == want[2:], (got[2:], want[2:])
                report = r.verify()
                assert report.ok, report.problems
            last = head
        assert last > 5 and _snapshot(reference)[3][4] > 0  # it did commit, and prune
    finally:
        reference.close()
        zygote.close()
