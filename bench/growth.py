"""Growth benchmark: what a store costs as it lives, side by side in one run.

    python bench/growth.py            # default: 300 commits; 10^4, 10^5, 10^6 persisted rows
    python bench/growth.py --quick    # smoke run (~1 min): 40 commits; 10^4, 10^5 rows
    python bench/growth.py --commits 1000 --sizes 1e4,1e5,1e6,1e7   # the issue's full run

1. A synthetic training trace: every commit writes ``--rows-per-commit`` rows chosen by a Zipf
   law (exponent 1.3 over 10^5 active rows of a 10^6-row pool: a few hot rows rewritten all
   the time, a long tail written rarely), dim 64 float32. Two stores take the same trace: one
   without compaction (today's behaviour, with ``gc`` every 50 commits) and one with the
   automatic compaction (threshold 1.5x, from 0 B, retention: HEAD and snapshots). Per commit:
   live bytes (raw bytes of HEAD's rows: id, delta), segment bytes (stored, compressed) and
   bytes on disk (every file of the store). Figures: space amplification = segment bytes /
   live bytes (and, stricter, the whole directory / live bytes), write amplification = bytes
   commits and compactions wrote / bytes commits wrote. Aims: space amplification <= 1.5x
   after compaction, write amplification <= 5x.
2. Scale: stores of 10^4.. persisted rows (dim 8): time to open one (``dpsn.open``: the row
   index's run files are mapped, not read, and the commits since them replayed), the resident
   memory that open adds, a read of 4096 random ids and the RSS after it, and the latency of a
   1-row commit (median and max of 9: a commit that writes a run or merges runs costs more),
   each in a fresh interpreter; beside them, in the same store, the design before: HEAD's
   whole index read from LMDB. Aims (issue 10): 1-row commit at 10^7 within 3x of 10^4, open
   within 5x, index memory at 10^7 <= 200 MB resident.

Writes bench/results/growth.json and, with matplotlib, docs/growth.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_out_argument, print_table, write_json

import dpsn
from dpsn.store import StoreFacts

POOL_ROWS = 10**6
ACTIVE_ROWS = 10**5  # rows the trace ever touches (Zipf rank r -> row 10 r)
ZIPF = 1.3
DIM = 64


def _zipf_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.unique((rng.zipf(ZIPF, n) - 1) % ACTIVE_ROWS * 10)


def trace(root: Path, commits: int, per_commit: int, *, compaction: bool) -> dict[str, Any]:
    path = root / ("compacted" if compaction else "plain")
    pool = dpsn.create(
        path,
        rows=POOL_ROWS,
        dim=DIM,
        generator={"kind": "hashed_slices", "memory_size": 4096},
        cache_rows=0,
        compact_above=1.5 if compaction else None,
    )
    if compaction:
        pool.set_policy(compact_min_bytes=0)
    rng = np.random.default_rng(0)
    series = []
    commit_time = 0.0
    for k in range(1, commits + 1):
        ids = _zipf_rows(rng, per_commit)
        deltas = torch.from_numpy(rng.standard_normal((len(ids), DIM), dtype=np.float32))
        pool.write(torch.from_numpy(ids), deltas)
        t = time.perf_counter()
        pool.commit(f"step {k}")
        if not compaction and k % 50 == 0:
            pool.gc()
        commit_time += time.perf_counter() - t
        with StoreFacts(path) as facts:
            info = facts.info()
        series.append(
            {
                "commit": k,
                "live_bytes": info["live_bytes"],
                "segment_bytes": info["segment_bytes_stored"],
                "disk_bytes": info["bytes_on_disk"],
            }
        )
    if not compaction:
        pool.gc()
    with StoreFacts(path) as facts:
        info = facts.info()
    pool.close()
    return {
        "compaction": compaction,
        "commits": commits,
        "persisted_rows": info["persisted_rows"],
        "live_bytes": info["live_bytes"],
        "segment_bytes": info["segment_bytes_stored"],
        "disk_bytes": info["bytes_on_disk"],
        "space_amplification": info["space_amplification"],
        "disk_amplification": info["bytes_on_disk"] / info["live_bytes"],
        "write_amplification": info["write_amplification"],
        "compactions": info["compactions"],
        "compaction_bytes_written": info["compaction_bytes_written"],
        "commit_bytes_written": info["commit_bytes_written"],
        "seconds_in_commits": commit_time,
        "max_space_amplification_last_half": max(
            s["segment_bytes"] / s["live_bytes"] for s in series[len(series) // 2 :]
        ),
        "series": series,
    }


CHILD = r"""
import json, sys, time
from pathlib import Path
def rss(kind="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) * 1024
import numpy as np, torch, dpsn
from dpsn.store import PersistedStore
path, mode = sys.argv[1], sys.argv[2]
dpsn.open(path, cache_rows=0).close()  # imports, generator and lazy set-up, once
out = {}
if mode == "flat":
    # The design before the run files, in the same store: HEAD's whole index read from LMDB.
    store = PersistedStore.open(Path(path), writable=False)
    base = rss()
    t = time.perf_counter()
    head, index = store.load_flat_head()
    out["open_s"] = time.perf_counter() - t
    out["open_rss_bytes"] = rss() - base
    store.close()
else:
    base, base_file = rss(), rss("RssFile")
    t = time.perf_counter()
    pool = dpsn.open(path, cache_rows=0)
    out["open_s"] = time.perf_counter() - t
    out["open_rss_bytes"] = rss() - base
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, pool.rows, 4096))
    t = time.perf_counter()
    pool.delta(ids)
    out["read_4096_s"] = time.perf_counter() - t
    out["read_rss_bytes"] = rss() - base
    # File-backed pages mapped in by the read: the run files' (and LMDB's) pages it touched,
    # which the OS may drop again; the rest of the RSS growth is the read's own buffers.
    out["read_rss_file_bytes"] = rss("RssFile") - base_file
    pool.close()
    w = dpsn.open(path, mode="r+", cache_rows=0)
    lat = []
    for i in range(9):
        w.write(torch.tensor([i]), torch.ones(1, w.dim))
        t = time.perf_counter()
        w.commit("one row")
        lat.append(time.perf_counter() - t)
    w.close()
    out["commit_1row_s"] = sorted(lat)[4]
    out["commit_1row_max_s"] = max(lat)
print(json.dumps(out))
"""


def scale(root: Path, n: int) -> dict[str, Any]:
    path = root / f"scale-{n}"
    batch = 200_000
    t = time.perf_counter()
    with dpsn.create(
        path,
        rows=max(10 * n, 10**6),
        dim=8,
        generator={"kind": "hashed_slices", "memory_size": 1024},
        cache_rows=0,  # the default policy: commits check whether to compact, as users' do
    ) as pool:
        rng = np.random.default_rng(n)
        ids = np.sort(rng.choice(max(10 * n, 10**6), n, replace=False))
        for lo in range(0, n, batch):
            part = torch.from_numpy(ids[lo : lo + batch])
            pool.write(part, torch.randn(len(part), 8))
            pool.commit("fill")
    build = time.perf_counter() - t
    res: dict[str, Any] = {"persisted_rows": n, "build_s": build}
    for mode in ("flat", "runs"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        res.update({f"{mode}_{k}": v for k, v in got.items()})
    shutil.rmtree(path, ignore_errors=True)
    return res


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    mib = 1 << 20
    for run, style in ((results["plain"], "--"), (results["compacted"], "-")):
        s = run["series"]
        label = "with compaction" if run["compaction"] else "without compaction (gc every 50)"
        ax.plot([p["commit"] for p in s], [p["disk_bytes"] / mib for p in s], style, label=label)
    s = results["compacted"]["series"]
    ax.plot([p["commit"] for p in s], [p["live_bytes"] / mib for p in s], ":", label="live")
    ax.set_xlabel("commit")
    ax.set_ylabel("MiB on disk")
    ax.set_title("bench/growth.py: store size over a Zipf training trace")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run (~1 minute)")
    ap.add_argument("--commits", type=int, default=None, help="commits in the trace (300)")
    ap.add_argument("--rows-per-commit", type=int, default=2000)
    ap.add_argument("--sizes", default=None, help="persisted rows to scale over, e.g. 1e4,1e5,1e6")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--only", choices=("trace", "scale"), help="run one part")
    add_out_argument(ap)
    args = ap.parse_args()
    commits = args.commits or (40 if args.quick else 300)
    sizes_text = args.sizes or ("1e4,1e5" if args.quick else "1e4,1e5,1e6")
    sizes = [int(float(x)) for x in sizes_text.split(",")]
    root = Path(tempfile.mkdtemp(prefix="dpsn-growth-"))
    try:
        results: dict[str, Any] = {
            "command": " ".join(["python", "bench/growth.py", *sys.argv[1:]]),
            "trace": {
                "pool_rows": POOL_ROWS,
                "active_rows": ACTIVE_ROWS,
                "zipf": ZIPF,
                "dim": DIM,
                "rows_per_commit": args.rows_per_commit,
            },
        }
        for compaction in (False, True) if args.only != "scale" else ():
            key = "compacted" if compaction else "plain"
            results[key] = trace(root, commits, args.rows_per_commit, compaction=compaction)
        mib = 1 << 20
        rows = []
        for key in ("plain", "compacted") if args.only != "scale" else ():
            r = results[key]
            rows.append(
                [
                    "with compaction" if r["compaction"] else "without (gc every 50)",
                    r["commits"],
                    r["persisted_rows"],
                    r["live_bytes"] / mib,
                    r["segment_bytes"] / mib,
                    r["disk_bytes"] / mib,
                    r["space_amplification"],
                    r["max_space_amplification_last_half"],
                    r["disk_amplification"],
                    r["write_amplification"],
                    r["compactions"],
                    r["seconds_in_commits"],
                ]
            )
        if rows:
            print_table(
                f"trace: {commits} commits of {args.rows_per_commit} Zipf rows (dim {DIM} float32)",
                [
                    "store",
                    "commits",
                    "rows",
                    "live MiB",
                    "segments MiB",
                    "disk MiB",
                    "space amp",
                    "max amp (2nd half)",
                    "disk/live",
                    "write amp",
                    "compactions",
                    "commit s",
                ],
                rows,
            )
        results["scale"] = [scale(root, n) for n in sizes] if args.only != "trace" else []
        if results["scale"]:
            base = results["scale"][0]
            print_table(
                "scale: fresh interpreters, dim 8. open: dpsn.open read-only (run files "
                "mapped, commits since replayed) beside the whole index read from LMDB (the "
                "design before); read: 4096 random ids; commit: 1 row, median and max of 9",
                [
                    "persisted rows",
                    "open ms",
                    "x 1st",
                    "open RSS MiB",
                    "whole index from LMDB ms",
                    "its RSS MiB",
                    "read ms",
                    "RSS after read MiB",
                    "of it file-backed",
                    "1-row commit ms",
                    "x 1st",
                    "max ms",
                ],
                [
                    [
                        s["persisted_rows"],
                        s["runs_open_s"] * 1e3,
                        s["runs_open_s"] / base["runs_open_s"],
                        s["runs_open_rss_bytes"] / mib,
                        s["flat_open_s"] * 1e3,
                        s["flat_open_rss_bytes"] / mib,
                        s["runs_read_4096_s"] * 1e3,
                        s["runs_read_rss_bytes"] / mib,
                        s["runs_read_rss_file_bytes"] / mib,
                        s["runs_commit_1row_s"] * 1e3,
                        s["runs_commit_1row_s"] / base["runs_commit_1row_s"],
                        s["runs_commit_1row_max_s"] * 1e3,
                    ]
                    for s in results["scale"]
                ],
            )
        write_json(f"growth_{args.only}" if args.only else "growth", results, out=args.out)
        if not args.no_plot and args.only != "scale":
            plot(results, Path(__file__).parent.parent / "docs" / "growth.png")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
