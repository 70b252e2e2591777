"""Scaling benchmark: dpsn against a dense table from 10^6 to 10^12 parameters, and LM quality
as the pool grows at fixed active compute.

    dpsn bench scaling                     # full run (~15-25 min on 2 cores)
    dpsn bench scaling --quick             # < 60 s on 2 cores, still up to 10^12
    python bench/scaling.py --max-params 1e10 --no-model --out /tmp/scaling

Part 1, memory and speed. For each virtual size P = rows x dim (dim 8, so that the smallest
pool, 10^6 parameters = 125,000 rows, holds the whole working set), in its own child process
(a fresh interpreter: peaks never mix):

- dpsn: create a store; train a working set of W rows (W = 10^5; --quick: 10^4), the same ids
  at every size (W distinct ids drawn once from the smallest pool's id range): every row is
  written once, then Zipf(1.0)-distributed steps read rows and add a step toward per-row
  targets (real, non-zero deltas); commit (timed); close. Reopen (timed: manifest, LMDB index,
  generator) and serve a fixed stream of reads through a cache of 65,536 rows: batches of
  4,096 ids, 90% Zipf(1.0) over the working set (the same ids at every size) and 10% uniform
  over the whole pool (mostly rows never trained: procedural); rows/s over the stream and the
  cache hit rate. Peak resident memory is the child's own high-water mark (VmHWM), after it
  imported torch and dpsn (that baseline is recorded apart); bytes on disk are every file of
  the store.
- dense: an ``nn.Embedding`` of the same rows x dim (one float32 tensor, initialised, so its
  pages are resident), the same updates to the working set, the same read stream
  (``F.embedding``). It runs only where rows x dim x 4 bytes plus the runtime fit in the
  memory the machine has available (``/proc/meminfo`` MemAvailable, less a margin) - the
  others are recorded with ``"fits": false`` and never started. Its ``disk_bytes`` is what a
  checkpoint of the table holds (every parameter, 4 bytes each), computed, not written.

Part 2, model scaling (the figure PKM and PEER publish): the byte-level LM of
``examples/lm.py`` (2 layers, d_model 128, k = 32 rows per token (``LM_K``: what the README's
figures were measured with; bench/quality.py now defaults to 16), otherwise
``bench/quality.py``'s settings, chosen there on validation; nothing is tuned here), trained for
the same number of steps with pools of 10^3 .. 10^7 rows (one per layer), beside dense FFNs of
the same active parameters (width k) and, where they fit, of the same total parameters (width
= rows; only up to width 10^4: wider ones cost more than this benchmark's time budget on a
CPU). Validation bits/byte on the whole validation split (--quick: a 16-window subset).

Output: a table on stdout, ``scaling.json`` (``"records"``: one object per system and size,
with ``system``, ``params``, ``fits``, ``peak_rss_bytes``, ``disk_bytes``, ``rows_per_s``,
...; ``"model"``: the LM runs) and ``scaling.png`` (log-log: memory vs parameters, rows/s vs
parameters, bits/byte vs pool rows) in ``--out`` (default ``bench/results/``).
"""

from __future__ import annotations

import argparse
import itertools
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
DIM = 8
CACHE_ROWS = 1 << 16
LM_K = 32  # rows per token of the LM runs (the README's scaling figures)
# Trained generators of the LM runs (--model-generators), at a size whose step fits a short
# run on 2 shared cores (docs/generators.md): one hidden layer of 64. 8 hashed features and
# region embeddings of 32 were chosen on validation bits/byte (10^4-10^6 rows, 100 steps) over
# 32/16 (the first setting), 4/64 and 32/16 with region_rank=4; an initial row scale of 0.03
# (std; the generator's default is 1/sqrt(dim) = 0.0625 here) over 0.0625 and 0.015, region_dim
# 16 and per-step novelty, on the whole validation split (docs/generators.md).
GENERATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "region_mlp": {"hidden": 64, "layers": 1, "features": 8, "region_dim": 32, "std": 0.03},
}

LM_TOKENS_PER_STEP = 1024  # bench/quality.py's DEFAULT: batch 8 x context 128
STREAM_BATCH = 4096
HOT_FRACTION = 0.9
ZIPF_A = 1.0
GiB = 1 << 30


# -- helpers shared by parent and children -----------------------------------------------------


def peak_rss() -> int:
    """This process's resident high-water mark in bytes (VmHWM; ru_maxrss where /proc lacks it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss()


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def zipf_ranks(n: int, size: int, a: float, rng: Any) -> Any:
    """``size`` draws of ranks 0..n-1 with P(r) proportional to (r + 1)^-a (exact CDF)."""
    import numpy as np

    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -a)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)


def working_set(spec: dict[str, Any]) -> Any:
    """The W trained ids: the same at every size (drawn from the smallest pool's ids)."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    return rng.choice(spec["id_space"], spec["working_set"], replace=False).astype(np.int64)


def train_batches(spec: dict[str, Any], ws: Any) -> list[Any]:
    """Batches of ids that train the working set: each row once, then Zipf-chosen steps."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"] + 1)
    out = [ws[a : a + spec["train_batch"]] for a in range(0, len(ws), spec["train_batch"])]
    for _ in range(spec["zipf_steps"]):
        ranks = zipf_ranks(len(ws), spec["train_batch"], ZIPF_A, rng)
        out.append(np.unique(ws[ranks]))
    return out


def read_stream(spec: dict[str, Any], ws: Any, rows: int) -> list[Any]:
    """The served stream: hot ids (Zipf over the working set, the same at every size) and cold
    ids (uniform over the pool: mostly never trained)."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"] + 2)
    cold_rng = np.random.default_rng(spec["seed"] + 3)
    hot = int(STREAM_BATCH * HOT_FRACTION)
    out = []
    for _ in range(spec["stream_batches"]):
        h = ws[zipf_ranks(len(ws), hot, ZIPF_A, rng)]
        c = cold_rng.integers(0, rows, STREAM_BATCH - hot, dtype=np.int64)
        out.append(np.concatenate([h, c]))
    return out


def targets(ids: Any, dim: int) -> Any:
    """A fixed target row per id (what training pulls each row toward)."""
    import torch

    freq = torch.arange(1, dim + 1, dtype=torch.float32)
    return torch.sin((ids % 100_003).float()[:, None] * 0.01 * freq)


# -- children ----------------------------------------------------------------------------------


def child_dpsn(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import dpsn

    torch.set_num_threads(1)
    rss_import = current_rss()
    rows = spec["params"] // spec["dim"]
    path = Path(spec["tmp"]) / f"dpsn-{spec['params']}"
    ws = working_set(spec)
    batches = train_batches(spec, ws)
    t0 = time.perf_counter()
    pool = dpsn.create(path, rows=rows, dim=spec["dim"], seed=spec["seed"], cache_rows=0)
    create_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for ids in batches:
        t = torch.from_numpy(ids)
        cur = pool.read(t)
        pool.write(t, 0.5 * (targets(t, spec["dim"]) - cur), add=True)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    commit = pool.commit("trained working set")
    commit_s = time.perf_counter() - t0
    pool.close()
    stream = read_stream(spec, ws, rows)
    t0 = time.perf_counter()
    pool = dpsn.open(path, cache_rows=spec["cache_rows"])
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for ids in stream:
        pool.read(torch.from_numpy(ids))
    serve_s = time.perf_counter() - t0
    stats = pool.stats()
    persisted = pool.info()["persisted_rows"]
    # Check that the deltas are real: trained rows differ from their procedural base.
    sample = torch.from_numpy(ws[:256])
    moved = float((pool.read(sample) - pool.base(sample)).abs().mean())
    pool.close()
    return {
        "system": "dpsn",
        "params": spec["params"],
        "rows": rows,
        "dim": spec["dim"],
        "fits": True,
        "ran": True,
        "peak_rss_bytes": peak_rss(),
        "rss_after_import_bytes": rss_import,
        "disk_bytes": tree_bytes(path),
        "rows_per_s": sum(len(b) for b in stream) / serve_s,
        "hit_rate": stats.get("hit_rate"),
        "open_s": open_s,
        "commit_s": commit_s,
        "create_s": create_s,
        "train_s": train_s,
        "trained_rows": persisted,
        "rows_written_by_commit": commit.rows_written,
        "mean_abs_delta_of_trained_rows": moved,
        "served_rows": sum(len(b) for b in stream),
        "cache_rows": spec["cache_rows"],
    }


def child_dense(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    rss_import = current_rss()
    rows = spec["params"] // spec["dim"]
    ws = working_set(spec)
    batches = train_batches(spec, ws)
    t0 = time.perf_counter()
    emb = torch.nn.Embedding(rows, spec["dim"])  # normal_ init: every page touched
    create_s = time.perf_counter() - t0
    w = emb.weight.data
    t0 = time.perf_counter()
    for ids in batches:
        t = torch.from_numpy(ids)
        cur = w.index_select(0, t)
        w.index_add_(0, t, 0.5 * (targets(t, spec["dim"]) - cur))
    train_s = time.perf_counter() - t0
    stream = read_stream(spec, ws, rows)
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in stream:
            F.embedding(torch.from_numpy(ids), w)
    serve_s = time.perf_counter() - t0
    return {
        "system": "dense",
        "params": spec["params"],
        "rows": rows,
        "dim": spec["dim"],
        "fits": True,
        "ran": True,
        "peak_rss_bytes": peak_rss(),
        "rss_after_import_bytes": rss_import,
        "disk_bytes": rows * spec["dim"] * 4,
        "disk_bytes_note": "a checkpoint of the table: every parameter, 4 bytes (computed)",
        "rows_per_s": sum(len(b) for b in stream) / serve_s,
        "hit_rate": None,
        "open_s": None,
        "commit_s": None,
        "create_s": create_s,
        "train_s": train_s,
        "trained_rows": len(ws),
        "served_rows": sum(len(b) for b in stream),
    }


def child_model(spec: dict[str, Any]) -> None:
    """All LM runs in one process, one JSON line per run as each ends."""
    import torch

    sys.path.insert(0, str(HERE.parent / "examples"))
    import lm
    from quality import DEFAULT

    torch.set_num_threads(1)
    from dataclasses import replace

    for run in spec["runs"]:
        generator = run.get("generator", "hashed_slices")
        if run["kind"] == "pool":
            cfg = replace(DEFAULT, ffn="pool", d_ff=0, rows=run["rows"], k=run.get("k", LM_K))
            if generator != "hashed_slices":  # a trained generator (region_mlp)
                cfg = replace(
                    cfg,
                    generator=generator,
                    generator_options={
                        **GENERATOR_OPTIONS.get(generator, {}),
                        **spec.get("generator_options", {}),
                    },
                    train_generator=True,
                )
        else:
            cfg = replace(DEFAULT, ffn="dense", d_ff=run["width"], k=run["width"])
        cfg = replace(cfg, seed=spec.get("seed", 0))
        steps = run.get("steps", spec["steps"])
        name = f"lm-{run['kind']}-{generator}-{steps}-{run.get('rows', run.get('width'))}"
        store = Path(spec["tmp"]) / name
        t0 = time.perf_counter()
        res = lm.train(
            cfg,
            steps=steps,
            store=store if cfg.ffn == "pool" else None,
            eval_every=10**9,
            eval_windows=8,
            final_windows=spec["final_windows"],
            progress=False,
        )
        d = cfg.d_model
        ffn_total = (
            cfg.n_layers * cfg.rows * 2 * d
            if cfg.ffn == "pool"
            else cfg.n_layers * (cfg.d_ff * 2 * d + cfg.d_ff + d)
        )
        out = {
            "system": "dpsn" if cfg.ffn == "pool" else "dense",
            "kind": run["kind"],
            "generator": generator if cfg.ffn == "pool" else None,
            "pool_rows": run.get("rows"),
            "matches_pool_rows": run.get("matches"),
            "ffn_width": None if cfg.ffn == "pool" else cfg.d_ff,
            "k": cfg.k if cfg.ffn == "pool" else None,
            "ffn_params_total": ffn_total,
            "active_ffn_params_per_token": lm.active_params_per_token(cfg),
            "macs_per_token": res["macs_per_token"]["total"],
            "steps": res["steps"],
            "val_bpb": res["val_bpb"],
            "val_bytes": res["val_bytes"],
            "test_bpb": res["test_bpb"],
            "test_bytes": res["test_bytes"],
            "tokens_per_s": res["tokens_per_s"],
            "seconds": time.perf_counter() - t0,
            "rows_trained": res.get("rows_trained"),
            "fits": True,
        }
        print(json.dumps(out), flush=True)
        if cfg.ffn == "pool":
            shutil.rmtree(store, ignore_errors=True)  # a 10^7-row store is not small


def child_main(kind: str, spec: dict[str, Any]) -> None:
    if kind == "model":
        child_model(spec)
        return
    out = child_dpsn(spec) if kind == "dpsn" else child_dense(spec)
    print(json.dumps(out), flush=True)


# -- parent ------------------------------------------------------------------------------------


def run_child(kind: str, spec: dict[str, Any], on_line: Any, timeout: float) -> str | None:
    """Run one child (a fresh interpreter); ``on_line(record)`` for each JSON line it prints.
    Returns None on success, else what went wrong (its stderr's tail)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                on_line(json.loads(line))
            if time.monotonic() > deadline:
                proc.kill()
                break
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode == 0:
            return None
        err.seek(0)
        tail = err.read()[-2000:].strip()
        return f"exit {proc.returncode}: {tail.splitlines()[-1] if tail else 'no message'}"


def dense_fits(params: int) -> tuple[bool, str]:
    """Whether a dense float32 table of ``params`` fits, with room for the runtime and others."""
    need = params * 4 + GiB  # the table, plus torch and the interpreter
    avail = mem_available()
    if avail is None:
        return params <= 10**8, "MemAvailable unknown: only up to 10^8 parameters are tried"
    room = avail - max(2 * GiB, avail // 4)  # leave a quarter (at least 2 GiB) to the rest
    if need <= room:
        return True, f"needs {need / GiB:.1f} GiB of {avail / GiB:.1f} GiB available"
    return False, f"needs {need / GiB:.1f} GiB, {avail / GiB:.1f} GiB available (margin kept)"


def sizes_between(lo: int, hi: int) -> list[int]:
    out, p = [], lo
    while p <= hi:
        out.append(p)
        p *= 10
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from dpsn.tools.cli import parse_count

    ap = argparse.ArgumentParser(
        prog="dpsn bench scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--max-params", type=parse_count, default=10**12, help="largest size (1e12)")
    ap.add_argument("--min-params", type=parse_count, default=10**6, help="smallest size (1e6)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="< 60 s: sizes 10^6, 10^9, 10^12, a working set of 10^4 rows, 2 short LM runs",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the JSON and PNG (default ./bench-results, or $DPSN_BENCH_OUT)",
    )
    ap.add_argument("--working-set", type=parse_count, default=None, help="trained rows (10^5)")
    ap.add_argument("--stream-batches", type=parse_count, default=None)
    ap.add_argument("--no-model", action="store_true", help="skip the LM part")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    ap.add_argument(
        "--dense-max-params",
        type=parse_count,
        default=None,
        help="run the dense baseline only up to this size (larger ones: recorded, not run)",
    )
    ap.add_argument(
        "--model-steps",
        default=None,
        help="LM steps, comma-separated for several token budgets (400)",
    )
    ap.add_argument(
        "--model-generators",
        default="hashed_slices",
        help="generators of the pool runs, comma-separated: hashed_slices (frozen), region_mlp "
        "(trained with the model)",
    )
    ap.add_argument(
        "--model-generator-options",
        type=json.loads,
        default={},
        metavar="JSON",
        help="options of the trained generator over the defaults "
        f"{GENERATOR_OPTIONS['region_mlp']}, e.g. '{{\"region_rank\": 4}}'",
    )
    ap.add_argument(
        "--model-windows",
        type=parse_count,
        default=None,
        help="validation and test windows of the final evaluation (default: all; --quick 16)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip part 1 (memory and speed)")
    ap.add_argument("--model-k", type=int, default=LM_K, help=f"rows per token ({LM_K})")
    ap.add_argument(
        "--model-seed",
        type=int,
        default=0,
        help="LM seed (init, batches, stores); another seed shows how much one run's figure moves",
    )
    ap.add_argument(
        "--model-tokens",
        type=parse_count,
        default=None,
        help=f"LM training tokens (instead of --model-steps: {LM_TOKENS_PER_STEP} a step)",
    )
    ap.add_argument(
        "--model-pool-only",
        action="store_true",
        help="LM part: the pools and the dense FFN of equal active parameters only (no "
        "dense FFNs as wide as the pools)",
    )
    ap.add_argument(
        "--model-rows",
        default=None,
        help="pool rows of the LM runs, comma-separated (1e3,1e4,1e5,1e6,1e7)",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return 0
    from dpsn.tools.cli import parse_count

    quick = args.quick
    if args.min_params < DIM or args.max_params < args.min_params:
        raise SystemExit("dpsn bench scaling: --min-params must be >= 8 and <= --max-params")
    sizes = sizes_between(args.min_params, args.max_params)
    if quick:  # three sizes, always the largest
        sizes = sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})
    ws_n = args.working_set or (10**4 if quick else 10**5)
    id_space = args.min_params // DIM
    if ws_n > id_space:
        raise SystemExit(
            f"dpsn bench scaling: the working set ({ws_n}) must fit the smallest pool "
            f"({id_space} rows); lower --working-set or raise --min-params"
        )
    model_rows = (
        [parse_count(x) for x in args.model_rows.split(",")]
        if args.model_rows
        else ([10**3, 10**5] if quick else [10**3, 10**4, 10**5, 10**6, 10**7])
    )
    step_budgets = (
        [parse_count(x) for x in args.model_steps.split(",")]
        if args.model_steps
        else [8 if quick else 400]
    )
    if args.model_tokens:
        step_budgets = [max(1, -(-args.model_tokens // LM_TOKENS_PER_STEP))]
    model_steps = max(step_budgets)
    generators = args.model_generators.split(",")
    model_k = args.model_k
    if args.no_memory:
        sizes = []
    spec_base = {
        "dim": DIM,
        "seed": 0,
        "id_space": id_space,
        "working_set": ws_n,
        "train_batch": 4096 if quick else 16384,
        "zipf_steps": 4 if quick else 30,
        "stream_batches": args.stream_batches or (16 if quick else 200),
        "cache_rows": CACHE_ROWS,
    }
    runs: list[dict[str, Any]] = []
    if not args.no_model:
        cap = (
            0 if quick or len(step_budgets) > 1 or args.model_pool_only else 10**4
        )  # --quick: no time for them
        for steps in step_budgets:
            runs += [
                {"kind": "pool", "rows": r, "generator": g, "steps": steps, "k": model_k}
                for r in model_rows
                for g in generators
            ]
            runs.append({"kind": "dense_active", "width": model_k, "steps": steps})
            runs += [
                {"kind": "dense_total", "width": r, "matches": r, "steps": steps}
                for r in model_rows
                if r <= cap
            ]
        skipped_total = [r for r in model_rows if r > cap]
    else:
        skipped_total = []
    total_reason = (
        "not run in --quick"
        if quick
        else "not run with several --model-steps budgets"
        if len(step_budgets) > 1
        else "not run with --model-pool-only"
        if args.model_pool_only
        else "a dense FFN this wide is beyond this benchmark's time budget (width > 10^4)"
    )
    from tqdm import tqdm

    jobs = len(sizes) * (1 if args.no_dense else 2) + len(runs)
    bar = tqdm(total=jobs, desc="scaling", unit="run", file=sys.stderr, disable=None)
    records: list[dict[str, Any]] = []
    model: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpsn-scaling-") as tmp:
        for p in sizes:
            spec = dict(spec_base, params=p, tmp=tmp)
            bar.set_postfix_str(f"dpsn {p:.0e}")
            err = run_child("dpsn", spec, records.append, timeout=1800)
            if err:
                records.append(_failed("dpsn", p, err))
            _cleanup(Path(tmp))
            bar.update(1)
            if args.no_dense:
                continue
            fits, why = dense_fits(p)
            capped = args.dense_max_params is not None and p > args.dense_max_params
            if fits and not capped:
                bar.set_postfix_str(f"dense {p:.0e}")
                err = run_child("dense", spec, records.append, timeout=1800)
                if err:
                    records.append(_failed("dense", p, err))
                else:
                    records[-1]["memory_check"] = why
            else:
                records.append(
                    {
                        "system": "dense",
                        "params": p,
                        "rows": p // DIM,
                        "dim": DIM,
                        "fits": fits,
                        "ran": False,
                        "peak_rss_bytes": None,
                        "disk_bytes": None,
                        "rows_per_s": None,
                        "reason": "above --dense-max-params" if fits else why,
                    }
                )
            bar.update(1)
        if runs:
            bar.set_postfix_str("LM runs")

            def got(rec: dict[str, Any]) -> None:
                model.append(rec)
                bar.update(1)
                print("LM run:", json.dumps(rec), file=sys.stderr, flush=True)  # partial results

            spec = {
                "runs": runs,
                "steps": model_steps,
                "final_windows": args.model_windows or (16 if quick else None),
                "tmp": tmp,
                "generator_options": args.model_generator_options,
                "seed": args.model_seed,
            }
            err = run_child("model", spec, got, timeout=7200)
            if err:
                model.append({"error": err})
    bar.close()
    total = time.perf_counter() - started
    for r in skipped_total:
        model.append(
            {
                "system": "dense",
                "kind": "dense_total",
                "matches_pool_rows": r,
                "ffn_width": r,
                "fits": False,
                "val_bpb": None,
                "reason": total_reason,
            }
        )
    payload = {
        "benchmark": "scaling",
        "quick": quick,
        "machine": {
            "python": platform.python_version(),
            **versions(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "mem_available_bytes": mem_available(),
        },
        "time": time.time(),
        "total_seconds": total,
        "settings": spec_base
        | {
            "sizes": sizes,
            "stream_batch": STREAM_BATCH,
            "hot_fraction": HOT_FRACTION,
            "zipf_a": ZIPF_A,
            "model_steps": model_steps,
            "model_step_budgets": step_budgets,
            "model_generators": generators,
            "model_generator_options": {
                **GENERATOR_OPTIONS["region_mlp"],
                **args.model_generator_options,
            },
            "model_windows": args.model_windows,
            "model_rows": model_rows,
            "model_k": model_k,
            "model_seed": args.model_seed,
        },
        "records": records,
        "model": model,
        "aims": aims(records, model, ws_n),
    }
    print_report(payload)
    out = stamped(args.out, "scaling")
    out.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    print(f"\nwrote {out}")
    if not args.no_plot:
        try:
            png = plot(payload, out.with_suffix(".png"))
            print(f"wrote {png}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
    print(f"total {total:.0f} s")
    return 0


def _failed(system: str, params: int, err: str) -> dict[str, Any]:
    return {
        "system": system,
        "params": params,
        "fits": True,
        "ran": False,
        "peak_rss_bytes": None,
        "disk_bytes": None,
        "rows_per_s": None,
        "error": err,
    }


def _cleanup(tmp: Path) -> None:
    import shutil

    for p in tmp.iterdir():
        if p.name.startswith("dpsn-"):
            shutil.rmtree(p, ignore_errors=True)


# -- report --------------------------------------------------------------------------------------


def aims(records: list[dict[str, Any]], model: list[dict[str, Any]], ws: int) -> dict[str, Any]:
    dp = sorted(
        (r for r in records if r["system"] == "dpsn" and r.get("peak_rss_bytes")),
        key=lambda r: r["params"],
    )
    out: dict[str, Any] = {}
    if dp:
        big, small = dp[-1], dp[0]
        out["largest_params"] = big["params"]
        out["peak_rss_at_largest_bytes"] = big["peak_rss_bytes"]
        out["rss_at_largest_within_1GiB"] = big["peak_rss_bytes"] <= GiB
        out["trained_rows_at_largest"] = big.get("trained_rows")
        out["trained_rows_at_least_1e5"] = (big.get("trained_rows") or 0) >= 10**5
        rss = [r["peak_rss_bytes"] for r in dp]
        out["rss_spread_over_sizes"] = max(rss) / min(rss)
        out["throughput_largest_over_smallest"] = big["rows_per_s"] / small["rows_per_s"]
        out["throughput_within_2x"] = big["rows_per_s"] * 2 >= small["rows_per_s"]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for m in model:
        if m.get("kind") == "pool" and m.get("val_bpb") is not None:
            key = (m.get("generator") or "hashed_slices", m["steps"])
            groups.setdefault(key, []).append(m)
    for pools in groups.values():
        pools.sort(key=lambda m: m["pool_rows"])
    plain = [k for k in groups if k[0] == "hashed_slices"]
    headline = max(plain or groups, key=lambda k: k[1]) if groups else None
    if headline is not None and len(groups[headline]) >= 2:  # the plain curve, longest run
        pools = groups[headline]
        bpb = [m["val_bpb"] for m in pools]
        out["bpb_by_pool_rows"] = {str(m["pool_rows"]): m["val_bpb"] for m in pools}
        out["bpb_falls_with_pool"] = all(b <= a for a, b in itertools.pairwise(bpb))
        out["bpb_largest_vs_smallest"] = bpb[-1] / bpb[0] - 1
    curves = []
    for (gen, steps), pools in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        test = {m["pool_rows"]: m.get("test_bpb") for m in pools}
        curve: dict[str, Any] = {
            "generator": gen,
            "steps": steps,
            "val_by_pool_rows": {str(m["pool_rows"]): m["val_bpb"] for m in pools},
            "test_by_pool_rows": {str(r): t for r, t in test.items()},
        }
        span = [test[r] for r in sorted(test) if 10**4 <= r <= 10**6 and test[r] is not None]
        if len(span) >= 2 and 10**4 in test and 10**6 in test:
            curve["test_falls_1e4_to_1e6"] = all(b < a for a, b in itertools.pairwise(span))
        best = min((t, r) for r, t in test.items() if t is not None)
        curve["best_pool_rows"] = best[1]  # where the curve stops improving
        base = groups.get(("hashed_slices", steps))
        if gen != "hashed_slices" and base:
            at = {m["pool_rows"]: m.get("test_bpb") for m in base}
            curve["test_vs_hashed_slices"] = {
                str(r): test[r] / at[r] - 1 for r in test if at.get(r) and test[r] is not None
            }
        curves.append(curve)
    if curves:
        out["lm_curves"] = curves
    return out


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _fmt(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    if not rows:  # a part that did not run (--no-memory, --no-model)
        return
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def print_report(payload: dict[str, Any]) -> None:
    s = payload["settings"]
    rows = []
    for r in sorted(payload["records"], key=lambda r: (r["params"], r["system"])):
        note = r.get("error") or r.get("reason") or ""
        rows.append(
            [
                f"{r['params']:.0e}",
                r["system"],
                "yes" if r.get("ran") else ("no: fits" if r["fits"] else "no"),
                _fmt_bytes(r.get("peak_rss_bytes")),
                _fmt_bytes(r.get("rss_after_import_bytes")),
                _fmt_bytes(r.get("disk_bytes")),
                _fmt(r.get("rows_per_s")),
                _fmt(r.get("hit_rate"), ".3f"),
                _fmt(r.get("open_s"), ".2f"),
                _fmt(r.get("commit_s"), ".2f"),
                _fmt(r.get("trained_rows"), ","),
                note[:60],
            ]
        )
    _table(
        f"memory and speed (dim {s['dim']}, working set {s['working_set']:,} rows, "
        f"{s['stream_batches']} read batches of {s['stream_batch']:,} ids, "
        f"cache {s['cache_rows']:,} rows)",
        [
            "params",
            "system",
            "run",
            "peak RSS",
            "RSS after import",
            "disk",
            "rows/s",
            "hit rate",
            "open s",
            "commit s",
            "trained rows",
            "note",
        ],
        rows,
    )
    if payload["model"]:
        mrows = []
        for m in payload["model"]:
            if "error" in m:
                mrows.append(["-", "error", "-", "-", "-", "-", "-", "-", m["error"][:60]])
                continue
            what = (
                f"pool {m['pool_rows']:.0e} rows, k={m['k']}, {m.get('generator') or ''}"
                if m["kind"] == "pool"
                else f"dense FFN width {m['ffn_width']:,}"
                + (" (= active)" if m["kind"] == "dense_active" else " (= total)")
            )
            mrows.append(
                [
                    what,
                    m["kind"],
                    _fmt(m.get("ffn_params_total"), ","),
                    _fmt(m.get("active_ffn_params_per_token"), ","),
                    _fmt(m.get("steps"), ","),
                    _fmt(m.get("val_bpb"), ".4f"),
                    _fmt(m.get("test_bpb"), ".4f"),
                    _fmt(m.get("tokens_per_s")),
                    m.get("reason", ""),
                ]
            )
        _table(
            f"LM bits/byte at fixed active compute (steps: {s['model_step_budgets']})",
            [
                "model",
                "kind",
                "FFN params",
                "active/token",
                "steps",
                "val bpb",
                "test bpb",
                "tokens/s",
                "note",
            ],
            mrows,
        )
    a = payload["aims"]
    if a:
        arows = []
        if "peak_rss_at_largest_bytes" in a:
            arows += [
                [
                    f"peak RSS at {a['largest_params']:.0e} params",
                    _fmt_bytes(a["peak_rss_at_largest_bytes"]),
                    "<= 1 GiB",
                    "met" if a["rss_at_largest_within_1GiB"] else "missed",
                ],
                [
                    "trained rows at the largest size",
                    _fmt(a["trained_rows_at_largest"], ","),
                    ">= 100,000",
                    "not measured (--quick trains 10^4)"
                    if payload["quick"]
                    else ("met" if a["trained_rows_at_least_1e5"] else "missed"),
                ],
                [
                    "peak RSS, largest / smallest across sizes",
                    f"{a['rss_spread_over_sizes']:.2f}x",
                    "flat",
                    "-",
                ],
                [
                    "rows/s, largest / smallest size",
                    f"{a['throughput_largest_over_smallest']:.2f}x",
                    ">= 0.5x",
                    "not judged (--quick: a few batches, timing noise)"
                    if payload["quick"]
                    else ("met" if a["throughput_within_2x"] else "missed"),
                ],
            ]
        if "bpb_falls_with_pool" in a:
            arows.append(
                [
                    "val bpb, largest pool vs smallest",
                    f"{a['bpb_largest_vs_smallest']:+.1%}",
                    "falls with pool size",
                    "not measured (--quick: 8 steps)"
                    if payload["quick"]
                    else ("met" if a["bpb_falls_with_pool"] else "missed"),
                ]
            )
        for c in a.get("lm_curves", []):
            if "test_falls_1e4_to_1e6" in c:
                arows.append(
                    [
                        f"test bpb 10^4 -> 10^6 rows, {c['generator']}, {c['steps']} steps",
                        " -> ".join(
                            f"{c['test_by_pool_rows'][str(r)]:.3f}"
                            for r in (10**4, 10**5, 10**6)
                            if str(r) in c["test_by_pool_rows"]
                        ),
                        "keeps falling",
                        "met" if c["test_falls_1e4_to_1e6"] else "missed",
                    ]
                )
            vs = c.get("test_vs_hashed_slices", {})
            if str(10**6) in vs:
                arows.append(
                    [
                        f"test bpb at 10^6 rows, {c['generator']} vs plain, {c['steps']} steps",
                        f"{vs[str(10**6)]:+.1%}",
                        "<= -3%",
                        "met" if vs[str(10**6)] <= -0.03 else "missed",
                    ]
                )
        _table("against the aims", ["figure", "measured", "aim", ""], arows)


def plot(payload: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"dpsn": "tab:red", "dense": "tab:blue"}
    for system in ("dpsn", "dense"):
        rs = sorted(
            (r for r in payload["records"] if r["system"] == system and r.get("peak_rss_bytes")),
            key=lambda r: r["params"],
        )
        if not rs:
            continue
        x = [r["params"] for r in rs]
        axes[0].plot(
            x, [r["peak_rss_bytes"] / GiB for r in rs], "o-", color=colors[system], label=system
        )
        axes[1].plot(x, [r["rows_per_s"] for r in rs], "o-", color=colors[system], label=system)
        gone = [r["params"] for r in payload["records"] if r["system"] == system and not r["fits"]]
        for g in gone:
            axes[0].axvline(g, color=colors[system], alpha=0.15, lw=6)
    params = [r["params"] for r in payload["records"]]
    if params:
        xs = sorted(set(params))
        axes[0].plot(
            xs, [p * 4 / GiB for p in xs], ":", color="gray", label="dense table bytes (4 B/param)"
        )
    axes[0].axhline(1.0, color="black", lw=0.8, ls="--", label="1 GiB")
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="parameters (rows x dim)",
        ylabel="peak resident memory (GiB)",
        title="memory (shaded: dense does not fit)",
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="parameters (rows x dim)",
        ylabel="rows/s served",
        title="throughput",
    )
    pools = sorted(
        (m for m in payload["model"] if m.get("kind") == "pool" and m.get("val_bpb")),
        key=lambda m: m["pool_rows"],
    )
    curves: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for m in pools:
        curves.setdefault((m.get("generator") or "hashed_slices", m["steps"]), []).append(m)
    styles = {"hashed_slices": "o-", "region_mlp": "s-"}
    for (gen, steps), ms in sorted(curves.items()):
        axes[2].plot(
            [m["pool_rows"] for m in ms],
            [m["val_bpb"] for m in ms],
            styles.get(gen, "^-"),
            color=colors["dpsn"],
            alpha=0.5 + 0.5 * steps / max(k[1] for k in curves),
            label=f"PoolLayer k={ms[0]['k']}, {gen}, {steps} steps",
        )
    for m in payload["model"]:
        if m.get("kind") == "dense_active" and m.get("val_bpb"):
            axes[2].axhline(
                m["val_bpb"],
                color=colors["dense"],
                ls="--",
                label=f"dense, same active, {m['steps']} steps",
            )
    tot = sorted(
        (m for m in payload["model"] if m.get("kind") == "dense_total" and m.get("val_bpb")),
        key=lambda m: m["matches_pool_rows"],
    )
    if tot:
        axes[2].plot(
            [m["matches_pool_rows"] for m in tot],
            [m["val_bpb"] for m in tot],
            "s-",
            color=colors["dense"],
            label="dense, same total",
        )
    steps = payload["settings"].get("model_step_budgets", payload["settings"]["model_steps"])
    axes[2].set(
        xscale="log",
        yscale="log",
        xlabel="pool rows per layer (dense: matched FFN width)",
        ylabel="validation bits/byte",
        title=f"LM quality at fixed active compute ({steps} steps)",
    )
    from matplotlib.ticker import FormatStrFormatter

    axes[2].yaxis.set_major_formatter(FormatStrFormatter("%.2f"))  # after set(yscale=...)
    axes[2].yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("dpsn scaling" + (" (--quick)" if payload["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
