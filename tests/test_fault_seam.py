"""Faults injected under the store engine through its file seam (``dpsn.store.fs``, issue 20).

A dry run of a commit counts the file operations it issues through the seam (each with its
call site); then, for operation index i and fault kind k (``tests/_faultfs.py``: ENOSPC, EIO,
a short write, a torn write, a power loss that drops everything not fsynced), the same commit
runs on a fresh copy of the store with that fault, and the store is reopened and checked:

- HEAD is whole: the previous commit or the new one, never a mix, and a commit that returned
  is there;
- ``verify`` is clean (crash leftovers are notes, never problems);
- nothing is lost: HEAD's rows read back as committed; a commit that failed raised a typed
  dpsn error (``StoreFullError``/``StoreWriteError``: ``DpsnError`` and ``OSError`` both) or
  died (the injected crash), and the same request commits on a retry.

The operations swept: a commit, the run-file writes of a writer's open, a compaction with
gc, ``pin``, gc alone, a rollback, create, opening a writer and a reader (the lock, the lease,
the reads), and two roots of several stores: a sharded root's two-phase commit and a
levelled root's consolidating commit. Reads fail too (``EIO``: a typed ``StoreReadError``).

By default a sample runs (a spread of operations and kinds, ~20 s on a loaded machine);
``DPSN_FAULT_SWEEP=full`` runs every operation with every kind that can hit it (``slow``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from _faultfs import KINDS, Crash, FaultFS, applies

from dpsn.errors import DpsnError, StoreNotFoundError
from dpsn.store import CommitRequest, Manifest, PersistedStore
from dpsn.store.fs import OS, current, using

ROWS, DIM = 64, 8
FULL = os.environ.get("DPSN_FAULT_SWEEP") == "full"


def _manifest() -> Manifest:
    return Manifest(
        rows=ROWS, dim=DIM, dtype="float32", seed=0, generator={"kind": "fault-test", "config": {}},
        chunk_rows=16, compressor="zstd", created=0.0, uuid="fault-seam",
    )  # fmt: skip


def _request(seed: int, ids: np.ndarray, drops: np.ndarray, **kw: object) -> CommitRequest:
    rng = np.random.default_rng(seed)
    deltas = rng.standard_normal((len(ids), DIM)).astype(np.float32)
    return CommitRequest(ids=ids, deltas=deltas, drops=drops, message=f"c{seed}", **kw)


FIRST = _request(1, np.arange(0, 40, 2, dtype=np.int64), np.empty(0, np.int64))
# The commit under test: new rows, rewritten rows, drops, a protected set, new generator
# weights and per-row state: every kind of file a commit writes.
UNDER_TEST = _request(
    2,
    np.array([1, 2, 3, 10, 33, 50, 63], dtype=np.int64),
    np.array([4, 6], dtype=np.int64),
    protected=np.array([2, 50], dtype=np.int64),
    generator_state={"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
    state=np.ones((7, 2), dtype=np.float32),
)


@dataclass(frozen=True)
class Scenario:
    """One store operation swept with faults: ``prepare`` makes the base store (real file
    system), ``act`` runs the operation on an open writer."""

    name: str
    rows: int
    prepare: Callable[[PersistedStore], None]
    act: Callable[[PersistedStore], None]
    sweep: str = ""  # sweep only the operations whose site names this file ("": all)
    # Whether the operation took effect, seen by a reader (default: HEAD moved). Its rows are
    # then the dry run's "after", else the base's "before".
    done: Callable[[PersistedStore, int], bool] | None = None

    def took_effect(self, store: PersistedStore, base_head: int) -> bool:
        if self.done is None:
            return store.head() > base_head
        return self.done(store, base_head)


def _commit_all(store: PersistedStore, *requests: CommitRequest) -> None:
    for r in requests:
        head, index = store.load_head()
        store.commit(index, head, r)


def _act_commit(store: PersistedStore) -> None:
    _commit_all(store, UNDER_TEST)


def _small_runs() -> contextlib.AbstractContextManager:
    """Run files from a few rows on (the thresholds lowered, as tests/damage_tools.py does):
    the same code paths as at 2**16 rows, on a store small enough to copy per fault."""
    from unittest import mock

    from dpsn.store import _runs

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(_runs, "RUN_MIN_ROWS", 4))
    stack.enter_context(mock.patch.object(_runs, "FLUSH_ROWS", 4))
    stack.enter_context(mock.patch.object(_runs, "FLUSH_COMMITS", 1))
    return stack


def _prepare_runs(store: PersistedStore) -> None:
    with _small_runs():
        _commit_all(store, FIRST)
    # the next writer's open writes them again
    shutil.rmtree(store.root / "index.runs", ignore_errors=True)


def _act_runs(store: PersistedStore) -> None:
    with _small_runs():
        store.load_head()  # a writer without runs writes them (runs.json, run files)
        _commit_all(store, UNDER_TEST)  # and after the commit, its new run


def _prepare_compact(store: PersistedStore) -> None:
    for seed in range(4):  # rewrite the same rows: the older segments go sparse
        ids = np.arange(seed, 40, 1 + seed, dtype=np.int64)
        _commit_all(store, _request(10 + seed, ids, np.empty(0, np.int64)))


def _act_compact(store: PersistedStore) -> None:
    store.compact(target=1.0, collect=True)  # a compaction commit, then gc


def _prepare_pin(store: PersistedStore) -> None:
    _commit_all(store, FIRST, UNDER_TEST)


def _act_pin(store: PersistedStore) -> None:
    store.pin("kept", 2)  # the index of commit 2 written out, then recorded


def _prepare_gc(store: PersistedStore) -> None:
    """Old commits gc may forget (keep_last=1) and a segment no kept commit reads (its rows
    all rewritten), a snapshot pinned then unpinned (its index copy is stale), and a dead
    reader's lease (gc removes it)."""
    ids = np.arange(0, 40, dtype=np.int64)
    _commit_all(store, _request(10, ids, ids[:0]), _request(11, ids, ids[:0]))
    _commit_all(store, _request(12, ids[:20], ids[30:32]))
    store.pin("old", 2)
    store.unpin("old")
    (store.root / "readers").mkdir(exist_ok=True)
    (store.root / "readers" / "1-dead.lease").write_text('{"commit": 2}')


def _act_gc(store: PersistedStore) -> None:
    store.gc(keep_last=1, keep_within=0)


def _act_rollback(store: PersistedStore) -> None:
    from dpsn.store.rollback import roll_back

    roll_back(store, 2)  # UNDER_TEST undone: rows, protected rows, generator, state


SCENARIOS = {
    "commit": Scenario("commit", ROWS, lambda s: _commit_all(s, FIRST), _act_commit),
    # the commit after the runs is the "commit" scenario's: only the run writes are swept
    "runs": Scenario("runs", ROWS, _prepare_runs, _act_runs, sweep="_runs.py"),
    "compact": Scenario("compact", ROWS, _prepare_compact, _act_compact),
    "pin": Scenario("pin", ROWS, _prepare_pin, _act_pin, done=lambda s, _: "kept" in s.snapshots()),
    # gc changes no row: every outcome reads the same rows; a retry always runs
    "gc": Scenario("gc", ROWS, _prepare_gc, _act_gc, done=lambda s, _: False),
    "rollback": Scenario("rollback", ROWS, _prepare_pin, _act_rollback),
}


def _manifest_rows(rows: int) -> Manifest:
    return replace(_manifest(), rows=rows)


def _rows(store: PersistedStore, rows: int) -> tuple[int, dict[str, np.ndarray]]:
    """HEAD and its rows (ids with a delta, their deltas) as a reader sees them."""
    head, index = store.load_head()
    ids = np.arange(rows, dtype=np.int64)
    found, got, _, _ = store.read_deltas(index, ids)
    return head, {"ids": ids[found], "deltas": got}


@dataclass
class Base:
    """A prepared store and what it holds before and after the operation (from a dry run on
    the real file system, which also counts the operation's file operations)."""

    scenario: Scenario
    root: Path
    head: int
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    ops: list


def _base(tmp: Path, scenario: Scenario) -> Base:
    root = tmp / f"{scenario.name}-base"
    with PersistedStore.create(root, _manifest_rows(scenario.rows), {}) as s:
        scenario.prepare(s)
    with PersistedStore.open(root, writable=False) as s:
        head, before = _rows(s, scenario.rows)
    dry = tmp / f"{scenario.name}-dry"
    shutil.copytree(root, dry)
    fs = FaultFS(dry, tmp / f"{scenario.name}-dry-graveyard")
    with PersistedStore.open(dry, writable=True, fs=fs) as s:
        fs.arm()
        scenario.act(s)
        fs.disarm()
    with PersistedStore.open(dry, writable=False) as s:
        assert s.verify().ok
        _, after = _rows(s, scenario.rows)
        assert scenario.done is not None or s.head() > head
    return Base(scenario, root, head, before, after, fs.ops)


_BASES: dict[str, Base] = {}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Base]:
    tmp = tmp_path_factory.mktemp("fault-bases")

    def get(name: str) -> Base:
        if name not in _BASES:
            _BASES[name] = _base(tmp, SCENARIOS[name])
        return _BASES[name]

    yield get
    _BASES.clear()


def _check(base: Base, root: Path) -> bool:
    """Reopen with the real file system; HEAD whole, verify clean, the rows as committed.
    Returns whether the operation took effect."""
    with PersistedStore.open(root, writable=False) as s:
        report = s.verify()
        assert report.ok, report.problems
        head, got = _rows(s, base.scenario.rows)
        done = base.scenario.took_effect(s, base.head)
    assert head >= base.head
    want = base.after if done or head > base.head else base.before
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_array_equal(got["deltas"], want["deltas"])
    return done


def _one(base: Base, tmp: Path, at: int, kind: str) -> tuple[str, str | None]:
    """Run the operation with the fault; returns (outcome, the site the fault hit)."""
    root = tmp / f"{base.scenario.name}-{kind}-{at}" / "store"
    shutil.copytree(base.root, root)
    fs = FaultFS(root, root.parent / "graveyard")
    store = PersistedStore.open(root, writable=True, fs=fs)
    after = at == len(base.ops)  # power lost once the operation returned
    try:
        fs.arm(None if after else at, None if after else kind)
        try:
            base.scenario.act(store)
            outcome = "completed"
            if after:
                fs.power_off()
                outcome = "completed, then power lost"
        except Crash:
            outcome = "crashed"
        except DpsnError as e:
            outcome = f"typed {type(e).__name__}"
        except OSError as e:  # what the sweep is for
            raise AssertionError(
                f"an untyped {e!r} escaped {base.scenario.name} ({kind} at "
                f"{fs.fired.site if fs.fired else at})"
            ) from e
    finally:
        fs.disarm()
        fs.dead = False
        store.close()
    fired = fs.fired.site if fs.fired else None
    done = _check(base, root)
    if outcome.startswith("completed") and base.scenario.done is None:
        assert done, f"{base.scenario.name} returned but HEAD did not move ({fired})"
    if not done:  # nothing took effect: the same operation succeeds on a retry
        with PersistedStore.open(root, writable=True) as s:
            base.scenario.act(s)
        assert _check(base, root) or base.scenario.done is not None
    return outcome, fired


def _pick(cases: list, sample: int, seed: int) -> list:
    """A sample of ``cases`` (``(at, kind)``): half of it crashes (torn, power), half typed
    failures, so every sample sees both."""
    rng = np.random.default_rng(seed)
    crash = [c for c in cases if c[1] in ("torn", "power")]
    other = [c for c in cases if c[1] not in ("torn", "power")]
    picked = []
    for group, n in ((crash, (sample + 1) // 2), (other, sample // 2)):
        picked += [group[i] for i in rng.choice(len(group), min(n, len(group)), replace=False)]
    return sorted(picked, key=lambda c: (str(c[0]), c[1]))


def _cases(ops: list, sample: int, only: str) -> list[tuple[int, str]]:
    n_ops = len(ops)
    cases = [(op.index, k) for op in ops if only in op.site for k in KINDS if applies(op.name, k)]
    if not FULL:
        cases = _pick(cases, sample, 20)
    return [*cases, (n_ops, "power")]  # and a power loss after it returned


def _sweep(base: Base, tmp_path: Path, sample: int) -> None:
    ops = base.ops
    sites = {op.site for op in ops if base.scenario.sweep in op.site}
    assert len(ops) > 5 and len(sites) > 4, sorted(sites)
    outcomes: dict[str, int] = {}
    fired_sites = set()
    cases = _cases(ops, sample, base.scenario.sweep)
    for at, kind in cases:
        outcome, fired = _one(base, tmp_path, at, kind)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if fired:
            fired_sites.add(fired)
    swept = sum(1 for op in ops if base.scenario.sweep in op.site)
    print(
        f"\n{base.scenario.name}: {swept} operations swept (of {len(ops)}) at {len(sites)} "
        f"call sites; {len(cases)} faults injected ({len(fired_sites)} sites hit), all "
        f"survived with nothing lost: {outcomes}"
    )
    assert outcomes.get("crashed", 0)


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="DPSN_FAULT_SWEEP=full runs every fault")
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_fault_is_survived(bases, tmp_path, name):
    _sweep(bases(name), tmp_path, 0)


@pytest.mark.parametrize(
    ("name", "sample"),
    [("commit", 12), ("compact", 6), ("pin", 3), ("gc", 3), ("rollback", 3)],
)
@pytest.mark.skipif(FULL, reason="the full sweep runs every case")
def test_sampled_faults_are_survived(bases, tmp_path, name, sample):
    _sweep(bases(name), tmp_path, sample)


def _create_once(root: Path, at: int | None, kind: str | None) -> tuple[str, FaultFS]:
    root.mkdir(parents=True)  # create takes an empty directory: the model starts from it
    fs = FaultFS(root, root.parent / "graveyard")
    fs.arm(at, kind)
    try:
        PersistedStore.create(root, _manifest(), {"w": np.ones(3, np.float32)}, fs=fs).close()
        outcome = "completed"
    except Crash:
        outcome = "crashed"
    except DpsnError as e:
        outcome = f"typed {type(e).__name__}"
    except OSError as e:  # what the sweep is for
        site = fs.fired.site if fs.fired else at
        raise AssertionError(f"an untyped {e!r} escaped create ({kind} at {site})") from e
    finally:
        fs.disarm()
        fs.dead = False
    return outcome, fs


def test_create_survives_faults(tmp_path):
    """A fault during ``create`` leaves no store that opens half made: either the store opens
    whole at commit 1 (verify clean) or the path holds no manifest (``StoreNotFoundError``);
    a typed failure leaves the directory empty, so a retry succeeds."""
    _, dry = _create_once(tmp_path / "dry", None, None)
    n = len(dry.ops)
    cases = [(op.index, k) for op in dry.ops for k in KINDS if applies(op.name, k)]
    if not FULL:
        rng = np.random.default_rng(21)
        cases = [cases[i] for i in sorted(rng.choice(len(cases), size=8, replace=False))]
        # and the power lost at close (the lock's release): after create returned
        assert dry.ops[-1].name == "unlock"
        cases.append((n - 1, "power"))
    outcomes: dict[str, int] = {}
    for at, kind in cases:
        root = tmp_path / f"{kind}-{at}" / "store"
        outcome, _ = _create_once(root, at, kind)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        try:
            with PersistedStore.open(root, writable=False) as s:
                assert s.head() == 1
                assert s.verify().ok
        except StoreNotFoundError:
            assert outcome != "completed"
            if outcome.startswith("typed"):
                assert not any(p.name != "writer.lock" for p in root.iterdir()), outcome
                PersistedStore.create(root, _manifest(), {}).close()
    sites = len({op.site for op in dry.ops})
    print(
        f"\ncreate: {n} operations swept at {sites} call sites; {len(cases)} faults injected, "
        f"all survived with nothing lost: {outcomes}"
    )


class _ForgetfulFS(FaultFS):
    """A file system on which the engine's directory fsyncs are lost: what an engine that
    forgot them would leave after a power loss."""

    def fsync_dir(self, path: Path) -> None:
        self._op("fsync_dir", path)


def test_the_sweep_sees_a_missing_directory_fsync(bases, tmp_path):
    """The checks can fail: with the directory fsyncs lost, a commit that returned does not
    survive a power loss (its segment's directory entries are gone), and the check says so."""
    base = bases("commit")
    root = tmp_path / "store"
    shutil.copytree(base.root, root)
    fs = _ForgetfulFS(root, tmp_path / "graveyard")
    with PersistedStore.open(root, writable=True, fs=fs) as store:
        fs.arm()
        _act_commit(store)
        fs.power_off()
        fs.dead = False
    with pytest.raises((AssertionError, DpsnError)):
        _check(base, root)


def test_the_seam_is_chosen_per_store_and_by_a_scoped_setter(bases, tmp_path):
    """``fs=`` picks a store's file system; ``using`` the one stores opened in its block
    get; a store keeps its own after the block."""
    root = tmp_path / "s"
    shutil.copytree(bases("commit").root, root)
    fs = FaultFS(root, tmp_path / "graveyard")
    assert current() is OS
    with using(fs):
        assert current() is fs
        store = PersistedStore.open(root, writable=True)
    assert current() is OS
    with store:
        assert store.fs is fs
        fs.arm()
        _act_commit(store)
        fs.disarm()
    names = {op.name for op in fs.ops}
    assert {"open", "write", "fsync", "fsync_dir", "replace", "lmdb_commit"} <= names
    assert any("segments" in op.path for op in fs.ops)  # zarr's chunk writes came through it
    with pytest.raises(TypeError), using(object()):  # type: ignore[arg-type]
        pass


def test_a_pool_keeps_its_staged_rows_when_a_commit_fails(tmp_path):
    """Through the public API: a pool opened inside ``using(fs)`` writes through ``fs``; a
    commit whose segment write fails raises a typed error, the staged rows stay in the pool,
    and the next commit (the fault gone) makes them durable."""
    torch = pytest.importorskip("torch")
    import dpsn

    path = tmp_path / "s"
    gen = {"kind": "hashed_slices", "memory_size": 256, "slice_size": 4}
    dpsn.create(path, rows=1000, dim=DIM, seed=3, chunk_rows=16, generator=gen).close()
    fs = FaultFS(path, tmp_path / "graveyard")
    rows = torch.randn(5, DIM)
    ids = torch.tensor([3, 7, 100, 500, 999])
    with using(fs), dpsn.open(path, "r+") as p:
        p.write(ids, rows)
        fs.arm()  # a dry run finds the first chunk write of the segment
        p.commit("dry")
        fs.disarm()
        at = next(op.index for op in fs.ops if op.name == "write" and "/c/" in op.path)
        p.write(ids, rows * 2)
        want = p.read(ids)
        fs.arm(at, "eio")
        with pytest.raises(DpsnError) as e:
            p.commit("b")
        assert isinstance(e.value, OSError) and e.value.errno == errno.EIO
        fs.disarm()
        assert torch.equal(p.read(ids), want)  # still staged, still served
        p.commit("b")
    with dpsn.open(path) as p:
        assert torch.equal(p.read(ids), want)
        assert p.head == 3 and p.verify().ok


# -- roots of several stores: a sharded root's two-phase commit, a levelled root's commit -----


@dataclass(frozen=True)
class RootScenario:
    """An operation on a root holding several stores, swept like :class:`Scenario`. ``open``
    runs inside ``using(fs)`` before arming (so every store below writes through the seam);
    ``state`` reads the root with the real file system, checks it (verify clean) and returns
    (its root commit, what a reader sees); ``same`` compares two of the latter."""

    name: str
    prepare: Callable[[Path], None]
    open: Callable[[Path], object]
    act: Callable[[object], None]
    close: Callable[[object], None]
    state: Callable[[Path], tuple[int, object]]
    same: Callable[[object, object], None]
    needs_torch: bool = False


def _root_case(
    scn: RootScenario, base: Path, root: Path, at: int | None, kind: str | None
) -> tuple[str, FaultFS]:
    shutil.copytree(base, root)
    fs = FaultFS(root, root.parent / "graveyard")
    with using(fs):
        handle = scn.open(root)
    after = at == "after"
    try:
        fs.arm(None if after else at, None if after else kind)
        try:
            with using(fs):
                scn.act(handle)
            outcome = "completed"
            if after:
                fs.power_off()
                outcome = "completed, then power lost"
        except Crash:
            outcome = "crashed"
        except DpsnError as e:
            outcome = f"typed {type(e).__name__}"
        except OSError as e:
            site = fs.fired.site if fs.fired else at
            raise AssertionError(f"an untyped {e!r} escaped {scn.name} ({kind} at {site})") from e
    finally:
        fs.disarm()
        fs.dead = False
        try:
            scn.close(handle)
        except (DpsnError, OSError):
            if outcome == "completed":  # a healthy run closes cleanly
                raise
    return outcome, fs


def _root_sweep(scn: RootScenario, tmp: Path, sample: int) -> None:
    base = tmp / "base"
    base.mkdir()
    scn.prepare(base)
    head0, before = scn.state(base)
    outcome, dry = _root_case(scn, base, tmp / "dry" / "root", None, None)
    assert outcome == "completed"
    head1, after = scn.state(tmp / "dry" / "root")
    assert head1 > head0
    ops = dry.ops
    sites = {op.site for op in ops}
    assert len(ops) > 10 and len(sites) > 5, sorted(sites)
    cases: list = [(op.index, k) for op in ops for k in KINDS if applies(op.name, k)]
    if not FULL:
        cases = _pick(cases, sample, 22)
    cases.append(("after", "power"))
    outcomes: dict[str, int] = {}
    fired_sites = set()
    for at, kind in cases:
        root = tmp / f"{kind}-{at}" / "root"
        outcome, fs = _root_case(scn, base, root, at, kind)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if fs.fired:
            fired_sites.add(fs.fired.site)
        head, got = scn.state(root)
        assert head in (head0, head1), (head, kind, at)
        scn.same(got, after if head == head1 else before)
        if outcome.startswith("completed"):
            assert head == head1, f"{scn.name} returned but its root did not move ({kind} {at})"
        if head == head0:  # the same operation succeeds on a retry
            handle = scn.open(root)
            try:
                scn.act(handle)
            finally:
                scn.close(handle)
            head, got = scn.state(root)
            assert head > head0  # verify clean (state checks it)
            if head == head1:  # (a levelled open after a crash first commits a recovery)
                scn.same(got, after)
    print(
        f"\n{scn.name}: {len(ops)} operations swept at {len(sites)} call sites; {len(cases)} "
        f"faults injected ({len(fired_sites)} sites hit), all survived with nothing lost: "
        f"{outcomes}"
    )
    assert outcomes.get("crashed", 0)


# A sharded root (dpsn.store.shards): two shard stores and the global records. The operation:
# phase 1 (each shard commits) then phase 2 (the next global record). A reader opens the
# shards at the commits the newest record names; a shard ahead of it is what a writer rolls
# back before it trains on, so a retry is the same two phases again.

SHARDS = ("shard-0000", "shard-0001")


def _shard_prepare(root: Path) -> None:
    from dpsn.store.shards import RootManifest, write_global, write_root_manifest

    write_root_manifest(root, RootManifest(uuid="fault-shards", rows=ROWS, dim=DIM, created=0.0))
    heads = []
    for i, d in enumerate(SHARDS):
        with PersistedStore.create(root / d, _manifest(), {}) as s:
            _commit_all(s, _request(30 + i, np.arange(i, 40, 2, dtype=np.int64), FIRST.drops))
            heads.append((d, s.head()))
    write_global(root, heads, "first")


def _shard_open(root: Path) -> dict[str, PersistedStore]:
    return {d: PersistedStore.open(root / d, writable=True) for d in SHARDS}


def _shard_act(stores: dict[str, PersistedStore]) -> None:
    from dpsn.store.shards import write_global

    heads = []
    for i, (d, s) in enumerate(stores.items()):
        ids = np.array([i, 10 + i, 33, 50 + i], dtype=np.int64)
        _commit_all(s, _request(40 + i, ids, np.array([2 + i], dtype=np.int64)))  # phase 1
        heads.append((d, s.head()))
    write_global(next(iter(stores.values())).root.parent, heads, "second")  # phase 2


def _shard_close(stores: dict[str, PersistedStore]) -> None:
    for s in stores.values():
        s.close()


def _shard_state(root: Path) -> tuple[int, object]:
    from dpsn.store.shards import read_global, read_root_manifest

    read_root_manifest(root)
    rec = read_global(root)
    rows = []
    for d, commit in rec.shards:
        with PersistedStore.open(root / d, writable=False) as s:
            report = s.verify()
            assert report.ok, report.problems
            index = s.load_index(commit)
            ids = np.arange(ROWS, dtype=np.int64)
            found, got, _, _ = s.read_deltas(index, ids)
            rows.append((ids[found], got))
    return rec.id, rows


def _same_rows(a: object, b: object) -> None:
    assert len(a) == len(b)
    for (ia, da), (ib, db) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(da, db)


# A levelled root (dpsn.pool's levels over dpsn.store.levels): three levels, each its own
# store, the root log and the migration-state arrays. The operation: a root commit that
# consolidates (migrates rows between levels), then writes the state and the root log.

LEVEL_ROWS = 400


def _level_operations(pool: object, k: int) -> None:
    import torch

    import dpsn

    g = torch.Generator().manual_seed(k)
    hot = torch.arange(0, 24)
    d = torch.randn(len(hot), DIM, generator=torch.Generator().manual_seed(0))
    pool.write(hot, 0.1 * d + 0.01 * torch.randn(len(hot), DIM, generator=g), add=True)
    ids = torch.randint(0, LEVEL_ROWS, (32,), generator=g)
    with pool.page_in(ids) as batch:
        batch.apply_grads(torch.randn(len(batch), DIM, generator=g), dpsn.pool.RowSGD(lr=0.05))


def _level_prepare(root: Path) -> None:
    import dpsn

    root.rmdir()  # create takes a new path
    levels = [dpsn.Level("foundation", inertia=0.5), "domain", "task"]
    policy = dpsn.Migration(stable_windows=1, handoff=2, consolidate_every=2, caps=(0.05, 0.02))
    with dpsn.create(
        root, rows=LEVEL_ROWS, dim=DIM, seed=7, generator={"kind": "hashed_slices",
        "memory_size": 1024}, chunk_rows=16, cache_rows=128, levels=levels, migration=policy,
    ) as p:  # fmt: skip
        p.commit("seed")
        while (p.head + 1) % 2:  # the swept commit consolidates: it migrates rows
            _level_operations(p, p.head + 1)
            p.commit(f"c{p.head + 1}")


def _level_open(root: Path) -> object:
    import dpsn

    pool = dpsn.open(root, "r+", cache_rows=128)
    _level_operations(pool, pool.head + 1)  # staged before the fault is armed
    return pool


def _level_state(root: Path) -> tuple[int, object]:
    import torch

    import dpsn

    with dpsn.open(root, cache_rows=128) as p:
        report = p.verify()
        assert report.ok, report.problems
        ids = torch.arange(LEVEL_ROWS)
        deltas = [p.delta(ids, level=n).numpy() for n in p.levels]
        return p.head, (deltas, p.migrations())


def _same_levels(a: object, b: object) -> None:
    for x, y in zip(a[0], b[0], strict=True):
        np.testing.assert_array_equal(x, y)
    strip = [{k: v for k, v in m.items() if k != "time"} for m in a[1]]
    assert strip == [{k: v for k, v in m.items() if k != "time"} for m in b[1]]


ROOT_SCENARIOS = {
    "shard-root": RootScenario(
        "shard-root", _shard_prepare, _shard_open, _shard_act, _shard_close, _shard_state,
        _same_rows,
    ),
    "level-commit": RootScenario(
        "level-commit", _level_prepare, _level_open, lambda p: p.commit("swept"),
        lambda p: p.close(), _level_state, _same_levels, needs_torch=True,
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="DPSN_FAULT_SWEEP=full runs every fault")
@pytest.mark.parametrize("name", sorted(ROOT_SCENARIOS))
def test_every_root_fault_is_survived(tmp_path, name):
    if ROOT_SCENARIOS[name].needs_torch:
        pytest.importorskip("torch")
    _root_sweep(ROOT_SCENARIOS[name], tmp_path, 0)


@pytest.mark.parametrize(("name", "sample"), [("shard-root", 3), ("level-commit", 2)])
@pytest.mark.skipif(FULL, reason="the full sweep runs every case")
def test_sampled_root_faults_are_survived(tmp_path, name, sample):
    if ROOT_SCENARIOS[name].needs_torch:
        pytest.importorskip("torch")
    _root_sweep(ROOT_SCENARIOS[name], tmp_path, sample)


def test_a_failed_global_record_is_typed_and_leaves_no_record(tmp_path):
    """Phase 2 of a sharded commit (``write_global``) failing under the seam raises a typed
    error (it let a bare ``OSError`` escape before), writes no record and leaves no
    temporary file; the retry writes the record."""
    from dpsn.store.shards import GLOBAL_DIR, global_ids, read_global, write_global

    root = tmp_path / "root"
    root.mkdir()
    _shard_prepare(root)
    fs = FaultFS(root, tmp_path / "graveyard")
    heads = [(d, 2) for d in SHARDS]
    for kind, error in (("eio", "StoreWriteError"), ("enospc", "StoreFullError")):
        fs.arm(0, kind)
        with pytest.raises(DpsnError) as e:
            write_global(root, heads, "second", fs=fs)
        fs.disarm()
        assert type(e.value).__name__ == error and isinstance(e.value, OSError)
        assert global_ids(root) == [1]
        assert sorted(p.name for p in (root / GLOBAL_DIR).iterdir()) == [f"{1:016d}.json"]
    assert write_global(root, heads, "second", fs=fs).id == 2
    assert read_global(root).shards == tuple(heads)


@pytest.mark.parametrize("target", ["manifest", "segment", "protected", "generator"])
def test_a_read_fault_is_a_typed_error_naming_the_file(bases, tmp_path, target):
    """The engine's reads go through the seam: ``EIO`` on reading one of its files is a
    ``StoreReadError`` (a ``CorruptStoreError``, an ``OSError`` with ``errno`` EIO) naming the
    file, and the store is as it was: the same read succeeds once the device is healthy."""
    from dpsn.errors import StoreReadError

    root = tmp_path / "s"
    shutil.copytree(bases("commit").root, root)
    with PersistedStore.open(root, writable=True) as s:
        _act_commit(s)  # protected rows, generator weights and state on disk
    want = {
        "manifest": "dpsn.json",
        "segment": "segments/",
        "protected": "protected/",
        "generator": "generator/",
    }[target]

    def read(fs: FaultFS) -> None:
        with PersistedStore.open(root, writable=False, fs=fs) as s:
            head, index = s.load_head()
            s.read_deltas(index, np.arange(ROWS, dtype=np.int64))
            rec = s.commit_record(head)
            s.read_generator(rec.generator)
            from dpsn.store import read_protected

            read_protected(root, rec.protected, ROWS, fs)

    fs = FaultFS(root, tmp_path / "graveyard")
    fs.arm()
    read(fs)
    fs.disarm()
    at = next(op.index for op in fs.ops if op.name in ("open_read", "read") and want in op.path)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*") if "readers" not in p.parts)
    fs.arm(at, "eio")
    with pytest.raises(StoreReadError) as e:
        read(fs)
    assert e.value.errno == errno.EIO and isinstance(e.value, OSError)
    assert want.rstrip("/") in str(e.value) and want.rstrip("/") in e.value.filename
    fs.disarm()
    after = sorted(str(p.relative_to(root)) for p in root.rglob("*") if "readers" not in p.parts)
    assert after == before  # nothing written, nothing removed
    read(fs)  # the device healthy again: the same read succeeds
    with PersistedStore.open(root, writable=False) as s:
        assert s.verify().ok


def test_opening_survives_faults_at_the_lock_the_lease_and_every_read(bases, tmp_path):
    """Opening a writer (the writer lock's file and ``flock``, the manifest, the groups'
    metadata, LMDB) and a reader (its lease: file, ``flock``, content, rename) goes through the
    seam: a fault at any of those operations is a typed error, or for a reader's lease a
    reader without one (``LeaseWarning``), never a bare ``OSError``; the store is unchanged."""
    from dpsn.errors import LeaseWarning

    base = bases("commit")
    dry_root = tmp_path / "dry"
    shutil.copytree(base.root, dry_root)
    dry = FaultFS(dry_root, tmp_path / "dry-graveyard")

    def open_both(root: Path, fs: FaultFS) -> None:
        with PersistedStore.open(root, writable=True, fs=fs) as w:
            w.load_head()
        with PersistedStore.open(root, writable=False, fs=fs) as r:
            r.load_head()

    dry.arm()
    open_both(dry_root, dry)
    dry.disarm()
    names = {op.name for op in dry.ops}
    assert {"open_lock", "lock", "unlock", "overwrite", "replace", "open_read", "read"} <= names
    cases = [(op.index, k) for op in dry.ops for k in ("eio", "enospc") if applies(op.name, k)]
    if not FULL:
        rng = np.random.default_rng(23)
        cases = [cases[i] for i in sorted(rng.choice(len(cases), size=6, replace=False))]
    outcomes: dict[str, int] = {}
    for at, kind in cases:
        root = tmp_path / f"{kind}-{at}" / "store"
        shutil.copytree(base.root, root)
        fs = FaultFS(root, root.parent / "graveyard")
        fs.arm(at, kind)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                open_both(root, fs)
            leaseless = any(issubclass(w.category, LeaseWarning) for w in caught)
            outcome = "opened without a lease" if leaseless else "opened"
        except DpsnError as e:
            outcome = f"typed {type(e).__name__}"
        except OSError as e:
            site = fs.fired.site if fs.fired else at
            raise AssertionError(f"an untyped {e!r} escaped open ({kind} at {site})") from e
        finally:
            fs.disarm()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        _check(base, root)  # verify clean, the rows as they were
        open_both(root, OS)  # and it opens again
    print(f"\nopen: {len(dry.ops)} operations; {len(cases)} faults injected: {outcomes}")


@pytest.mark.parametrize("kind", ["eio", "enospc"])
def test_gc_goes_on_when_a_dead_lease_cannot_be_removed(bases, tmp_path, kind):
    """Removing a dead reader's lease is housekeeping: when the file system fails it, gc
    still collects (a bare ``OSError`` escaped gc before) and the next gc removes it."""
    root = tmp_path / "s"
    shutil.copytree(bases("gc").root, root)
    lease = root / "readers" / "1-dead.lease"
    fs = FaultFS(root, tmp_path / "graveyard")
    ops = bases("gc").ops  # the dry run of this very gc
    at = next(op.index for op in ops if op.name == "unlink" and op.path.endswith(lease.name))
    with PersistedStore.open(root, writable=True, fs=fs) as s:
        fs.arm(at, kind)
        removed = s.gc(keep_last=1, keep_within=0)
        fs.disarm()
        assert fs.fired is not None and lease.exists()
        assert removed["removed_segments"]  # gc collected all the same
        s.gc()
    assert not lease.exists()
    _check(bases("gc"), root)


def test_a_commit_returns_when_its_new_run_cannot_be_read_back(tmp_path):
    """After a commit is durable, the writer writes its row index as run files and maps them
    back; a read fault there (a ``RunsUnusableError`` escaped the commit before) leaves the
    commit returned and whole: runs only speed up the next open."""
    from unittest import mock

    from dpsn.store import _runs

    with (
        mock.patch.object(_runs, "RUN_MIN_ROWS", 4),
        mock.patch.object(_runs, "FLUSH_ROWS", 4),
        mock.patch.object(_runs, "FLUSH_COMMITS", 1),
    ):
        base = tmp_path / "base"
        with PersistedStore.create(base, _manifest(), {}) as s:
            _commit_all(s, FIRST)
        roots = {}
        for name in ("dry", "fault"):
            roots[name] = tmp_path / name / "store"
            shutil.copytree(base, roots[name])
        dry = FaultFS(roots["dry"], tmp_path / "dry" / "graveyard")
        with PersistedStore.open(roots["dry"], writable=True, fs=dry) as s:
            dry.arm()
            _act_commit(s)
            dry.disarm()
        committed = next(i for i, op in enumerate(dry.ops) if op.name == "lmdb_commit")
        at = next(
            op.index for op in dry.ops[committed:] if op.name == "read" and "/run-" in op.path
        )
        fs = FaultFS(roots["fault"], tmp_path / "fault" / "graveyard")
        with PersistedStore.open(roots["fault"], writable=True, fs=fs) as s:
            fs.arm(at, "eio")
            _act_commit(s)  # returns: the commit is durable
            fs.disarm()
            assert fs.fired is not None
        for name in ("dry", "fault"):
            with PersistedStore.open(roots[name], writable=False) as s:
                assert s.verify().ok
                got = _rows(s, ROWS)
            if name == "dry":
                want = got
        assert got[0] == want[0] == 3
        np.testing.assert_array_equal(got[1]["deltas"], want[1]["deltas"])


@pytest.mark.parametrize("kind", ["eio", "enospc"])
def test_a_failed_migration_state_or_root_file_is_typed(tmp_path, kind):
    """A levelled root's migration state and root files are written through the seam; a
    failure is ``StoreWriteError``/``StoreFullError`` (a bare ``OSError`` escaped a levelled
    commit before), leaves no temporary behind, and the old file stands."""
    from dpsn.store import levels

    root = tmp_path / "root"
    root.mkdir()
    levels.write_atomic(root / levels.LOG_FILE, {"commits": []})
    parts = {"a": np.arange(5, dtype=np.int64), "b": np.ones((2, 3), np.float32)}
    levels.write_state(root, 1, parts)
    fs = FaultFS(root, tmp_path / "graveyard")
    want = "StoreFullError" if kind == "enospc" else "StoreWriteError"
    for write in (
        lambda: levels.write_state(root, 2, parts, fs),
        lambda: levels.write_atomic(root / levels.LOG_FILE, {"commits": [1]}, fs),
    ):
        fs.arm(1, kind)  # the first write of either
        with pytest.raises(DpsnError) as e:
            write()
        fs.disarm()
        assert type(e.value).__name__ == want and isinstance(e.value, OSError)
    assert sorted(p.name for p in (root / levels.STATE_DIR).iterdir()) == [f"{1:016x}"]
    assert [p.name for p in root.iterdir() if "tmp" in p.name] == []
    assert levels.read_sealed(root / levels.LOG_FILE)["commits"] == []
    record = levels.write_state(root, 2, parts, fs)  # the retry
    got = levels.read_state(root, record, fs)
    np.testing.assert_array_equal(got["b"], parts["b"])
