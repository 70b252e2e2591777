"""CLI benchmark: how fast the read-only commands answer, beside the Pool-based path they
replaced.

    dpsn bench cli             # full run (~2-4 min on 2 cores)
    dpsn bench cli --quick     # smoke run (< 1 min)
    python bench/cli.py

Each command runs as a user runs it: a fresh interpreter (``python -m dpsn.tools.cli ...``),
wall time from start to exit, best of ``--repeat`` runs (the least disturbed by a shared
machine). The old path is what the CLI did before: open a ``Pool`` (which imports torch,
rebuilds the generator and loads the row index) and ask it, also in a fresh interpreter.

Stores: the demo's (``dpsn demo``, 10^9 rows x 64, ~1,000 trained rows); 10^6 persisted rows
x 64 float32 written in 10 commits (--quick: 10^5); 1,000 commits of 100 rows each, so 1,000
segments (--quick: 100). Aim: ``dpsn info`` under 0.5 s on every store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpsn.bench._provenance import stamped, versions

HERE = Path(__file__).resolve().parent

OLD = {
    "info": "import dpsn,sys; p=dpsn.open(sys.argv[1]); p.info(); p.close()",
    "log": "import dpsn,sys; p=dpsn.open(sys.argv[1]); p.log(); p.snapshots(); p.close()",
    "stats": "import dpsn,sys; p=dpsn.open(sys.argv[1]); p.info(); p.log(); p.close()",
    "inspect": "import dpsn,sys; p=dpsn.open(sys.argv[1]); ids=[0,1,2]; "
    "p.base(ids); p.delta(ids); p.row_commits(ids); p.close()",
    "verify": "import dpsn,sys; p=dpsn.open(sys.argv[1]); p.verify(); p.close()",
}
NEW = {
    "info": ["info"],
    "log": ["log"],
    "stats": ["stats"],
    "inspect": ["inspect", "--no-base", "0", "1", "2"],
    "verify": ["verify"],
}


def timed(cmd: list[str], repeat: int) -> float:
    best = float("inf")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for _ in range(repeat):
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        dt = time.perf_counter() - t
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
        best = min(best, dt)
    return best


def make_stores(tmp: Path, quick: bool) -> dict[str, Path]:
    import numpy as np
    import torch

    import dpsn
    from dpsn.tools import run_demo

    stores = {}
    demo = tmp / "demo"
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            run_demo(str(demo), steps=200, force=False, as_json=False)
        finally:
            sys.stdout = stdout
    stores["demo"] = demo

    big_rows = 10**5 if quick else 10**6
    big = tmp / "big"
    rng = np.random.default_rng(0)
    with dpsn.create(big, rows=10**9, dim=64, cache_rows=0) as pool:
        ids = np.unique(rng.integers(0, 10**9, big_rows * 2))[:big_rows]
        rng.shuffle(ids)
        per = big_rows // 10
        for c in range(10):
            part = np.sort(ids[c * per : (c + 1) * per])
            pool.write(part, torch.from_numpy(rng.standard_normal((len(part), 64), np.float32)))
            pool.commit(f"part {c}")
    stores[f"{big_rows:.0e} rows"] = big

    commits = 100 if quick else 1000
    many = tmp / "many"
    with dpsn.create(many, rows=10**6, dim=16, cache_rows=0) as pool:
        for c in range(commits):
            part = np.arange(c * 100, (c + 1) * 100)
            pool.write(part, torch.ones(100, 16))
            pool.commit(f"commit {c}")
    stores[f"{commits} commits"] = many
    return stores


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dpsn bench cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=None, help="runs per figure (best of; 3)")
    ap.add_argument(
        "--out", type=Path, default=None, help="results directory (default ./bench-results)"
    )
    args = ap.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    from dpsn.store import StoreFacts
    from dpsn.tools import human_bytes

    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="dpsn-bench-cli-"))
    try:
        print("making stores ...", file=sys.stderr, flush=True)
        stores = make_stores(tmp, args.quick)
        from tqdm import tqdm

        bar = tqdm(total=len(stores) * len(NEW), desc="cli", file=sys.stderr, disable=None)
        for name, path in stores.items():
            with StoreFacts(path) as facts:
                info = facts.info()
            for command in NEW:
                new = timed(
                    [
                        sys.executable,
                        "-m",
                        "dpsn.tools.cli",
                        *NEW[command][:1],
                        str(path),
                        *NEW[command][1:],
                    ],
                    repeat,
                )
                old = timed([sys.executable, "-c", OLD[command], str(path)], repeat)
                results.append(
                    {
                        "store": name,
                        "persisted_rows": info["persisted_rows"],
                        "segments": info["segments"],
                        "bytes_on_disk": info["bytes_on_disk"],
                        "command": command,
                        "new_s": new,
                        "old_s": old,
                    }
                )
                bar.update(1)
        bar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - started
    headers = ["store", "on disk", "command", "dpsn CLI s", "Pool path s", "speed-up"]
    rows = [
        [
            r["store"],
            human_bytes(r["bytes_on_disk"]),
            " ".join(NEW[r["command"]]),
            f"{r['new_s']:.3f}",
            f"{r['old_s']:.3f}",
            f"{r['old_s'] / r['new_s']:.1f}x",
        ]
        for r in results
    ]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print(f"\nread-only commands, fresh interpreter each, best of {repeat}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    worst = max(r["new_s"] for r in results if r["command"] == "info")
    print(
        f"\naim: dpsn info < 0.5 s on every store: slowest {worst:.3f} s "
        f"({'met' if worst < 0.5 else 'missed'})"
    )
    payload = {
        "benchmark": "cli",
        "quick": args.quick,
        "repeat": repeat,
        "machine": {
            "python": platform.python_version(),
            **versions(),
            "platform": platform.platform(),
        },
        "time": time.time(),
        "total_seconds": total,
        "results": results,
        "info_worst_s": worst,
    }
    out = stamped(args.out, "cli")
    out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}\ntotal {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
