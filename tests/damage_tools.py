"""Damaged-store testing: a small store, what its reads must return, and a driver that opens,
reads and verifies many damaged copies of it, each in a forked child.

Why a driver process that forks per case: damage to an LMDB file can kill a process outright
(SIGBUS, SIGSEGV, an abort inside LMDB); a child that dies that way is reported as a crash of
that case instead of taking pytest down with it. The driver applies one damage at a time to a
working copy (flip a byte, cut a file, delete it), forks a child that probes the copy, and puts
the file back.

What a probe does, and what counts as a failure (see :func:`probe`): it opens the store
read-only, reads every row (and its delta) at HEAD and at a snapshot, reads ``info``, ``log``,
the snapshots, the router and a dry-run ``gc``, and runs ``verify`` both torch-free
(``PersistedStore.verify``) and through the pool. Each call must either return exactly what the
undamaged store returns or raise a ``DpsnError``; anything else (another exception, a crash, a
hang, different bits without an error) is a failure. And whenever anything differs or fails,
``verify`` must report a problem.

Run as ``python damage_tools.py CASES.json STORE EXPECTED.json`` (the driver); import it for the
helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dpsn
from dpsn.errors import DpsnError
from dpsn.index import ProductKeyRouter
from dpsn.store import PersistedStore

IDS = np.arange(0, 1000, dtype=np.int64)
ROWS = 1000
DIM = 8
CHILD_TIMEOUT_S = int(os.environ.get("DPSN_FUZZ_CHILD_TIMEOUT", "60"))


def make_store(path: Path, *, tiny: bool = False) -> None:
    """Three commits (writes, overwrites, drops), a snapshot and a router: small files, every
    kind of record and array a store holds. ``tiny`` writes a few rows per commit: an LMDB
    file of about 3,600 used bytes, for sweeps of every one of them. Otherwise the third commit
    is made with a row lifecycle: the store turns format 2, HEAD's commit record holds a
    ``lifecycle`` object, its segment a ``usage`` array, and reads at HEAD decay the older
    rows (FREE, written before the lifecycle) lazily, while the snapshot and the past commit
    read them as written."""
    if tiny:
        _make_store(path, tiny=True)
        return
    # Thresholds lowered while it is made: the row index lands in run files (``index.runs/``),
    # which every later opener (the probes) maps, so their damage is fuzzed too.
    from unittest import mock

    from dpsn.store import _runs

    with (
        mock.patch.object(_runs, "RUN_MIN_ROWS", 4),
        mock.patch.object(_runs, "FLUSH_ROWS", 6),
        mock.patch.object(_runs, "FLUSH_COMMITS", 2),
    ):
        _make_store(path, tiny=False)
    assert (path / _runs.RUNS_DIR / _runs.RUNS_MANIFEST).is_file()


def _make_store(path: Path, *, tiny: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n = 6 if tiny else 200
    with dpsn.create(
        path,
        rows=ROWS,
        dim=DIM,
        seed=11,
        chunk_rows=4 if tiny else 16,
        generator={"kind": "hashed_slices", "memory_size": 256, "slice_size": 4},
        cache_rows=0,
    ) as p:
        p.write(torch.arange(0, 2 * n, 2), torch.randn(n, DIM, generator=g))
        p.save_router("r", ProductKeyRouter(d_in=4, num_rows=ROWS, k=2, d_key=4))
        p.commit("first")
        p.snapshot("s1")
        p.write(torch.arange(1, 3 * (n // 2), 3), torch.randn(n // 2, DIM, generator=g))
        p.drop([0, 2, 4, 6])
        p.commit("second")
    lifecycle = None if tiny else dpsn.Lifecycle(decay=0.25, regions=4)
    with dpsn.open(path, "r+", cache_rows=0, lifecycle=lifecycle) as p:
        p.write(torch.arange(500, 500 + n // 10 + 1), torch.randn(n // 10 + 1, DIM, generator=g))
        p.commit("third")


def _bits(t: torch.Tensor) -> list[int]:
    return t.float().contiguous().view(torch.int32).reshape(-1).tolist()


def observe(path: Path, *, verify: bool = False) -> dict[str, Any]:
    """Everything a probe compares, from one store. Each entry is a value or an error."""
    out: dict[str, Any] = {}

    def take(name: str, fn: Any) -> None:
        try:
            out[name] = fn()
        except DpsnError as e:
            out[name] = {"error": type(e).__name__, "message": str(e)[:300]}

    def head() -> dict[str, Any]:
        with dpsn.open(path, cache_rows=0) as p:
            info = p.info()
            # reader_lease: see the "readers" cases; index_runs describes the derived run
            # files (damaged ones: None, and verify says why), not what reads return
            for k in ("path", "bytes_on_disk", "reader_lease", "index_runs"):
                info.pop(k)
            return {
                "rows": _bits(p.read(IDS)),
                "deltas": _bits(p.delta(IDS)),
                "info": info,
                "log": [(c.id, c.message, c.provenance, c.persisted_rows) for c in p.log()],
                "snapshots": p.snapshots(),
                "routers": p.routers(),
                "router": _bits(p.load_router("r")(torch.ones(3, 4)).scores),
                "row_commits": p.row_commits(IDS).tolist(),
            } | ({"verify": p.verify().problems} if verify else {})

    def snapshot() -> dict[str, Any]:
        with dpsn.open(path, at="s1", cache_rows=0) as p:
            return {"rows": _bits(p.read(IDS)), "deltas": _bits(p.delta(IDS)), "head": p.head}

    def past() -> dict[str, Any]:
        with dpsn.open(path, at=3, cache_rows=0) as p:
            return {"deltas": _bits(p.delta(IDS))}

    def gc() -> dict[str, Any]:
        with dpsn.open(path, "r+", cache_rows=0) as p:
            out = p.gc(dry_run=True)
            out.pop("freed_bytes")
            return out

    take("head", head)
    take("snapshot", snapshot)
    take("past", past)
    take("gc", gc)
    return json.loads(json.dumps(out))


def observe_store(path: Path, *, verify: bool = False) -> dict[str, Any]:
    """What the LMDB index decides, read through the store alone (no pool, no torch): deltas
    at HEAD, at the snapshot and at a past commit, the log, snapshots, segment records, the
    generator weights in use, and a dry-run gc. For damage to ``data.mdb`` this sees all a pool
    would, at a fraction of the cost."""
    out: dict[str, Any] = {}
    try:
        store = PersistedStore.open(path, writable=False)
    except DpsnError as e:
        return {"open": {"error": type(e).__name__, "message": str(e)[:300]}}

    def take(name: str, fn: Any) -> None:
        try:
            out[name] = fn()
        except DpsnError as e:
            out[name] = {"error": type(e).__name__, "message": str(e)[:300]}

    def deltas(index: Any) -> list[int]:
        # The raw stored deltas and, where a segment holds them, the usage statistics.
        found, values, _, usage = store.read_deltas(index, IDS, usage_width=10)
        kept = usage[~np.isnan(usage).all(axis=1)]
        bits = [values.view(np.int32).ravel(), kept.view(np.int32).ravel()]
        return [*np.flatnonzero(found).tolist(), *np.concatenate(bits).tolist()]

    def head() -> dict[str, Any]:
        commit, index = store.load_head()
        rec = store.commit_record(commit)
        gen = store.read_generator(rec.generator)
        return {
            "commit": commit,
            "deltas": deltas(index),
            "row_commits": index.commit.tolist(),
            "generator": {k: v.view(np.int32).tolist() for k, v in gen.items()},
            "routers": rec.routers,
        }

    def at(commit_or_name: Any) -> Any:
        return lambda: deltas(store.load_index(store.resolve(commit_or_name)))

    def records() -> dict[str, Any]:
        return {
            "log": [c.to_json() for c in store.log()],
            "snapshots": store.snapshots(),
            "segments": {k: v.to_json() for k, v in store.segment_records().items()},
        }

    def facts() -> Any:  # what `dpsn inspect` reads: a few rows' entries, looked up one by one
        from dpsn.store import StoreFacts

        with StoreFacts(path) as f:
            head, found = f.row_locations(list(range(0, 1000, 7)))
            return [head, sorted(found.items())]

    try:
        take("head", head)
        take("facts", facts)
        take("snapshot", at("s1"))
        take("past", at(3))
        take("records", records)
        if verify:  # the probe's verify, on the same reader (an open costs as much as reads)
            out["verify"] = store.verify().problems
    finally:
        store.close()
    try:
        with PersistedStore.open(path, writable=True) as writer:
            gc = writer.gc(dry_run=True)
            gc.pop("freed_bytes")
            out["gc"] = gc
    except DpsnError as e:
        out["gc"] = {"error": type(e).__name__, "message": str(e)[:300]}
    return json.loads(json.dumps(out))


def verify_problems(path: Path, *, pool: bool = True) -> list[str]:
    """Problems both verifies report (torch-free store level, and the pool's)."""
    problems: list[str] = []
    try:
        store = PersistedStore.open(path, writable=False)
    except DpsnError as e:
        return [f"open: {e}"]
    try:
        problems += store.verify().problems
    finally:
        store.close()
    if not pool:
        return problems
    try:
        with dpsn.open(path, cache_rows=0) as p:
            problems += p.verify().problems
    except DpsnError as e:
        problems.append(f"pool open: {e}")
    return problems


# Observations that may differ without an error as long as verify reports the damage: what
# `dpsn inspect` reads (StoreFacts looks a few raw index entries up, unchecked against the
# index's digest, which only a whole walk can recompute). Rows, deltas, snapshots, the log,
# routers and generator weights must be right or fail.
REPORTED_ONLY = frozenset({"facts"})


def probe(path: Path, want: dict[str, Any], *, level: str = "pool") -> tuple[str, str]:
    """Classify one damaged store: ``ok`` (everything as before, verify clean), ``detected``
    (something failed with a DpsnError or differs, and verify reports a problem), or a failure:
    ``untyped`` (another exception), ``silent`` (something differs or failed but verify is
    clean), ``wrong`` (a read returned other bits without an error; ``REPORTED_ONLY`` aside)."""
    try:
        if level == "store":
            got = observe_store(path, verify=True)
            problems = got.pop("verify", None) or []
            if "open" in got:  # the store did not open: verify must say so
                problems = verify_problems(path, pool=False)
        else:
            got = observe(path, verify=True)
            head = got["head"]
            if isinstance(head, dict) and "verify" in head:
                problems = head.pop("verify")
            else:  # the pool did not open: the store's own verify must say why
                problems = verify_problems(path, pool=False)
    except Exception:
        return "untyped", traceback.format_exc(limit=8)[-2500:]
    # a store that failed to open failed every observation
    got = {k: got.get(k, got.get("open")) for k in want}
    changed = [k for k in want if got[k] != want[k]]
    wrong = [
        k
        for k in changed
        if not (isinstance(got[k], dict) and "error" in got[k]) and k not in REPORTED_ONLY
    ]
    if wrong:
        detail = {k: _diff(want[k], got[k]) for k in wrong}
        return "wrong", json.dumps(detail)[:2500] + f" verify: {problems[:3]}"
    if changed and not problems:
        return "silent", json.dumps({k: got[k] for k in changed})[:2500]
    if changed or problems:
        return "detected", f"{changed} {problems[:2]}"[:500]
    return "ok", ""


def _diff(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _diff(a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    return f"{str(a)[:200]} != {str(b)[:200]}"


def apply(root: Path, case: dict[str, Any]) -> None:
    path = root / case["file"]
    op = case["op"]
    if op == "flip":
        data = bytearray(path.read_bytes())
        data[case["pos"]] ^= case.get("mask", 0xFF)
        path.write_bytes(bytes(data))
    elif op == "truncate":
        with open(path, "r+b") as f:
            f.truncate(case["len"])
    elif op == "delete":
        path.unlink()
    elif op == "write":
        path.write_bytes(bytes.fromhex(case["hex"]))
    elif op == "fifo":  # a FIFO in its place: an open that waits for a writer would hang
        path.unlink(missing_ok=True)
        os.mkfifo(path)
    elif op == "devzero":  # a link to /dev/zero: a read without a bound never ends
        path.unlink(missing_ok=True)
        path.symlink_to("/dev/zero")
    elif op == "dir":  # a directory where a file belongs
        path.unlink(missing_ok=True)
        path.mkdir()
    elif op == "plant":  # a regular file where the store expects none or a folder
        if path.is_dir():
            shutil.rmtree(path)
        path.write_bytes(b"planted")
    else:
        raise ValueError(op)


def restore(work: Path, pristine: Path, case: dict[str, Any], original: bytes | None) -> None:
    """Put the damaged path back (whatever it became: a FIFO, a link, a folder), and the run
    files as they were (a writer's open may rewrite or discard them after damage)."""
    path = work / case["file"]
    if path.is_symlink() or (path.exists() and not path.is_file()):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if original is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(original)
    runs = pristine / "index.runs"
    if runs.is_dir():
        shutil.rmtree(work / "index.runs", ignore_errors=True)
        shutil.copytree(runs, work / "index.runs")
    (work / "index.lmdb" / "lock.mdb").unlink(missing_ok=True)


def run_cases(store: Path, want: dict[str, Any], cases: list[dict[str, Any]]) -> list[dict]:
    """Probe every case in forked children, restoring the working copy after each.

    A child takes cases one after another (a fork per case would cost more than most probes)
    and reports each through a pipe before it starts the next; if it dies (a signal, a hang
    past the alarm), the case it was on is reported as a crash, the file is restored and a new
    child goes on with the next case."""
    work = store.parent / (store.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(store, work)
    originals = {
        c["file"]: (work / c["file"]).read_bytes() if (work / c["file"]).is_file() else None
        for c in cases
    }
    results: list[dict] = []
    while len(results) < len(cases):
        start = len(results)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _child(work, want, cases, start, originals, wfd, store)  # never returns
        os.close(wfd)
        with os.fdopen(rfd, "rb") as pipe:
            for line in pipe:
                results.append({**cases[len(results)], **json.loads(line)})
        _, status = os.waitpid(pid, 0)
        if len(results) < len(cases) and os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            results.append({**cases[len(results)], "outcome": f"crash:{name}", "detail": ""})
        elif len(results) < len(cases) and os.WEXITSTATUS(status) != _FRESH_CHILD:
            results.append({**cases[len(results)], "outcome": "crash:exit", "detail": ""})
        case = cases[len(results) - 1] if len(results) > start else cases[start]
        restore(work, store, case, originals[case["file"]])
    shutil.rmtree(work, ignore_errors=True)
    return results


_FRESH_CHILD = 7  # a child's exit status asking for a fresh child (it left an env open)


def _child(
    work: Path,
    want: dict[str, Any],
    cases: list[dict[str, Any]],
    start: int,
    originals: dict[str, bytes | None],
    wfd: int,
    pristine: Path,
) -> None:
    from dpsn.store import _lmdb

    code = 0
    try:
        for case in cases[start:]:
            signal.alarm(CHILD_TIMEOUT_S)
            apply(work, case)
            level = case.get("level", "pool")
            outcome, detail = probe(work, want[level], level=level)
            restore(work, pristine, case, originals[case["file"]])
            os.write(wfd, json.dumps({"outcome": outcome, "detail": detail}).encode() + b"\n")
            if _lmdb._registry:  # a probe left an environment open: start clean
                code = _FRESH_CHILD
                break
    except BaseException:
        code = 3
    finally:
        os._exit(code)


FAILURES = ("untyped", "silent", "wrong")


def failures(results: list[dict]) -> list[dict]:
    return [r for r in results if r["outcome"] in FAILURES or r["outcome"].startswith("crash")]


def warm_up(store: Path | None = None) -> None:
    """Load, in the driver, what every child would otherwise load lazily (torch's meta-device
    kernels, the pool, router code): seconds a child. Touches no store: zarr keeps an event
    loop thread that a forked child cannot use, so the driver never runs zarr itself; nor
    any op on more than one thread (a forked child would wait forever on OpenMP's pool)."""
    torch.set_num_threads(1)
    import dpsn.pool  # noqa: F401
    from dpsn.hypernet import make_generator
    from dpsn.index._persist import _AllocationBudget

    with torch.device("meta"):
        make_generator("hashed_slices", dim=DIM, seed=0, memory_size=256, slice_size=4)
    gen = make_generator("hashed_slices", dim=DIM, seed=0, memory_size=256, slice_size=4)
    gen(torch.arange(10))
    with _AllocationBudget(1 << 30, "warm-up"):
        router = ProductKeyRouter(d_in=4, num_rows=ROWS, k=2, d_key=4)
    router(torch.ones(3, 4))
    if store is not None:  # every store-level code path once (none of them runs zarr)
        observe_store(store)


if __name__ == "__main__":
    cases_file, store_dir, want_file, out_file = sys.argv[1:5]
    warm_up(Path(store_dir))
    cases = json.loads(Path(cases_file).read_text())
    want = json.loads(Path(want_file).read_text())
    res = run_cases(Path(store_dir), want, cases)
    Path(out_file).write_text(json.dumps(res))
