"""Budget benchmark: does a PoolLayer step cost less when the router hands out fewer rows?

    python bench/budget.py            # ~1-2 min on 2 cores
    python bench/budget.py --quick    # smoke run

A per-input budget (``k_min <= k <= k_max``, ``dpsn.index.Budget``) only saves compute if the
rows past each token's budget are neither paged in, gathered nor multiplied. PoolLayer packs the
uses token by token (``pool/_layer.py``: ``Uses``), so a step's work should follow the mean
budget. Measured here, in one run, side by side:

- one PoolLayer training step (router, page-in, executor forward and backward, row optimizer)
  of T = 1024 tokens, d_model 128, k_max 32, 32,000 rows (bench/quality.py's layer), with a
  fixed budget (every token k_max) and with budgets of mean k 24, 16 and 8;
- the fixed budget through a cache of 4,096 rows, fewer than one step's ~16,000 distinct rows:
  every step is then served *spilled* (the batch's rows assembled from the cache and the lower
  tiers, the procedural ones regenerated each step), which is how much a too-small cache costs;
- the same on the PyTorch path (``DPSN_NATIVE=0``'s, what CUDA and builds without a C compiler
  run) beside the native one.

The budget here is the router's ``"learned"`` signal, ``k = k_min + round(sigmoid(w . x + b) *
(k_max - k_min))``, with its head set so that budgets spread around the wanted mean (small
random weights for the spread, the bias found by bisection on a sample for the mean): the point
is the cost of a given mean, not how a budget is learned. Every row is paged in before timing (the
cache holds the pool), the layers take turns step by step, and a layer's step time is the median
of its timed steps, one thread, by wall clock and by the thread's CPU time (which other
processes' load does not inflate; on an idle machine the two agree).

A ``"learned"`` budget depends on the input alone, so the router knows each token's k before
it searches, and the native product-key search stops there (``_kernels.pk_search``'s
``budgets``): the search, not only the executor, costs less for a small budget. Budgets read
from the candidates' scores (``"entropy"``) still search all ``k_max``.

Aim (issue 13): mean k = k_max / 4 costs <= 0.6x of a fixed k_max step.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_out_argument, print_table, write_json

import dpsn
from dpsn import _kernels
from dpsn.index import ProductKeyRouter
from dpsn.index.testing import mixture

D, ROWS, K_MAX, TOKENS = 128, 32_000, 32, 1024
SPILLED, SPILL_CACHE = "fixed, spilled", 4096  # a step touches ~16,000 distinct rows


def make_layer(path: Path, mean_k: int | None, cache_rows: int = ROWS) -> dpsn.PoolLayer:
    pool = dpsn.create(
        path,
        rows=ROWS,
        dim=2 * D,
        generator={"kind": "hashed_slices", "memory_size": 1 << 20},
        cache_rows=cache_rows,
    )
    if mean_k is None:
        router = ProductKeyRouter(d_in=D, num_rows=ROWS, k=K_MAX, d_key=32, query_batchnorm=True)
    else:
        router = ProductKeyRouter(
            d_in=D,
            num_rows=ROWS,
            k=K_MAX,
            k_min=1,
            budget="learned",
            d_key=32,
            query_batchnorm=True,
        )
        head = router.budget.head
        assert head is not None
        with torch.no_grad():
            head.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(mean_k))
            # the bias that gives mean_k on these inputs (bisection on the logit)
            sample = mixture(4 * TOKENS, d=D, seed=99)
            lo, hi = -12.0, 12.0
            for _ in range(30):
                head.bias.fill_((lo + hi) / 2)
                c = torch.sigmoid(head(sample).squeeze(-1))
                got = float(router.budget.k_for(c).float().mean())
                lo, hi = ((lo + hi) / 2, hi) if got < mean_k else (lo, (lo + hi) / 2)
    return dpsn.PoolLayer(pool, D, D, router=router, k=K_MAX, row_optimizer="adagrad")


def time_interleaved(
    layers: dict[str, dpsn.PoolLayer], steps: int, warmup: int
) -> dict[str, dict[str, Any]]:
    """Median step time of each layer, the layers taking turns step by step: on a machine
    shared with other work, load that comes and goes then slows every layer alike instead of
    whichever happened to run at the time. The caller has paged every row in (the cache holds
    the whole pool), so fills from the generator are not what is timed."""
    opts = {name: torch.optim.SGD(layer.parameters(), lr=1e-3) for name, layer in layers.items()}
    x_all = mixture(TOKENS * (steps + warmup), d=D, seed=0)
    times: dict[str, list[float]] = {name: [] for name in layers}
    cpu: dict[str, list[float]] = {name: [] for name in layers}
    ks: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(steps + warmup):
        x = x_all[i * TOKENS : (i + 1) * TOKENS]
        for name, layer in layers.items():
            t, c = time.perf_counter(), time.thread_time()
            loss = layer(x).square().mean()
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.thread_time() - c)
                ks[name].append(layer.last_route.mean_k)
    return {
        name: {
            "step_ms": 1e3 * statistics.median(times[name]),
            "cpu_ms": 1e3 * statistics.median(cpu[name]),
            "mean_k": statistics.fmean(ks[name]),
        }
        for name in layers
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    add_out_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps, warmup = (4, 2) if args.quick else (15, 3)
    means: list[int | None] = [None, 24, 16, 8]
    paths = ["native", "torch"] if _kernels.BUILT else ["torch"]
    tmp = Path(tempfile.mkdtemp(prefix="dpsn-budget-"))
    results: list[dict[str, Any]] = []
    try:
        for path in paths:
            _kernels.ENABLED = path == "native"
            layers = {}
            for mean_k in means:
                name = "fixed" if mean_k is None else f"mean {mean_k}"
                layers[name] = make_layer(tmp / f"{path}-{mean_k}", mean_k)
                with torch.no_grad():  # every row paged in once, then kept (cache = pool)
                    layers[name].pool.read(torch.arange(ROWS))
            # a cache smaller than one step's distinct rows: every step is served spilled
            layers[SPILLED] = make_layer(tmp / f"{path}-spilled", None, cache_rows=SPILL_CACHE)
            for name, r in time_interleaved(layers, steps, warmup).items():
                layers[name].pool.close()
                r.update(path=path, budget=name)
                results.append(r)
                print(f"  {path} {name}: {r['step_ms']:.1f} ms, k {r['mean_k']:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for path in paths:
        fixed = next(r for r in results if r["path"] == path and r["budget"] == "fixed")
        for r in (r for r in results if r["path"] == path):
            r["x_fixed"] = r["step_ms"] / fixed["step_ms"]
            r["cpu_x_fixed"] = r["cpu_ms"] / fixed["cpu_ms"]
            figures = (r["step_ms"], r["x_fixed"], r["cpu_ms"], r["cpu_x_fixed"])
            rows.append((path, r["budget"], r["mean_k"], *figures))
    print_table(
        f"PoolLayer training step: {TOKENS} tokens, d {D}, k_max {K_MAX}, {ROWS:,} rows, "
        f"{args.threads} thread(s), median of {steps} steps",
        ["path", "budget", "mean k", "step ms", "x fixed", "CPU ms", "CPU x fixed"],
        rows,
    )
    quarter = next(
        r for r in results if r["path"] == paths[0] and r["budget"] == f"mean {K_MAX // 4}"
    )
    print(
        f"\nmean k {quarter['mean_k']:.1f} of {K_MAX}: {quarter['x_fixed']:.2f}x the fixed step's "
        f"wall time, {quarter['cpu_x_fixed']:.2f}x its CPU time ({paths[0]} path; aim <= 0.6x)"
    )
    write_json(
        "budget", {"results": results, "steps": steps, "threads": args.threads}, out=args.out
    )


if __name__ == "__main__":
    main()
