"""Migration state (windows, signatures, streaks, hand-offs in flight) persisted with each root
commit: a writer that commits, closes and reopens goes on exactly as one that never stopped,
and a damaged state is refused with an error that names it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpsn
from dpsn.errors import CorruptStoreError
from dpsn.pool import _migration as mig
from dpsn.store import levels as levels_format

GEN = {"kind": "hashed_slices", "memory_size": 4096}
ROWS, DIM = 1000, 8
LEVELS = [dpsn.Level("foundation", inertia=0.5), "domain", "task"]
# consolidate every 2nd commit: a window spans a commit, so the saved state holds one
POLICY = dict(stable_windows=1, handoff=2, consolidate_every=2, caps=(0.01, 0.005))


def make(path: Path) -> None:
    with dpsn.create(
        path,
        rows=ROWS,
        dim=DIM,
        seed=7,
        generator=GEN,
        chunk_rows=16,
        cache_rows=128,
        levels=LEVELS,
        migration=dpsn.Migration(**POLICY),
    ) as p:
        p.commit("seed")


def operations(pool, k: int) -> None:
    """What the writer does before root commit k: a deterministic function of k. Hot rows get
    the same direction every time (they become stable and migrate); others train at random."""
    g = torch.Generator().manual_seed(k)
    hot = torch.arange(0, 40)
    direction = torch.Generator().manual_seed(0)
    d = torch.randn(len(hot), DIM, generator=direction)
    pool.write(hot, 0.1 * d + 0.01 * torch.randn(len(hot), DIM, generator=g), add=True)
    ids = torch.randint(0, ROWS, (48,), generator=g)
    with pool.page_in(ids) as batch:
        batch.apply_grads(torch.randn(len(batch), DIM, generator=g), dpsn.pool.RowSGD(lr=0.05))


def state_of(pool) -> tuple:
    """Every level's deltas (as bits), the migration records and per-level health."""
    ids = torch.arange(ROWS)
    deltas = tuple(pool.delta(ids, level=n).view(torch.int32) for n in pool.levels)
    migrations = pool.migrations()
    health = {
        n: {k: v for k, v in h.items() if k not in ("staged_rows", "lifecycle")}
        for n, h in pool.stats()["levels"].items()
    }
    return deltas, migrations, health


def advance(pool, upto: int) -> None:
    while pool.head < upto:
        operations(pool, pool.head + 1)
        pool.commit(f"c{pool.head + 1}")


@pytest.mark.slow  # ~4 s alone, 12 s on a loaded 2-core machine: 18 commits of 3 levels, fsynced
def test_reopen_goes_on_as_if_never_closed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make(a)
    shutil.copytree(a, b)
    with dpsn.open(a, "r+", cache_rows=128) as pa:
        advance(pa, 9)
        with dpsn.open(b, "r+", cache_rows=128) as pb:
            advance(pb, 5)  # commit 5 ends a window without consolidating...
        for stop in (7, 9):  # ...and reopened twice more, once mid-hand-off
            with dpsn.open(b, "r+", cache_rows=128) as pb:
                advance(pb, stop)
        with dpsn.open(b, "r+", cache_rows=128) as rb:
            got, want = state_of(rb), state_of(pa)
    for x, y, n in zip(got[0], want[0], LEVELS, strict=True):
        assert torch.equal(x, y), f"level {n} differs after reopening"
    assert got[1] == want[1]  # the same migrations, commit by commit
    assert got[2] == want[2]  # and the same health
    assert sum(m["rows"] for m in want[1]) > 0 and any(m["completed"] for m in want[1])
    assert any(m["in_flight"] for m in want[1])  # hand-offs spanned the reopenings


def _reseal(path: Path, edit) -> None:
    log = json.loads((path / levels_format.LOG_FILE).read_bytes())
    edit(log["commits"][-1]["state"])
    levels_format.write_atomic(path / levels_format.LOG_FILE, log)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A levelled store a few commits in (copied by each test that damages it)."""
    path = tmp_path_factory.mktemp("trained") / "r"
    make(path)
    with dpsn.open(path, "r+") as p:
        advance(p, 5)
    return path


def test_damaged_state_is_refused_by_name(tmp_path, trained):
    path = tmp_path / "r"
    shutil.copytree(trained, path)
    head = 5
    state = levels_format.state_dir(path, head)
    assert state.is_dir()
    assert sorted(c.name for c in (path / levels_format.STATE_DIR).iterdir()) == sorted(
        levels_format.state_dir(path, c).name for c in (head - 1, head)
    )  # only the newest two are kept
    keep = tmp_path / "keep"
    shutil.copytree(path, keep)

    chunk = next(f for f in (state / "f4").rglob("*") if f.is_file() and f.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match=r"migration state .* 5: chunk .* decoded"):
        dpsn.open(path, "r+")
    with dpsn.open(path) as r:  # a reader never needs the state
        assert r.head == head

    cases = [
        (lambda s: s["parts"].__setitem__("t/task/streak", ["i8", 0, [10**9]]), "runs past"),
        (lambda s: s["parts"].pop("w/domain/sums"), "no part 'w/domain/sums'"),
        (lambda s: s.__setitem__("levels", ["foundation"]), "names levels"),
        (lambda s: s["sizes"].__setitem__("i8", -1), "bad size"),
        (lambda s: s["parts"].__setitem__("t/task/ids", ["f4", 0, [1]]), "not a 1-D int64"),
    ]
    for edit, message in cases:
        shutil.rmtree(path)
        shutil.copytree(keep, path)
        _reseal(path, edit)
        with pytest.raises(CorruptStoreError, match=message):
            dpsn.open(path, "r+")


def test_out_of_range_values_are_refused(tmp_path, trained):
    """Arrays that pass their checksums but mean nothing (a hand-off with more steps left than
    the policy's, ids out of order) are refused when restored."""
    path = tmp_path / "r"
    shutil.copytree(trained, path)
    head = 5
    log = json.loads((path / levels_format.LOG_FILE).read_bytes())
    rec = log["commits"][-1]["state"]
    arrays = levels_format.read_state(path, rec)
    bad = dict(arrays)
    bad["h/0/ids"] = np.array([5, 3], dtype=np.int64)
    bad["h/0/left"] = np.array([1, 1], dtype=np.int64)
    new = levels_format.write_state(path, head, bad)
    log["commits"][-1]["state"] = {**rec, **new}
    levels_format.write_atomic(path / levels_format.LOG_FILE, log)
    with pytest.raises(CorruptStoreError, match=r"h/0/ids.*sorted"):
        dpsn.open(path, "r+")
    bad["h/0/ids"] = np.array([3, 5], dtype=np.int64)
    bad["h/0/left"] = np.array([1, 99], dtype=np.int64)
    log["commits"][-1]["state"] = {**rec, **levels_format.write_state(path, head, bad)}
    levels_format.write_atomic(path / levels_format.LOG_FILE, log)
    with pytest.raises(CorruptStoreError, match=r"h/0/left.*hand-off"):
        dpsn.open(path, "r+")


@settings(max_examples=40, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.integers(0, 9000), min_size=0, max_size=300).map(sorted), max_size=12
    )
)
def test_sums_match_a_dict(batches):
    """``Sums`` (hits summed in place, new ids merged in geometric batches) against a dict."""
    sums, model = mig.Sums(2), {}
    for k, ids in enumerate(batches):
        t = torch.tensor(ids, dtype=torch.int64)
        vals = torch.full((len(ids), 2), float(k + 1))
        vals[:, 1] = t.float()
        sums.add(t, vals)
        for i, v in zip(ids, vals.tolist(), strict=True):
            old = model.get(i, [0.0, 0.0])
            model[i] = [old[0] + v[0], old[1] + v[1]]
    ids, vals = sums.items()
    assert ids.tolist() == sorted(model)
    assert vals.tolist() == [model[i] for i in sorted(model)]
