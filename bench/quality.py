"""Quality benchmark: dense feed-forward blocks vs dpsn PoolLayers at equal active compute.

    python bench/quality.py                 # full run (15-25 min on 2 cores)
    python bench/quality.py --quick         # smoke run (< 1 min)
    python bench/quality.py --clock cpu     # time by CPU time (a machine shared with other work)
    python bench/quality.py --tune --set k=24 --set row_lr=3e-2   # try a setting (validation only)
    python bench/quality.py --budget-prices 0.00001,0.00002      # learned budgets vs fixed k

Two models side by side, identical except for their feed-forward blocks (the byte-level
transformer of ``examples/lm.py``):

- (a) dense: every block has a dense FFN of hidden width ``h = d_ff + k``;
- (b) pool: every block has a ``PoolLayer`` with ``k`` active rows per token out of a pool of
  ``rows`` rows (one pool per layer), beside a small dense FFN of width ``d_ff`` (0: none).

How the compute is matched (multiply-adds per token, forward): a dense FFN of width ``h`` costs
``h * 2d`` and a PoolLayer row ``2d`` (``x . u`` and ``act * v``, PEER), so ``k`` active rows
plus the side FFN cost exactly what the dense FFN of width ``d_ff + k`` costs, with as many
active FFN parameters per token. The router is extra on (b)'s side and is counted, not hidden:
its query projection ``d * d_key``, the sub-key scores ``2 * sqrt(rows) * d_key / 2``, the
``k * k`` candidate sums and the re-scoring of the chosen rows (``k * d_key``); the table shows
each model's total multiply-adds per token (attention and output head included). The pool is
100-2000x the dense FFN's parameters (``pool / dense FFN`` column).

Data (``examples/lm.py``'s ``Splits``): each text is cut into train (bytes 0-70%), test
(70-80%) and validation (80-100%). Settings are chosen on validation only (``--tune`` prints
nothing else); the test split is reported and no setting was chosen on it. A second text of
another kind (``code``: Python source of stdlib modules) is run with pydoc's settings; nothing
was tuned on it at all.

Measured, on both texts:
- test (and validation) bits/byte on the whole split after the same number of steps, and after
  the same training time: (a)'s time for those steps, which (b) gets as a time budget in a
  second run (its learning rate schedule runs over that budget); aims: (b) at least 5% lower
  than (a) at equal steps, no worse at equal time;
- training tokens/s (evaluation excluded), by wall clock and by CPU time; aim: (b) >= 0.5x (a);
  ``--clock`` picks which one the equal-time budget and the headline ratio use;
- where (b)'s step goes (router, page-in, executor forward and backward, row optimizer, the
  rest), timed by the same clock;
- the digits classifier (``examples/digits.py``): test accuracy with a dense hidden block
  vs a PoolLayer over 10**6 rows at the same active width.

Settings. The row optimizer, its learning rate and the query batch norm were explored in 300-step
runs by an earlier version of this benchmark on the last 10% of pydoc's text (now inside the
validation split): row-wise AdaGrad beat partial row-wise Adam (-12.5% vs -7.6% against dense
at k = 32), row_lr 0.025 beat 0.05-0.2, and without batch norm on the query the router
collapsed (4.6% of rows used after 20 steps, Gini 0.997; ~60% with it). Then ``--tune``, 800
steps, on bytes 80-90% (validation), wall clock on a busy machine:

    setting              (a) dense val bpb   (b) equal steps   (b) equal time   tokens/s ratio
    k=32, row_lr 0.025   2.342 (width 32)    1.884 (-19.5%)    2.669 (+14.0%)   0.22
    k=16, row_lr 0.025   2.372 (width 16)    2.017 (-15.0%)    2.378 (+0.2%)    0.44
    k=16, row_lr 0.05    2.372 (width 16)    2.090 (-11.9%)    2.387 (+0.6%)    0.60

k = 16, row_lr 0.025 is the default: the best at equal time, which is what a user pays for.
After the AVX2 product-key selection (a faster step, so more steps at equal time), the default
rechecked with ``--tune --clock cpu`` on the whole validation split (bytes 80-100%), idle
machine: dense 2.218, pool 1.923 (-13.3%) at equal steps, 2.059 (-7.2%, 541 steps) at equal
time, tokens/s ratio 0.64; no other setting was tried since.

Curves (train and validation bits/byte vs step and vs seconds) go to
``bench/results/quality.json`` and ``bench/results/quality.png``. Threads: one per process by
default (``--threads``): on a small machine shared with other work, torch's multi-threaded CPU
kernels slow down by 10x or more while they wait for each other, and both models run alike.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
import digits  # noqa: E402
import lm  # noqa: E402
from _common import add_out_argument, default_out, print_table, write_json  # noqa: E402

# The default: the best at equal time of the settings tried on validation (module docstring).
DEFAULT = lm.LMConfig(
    d_model=128,
    n_layers=2,
    n_heads=4,
    context=128,
    batch=8,
    d_ff=0,
    k=16,
    rows=32_000,  # 8.19M pool parameters a layer: ~1,900x the dense FFN's 4,240
    router_heads=1,
    d_key=32,
    query_batchnorm=True,
    row_optimizer="adagrad",
    row_lr=0.025,
    lr=3e-3,
)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` overrides of :class:`lm.LMConfig` (values as Python literals)."""
    names = {f.name for f in fields(lm.LMConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--set takes key=value with key one of {sorted(names)}: {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def dense_ffn_params(cfg: lm.LMConfig, width: int) -> int:
    return width * 2 * cfg.d_model + width + cfg.d_model


def smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {"dense": "tab:blue", "pool": "tab:red", "pool (time budget)": "tab:orange"}
    for name, run in runs.items():
        c = run["curves"]
        color = colors.get(name)
        for ax, x_train, x_val in (
            (axes[0], c["train_step"], c["val_step"]),
            (axes[1], c["train_seconds"], c["val_seconds"]),
        ):
            ax.plot(x_train, smooth(c["train_bpb"], 20), color=color, alpha=0.35, lw=1)
            ax.plot(x_val, c["val_bpb"], color=color, marker="o", ms=3, label=f"{name} (val)")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds")
    axes[0].set_ylabel("bits per byte (faint: train, smoothed)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    lo = min(min(r["curves"]["val_bpb"]) for r in runs.values())
    axes[0].set_ylim(lo - 0.2, lo + 2.5)
    fig.suptitle("dpsn quality: dense FFN vs PoolLayer at equal active compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def lm_pair(
    dense_cfg: lm.LMConfig,
    pool_cfg: lm.LMConfig,
    steps: int,
    tmp: Path,
    text: str,
    common: dict[str, Any],
    profile_steps: int = 0,
) -> dict[str, dict[str, Any]]:
    """(a) dense and (b) pool for ``steps`` steps, then (b) again for (a)'s training time."""
    tag = "" if text == "pydoc" else f" [{text}]"
    dense = lm.train(dense_cfg, steps=steps, desc=f"(a) dense{tag}", text=text, **common)
    pool = lm.train(
        pool_cfg,
        steps=steps,
        store=tmp / f"b-{text}",
        desc=f"(b) pool{tag}",
        text=text,
        profile_steps=profile_steps,
        **common,
    )
    pool_t = lm.train(
        pool_cfg,
        seconds=dense["train_seconds"],
        store=tmp / f"bt-{text}",
        desc=f"(b) pool, time budget{tag}",
        text=text,
        **common,
    )
    return {"dense": dense, "pool": pool, "pool_time_budget": pool_t}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (< 1 min)")
    ap.add_argument("--steps", type=int, default=None, help="LM steps (default 800; quick 15)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-second-text", action="store_true")
    ap.add_argument(
        "--tune",
        action="store_true",
        help="validation figures only (the split settings may be chosen on): (a) and (b) at "
        "equal steps on pydoc; use with --set to try a setting",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what training time counts (tokens/s, the equal-time budget): wall clock, or the "
        "process's CPU time (on a machine shared with other work: what a step cost, without the "
        "time other processes held the cores); both are reported",
    )
    ap.add_argument("--no-write", action="store_true", help="print only (no JSON/PNG)")
    ap.add_argument(
        "--budget-prices",
        default=None,
        metavar="P1,P2,...",
        help="instead of (a) vs (b): the pool model with a fixed k beside learned budgets in "
        "[--budget-k-min, k] trained at these prices (nats of loss per row per token): quality, "
        "mean k and the bytes with the smallest budgets (bench/_budget_prices.py)",
    )
    ap.add_argument("--budget-k-min", type=int, default=2)
    add_out_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (15 if args.quick else 800)
    eval_every = max(5, steps // 16)
    eval_windows = 8 if args.quick else 64
    final_windows = 16 if args.quick else None  # None: the whole split (~10 s a model)
    pool_cfg = replace(DEFAULT, ffn="pool", **parse_set(args.set))
    dense_cfg = replace(pool_cfg, ffn="dense", d_ff=pool_cfg.d_ff + pool_cfg.k)
    h = dense_cfg.d_ff
    ratio = pool_cfg.rows * 2 * pool_cfg.d_model / dense_ffn_params(dense_cfg, h)
    macs_a, macs_b = lm.macs_per_token(dense_cfg), lm.macs_per_token(pool_cfg)
    matching = {
        "rule": "dense FFN width h = d_ff + k; pool: k rows (2d MACs each) + side FFN d_ff",
        "dense_ffn_width": h,
        "pool_k": pool_cfg.k,
        "pool_side_ffn_width": pool_cfg.d_ff,
        "active_ffn_params_per_token": [
            lm.active_params_per_token(dense_cfg),
            lm.active_params_per_token(pool_cfg),
        ],
        "macs_per_token": {"dense": macs_a, "pool": macs_b},
        "router_overhead_of_total": macs_b["router"] / macs_b["total"],
        "pool_over_dense_ffn_params": ratio,
    }
    print(
        f"matching: dense FFN width {h} vs {pool_cfg.k} pool rows"
        + (f" + dense side FFN {pool_cfg.d_ff}" if pool_cfg.d_ff else "")
        + f"; MACs/token {macs_a['total']:,} vs {macs_b['total']:,} (router "
        f"{macs_b['router']:,} = {matching['router_overhead_of_total']:.1%} of (b)); "
        f"pool = {ratio:,.0f}x the dense FFN's parameters"
    )
    tmp = Path(tempfile.mkdtemp(prefix="dpsn-quality-"))
    started = time.perf_counter()
    common = {
        "eval_every": eval_every,
        "eval_windows": eval_windows,
        "final_windows": final_windows,
        "progress": sys.stderr.isatty(),
        "clock": args.clock,
    }
    try:
        if args.tune:
            return tune(dense_cfg, pool_cfg, steps, tmp, common)
        if args.budget_prices:
            import _budget_prices

            prices = [float(p) for p in args.budget_prices.split(",")]
            out = _budget_prices.run(pool_cfg, prices, args.budget_k_min, steps, tmp, common)
            out["total_seconds"] = time.perf_counter() - started
            out["clock"] = args.clock
            if not args.no_write:
                write_json("quality_budget", out)
            return out
        runs = {
            "pydoc": lm_pair(
                dense_cfg, pool_cfg, steps, tmp, "pydoc", common, 3 if args.quick else 10
            )
        }
        if not args.skip_second_text:
            runs["code"] = lm_pair(dense_cfg, pool_cfg, steps, tmp, "code", common)
        digit_runs = {} if args.skip_digits else run_digits(args.quick, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - started
    report(runs, digit_runs, dense_cfg, pool_cfg, macs_a, macs_b, ratio, args.quick)
    print(f"\ntotal {total:.0f} s")
    main_runs = runs["pydoc"]
    dense, pool = main_runs["dense"], main_runs["pool"]

    def strip(run: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in run.items() if k != "store"}

    payload = {
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "matching": matching,
        "configs": {"dense": asdict(dense_cfg), "pool": asdict(pool_cfg)},
        "lm": {text: {k: strip(v) for k, v in r.items()} for text, r in runs.items()},
        "summary": {text: summary_figures(r) for text, r in runs.items()},
        "profile_ms_per_step": pool.get("profile"),
        "digits": digit_runs,
        "total_seconds": total,
    }
    if not args.no_write:
        write_json("quality", payload, out=args.out)
        plot(
            {"dense": dense, "pool": pool, "pool (time budget)": main_runs["pool_time_budget"]},
            (args.out or default_out()) / "quality.png",
        )
    return payload


def summary_figures(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    dense, pool, pool_t = runs["dense"], runs["pool"], runs["pool_time_budget"]
    return {
        "test_bpb_dense": dense["test_bpb"],
        "test_bpb_pool_equal_steps": pool["test_bpb"],
        "test_bpb_pool_equal_time": pool_t["test_bpb"],
        "test_change_equal_steps": pool["test_bpb"] / dense["test_bpb"] - 1,
        "test_change_equal_time": pool_t["test_bpb"] / dense["test_bpb"] - 1,
        "val_bpb_dense": dense["val_bpb"],
        "val_bpb_pool_equal_steps": pool["val_bpb"],
        "tokens_per_s_ratio": pool["tokens_per_s"] / dense["tokens_per_s"],
        "tokens_per_wall_s_ratio": pool["tokens_per_wall_s"] / dense["tokens_per_wall_s"],
        "tokens_per_cpu_s_ratio": pool["tokens_per_cpu_s"] / dense["tokens_per_cpu_s"],
    }


def run_digits(quick: bool, tmp: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    seeds = [0] if quick else [0, 1, 2]  # 450 test images: one seed is noisy
    for kind in ("dense", "pool"):
        runs = []
        for seed in seeds:
            dcfg = digits.DigitsConfig(steps=60 if quick else 300, seed=seed)
            store = tmp / f"digits-{seed}" if kind == "pool" else None
            runs.append(digits.train_and_test(dcfg, kind, store))
        accs = [r["test_accuracy"] for r in runs]
        out[kind] = {
            "test_accuracy": sum(accs) / len(accs),
            "per_seed": accs,
            "seeds": seeds,
            "train_seconds": sum(r["train_seconds"] for r in runs),
            "config": {k: v for k, v in asdict(dcfg).items() if k != "seed"},
        }
    return out


def tune(
    dense_cfg: lm.LMConfig,
    pool_cfg: lm.LMConfig,
    steps: int,
    tmp: Path,
    common: dict[str, Any],
) -> dict[str, Any]:
    """Validation figures only: what settings are chosen on (the test split is not read)."""
    out = {}
    for name, cfg in (("dense", dense_cfg), ("pool", pool_cfg)):
        run = lm.train(cfg, steps=steps, store=tmp / name, desc=name, **common)
        out[name] = {"val_bpb": run["val_bpb"], "tokens_per_s": run["tokens_per_s"]}
        if name == "dense":
            seconds = run["train_seconds"]
    run = lm.train(pool_cfg, seconds=seconds, store=tmp / "pt", desc="pool, time", **common)
    out["pool_time_budget"] = {"val_bpb": run["val_bpb"], "steps": run["steps"]}
    dense_bpb = out["dense"]["val_bpb"]
    print(
        f"tune ({steps} steps, validation split): dense {dense_bpb:.4f}, pool "
        f"{out['pool']['val_bpb']:.4f} ({out['pool']['val_bpb'] / dense_bpb - 1:+.1%}), pool "
        f"at equal time {run['val_bpb']:.4f} ({run['val_bpb'] / dense_bpb - 1:+.1%}, "
        f"{run['steps']} steps, {run['clock']} clock); tokens/s ratio "
        f"{out['pool']['tokens_per_s'] / out['dense']['tokens_per_s']:.2f}; pool config "
        f"{asdict(pool_cfg)}"
    )
    return out


def report(
    runs: dict[str, dict[str, dict[str, Any]]],
    digit_runs: dict[str, dict[str, Any]],
    dense_cfg: lm.LMConfig,
    pool_cfg: lm.LMConfig,
    macs_a: dict[str, int],
    macs_b: dict[str, int],
    ratio: float,
    quick: bool,
) -> None:
    h = dense_cfg.d_ff
    for text, r in runs.items():
        dense, pool, pool_t = r["dense"], r["pool"], r["pool_time_budget"]
        rows = [
            [
                "(a) dense",
                f"FFN {h}",
                f"{dense_ffn_params(dense_cfg, h):,}",
                f"{macs_a['total']:,}",
                dense["steps"],
                dense["tokens_per_wall_s"],
                dense["tokens_per_cpu_s"],
                f"{dense['val_bpb']:.4f}",
                f"{dense['test_bpb']:.4f}",
                f"{dense['test_bpb']:.4f}",
            ],
            [
                "(b) pool",
                f"k={pool_cfg.k}" + (f"+FFN {pool_cfg.d_ff}" if pool_cfg.d_ff else ""),
                f"{pool_cfg.rows * 2 * pool_cfg.d_model:,} ({ratio:,.0f}x)",
                f"{macs_b['total']:,}",
                f"{pool['steps']} / {pool_t['steps']}",
                pool["tokens_per_wall_s"],
                pool["tokens_per_cpu_s"],
                f"{pool['val_bpb']:.4f}",
                f"{pool['test_bpb']:.4f}",
                f"{pool_t['test_bpb']:.4f}",
            ],
        ]
        part = "held-out subsets" if quick else "whole splits"
        print_table(
            f"{text}: bits/byte on {part} (test: {dense['test_bytes']:,} bytes); equal time = "
            f"{dense['train_seconds']:.1f} s of training ({dense['clock']} clock)"
            + (
                " (settings tuned on pydoc's validation split)"
                if text == "pydoc"
                else " (no setting tuned on this text)"
            ),
            [
                "model",
                "FFN",
                "FFN params/layer",
                "MACs/token",
                "steps (eq. steps / eq. time)",
                "tokens/s (wall)",
                "tokens/s (CPU)",
                "val bpb",
                "test bpb eq. steps",
                "test bpb eq. time",
            ],
            rows,
        )
    pool = runs["pydoc"]["pool"]
    if pool.get("profile"):
        prof = pool["profile"]
        names = {
            "dpsn.route": "router (query, product-key search, scores)",
            "dpsn.page_in": "page-in (distinct rows, cache lookup, fills)",
            "dpsn.executor.forward": "executor forward",
            "dpsn.executor.backward": "executor backward (row gradients)",
            "dpsn.row_step": "row optimizer step (fused into the cache)",
            "other": "the rest: attention, dense layers, head, dense optimizer, autograd",
        }
        print_table(
            f"(b) one training step, ms by the {pool['clock']} clock (dpsn.pool._profile scopes, "
            "both PoolLayers together; write-back happens at commit, outside the step)",
            ["part", "ms/step", "share"],
            [
                (names.get(k, k), v, f"{v / prof['total']:.0%}")
                for k, v in prof.items()
                if k != "total"
            ]
            + [("total", prof["total"], "100%")],
        )
    summary = []
    for text, r in runs.items():
        f = summary_figures(r)
        summary += [
            [
                f"{text}: test bpb, equal steps, (b) vs (a)",
                f"{f['test_change_equal_steps']:+.1%}",
                "<= -5%",
            ],
            [
                f"{text}: test bpb, equal time, (b) vs (a)",
                f"{f['test_change_equal_time']:+.1%}",
                "<= 0%",
            ],
            [
                f"{text}: training tokens/s, (b) / (a), {r['dense']['clock']} clock",
                f"{f['tokens_per_s_ratio']:.2f}x",
                ">= 0.5x",
            ],
        ]
    if digit_runs:
        gain = digit_runs["pool"]["test_accuracy"] - digit_runs["dense"]["test_accuracy"]
        summary.append(["digits test accuracy: (b) - (a)", f"{gain:+.4f}", "-"])
    print_table("against the aims", ["figure", "measured", "aim"], summary)


if __name__ == "__main__":
    main()
