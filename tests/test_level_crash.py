"""The crash loop over a levelled store: SIGKILL a writer whose every root commit consolidates
and migrates (hand-offs write ``fast - part`` and ``slow + part`` on two level stores, then the
root log names both), and check after every kill that the root opens at a whole root commit
where every level's every row holds, bit for bit, what an uninterrupted writer holds there.

The reference is a second levelled store this test advances itself and never reopens, so the
loop also checks that the migration state saved with each root commit lets a restarted writer
(windows, streaks, hand-offs in flight reloaded from disk; orphan level commits rolled back and
a "recover" root commit written) go on exactly as one that never stopped.

Short by default (4 kills); DPSN_CRASH_KILLS sets more.
"""

from __future__ import annotations

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

KILLS = int(os.environ.get("DPSN_CRASH_KILLS", "4"))
ROWS, DIM = 1000, 8
GEN = {"kind": "hashed_slices", "memory_size": 4096}
LEVELS = [dpsn.Level("foundation", inertia=0.5), "domain", "task"]
POLICY = dict(stable_windows=1, handoff=2, consolidate_every=1, caps=(0.02, 0.01))


def operations(pool, k: int) -> None:
    """What the writer does before root commit k: a deterministic function of k. Hot rows move
    the same way every time, so they turn stable and migrate at nearly every commit."""
    g = torch.Generator().manual_seed(k)
    hot = torch.arange(0, 60)
    d = torch.randn(len(hot), DIM, generator=torch.Generator().manual_seed(0))
    pool.write(hot, 0.1 * d + 0.01 * torch.randn(len(hot), DIM, generator=g), add=True)
    ids = torch.randint(0, ROWS, (48,), generator=g)
    with pool.page_in(ids) as batch:
        batch.apply_grads(torch.randn(len(batch), DIM, generator=g), dpsn.pool.RowSGD(lr=0.05))


WRITER = r"""
import sys
path = sys.argv[1]
pool = dpsn.open(path, mode="r+", cache_rows=64)
print("READY", pool.head, flush=True)
while True:
    k = pool.head + 1
    operations(pool, k)
    print("COMMITTING", k, flush=True)
    pool.commit(f"c{k}")
    print("COMMITTED", k, flush=True)
"""


def _create(path) -> None:
    with dpsn.create(
        path,
        rows=ROWS,
        dim=DIM,
        seed=11,
        generator=GEN,
        chunk_rows=16,
        cache_rows=64,
        levels=LEVELS,
        migration=dpsn.Migration(**POLICY),
    ):
        pass


def _values(pool) -> list[torch.Tensor]:
    ids = torch.arange(ROWS)
    return [pool.delta(ids, level=n).view(torch.int32) for n in pool.levels]


def test_sigkill_during_migration_commits(tmp_path):
    path, ref_path = tmp_path / "root", tmp_path / "reference"
    _create(path)
    _create(ref_path)
    reference = dpsn.open(ref_path, "r+", cache_rows=500)  # never restarted
    script = tmp_path / "writer.py"
    script.write_text(
        f"import torch, dpsn\nROWS, DIM = {ROWS}, {DIM}\n" + inspect.getsource(operations) + WRITER
    )
    rng = random.Random(23)
    zygote = Zygote(tmp_path, dict(os.environ, PYTHONUNBUFFERED="1"))
    last, in_commit = 1, 0
    try:
        for _ in range(KILLS):
            proc = zygote.spawn(script, str(path))
            line = proc.readline()
            assert line.startswith("READY"), line
            seen = proc.read_until("COMMITTED")  # at least one commit a run
            seen += proc.read_until("COMMITTING")  # then kill inside the next one
            time.sleep(rng.uniform(0.0, 0.3))
            proc.kill(signal.SIGKILL)
            out = (seen + proc.wait()).splitlines()
            in_commit += bool(out) and out[-1].startswith("COMMITTING")
            for ln in out:
                if ln.startswith("COMMITTED"):
                    last = int(ln.split()[1])
            with dpsn.open(path) as r:  # a reader: orphan level commits are ignored
                head = r.head
                assert head in (last, last + 1), (head, last)
                while reference.head < head:
                    k = reference.head + 1
                    message = r.log()[k - 1]["message"]
                    if not message.startswith("recover"):
                        operations(reference, k)
                    reference.commit(message)
                got, want = _values(r), _values(reference)
                for name, a, b in zip(r.levels, got, want, strict=True):
                    assert torch.equal(a, b), f"level {name} differs at root commit {head}"
                ids = torch.arange(ROWS)
                assert torch.equal(r.read(ids), reference.read(ids))
            last = head
        with dpsn.open(path) as r:
            report = r.verify()
            assert report.ok, report.problems
            moved = sum(m["rows"] + m["completed"] for m in r.migrations())
        assert last > KILLS and moved > 0, (last, moved)
        print(f"{KILLS} kills, {in_commit} inside a commit, {last} root commits, {moved} moves")
    finally:
        reference.close()
        zygote.close()
