"""Damage fuzzing: bytes flipped and files cut in a small store, each damaged copy opened, read
and verified in a forked child (``damage_tools.py``).

Each case must end in one of two ways: everything reads back exactly as from the undamaged
store and verify is clean, or something fails with a typed ``DpsnError`` and verify reports a
problem. A crash (SIGBUS, SIGSEGV, abort), a hang, another exception, bits that differ without
an error, or a failure that verify does not report fails the test.

The default run takes a seeded, bounded set: every byte of every page header of ``data.mdb``,
the meta pages' fields, random positions, truncations at many lengths, and flips, cuts and
deletions of each other kind of file (manifest, zarr.json of groups and arrays, segment,
generator, snapshot and router chunks). ``slow`` sweeps every byte the LMDB file of a tinier
store uses (page headers, node pointers and nodes of every reachable page, overflow pages, the
meta pages: about 3,600); ``DPSN_FUZZ_ALL=1`` makes it every byte of that file, free pages and
unused page space included (about 74,000, an hour or two).
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import damage_tools as D
import pytest

from dpsn.store._lmdbfile import check_trees, read_meta

HERE = Path(__file__).parent
WORKERS = 2
SEED = int(os.environ.get("DPSN_FUZZ_SEED", "20260101"))
DATA = "index.lmdb/data.mdb"


def _make(root: Path, *, tiny: bool) -> tuple[Path, Path]:
    path = root / "s"
    D.make_store(path, tiny=tiny)
    want = {"pool": D.observe(path), "store": D.observe_store(path)}
    assert D.verify_problems(path) == []
    want_file = root / "want.json"
    want_file.write_text(json.dumps(want))
    return path, want_file


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _make(tmp_path_factory.mktemp("fuzz"), tiny=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _make(tmp_path_factory.mktemp("tiny"), tiny=True)


def run(store: tuple[Path, Path], cases: list[dict], name: str) -> list[dict]:
    """Probe ``cases`` with ``WORKERS`` drivers side by side, each on its own copy."""
    path, want_file = store
    procs = []
    for w in range(WORKERS):
        part = cases[w::WORKERS]
        copy = path.parent / f"{name}-{w}"
        if not copy.exists():
            subprocess.run(["cp", "-a", str(path), str(copy)], check=True)
        cases_file = path.parent / f"{name}-{w}.cases.json"
        out = path.parent / f"{name}-{w}.out.json"
        cases_file.write_text(json.dumps(part))
        cmd = [sys.executable, str(HERE / "damage_tools.py"), str(cases_file), str(copy)]
        procs.append((subprocess.Popen([*cmd, str(want_file), str(out)]), out))
    results = []
    for proc, out in procs:
        assert proc.wait() == 0, "a damage driver failed"
        results += json.loads(out.read_text())
    return results


def check(results: list[dict]) -> None:
    bad = D.failures(results)
    summary = Counter(r["outcome"] for r in results)
    shown = "\n".join(
        f"{r['file']} {r['op']} {r.get('pos', r.get('len', ''))}: {r['outcome']} {r['detail']}"
        for r in bad[:15]
    )
    assert not bad, f"{len(bad)} of {len(results)} damaged stores failed ({summary}):\n{shown}"
    assert summary["ok"] + summary["detected"] == len(results)


def _meta_and_headers(path: Path, rng: random.Random) -> tuple[int, list[int]]:
    """Every byte of the newer meta page's fields and of every used page's header, four header
    bytes (page number, flags, lower, upper) of every free page, and a sample of the older meta
    page's fields."""
    data = path / DATA
    size = data.stat().st_size
    meta = read_meta(data)
    psize = meta.page_size
    used = set(check_trees(data, meta).tolist())
    newer = meta.txnid & 1
    out = [newer * psize + b for b in range(16, 152)]
    out += [(1 - newer) * psize + b for b in rng.sample(range(16, 152), 30)]
    for p in range(size // psize):
        header = range(16) if p in used else (0, 10, 12, 14)
        out += [p * psize + b for b in header]
    return size, sorted(set(out))


def _live_bytes(path: Path) -> list[int]:
    """Every byte ``data.mdb`` uses: meta fields, and for every page the newest transaction
    reaches its header, node pointers and nodes (a branch or leaf page's gap between ``lower``
    and ``upper`` is unused) or, for overflow pages, all of it."""
    data = path / DATA
    meta = read_meta(data)
    raw = data.read_bytes()
    psize = meta.page_size
    out = [p * psize + b for p in (0, 1) for b in range(152)]
    for p in check_trees(data, meta).tolist():
        if p < 2:
            continue
        base = p * psize
        flags, lower, upper = struct.unpack_from("<HHH", raw, base + 10)
        if flags & 0x04:  # overflow
            out += range(base, base + psize)
        else:
            out += [*range(base, base + lower), *range(base + upper, base + psize)]
    return sorted(set(out))


def test_lmdb_flips_and_truncations(store: tuple[Path, Path]) -> None:
    path, _ = store
    rng = random.Random(SEED)
    size, fixed = _meta_and_headers(path, rng)
    positions = fixed + rng.sample(range(size), 80)
    cases = [{"file": DATA, "op": "flip", "pos": p, "level": "store"} for p in positions]
    # single-bit flips too: a 0xFF flip of a size byte is huge, one bit is a near miss
    cases += [
        {"file": DATA, "op": "flip", "pos": p, "mask": 1 << rng.randrange(8), "level": "store"}
        for p in rng.sample(_live_bytes(path), 60)
    ]
    page = read_meta(path / DATA).page_size
    cuts = {0, 1, 15, 16, 100, page - 1, page, page + 1, 2 * page - 1, 2 * page, 2 * page + 1}
    cuts |= {size // 2, size - page - 1, size - page, size - 1}
    cuts |= set(rng.sample(range(size), 5))
    cases += [{"file": DATA, "op": "truncate", "len": n, "level": "store"} for n in sorted(cuts)]
    cases.append({"file": DATA, "op": "delete", "level": "store"})
    results = run(store, cases, "lmdb")
    check(results)
    outcomes = Counter(r["outcome"] for r in results if r["op"] == "truncate")
    assert outcomes == {"detected": len(cuts)}  # a cut file is always noticed, never mapped


def _files(path: Path) -> dict[str, Path]:
    z = path / "data.zarr"

    def first_dir(p: Path) -> Path:
        return sorted(d for d in p.iterdir() if d.is_dir())[0]

    seg = first_dir(z / "segments")
    newest = sorted(d for d in (z / "segments").iterdir() if d.is_dir())[-1]  # with usage
    gen = first_dir(z / "generator")
    snap = first_dir(z / "snapshots")
    router = first_dir(z / "routers" / "r")
    keys = next(p for p in router.iterdir() if p.name.endswith("keys1"))
    return {
        "manifest": path / "dpsn.json",
        "root group": z / "zarr.json",
        "segment deltas zarr.json": seg / "deltas" / "zarr.json",
        "segment deltas chunk": next(
            p for p in (seg / "deltas").rglob("*") if p.is_file() and p.name != "zarr.json"
        ),
        "segment ids chunk": seg / "ids" / "c" / "0",
        "segment usage zarr.json": newest / "usage" / "zarr.json",
        "segment usage chunk": newest / "usage" / "c" / "0" / "0",
        "segment drops zarr.json": seg / "drops" / "zarr.json",
        "generator zarr.json": gen / "memory" / "zarr.json",
        "generator chunk": gen / "memory" / "c" / "0",
        "snapshot zarr.json": snap / "ids" / "zarr.json",
        "snapshot chunk": snap / "ids" / "c" / "0",
        "router group zarr.json": router / "zarr.json",
        "router array zarr.json": keys / "zarr.json",
        "router chunk": next(p for p in keys.rglob("*") if p.is_file() and p.name != "zarr.json"),
    }


def test_other_files(store: tuple[Path, Path]) -> None:
    path, _ = store
    rng = random.Random(SEED + 1)
    cases = []
    for what, f in _files(path).items():
        rel = str(f.relative_to(path))
        size = f.stat().st_size
        n = 8 if what == "manifest" else 6 if "zarr.json" in what else 4
        for pos in rng.sample(range(size), min(n, size)):
            cases.append({"file": rel, "op": "flip", "pos": pos, "what": what})
        cases.append({"file": rel, "op": "truncate", "len": rng.randrange(size), "what": what})
        cases.append({"file": rel, "op": "delete", "what": what})
    results = run(store, cases, "files")
    check(results)
    # damage to chunks and array metadata never goes unnoticed
    for r in results:
        if "chunk" in r["what"] and r["op"] != "flip":
            assert r["outcome"] == "detected", r


@pytest.mark.slow
def test_every_used_byte_of_the_lmdb_file(tiny: tuple[Path, Path]) -> None:
    path, _ = tiny
    if os.environ.get("DPSN_FUZZ_ALL"):
        positions = list(range((path / DATA).stat().st_size))
    else:
        positions = _live_bytes(path)
    cases = [{"file": DATA, "op": "flip", "pos": p, "level": "store"} for p in positions]
    check(run(tiny, cases, "sweep"))


def _run_files(path: Path) -> list[Path]:
    folder = path / "index.runs"
    return sorted(folder.glob("run-*.bin"))


def test_run_files_and_runs_json(store: tuple[Path, Path]) -> None:
    """The row index's run files (issue 21): flips anywhere in ``runs.json`` and in every run
    file (header, each block of entries, fences, block sums), cuts and deletions. Damage there
    may only ever be ``ok`` (a checksum sent the reader to LMDB and every read is right) or
    ``detected``; never a wrong read."""
    path, _ = store
    rng = random.Random(SEED + 2)
    manifest = path / "index.runs" / "runs.json"
    cases = []
    rel = str(manifest.relative_to(path))
    size = manifest.stat().st_size
    for pos in rng.sample(range(size), min(12, size)):
        cases.append({"file": rel, "op": "flip", "pos": pos, "mask": 1 << rng.randrange(8)})
    cases.append({"file": rel, "op": "truncate", "len": rng.randrange(size)})
    cases.append({"file": rel, "op": "delete"})
    runs = _run_files(path)
    assert runs, "the fuzz store has no run files"
    for run_file in runs:
        rel = str(run_file.relative_to(path))
        size = run_file.stat().st_size
        positions = set(rng.sample(range(64), 3))  # the header
        positions |= set(rng.sample(range(64, size), min(20, size - 64)))  # entries and tail
        for pos in sorted(positions):
            cases.append({"file": rel, "op": "flip", "pos": pos, "mask": 1 << rng.randrange(8)})
        cases.append({"file": rel, "op": "truncate", "len": rng.randrange(size)})
        cases.append({"file": rel, "op": "delete"})
    for c in cases:
        c["what"] = "runs"
    check(run(store, cases, "runs"))


def test_special_files_everywhere_a_file_is_read(store: tuple[Path, Path]) -> None:
    """A FIFO, a link to /dev/zero or a directory in place of each kind of file a store's
    openers read (issue 21): every probe ends, typed; none hangs (the child's alarm would
    report a crash) or reads without end. And a ``readers`` file (no lease can be made):
    readers read as before, without a lease."""
    path, _ = store
    targets = {**_files(path)}
    targets["runs.json"] = path / "index.runs" / "runs.json"
    targets["run file"] = _run_files(path)[0]
    cases = []
    for what, f in targets.items():
        rel = str(f.relative_to(path))
        ops = ("fifo", "devzero", "dir") if what != "manifest" else ("fifo", "devzero")
        cases += [{"file": rel, "op": op, "what": what} for op in ops]
    cases.append({"file": "readers", "op": "plant", "what": "readers"})
    results = run(store, cases, "special")
    check(results)
    lease_less = [r for r in results if r["what"] == "readers"]
    assert [r["outcome"] for r in lease_less] == ["ok"], lease_less
