"""Router benchmark: recall@k against exact top-k over the same keys, and queries/s.

For each pool size and router, "keys" are the per-row keys the router scores, materialised as
one dense ``[N, D]`` matrix (``Router.dense_keys``): for product keys the two sub-keys side by
side, for VQ/LSH the region part plus the local sub-keys. The baseline is exact brute force over
those keys (chunked matmul + block-max top-k, the same kernel the routers use), i.e. what a
dense key per row would cost. The keys are materialised one chunk of rows at a time and only the
scoring is timed, so memory stays at one chunk (a whole ``[10**7, 97]`` matrix would be ~4 GB).
The product-key router is also timed at N = 10**12, where brute force is out of reach (its
exactness is what the tests check).

Usage: ``python bench/routing.py [--quick]``. Prints a table, writes bench/results/routing.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dpsn.index import LSHRouter, ProductKeyRouter, Router, VQRouter, merge_topk, topk_ip
from dpsn.index.testing import mixture, recall

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json

ROUTERS = {"product_keys": ProductKeyRouter, "vq": VQRouter, "lsh": LSHRouter}


def build(kind: str, n: int, args: argparse.Namespace, **kw: Any) -> tuple[Router, float]:
    t0 = time.perf_counter()
    router = ROUTERS[kind](d_in=args.d, num_rows=n, k=args.k, d_key=args.d_key, **kw)
    if kind != "product_keys":
        router.fit(mixture(args.fit_samples, d=args.d, seed=1))  # type: ignore[attr-defined]
    router.eval()
    router.track_usage = False
    return router, time.perf_counter() - t0


@torch.no_grad()
def route_qps(router: Router, x: torch.Tensor, batch: int, repeats: int) -> float:
    """Queries/s, best of ``repeats`` passes (the machine may be shared: best is least noisy)."""
    router(x[:batch])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(0, x.shape[0], batch):
            router(x[s : s + batch])
        best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


@torch.no_grad()
def brute_force(
    router: Router, x: torch.Tensor, repeats: int, chunk: int = 1 << 20
) -> tuple[float, torch.Tensor]:
    """Exact top-k over every row's dense key: queries/s and the ids ``[T, k]``.

    Keys are built one chunk at a time (untimed: a dense-key router would hold them in memory);
    the scoring of each chunk is timed, best of ``repeats``, and the per-chunk times summed.
    """
    q = router.dense_queries(x)  # [T, H, D]
    if q.shape[1] != 1:
        raise SystemExit("the brute-force baseline scores one head; build routers with heads=1")
    q = q[:, 0][None]  # [1, T, D]
    k, total = router.k_max, 0.0
    vals: list[torch.Tensor] = []
    idx: list[torch.Tensor] = []
    for s in range(0, router.num_rows, chunk):
        keys = router.dense_keys(torch.arange(s, min(s + chunk, router.num_rows)))[None]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            v, i = topk_ip(q, keys, k)
            best = min(best, time.perf_counter() - t0)
        total += best
        vals.append(v[0])
        idx.append(i[0] + s)
        if len(vals) > 8:
            v0, i0 = merge_topk(vals, idx, k)
            vals, idx = [v0], [i0]
    _, ids = merge_topk(vals, idx, k)
    return x.shape[0] / total, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small pools, few queries (~30 s)")
    ap.add_argument("--sizes", type=int, nargs="*", help="pool sizes (default 1e5 1e6 1e7)")
    ap.add_argument("--d", type=int, default=64, help="input width")
    ap.add_argument("--d-key", type=int, default=32, help="product-key query width")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--queries", type=int, default=4096, help="queries timed per router")
    ap.add_argument("--exact-queries", type=int, default=256, help="queries brute-forced")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes; the best is kept")
    ap.add_argument("--fit-samples", type=int, default=20_000)
    ap.add_argument(
        "--out", type=Path, default=None, help="results directory (default ./bench-results)"
    )
    args = ap.parse_args()
    if args.quick:
        args.sizes = args.sizes or [10**4, 10**5]
        args.queries, args.exact_queries, args.fit_samples = 1024, 64, 5000
    sizes = args.sizes or [10**5, 10**6, 10**7]
    torch.manual_seed(0)
    xq = mixture(args.queries, d=args.d, seed=2)
    xe = xq[: args.exact_queries]
    rows: list[dict[str, Any]] = []
    hdr = (
        f"{'router':<13}{'N':>8}{'regions':>12}{'recall@k':>10}{'router q/s':>12}"
        f"{'brute q/s':>11}{'speedup':>9}{'build s':>9}"
    )
    print(f"d={args.d} d_key={args.d_key} k={args.k} threads={torch.get_num_threads()}")
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        for kind in ROUTERS:
            router, build_s = build(kind, n, args)
            qps = route_qps(router, xq, args.batch, args.repeats)
            with torch.no_grad():
                got = router(xe).ids
            bqps, want = brute_force(router, xe, 1 if n >= 10**7 else args.repeats)
            row = {
                "router": kind,
                "num_rows": n,
                "regions": getattr(router, "num_regions", None),
                "beam": getattr(router, "beam", None),
                "dense_key_width": router.dense_keys(torch.arange(1)).shape[1],
                "recall_at_k": recall(got, want),
                "router_qps": qps,
                "brute_force_qps": bqps,
                "speedup": qps / bqps,
                "build_s": build_s,
            }
            rows.append(row)
            print(
                f"{kind:<13}{n:>8.0e}{row['regions'] or '-':>12}{row['recall_at_k']:>10.4f}"
                f"{qps:>12.0f}{bqps:>11.1f}{qps / bqps:>8.0f}x{build_s:>9.2f}"
            )
    # the trillion-row pool: product keys with 10**6 sub-keys per half (no brute force)
    big = 10**12
    extra: list[dict[str, Any]] = []
    kinds = ["product_keys"] if args.quick else ["product_keys", "vq", "lsh"]
    for kind in kinds:
        router, build_s = build(kind, big, args)
        nq = 256 if kind == "product_keys" else args.queries
        qps = route_qps(router, xq[:nq], min(args.batch, nq), args.repeats)
        row = {
            "router": kind,
            "num_rows": big,
            "regions": getattr(router, "num_regions", None),
            "router_qps": qps,
            "build_s": build_s,
        }
        extra.append(row)
        print(
            f"{kind:<13}{big:>8.0e}{row['regions'] or '-':>12}{'n/a':>10}{qps:>12.0f}"
            f"{'n/a':>11}{'':>9}{build_s:>9.2f}"
        )
    # the budget: same routers, k between k/4 and k
    n = sizes[min(1, len(sizes) - 1)]
    budget_rows: list[dict[str, Any]] = []
    print(f"\nbudget k in [{args.k // 4}, {args.k}], calibrated on a sample, N={n:.0e}")
    print(f"{'router':<13}{'signal':>9}{'mean k':>8}{'saved':>8}{'used':>9}{'KL':>7}{'gini':>7}")
    for kind in ROUTERS:
        router, _ = build(kind, n, args, k_min=args.k // 4)
        if kind == "product_keys":  # VQ/LSH calibrate in fit; product keys have no fit
            router.calibrate_budget(mixture(args.fit_samples, d=args.d, seed=1))
        router.track_usage = True
        with torch.no_grad():
            for s in range(0, xq.shape[0], args.batch):
                router(xq[s : s + args.batch])
        use = router.usage()
        row = {"router": kind, "num_rows": n, "signal": router.budget.signal, **use}
        budget_rows.append(row)
        print(
            f"{kind:<13}{row['signal']:>9}{use['mean_k']:>8.1f}{use['compute_saved']:>8.2f}"
            f"{use['fraction_used']:>9.4f}{use['kl_uniform']:>7.2f}{use['gini']:>7.3f}"
        )
    result = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "recall_and_throughput": rows,
        "trillion_rows": extra,
        "budget": budget_rows,
    }
    write_json("routing", result, out=args.out)


if __name__ == "__main__":
    main()
