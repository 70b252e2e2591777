"""How many of dpsn's source files one row-path operation walks through, and how often it
crosses from one to another: a measure of how direct the road from an executor to its rows is
(issue 20; the counts are in docs/row-path.md).

Each operation runs once under ``sys.setprofile``. Every Python call that enters one of the
library's files (``dpsn/``, ``pool/``, ``tiers/``, ``store/``, ``index/``, ...; this script and
everything outside the repository are not counted) is attributed to that file; the call is a
*crossing* when the nearest library frame below it (walking back past torch, autograd and the
standard library) is in another file; a *boundary* is a distinct (caller file, callee file)
pair, and a pair called *both ways* is a walk that goes back up (a callback). Returns are not
counted (each crossing returns once).

Operations, on a pool of 10**6 rows (dim 16, a cache of 1,024 rows), with the ``PoolEmbedding``
executor (``mode="sum"``, row SGD), each traced after warming up:

- ``hot step``: a forward and backward of one cached row (its second step);
- ``miss step``: the same for a row never read before (procedural, nothing staged);
- ``miss, full cache``: the same once the cache is full of trained rows, so that the miss
  evicts a dirty row into staging (the policy picks the victim) and searches a staging area
  that holds rows: the steady state of a long training run;
- ``hot read``: ``pool.read`` of cached rows;
- ``commit``: ``pool.commit()`` of one trained row (dirty in the cache);
- ``hot step, lifecycle``: the hot step on a pool with a ``dpsn.Lifecycle`` (usage statistics).

Run: ``python bench/rowpath_files.py [--walk NAME] [--json]`` (``--walk`` prints the files of
one operation in the order first entered, with their call counts). ``DPSN_NATIVE=0`` gives the
PyTorch paths' counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any


def _library_root() -> Path:
    import dpsn

    return Path(dpsn.__file__).resolve().parent.parent


def trace(fn: Callable[[], Any], root: Path) -> dict[str, Any]:
    """Run ``fn`` once under a profiler: the library files it entered (in first-entry order,
    with call counts) and the number of calls that crossed from one library file to another."""
    here = str(Path(__file__).resolve())
    prefix = str(root) + "/"
    library: dict[str, bool] = {}

    def ours(path: str) -> bool:
        known = library.get(path)
        if known is None:
            known = library[path] = (
                path.startswith(prefix)
                and path != here
                and "/tests/" not in path
                and "/.venv/" not in path
                and path.endswith(".py")
            )
        return known

    calls: Counter[str] = Counter()
    edges: set[tuple[str, str]] = set()
    crossings = 0

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal crossings
        if event != "call":
            return
        path = frame.f_code.co_filename
        if not ours(path):
            return
        calls[path] += 1
        below = frame.f_back
        while below is not None and not ours(below.f_code.co_filename):
            below = below.f_back
        if below is not None and below.f_code.co_filename != path:
            crossings += 1
            edges.add((below.f_code.co_filename, path))

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    files = {str(Path(p).relative_to(root)): n for p, n in calls.items()}
    back = sorted(
        f"{Path(a).relative_to(root)} <-> {Path(b).relative_to(root)}"
        for a, b in edges
        if (b, a) in edges and a < b
    )
    return {
        "files": len(files),
        "boundaries": len(edges),
        "crossings": crossings,
        "both_ways": back,
        "walk": files,
    }


def operations(tmp: Path, *, lifecycle: bool = True) -> dict[str, Callable[[], Any]]:
    """The traced operations (see the module docstring), warmed up (``lifecycle=False``: not
    the lifecycle step, whose pool costs a second store)."""
    import torch

    import dpsn
    from dpsn.pool import PoolEmbedding

    pool = dpsn.create(tmp / "s", rows=10**6, dim=16, seed=1, cache_rows=1024)
    emb = PoolEmbedding(pool, mode="sum", row_optimizer="sgd", row_lr=0.1)
    hot = torch.tensor([[7]])
    fresh = iter(range(1000, 10**6))

    def step(ids: torch.Tensor) -> None:
        emb(ids).square().sum().backward()

    def miss() -> None:
        step(torch.tensor([[next(fresh)]]))

    def commit() -> None:
        pool.commit("traced")

    for _ in range(2):  # every path once, so nothing is traced that only a first call does
        step(hot)
        miss()
        pool.read(hot.reshape(-1))
        commit()
    step(hot)  # a trained row for the traced commit (the hot step below trains it again)
    # a second pool whose cache is full of trained (dirty) rows: a miss there evicts one
    full = dpsn.create(tmp / "f", rows=10**6, dim=16, seed=1, cache_rows=1024)
    emb_f = PoolEmbedding(full, mode="sum", row_optimizer="sgd", row_lr=0.1)
    for start in range(0, 3 * 1024, 512):  # 3 x the cache, in batches it can hold
        emb_f(torch.arange(start, start + 512).reshape(-1, 1)).square().sum().backward()
    cold = iter(range(10**5, 10**6))

    def full_miss() -> None:
        emb_f(torch.tensor([[next(cold)]])).square().sum().backward()

    full_miss()
    ops = {
        "hot step": lambda: step(hot),
        "miss step": miss,
        "miss, full cache": full_miss,
        "hot read": lambda: pool.read(hot.reshape(-1)),
        "commit": commit,
    }
    if not lifecycle:
        return ops
    # the same hot step on a pool with a row lifecycle (usage statistics on the walk)
    tracked = dpsn.create(
        tmp / "l", rows=10**6, dim=16, seed=1, cache_rows=1024, lifecycle=dpsn.Lifecycle()
    )
    emb_l = PoolEmbedding(tracked, mode="sum", row_optimizer="sgd", row_lr=0.1)

    def tracked_step() -> None:
        emb_l(hot).square().sum().backward()

    for _ in range(3):
        tracked_step()
    ops["hot step, lifecycle"] = tracked_step
    return ops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--walk", default=None, help="print the files of this operation")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    root = _library_root()
    with tempfile.TemporaryDirectory() as tmp:
        ops = operations(Path(tmp))
        results = {name: trace(fn, root) for name, fn in ops.items()}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"library at {root}")
    print(f"{'operation':<20} {'files':>6} {'boundaries':>11} {'crossings':>10} {'both ways':>10}")
    for name, r in results.items():
        print(
            f"{name:<20} {r['files']:>6} {r['boundaries']:>11} {r['crossings']:>10} "
            f"{len(r['both_ways']):>10}"
        )
    if args.walk:
        print(f"\n{args.walk}: files in first-entry order (calls)")
        for path, n in results[args.walk]["walk"].items():
            print(f"  {path} ({n})")
        print(f"{args.walk}: file pairs called both ways")
        for pair in results[args.walk]["both_ways"]:
            print(f"  {pair}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
