"""What the row lifecycle costs: training steps with and without it, and one consolidation.

    python bench/lifecycle.py           # full run (~5 min on 2 cores)
    python bench/lifecycle.py --quick   # smoke run (< 1 min)

1. Training slowdown from the usage statistics (aim: < 10%). Two identical models are built
   in the same run, one on a pool with ``dpsn.Lifecycle()`` and one without, and trained in
   alternating blocks of steps so that both see the same machine load; the table compares the
   median step time. Both commit every 50 steps (untimed; the lifecycle pool's commits do not
   consolidate here). Consolidation is not part of a step (it runs at commits); its cost per
   step at one consolidation every 100 steps is shown beside it.
   - ``layer``: a PoolLayer step (the executor of bench/quality.py): 512 tokens, k = 16 rows of
     a 10**6-row pool (d_in = d_out = 64), product-key router, row-wise AdaGrad, forward and
     backward (the rows train inside it).
   - ``embedding``: a PoolEmbedding step: 2048 bags of 8 ids from a 10**7-row pool (dim 64),
     ids drawn Zipf-like (a few hot rows, a long tail), AdaGrad.
   These two read and write the store (cache misses, evictions, commits), and the lifecycle
   changes that traffic: its warm-up keeps rows used once or twice in memory instead of
   committing them, so later misses read fewer of them back from disk. So two more pairs
   isolate what the statistics cost a step itself:
   - ``layer, all cached`` and ``embedding, all cached``: the same steps on pools small
     enough to stay in the cache (2**15 and 10**5 rows, ``cache_rows`` = rows): no disk
     traffic, only the row path and its statistics.
2. Consolidation cost at 10**5 and 10**6 rows with a delta (dim 16): the first consolidation
   (which loads every committed row's statistics into memory), a later one, and the commit that
   follows; plus the memory the statistics take (``UsageIndex``).

Threads: one by default (``--threads``), as in bench/quality.py. Step times are the CPU time of
the training thread (``time.thread_time``): on a small machine shared with other work, wall
time swung by +-30% between identical runs, CPU time by a few percent. The wall-clock ratio is
printed beside it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_out_argument, print_table, write_json

import dpsn
from dpsn.index import ProductKeyRouter

SMALL = {"kind": "hashed_slices", "memory_size": 1 << 16}


def layer_model(
    path: Path, lifecycle: dpsn.Lifecycle | None, rows: int = 10**6, cached: bool = False
) -> tuple[Any, Callable[[], None]]:
    d, k, tokens = 64, 16, 512
    pool = dpsn.create(
        path,
        rows=rows,
        dim=2 * d,
        seed=0,
        generator=SMALL,
        lifecycle=lifecycle,
        cache_rows=rows if cached else None,
    )
    torch.manual_seed(0)
    router = ProductKeyRouter(d_in=d, num_rows=rows, k=k, query_batchnorm=True, seed=0)
    layer = dpsn.PoolLayer(pool, d, d, router=router, k=k, row_optimizer="adagrad")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        x = torch.randn(tokens, d, generator=gen)
        loss = layer(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return pool, step


def embedding_model(
    path: Path, lifecycle: dpsn.Lifecycle | None, rows: int = 10**7, cached: bool = False
) -> tuple[Any, Callable[[], None]]:
    dim, bags, per_bag = 64, 2048, 8
    pool = dpsn.create(
        path,
        rows=rows,
        dim=dim,
        seed=0,
        generator=SMALL,
        lifecycle=lifecycle,
        cache_rows=rows if cached else None,
    )
    emb = dpsn.PoolEmbedding(pool, mode="mean", row_optimizer="adagrad")
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        # Zipf-like: ids = floor(rows ** u) - 1 for uniform u puts most mass on small ids
        u = torch.rand(bags * per_bag, generator=gen, dtype=torch.float64)
        ids = (torch.pow(float(rows), u).long() - 1).clamp_(0, rows - 1).reshape(bags, per_bag)
        emb(ids).pow(2).mean().backward()

    return pool, step


def cached_layer(path: Path, lifecycle: dpsn.Lifecycle | None) -> tuple[Any, Callable[[], None]]:
    return layer_model(path, lifecycle, rows=1 << 15, cached=True)


def cached_embedding(
    path: Path, lifecycle: dpsn.Lifecycle | None
) -> tuple[Any, Callable[[], None]]:
    return embedding_model(path, lifecycle, rows=10**5, cached=True)


def time_training(
    name: str, build: Callable, steps: int, block: int, tmp: Path, commit_blocks: int = 5
) -> dict[str, Any]:
    models = {
        "off": build(tmp / f"{name}-off", None),
        "on": build(tmp / f"{name}-on", dpsn.Lifecycle(consolidate_every=0)),
    }
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for _pool, step in models.values():  # warm up: caches filled, kernels loaded
        for _ in range(5):
            step()
    done = 0
    while done < steps:
        for key, (pool, step) in models.items():
            for _ in range(block):
                t, c = time.perf_counter(), time.thread_time()
                step()
                cpu[key].append(time.thread_time() - c)
                times[key].append(time.perf_counter() - t)
            if (done // block) % commit_blocks == commit_blocks - 1:
                pool.commit()  # not timed: staged rows stay bounded, as in real training
        done += block
    pool = models["on"][0]
    t = time.thread_time()
    report = pool.consolidate()
    consolidation = time.thread_time() - t
    t = time.thread_time()
    pool.consolidate()
    consolidation_again = time.thread_time() - t
    out = {
        "steps_each": len(times["on"]),
        "step_ms_off": 1e3 * statistics.median(cpu["off"]),
        "step_ms_on": 1e3 * statistics.median(cpu["on"]),
        "wall_ms_off": 1e3 * statistics.median(times["off"]),
        "wall_ms_on": 1e3 * statistics.median(times["on"]),
        "consolidation_s": consolidation,
        "consolidation_again_s": consolidation_again,
        "rows_with_delta": report["rows"],
        "screened": report["screened"],
    }
    out["slowdown"] = out["step_ms_on"] / out["step_ms_off"] - 1
    out["wall_slowdown"] = out["wall_ms_on"] / out["wall_ms_off"] - 1
    per_step = 1e3 * consolidation_again / 100
    out["slowdown_with_consolidation_every_100"] = (out["step_ms_on"] + per_step) / out[
        "step_ms_off"
    ] - 1
    for p, _ in models.values():
        p.close()
    return out


def time_consolidation(n: int, tmp: Path) -> dict[str, Any]:
    dim, batch = 16, 1 << 17
    path = tmp / f"consolidate-{n}"
    pool = dpsn.create(
        path,
        rows=10**9,
        dim=dim,
        seed=0,
        generator=SMALL,
        cache_rows=1 << 15,
        lifecycle=dpsn.Lifecycle(consolidate_every=0),
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.unique(torch.randint(0, 10**9, (int(n * 1.01),), generator=gen))[:n]
    t = time.perf_counter()
    for a in range(0, n, batch):
        part = ids[a : a + batch]
        pool.write(part, torch.randn(len(part), dim, generator=gen))
        pool.commit()
    build = time.perf_counter() - t
    pool.close()
    pool = dpsn.open(path, "r+", cache_rows=1 << 15)
    hot = ids[:10_000]
    for _ in range(20):  # some rows cached and used: screened, dirty
        with pool.page_in(hot[torch.randperm(len(hot), generator=gen)[:4096]]) as b:
            b.apply_grads(torch.zeros(len(b), dim), dpsn.pool.RowSGD(lr=0.1))
    t = time.perf_counter()
    first = pool.consolidate()
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    pool.consolidate()
    again_s = time.perf_counter() - t
    t = time.perf_counter()
    c = pool.commit()
    commit_s = time.perf_counter() - t
    mirror = pool._stack.usage_index
    out = {
        "rows": n,
        "build_s": build,
        "first_consolidation_s": first_s,
        "consolidation_s": again_s,
        "rows_per_s": n / again_s,
        "commit_after_s": commit_s,
        "commit_rows_written": c.rows_written,
        "screened": first["screened"],
        "statistics_in_memory_bytes": mirror.nbytes() if mirror is not None else 0,
    }
    pool.close()
    shutil.rmtree(path, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only (no JSON)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, block = (30, 5) if args.quick else (300, 10)
    sizes = [10**4, 10**5] if args.quick else [10**5, 10**6]
    tmp = Path(tempfile.mkdtemp(prefix="dpsn-lifecycle-"))
    try:
        training = {
            "layer": time_training("layer", layer_model, steps, block, tmp),
            "embedding": time_training("embedding", embedding_model, steps, block, tmp),
            "layer, all cached": time_training("layer-cached", cached_layer, steps, block, tmp),
            "embedding, all cached": time_training(
                "embedding-cached", cached_embedding, steps, block, tmp
            ),
        }
        consolidation = [time_consolidation(n, tmp) for n in sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(
        "training step, median CPU ms of the training thread (same run, alternating blocks)",
        [
            "model",
            "steps",
            "no lifecycle",
            "lifecycle",
            "slowdown",
            "+ consolidation/100 steps",
            "wall-clock slowdown",
        ],
        [
            [
                k,
                v["steps_each"],
                v["step_ms_off"],
                v["step_ms_on"],
                f"{v['slowdown']:+.1%}",
                f"{v['slowdown_with_consolidation_every_100']:+.1%}",
                f"{v['wall_slowdown']:+.1%}",
            ]
            for k, v in training.items()
        ],
    )
    print_table(
        "consolidation (dim 16; rows with a delta, 10k of them cached and in use)",
        ["rows", "first (loads stats) s", "later s", "rows/s", "commit after s", "stats MiB"],
        [
            [
                c["rows"],
                c["first_consolidation_s"],
                c["consolidation_s"],
                f"{c['rows_per_s']:,.0f}",
                c["commit_after_s"],
                c["statistics_in_memory_bytes"] / 2**20,
            ]
            for c in consolidation
        ],
    )
    result = {"training": training, "consolidation": consolidation, "quick": args.quick}
    if not args.no_write:
        write_json("lifecycle", result, out=args.out)
    return result


if __name__ == "__main__":
    main()
