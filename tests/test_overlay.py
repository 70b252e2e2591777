"""Overlay stores over real bases (reads, never writing the base, pins kept by the base's gc,
typed errors, chains to depth 3) and merges on constructed cases (aligned contributions add
up, opposing ones cancel, order independence), and agents: 4 processes writing overlays of one
base at once, then a merge."""

import json
import multiprocessing as mp
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpsn
from dpsn.errors import (
    BaseCommitNotFoundError,
    BaseMismatchError,
    InvalidArgumentError,
    ReadOnlyError,
    StoreVersionError,
)
from dpsn.store import read_manifest

DIM = 4
SMALL = {"kind": "hashed_slices", "memory_size": 512}


def make_base(path, rows=1000):
    base = dpsn.create(path, rows=rows, dim=DIM, seed=3, generator=SMALL)
    base.write([1, 2], torch.ones(2, DIM))
    base.commit("b1")
    base.snapshot("s1")
    base.write([1], torch.full((1, DIM), 5.0))
    base.commit("b2")
    return base


def test_overlay_reads_base_at_its_commit_and_never_writes_it(tmp_path):
    base = make_base(tmp_path / "base")
    base.close()

    def state():  # the base's data and history (readers leave lease files: not data)
        with dpsn.open(tmp_path / "base") as b:
            log = [c.id for c in b.log()]
            snaps = b.snapshots()
        return sorted(str(p) for p in (tmp_path / "base" / "data.zarr").rglob("*")), log, snaps

    before = state()
    ov = dpsn.create(tmp_path / "ov", base=tmp_path / "base", base_at="s1")
    with dpsn.open(tmp_path / "base", at="s1") as at_s1:
        want = at_s1.read([1, 2, 3]).clone()
    assert torch.equal(ov.read([1, 2, 3]), want)
    assert torch.equal(ov.base([1, 2, 3]), want)
    assert torch.equal(ov.delta([1, 2, 3]), torch.zeros(3, DIM))
    ov.write([2, 3], torch.full((2, DIM), 0.5), add=True)
    ov.commit("o1")
    assert ov.delta_ids().tolist() == [2, 3]
    ov.drop([2])
    ov.commit()
    assert torch.equal(ov.read([2]), want[1:2])  # dropped: back to the base's row
    ov.close()
    # base_at given as a snapshot: the base's data and history are unchanged; it gained the
    # overlay's own pin record, at the snapshot's commit
    (files, log, snaps), (files0, log0, snaps0) = state(), before
    assert (files, log) == (files0, log0)
    with dpsn.open(tmp_path / "ov") as r:
        assert torch.allclose(r.read([3]), want[2:] + 0.5)
        pin = r.base_store["snapshot"]
        assert pin == f"overlay-{r.uuid}"
        assert snaps == {**snaps0, pin: snaps0["s1"]}
        assert r.verify().ok


def test_overlay_pins_its_base_commit_against_gc(tmp_path):
    base = make_base(tmp_path / "base")
    base.close()
    ov = dpsn.create(tmp_path / "ov", base=tmp_path / "base", base_at=2)
    pin = ov.base_store["snapshot"]
    ov.close()
    with dpsn.open(tmp_path / "base", mode="r+") as b:
        assert b.snapshots()[pin] == 2  # the pin record the base lists
        b.write([1], torch.full((1, DIM), 9.0))
        b.commit()
        b.gc()
    import dpsn.pool._overlay as overlay

    overlay._SHARED.clear()
    with dpsn.open(tmp_path / "ov") as r, dpsn.open(tmp_path / "base", at=pin) as pinned:
        assert torch.equal(r.read([1, 2]), pinned.read([1, 2]))
        assert float((r.read([1]) - r.generator(torch.tensor([1])))[0, 0]) == 1.0  # at b1


def test_typed_errors_for_a_missing_commit_or_another_base(tmp_path):
    base = make_base(tmp_path / "base")
    base.close()
    with pytest.raises(BaseCommitNotFoundError):
        dpsn.create(tmp_path / "x", base=tmp_path / "base", base_at="nope")
    with pytest.raises(BaseCommitNotFoundError):
        dpsn.create(tmp_path / "x", base=tmp_path / "base", base_at=99)
    ov = dpsn.create(tmp_path / "ov", base=tmp_path / "base", base_at="s1")
    ov.close()
    del ov  # with it the shared reader of the base (its lease would keep commit 2)
    import gc as garbage

    garbage.collect()
    # the base commit goes: the snapshot is removed and gc'd away
    with dpsn.open(tmp_path / "base", mode="r+") as b:
        for name in list(b.snapshots()):  # the user's and the overlay's own pin
            b.delete_snapshot(name)
        b.write([1, 2], torch.ones(2, DIM))  # commit 2's segment is dead after this
        b.commit()
        b.gc()
    import dpsn.pool._overlay as overlay

    overlay._SHARED.clear()
    with pytest.raises(BaseCommitNotFoundError):
        dpsn.open(tmp_path / "ov")
    # another store at the base's path
    shutil.rmtree(tmp_path / "base")
    other = dpsn.create(tmp_path / "base", rows=1000, dim=DIM, seed=3, generator=SMALL)
    other.write([1], torch.ones(1, DIM))
    other.commit()
    other.snapshot("s1")
    other.close()
    ov2 = tmp_path / "ov"
    m = json.loads((ov2 / "dpsn.json").read_text())
    assert m["format_version"] == 3 and m["base"]["snapshot"] == f"overlay-{m['uuid']}"
    overlay._SHARED.clear()
    with pytest.raises(BaseMismatchError):
        dpsn.open(ov2)
    with pytest.raises(InvalidArgumentError, match="differs from the base"):
        dpsn.create(tmp_path / "y", base=tmp_path / "base", rows=5)


def test_overlay_manifest_is_refused_by_an_older_reader(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base")
    base.close()
    dpsn.create(tmp_path / "ov", base=tmp_path / "base", base_at="s1").close()
    import dpsn.store._format as fmt

    monkeypatch.setattr(fmt, "FORMAT_VERSION", 2)
    with pytest.raises(StoreVersionError):
        fmt.read_manifest(tmp_path / "ov")


def test_chain_of_three_overlays(tmp_path):
    base = make_base(tmp_path / "foundation")
    base.close()
    paths = [tmp_path / "foundation"]
    for n, name in enumerate(("domain", "swarm", "agent")):
        ov = dpsn.create(tmp_path / name, base=paths[-1])
        ov.write([3], torch.full((1, DIM), float(n + 1)), add=True)
        ov.commit()
        ov.close()
        paths.append(tmp_path / name)
    with dpsn.open(paths[-1]) as agent, dpsn.open(paths[0]) as foundation:
        assert torch.allclose(agent.read([3]) - foundation.read([3]), torch.full((1, DIM), 6.0))
        assert torch.equal(agent.read([1]), foundation.read([1]))
    from dpsn.store import base_chain

    chain = base_chain(paths[-1])
    assert [c["path"] for c in chain] == [str(p.resolve()) for p in paths[-2::-1]]


def test_an_overlay_reader_cannot_write(tmp_path):
    base = make_base(tmp_path / "base")
    base.close()
    dpsn.create(tmp_path / "ov", base=tmp_path / "base", base_at="s1").close()
    with dpsn.open(tmp_path / "ov") as r, pytest.raises(ReadOnlyError):
        r.write([1], torch.ones(1, DIM))


# -- merges ----------------------------------------------------------------------------------------


def overlays_with(tmp_path, deltas_per_source):
    """A base and one overlay per entry of ``deltas_per_source`` ({row: vector})."""
    base = dpsn.create(tmp_path / "base", rows=100, dim=DIM, seed=1, generator=SMALL)
    base.commit()
    base.snapshot("s")
    base.close()  # each overlay writes its pin record in the base
    paths = []
    for n, rows in enumerate(deltas_per_source):
        p = tmp_path / f"ov{n}"
        with dpsn.create(p, base=tmp_path / "base", base_at="s") as ov:
            ids = sorted(rows)
            ov.write(ids, torch.stack([torch.as_tensor(rows[i], dtype=torch.float32) for i in ids]))
            ov.commit()
        paths.append(p)
    return dpsn.open(tmp_path / "base", mode="r+"), paths


def test_merge_sum_mean_resonance_on_constructed_cases(tmp_path):
    v = [1.0, 0.0, 0.0, 0.0]
    w = [-1.0, 0.0, 0.0, 0.0]
    u = [0.0, 2.0, 0.0, 0.0]
    sources = [{1: v, 2: v, 3: u}, {1: v, 2: w}, {1: v}]
    base, paths = overlays_with(tmp_path, sources)
    start = base.read([1, 2, 3]).clone()
    report = dpsn.merge(base, paths, rule="resonance", alpha=0.5, beta=-0.5)
    got = base.read([1, 2, 3]) - start
    # row 1: three aligned contributions add up, each amplified by 1 + 0.5
    assert torch.allclose(got[0], torch.tensor(v) * 3 * 1.5)
    # row 2: two opposing ones cancel (consensus 0: neither counts as aligned)
    assert torch.allclose(got[1], torch.zeros(DIM), atol=1e-6)
    assert torch.allclose(got[2], torch.tensor(u) * 1.5)
    assert report.ids.tolist() == [1, 2, 3]
    assert report.contributors.tolist() == [3, 2, 1]
    assert report.commit.message.startswith("merge 3 sources")
    base.discard()
    base.close()


def test_merge_resonance_damps_a_minority_that_opposes(tmp_path):
    v, w = [1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]
    base, paths = overlays_with(tmp_path, [{5: v}, {5: v}, {5: w}])
    start = base.read([5]).clone()
    report = dpsn.merge(base, paths, rule="resonance", alpha=0.0, beta=-1.0)
    assert report.conflicts.tolist() == [1] and report.conflicting_rows == 1
    # consensus +x: the two aligned count once each, the opposing one is cancelled (1 - 1)
    assert torch.allclose(base.read([5]) - start, torch.tensor([v]) * 2)
    sums = dpsn.merge(base, paths, rule="mean")
    assert sums.conflicts.tolist() == [0]
    base.close()


@given(
    order=st.permutations([0, 1, 2, 3]),
    rule=st.sampled_from(["sum", "mean", "resonance"]),
)
def test_property_merge_is_independent_of_source_order(tmp_path_factory, order, rule):
    from dpsn.pool._merge import _combine

    g = torch.Generator().manual_seed(0)
    contributions = []
    for _ in range(4):
        ids = torch.unique(torch.randint(0, 30, (12,), generator=g))
        contributions.append((ids, torch.randn(len(ids), DIM, generator=g, dtype=torch.float64)))
    want = _combine(contributions, DIM, rule, 0.5, -0.5)
    got = _combine([contributions[i] for i in order], DIM, rule, 0.5, -0.5)
    assert torch.equal(want[0], got[0])
    assert torch.allclose(want[1], got[1], atol=1e-12)
    assert torch.equal(want[2], got[2]) and torch.equal(want[3], got[3])


def test_merge_bad_arguments(tmp_path):
    base, paths = overlays_with(tmp_path, [{1: [1.0, 0, 0, 0]}])
    with pytest.raises(InvalidArgumentError):
        dpsn.merge(base, paths, rule="max")
    with pytest.raises(InvalidArgumentError):
        dpsn.merge(base, paths, rule="resonance", beta=0.5)
    with pytest.raises(InvalidArgumentError):
        dpsn.merge(base, [])
    other = dpsn.create(tmp_path / "other", rows=7, dim=DIM, generator=SMALL)
    with pytest.raises(InvalidArgumentError, match="rows=7"):
        dpsn.merge(base, [other])
    other.close()
    base.close()


# -- agents ----------------------------------------------------------------------------------------


def _agent(base: str, path: str, n: int) -> None:
    torch.manual_seed(n)
    pool = dpsn.create(path, base=base, base_at="shared")
    emb = dpsn.PoolEmbedding(pool, mode="sum", row_optimizer="sgd", row_lr=0.1)
    ids = torch.tensor([[0, 1, 2, 10 + n]])
    for _ in range(5):
        emb(ids).sum().backward()
        pool.commit()
    pool.close()


@pytest.mark.slow
def test_four_agents_write_overlays_of_one_base_at_once_then_merge(tmp_path):
    base = dpsn.create(tmp_path / "base", rows=1000, dim=DIM, seed=4, generator=SMALL)
    base.commit()
    base.snapshot("shared")
    base.close()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_agent, args=(str(tmp_path / "base"), str(tmp_path / f"a{n}"), n))
        for n in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with dpsn.open(tmp_path / "base", mode="r+") as b:
        # each agent took its turn at the base's writer lock to write its own pin record
        pins = [n for n in b.snapshots() if n.startswith("overlay-")]
        assert sorted(p[len("overlay-") :] for p in pins) == sorted(
            read_manifest(tmp_path / f"a{n}").uuid for n in range(4)
        )
        start = b.read([0, 1, 2, 10, 11, 12, 13]).clone()
        report = dpsn.merge(b, [tmp_path / f"a{n}" for n in range(4)], rule="resonance")
        change = b.read([0, 1, 2, 10, 11, 12, 13]) - start
        assert report.contributors.tolist() == [4, 4, 4, 1, 1, 1, 1]
        # every agent pushed the shared rows the same way: amplified, never cancelled
        assert torch.allclose(change[0], 4 * change[3], rtol=1e-4)
        assert b.verify().ok


# -- the command line ------------------------------------------------------------------------------


def test_cli_overlay_create_and_info_show_the_chain(tmp_path, capsys):
    from dpsn.tools.cli import main

    base = make_base(tmp_path / "base")
    base.close()
    assert (
        main(["overlay", "create", str(tmp_path / "base"), str(tmp_path / "ov"), "--at", "s1"]) == 0
    )
    assert main(["overlay", "create", str(tmp_path / "ov"), str(tmp_path / "ov2")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ov2"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 3
    assert [c["path"] for c in info["base_chain"]] == [
        str((tmp_path / "ov").resolve()),
        str((tmp_path / "base").resolve()),
    ]
    assert main(["info", str(tmp_path / "ov")]) == 0
    out = capsys.readouterr().out
    assert "overlay of" in out and "1 pinned" in out
    assert (
        main(["overlay", "create", str(tmp_path / "base"), str(tmp_path / "x"), "--at", "no"]) == 1
    )
