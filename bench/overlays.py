"""Overlays: what many private deltas over one shared base cost, against a full copy per task.

    python bench/overlays.py            # 10^5-row base, 64 overlays, merge of 8 x 10^5 rows
    python bench/overlays.py --quick    # smaller base and merge (a smoke run)

Measured in one run, on one machine:

- bytes on disk of an overlay holding 1% of its base's rows, against a full copy of the base
  (the dense fine-tuned copy per task an overlay replaces: the base store copied whole);
- warm switch: with every overlay open (one shared, cached base), the time of a request of
  256 rows on overlay j right after one on overlay i, against the same request repeated on one
  overlay (median of many);
- reads/s (rows/s) of 256-row requests spread round-robin over 1, 8 and 64 overlays of one
  base, each overlay's cache small (4096 rows) and the base's rows cached once;
- a resonance merge (``dpsn.merge(rule="resonance")``) of 8 overlays each holding 10^5 rows.

Aims (issue 24): overlay <= 2% of a full copy; warm switch <= 10 ms; reads/s with 64 overlays
>= 0.7x with one; the merge <= 5 s. The table says which are met.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

import dpsn
from dpsn.store import tree_bytes

SMALL = {"kind": "hashed_slices", "memory_size": 1 << 14}
REQUEST = 256


def make_base(path: Path, rows: int, dim: int) -> None:
    base = dpsn.create(path, rows=rows, dim=dim, seed=1, generator=SMALL, cache_rows=0)
    g = torch.Generator().manual_seed(0)
    for a in range(0, rows, 1 << 15):
        ids = torch.arange(a, min(rows, a + (1 << 15)))
        base.write(ids, torch.randn(len(ids), dim, generator=g) * 0.1)
    base.commit("trained base")
    base.snapshot("shared")
    base.close()


def make_overlay(path: Path, base: Path, ids: torch.Tensor, seed: int) -> None:
    ov = dpsn.create(path, base=base, base_at="shared", cache_rows=0)
    g = torch.Generator().manual_seed(seed)
    for a in range(0, len(ids), 1 << 15):
        part = ids[a : a + (1 << 15)]
        ov.write(part, torch.randn(len(part), ov.dim, generator=g) * 0.01)
    ov.commit("task")
    ov.close()


def reads_per_second(pools: list[Any], rows: int, requests: int) -> float:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, rows, (REQUEST,), generator=g) for _ in range(requests)]
    for b in batches:  # warm the shared base's cache and the page cache once
        pools[0].read(b)
    for i, p in enumerate(pools):  # warm: every overlay has served once
        p.read(batches[i % len(batches)])
    t = time.perf_counter()
    for i, b in enumerate(batches):
        pools[i % len(pools)].read(b)
    return requests * REQUEST / (time.perf_counter() - t)


def switch_times(pools: list[Any], rows: int, n: int) -> tuple[float, float]:
    """Median seconds of a request after a request on another overlay, and on the same one."""
    g = torch.Generator().manual_seed(4)
    same, other = [], []
    for i in range(n):
        b = torch.randint(0, rows, (REQUEST,), generator=g)
        p, q = pools[i % len(pools)], pools[(i + 1) % len(pools)]
        p.read(b)
        t = time.perf_counter()
        p.read(b)
        same.append(time.perf_counter() - t)
        t = time.perf_counter()
        q.read(b)
        other.append(time.perf_counter() - t)
    return statistics.median(other), statistics.median(same)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only (no JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, dim, merge_rows = (20_000, 32, 20_000) if args.quick else (100_000, 64, 100_000)
    counts = (1, 8, 64)
    tmp = Path(tempfile.mkdtemp(prefix="dpsn-overlays-"))
    started = time.perf_counter()
    try:
        base = tmp / "base"
        make_base(base, rows, dim)
        full_copy = tree_bytes(base)
        few = torch.randperm(rows, generator=torch.Generator().manual_seed(5))[: rows // 100]
        paths = []
        for n in range(max(counts)):
            path = tmp / f"ov{n}"
            make_overlay(path, base, torch.sort(few).values, n)
            paths.append(path)
        overlay_bytes = tree_bytes(paths[0])
        pools = [dpsn.open(p, cache_rows=4096) for p in paths]
        try:
            rps = {k: reads_per_second(pools[:k], rows, 400) for k in counts}
            switch, same = switch_times(pools, rows, 200)
        finally:
            for p in pools:
                p.close()
        merge_paths = []
        every = torch.arange(merge_rows)
        for n in range(8):
            path = tmp / f"m{n}"
            make_overlay(path, base, every, 100 + n)
            merge_paths.append(path)
        target = dpsn.open(base, mode="r+", cache_rows=0)
        try:
            t = time.perf_counter()
            report = dpsn.merge(target, merge_paths, rule="resonance", alpha=0.5, beta=-0.5)
            merge_s = time.perf_counter() - t
        finally:
            target.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = overlay_bytes / full_copy
    print_table(
        f"overlays of one base ({rows} rows x {dim}, every row trained; overlays hold 1%)",
        ["figure", "value"],
        [
            ["full copy of the base (bytes)", f"{full_copy:,}"],
            ["overlay holding 1% of the rows (bytes)", f"{overlay_bytes:,}"],
            ["overlay / full copy", f"{ratio:.2%}"],
            ["request after another overlay's (ms, median)", f"{switch * 1e3:.3f}"],
            ["same request on the same overlay (ms, median)", f"{same * 1e3:.3f}"],
            *[[f"rows/s over {k} overlay(s)", f"{v:,.0f}"] for k, v in rps.items()],
            [f"resonance merge of 8 overlays x {merge_rows} rows (s)", f"{merge_s:.2f}"],
            ["merged rows / rows with a conflict", f"{report.rows} / {report.conflicting_rows}"],
        ],
    )
    scale = rps[64] / rps[1]
    aims = [
        ["overlay <= 2% of a full copy", f"{ratio:.2%}", ratio <= 0.02],
        ["warm switch <= 10 ms", f"{switch * 1e3:.2f} ms", switch <= 0.010],
        ["reads/s with 64 overlays >= 0.7x with 1", f"{scale:.2f}x", scale >= 0.7],
        ["resonance merge of 8 x 10^5 rows <= 5 s", f"{merge_s:.2f} s", merge_s <= 5.0],
    ]
    print_table("aims", ["aim", "measured", "met"], aims)
    result = {
        "rows": rows,
        "dim": dim,
        "full_copy_bytes": full_copy,
        "overlay_bytes": overlay_bytes,
        "overlay_ratio": ratio,
        "switch_s": switch,
        "same_overlay_s": same,
        "rows_per_s": rps,
        "merge_rows": merge_rows,
        "merge_s": merge_s,
        "merge_conflicting_rows": report.conflicting_rows,
        "aims": [{"aim": a, "measured": m, "met": ok} for a, m, ok in aims],
        "seconds": time.perf_counter() - started,
        "quick": args.quick,
    }
    if not args.no_write:
        write_json("overlays", result)
    return result


if __name__ == "__main__":
    main()
