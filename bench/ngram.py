"""NgramMemory benchmark: the byte-level LM of ``examples/lm.py`` with and without a hashed
N-gram memory, and what ahead-of-time paging and the co-use statistics cost.

    python bench/ngram.py --quick           # smoke run (a few minutes on 2 shared cores)
    python bench/ngram.py                   # longer runs
    python bench/ngram.py --tune            # validation bits/byte only (choosing settings)

Measured, each against its baseline in the same run:

1. Quality, on both texts (``pydoc`` prose and ``code``): the LM (dense FFN blocks, so the
   memory is the only pool) without memory, and with an ``NgramMemory`` (orders 2 and 3, 4
   heads, pool rows ``--sizes``, each a virtual pool: only the rows training touched are
   stored) added to the residual stream after the first block. Test bits/byte at equal steps,
   and at equal training time (the memory model trained for the baseline's CPU seconds).
   Settings were chosen on the validation split (``--tune``); the test split is reported.
2. Step overhead (pydoc, the first memory size): ms per training step with the memory's rows
   all resident in the device cache (warm, large cache), against rows committed to disk and
   read through a small cache (~1.5 steps' rows; the store's files are in the OS page cache),
   with ``dpsn.pool.prefetching`` (the next batch's rows paged in on the helper thread while
   the step computes) and without. The three are interleaved over ``--rounds`` rounds, and the
   best round of each is shown.
3. The co-use statistics: ms per step of ``pool.record_couse`` (what ``NgramMemory`` records
   in one step: every ``couse_every``-th position's rows, default every 4th), against the
   step's time.

Time is process CPU time (``time.process_time``) for the training budgets, as
``bench/quality.py --clock cpu``: this machine is shared with other work, and CPU time is what
a step cost. Step-overhead figures are medians of wall time per step (the prefetch thread's
point is overlap, which CPU time cannot show). All runs use one torch thread.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))

from _common import print_table, write_json  # noqa: E402
from lm import (  # noqa: E402
    VOCAB,
    ByteLM,
    LMConfig,
    build_model,
    evaluate,
    get_batch,
    load_splits,
    lr_at,
    val_windows,
)

import dpsn  # noqa: E402
from dpsn.tiers import ADJACENCY_REFRESH  # noqa: E402

TEXTS = ("pydoc", "code")
GENERATOR = {"kind": "hashed_slices", "memory_size": 1 << 16}


class NgramLM(nn.Module):
    """``ByteLM`` with ``memory(x, tokens)`` added to the residual stream after block 0."""

    def __init__(self, lm: ByteLM, memory: dpsn.NgramMemory | None) -> None:
        super().__init__()
        self.lm = lm
        self.memory = memory

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lm = self.lm
        x = lm.embed(tokens) + lm.pos[: tokens.shape[1]]
        for i, block in enumerate(lm.blocks):
            x = block(x)
            if i == 0 and self.memory is not None:
                x = x + self.memory(x, tokens)
        return lm.ln_f(x) @ lm.embed.weight.T


def make_model(
    cfg: LMConfig, store: Path | None, rows: int | None, *, mem_dim: int, row_lr: float
) -> NgramLM:
    lm = build_model(cfg, None)
    memory = None
    if rows is not None:
        assert store is not None
        tokens = cfg.batch * cfg.context
        pool = dpsn.create(
            store,
            rows=rows,
            dim=mem_dim,
            seed=cfg.seed + 17,
            generator=GENERATOR,
            cache_rows=max(1 << 16, 4 * tokens * 8),
        )
        pool.track_couse()
        memory = dpsn.NgramMemory(pool, cfg.d_model, orders=(2, 3), heads=4, row_lr=row_lr)
    return NgramLM(lm, memory)


def train(
    model: NgramLM,
    cfg: LMConfig,
    text: str,
    *,
    steps: int,
    seconds: float | None = None,
    eval_windows: int | None = None,
) -> dict[str, Any]:
    """Train ``steps`` steps or ``seconds`` of CPU time (the lr decays over that budget);
    validation and test bits/byte at the end."""
    splits = load_splits(text)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator()
    cpu = 0.0
    step = 0
    model.train()
    while step < steps and (seconds is None or cpu < seconds):
        g.manual_seed(cfg.seed * 1_000_003 + step)
        x, y = get_batch(splits.train, cfg.batch, cfg.context, g)
        c0 = time.process_time()
        progress = cpu / seconds if seconds else step / steps
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, progress)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        cpu += time.process_time() - c0
        step += 1
    out = {"steps": step, "cpu_seconds": cpu, "train_bpb": loss.item() / math.log(2)}
    out["val_bpb"] = evaluate(model, val_windows(splits.val, cfg.context, eval_windows), 8)
    out["test_bpb"] = evaluate(model, val_windows(splits.test, cfg.context, eval_windows), 8)
    if model.memory is not None:
        pool = model.memory.pool
        out["rows_touched"] = int(pool.staged_rows)
    return out


def quality(args: argparse.Namespace, cfg: LMConfig, tmp: Path) -> list[dict[str, Any]]:
    results = []
    for text in args.texts:
        base = train(make_model(cfg, None, None, mem_dim=0, row_lr=0), cfg, text, **_budget(args))
        base.update(text=text, model="baseline", rows=0, budget="steps")
        results.append(base)
        print(f"{text} baseline: {base}", flush=True)
        for rows in args.sizes:
            for budget in ("steps", "time"):
                store = tmp / f"{text}-{rows}-{budget}"
                model = make_model(cfg, store, rows, mem_dim=args.mem_dim, row_lr=args.row_lr)
                kw = _budget(args)
                if budget == "time":
                    kw["steps"] = 10 * args.steps
                    kw["seconds"] = base["cpu_seconds"]
                r = train(model, cfg, text, **kw)
                r.update(text=text, model="ngram", rows=rows, budget=budget)
                r["test_change"] = r["test_bpb"] / base["test_bpb"] - 1
                r["val_change"] = r["val_bpb"] / base["val_bpb"] - 1
                results.append(r)
                print(f"{text} ngram {rows} {budget}: {r}", flush=True)
                model.memory.pool.close()
                shutil.rmtree(store, ignore_errors=True)
                if args.tune:
                    break  # equal-time runs are for the report only
    return results


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "eval_windows": args.eval_windows}


def overhead(args: argparse.Namespace, cfg: LMConfig, tmp: Path) -> dict[str, Any]:
    """ms/step: rows cached vs rows read from disk through a small cache, with and without
    prefetch; and the co-use recording's ms/step."""
    from dpsn.pool import prefetching

    splits = load_splits("pydoc")
    rows = args.sizes[0]
    store = tmp / "overhead"
    model = make_model(cfg, store, rows, mem_dim=args.mem_dim, row_lr=args.row_lr)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    g = torch.Generator()
    n = args.overhead_steps

    def batches(offset: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i in range(n):
            g.manual_seed(offset + i)
            out.append(get_batch(splits.train, cfg.batch, cfg.context, g))
        return out

    cpu_ms: dict[str, float] = {}

    def run(seq: Any, name: str = "") -> list[float]:
        times = []
        c0 = 0.0
        for i, (x, y) in enumerate(seq):
            if i == 1:
                c0 = time.process_time()  # the first step warms up
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        # process CPU time per step, the helper thread's included (the whole cost)
        cpu_ms[name] = 1e3 * (time.process_time() - c0) / max(1, len(times) - 1)
        return times[1:]

    # write rows for every batch used below, then commit them to disk
    warm = batches(0)
    run(warm)
    memory = model.memory
    memory.pool.commit("trained")
    memory.pool.close()
    tokens = cfg.batch * cfg.context
    sizes = {
        "cached": max(1 << 16, 2 * n * tokens * memory.rows_per_token),  # all of them
        # ~1.5 steps' rows: each step's rows come from the persisted tier
        "disk": int(1.5 * tokens * memory.rows_per_token),
        "disk_prefetch": int(1.5 * tokens * memory.rows_per_token),
    }
    walls: dict[str, list[float]] = {m: [] for m in sizes}
    cpus: dict[str, list[float]] = {m: [] for m in sizes}
    for _ in range(args.rounds):  # modes interleaved: a loaded machine drifts between blocks
        for mode, cache_rows in sizes.items():
            pool = dpsn.open(store, mode="r+", cache_rows=cache_rows)
            pool.prefetch_partners_on_miss(args.miss_partners)
            memory.pool = memory.trainer.pool = pool
            pool.set_state_width(memory.row_optimizer.state_width(pool.dim))
            if mode == "cached":
                run(warm)  # page every row in first (not timed)
            seq = prefetching(warm, memory) if mode == "disk_prefetch" else warm
            walls[mode].append(1e3 * statistics.median(run(seq, mode)))
            cpus[mode].append(cpu_ms[mode])
            pool.discard()
            pool.close()
    out: dict[str, Any] = {"rounds": args.rounds}
    for mode in sizes:  # the least disturbed round of each
        out[f"{mode}_ms"] = min(walls[mode])
        out[f"{mode}_cpu_ms"] = min(cpus[mode])
        out[f"{mode}_ms_rounds"] = walls[mode]
        out[f"{mode}_cpu_ms_rounds"] = cpus[mode]
    for k in ("disk", "disk_prefetch"):
        out[f"{k}_overhead"] = out[f"{k}_ms"] / out["cached_ms"] - 1
        out[f"{k}_cpu_overhead"] = out[f"{k}_cpu_ms"] / out["cached_cpu_ms"] - 1
    # the co-use statistics: one step's groups recorded into a sketch that has seen the
    # earlier batches; best of the per-call CPU times (a loaded machine disturbs wall time)
    # A miss's partner prefetch (on by default with statistics) costs a CoUse.miss_partners of
    # the step's missed rows on the prefetch thread (all the step's rows here: the disk case),
    # its partner table rebuilt every ADJACENCY_REFRESH records: timed likewise, per step.
    sketch = dpsn.tiers.CoUse(1 << 18)
    rec, advice = [], []
    for x, _ in warm:
        all_ids = memory.ids(x)
        ids = all_ids.reshape(-1, memory.rows_per_token)[:: memory.couse_every]
        c0 = time.process_time()
        sketch.record(ids)
        rec.append(time.process_time() - c0)
        c0 = time.process_time()
        sketch.miss_partners(all_ids, 2, limit=sizes["disk"] // 8)
        advice.append(time.process_time() - c0)
    out["couse_record_cpu_ms"] = 1e3 * min(rec[1:])
    out["couse_record_cpu_ms_median"] = 1e3 * statistics.median(rec[1:])
    out["couse_share_of_cached_step"] = out["couse_record_cpu_ms_median"] / out["cached_cpu_ms"]
    out["couse_advice_cpu_ms_median"] = 1e3 * statistics.median(advice[1:])
    # the partner table's rebuild (a fresh copy of the sketch has none), amortized
    fresh = dpsn.tiers.CoUse.from_arrays(sketch.to_arrays())
    c0 = time.process_time()
    fresh.miss_partners(all_ids, 2, limit=sizes["disk"] // 8)
    out["couse_advice_rebuild_cpu_ms"] = 1e3 * (time.process_time() - c0)
    amortized = out["couse_advice_rebuild_cpu_ms"] / ADJACENCY_REFRESH
    out["couse_total_cpu_ms"] = (
        out["couse_record_cpu_ms_median"] + out["couse_advice_cpu_ms_median"] + amortized
    )
    out["couse_total_share_of_cached_step"] = out["couse_total_cpu_ms"] / out["cached_cpu_ms"]
    out["couse_total_share_of_disk_step"] = out["couse_total_cpu_ms"] / out["disk_cpu_ms"]
    out["steps_timed"] = n - 1
    shutil.rmtree(store, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true", help="validation only, equal steps only")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="memory pool rows")
    ap.add_argument("--texts", nargs="+", default=list(TEXTS), choices=TEXTS)
    ap.add_argument("--mem-dim", type=int, default=16, help="width of one memory row")
    ap.add_argument("--row-lr", type=float, default=0.05)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--overhead-steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the overhead")
    ap.add_argument(
        "--miss-partners",
        type=int,
        default=2,
        help="co-use partners a cache miss pages in during the overhead runs (0: off)",
    )
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.steps = args.steps or (300 if args.quick else 1500)
    args.sizes = args.sizes or ([10**5, 10**8] if args.quick else [10**5, 10**6, 10**8])
    args.eval_windows = args.eval_windows or (64 if args.quick else None)
    args.overhead_steps = args.overhead_steps or (12 if args.quick else 30)
    cfg = replace(LMConfig(), ffn="dense", d_ff=128)
    tmp = Path(tempfile.mkdtemp(prefix="dpsn-ngram-"))
    payload: dict[str, Any] = {"args": vars(args), "config": cfg.__dict__}
    try:
        if not args.skip_quality:
            results = quality(args, cfg, tmp)
            payload["quality"] = results
            col = "val_bpb" if args.tune else "test_bpb"
            print_table(
                f"{col} (dense-FFN byte LM of examples/lm.py; ngram = + NgramMemory)",
                ["text", "model", "rows", "budget", "steps", "cpu s", col, "vs baseline"],
                [
                    (
                        r["text"],
                        r["model"],
                        r["rows"],
                        r["budget"],
                        r["steps"],
                        r["cpu_seconds"],
                        r[col],
                        f"{100 * r.get(col.replace('bpb', 'change'), 0.0):+.1f}%",
                    )
                    for r in results
                ],
            )
        if not args.tune:
            o = overhead(args, cfg, tmp)
            payload["overhead"] = o
            print_table(
                "ms per training step, memory rows cached vs on disk (best round of the median "
                "wall ms, and of the mean process CPU ms, prefetch thread included)",
                ["rows in", "ms/step", "vs cached", "CPU ms/step", "vs cached"],
                [
                    ("device cache", o["cached_ms"], "-", o["cached_cpu_ms"], "-"),
                    (
                        "disk, no prefetch",
                        o["disk_ms"],
                        f"{100 * o['disk_overhead']:+.1f}%",
                        o["disk_cpu_ms"],
                        f"{100 * o['disk_cpu_overhead']:+.1f}%",
                    ),
                    (
                        "disk, prefetching()",
                        o["disk_prefetch_ms"],
                        f"{100 * o['disk_prefetch_overhead']:+.1f}%",
                        o["disk_prefetch_cpu_ms"],
                        f"{100 * o['disk_prefetch_cpu_overhead']:+.1f}%",
                    ),
                ],
            )
            print(
                f"\nco-use recording: {o['couse_record_cpu_ms_median']:.2f} CPU ms per step "
                f"(median; best {o['couse_record_cpu_ms']:.2f}), "
                f"{100 * o['couse_share_of_cached_step']:.1f}% of a cached step's CPU ms; "
                f"with a miss's partner lookup (all the step's rows missed): "
                f"+{o['couse_advice_cpu_ms_median']:.2f} ms and its table's rebuild "
                f"({o['couse_advice_rebuild_cpu_ms']:.1f} ms every {ADJACENCY_REFRESH} steps), "
                f"{o['couse_total_cpu_ms']:.2f} ms in all: "
                f"{100 * o['couse_total_share_of_disk_step']:.1f}% of a disk step's CPU ms "
                f"({100 * o['couse_total_share_of_cached_step']:.1f}% of a cached one's)"
            )
        write_json("ngram" + ("_tune" if args.tune else ""), payload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
