"""Embedding tables side by side: dpsn's PoolEmbeddingCollection against nn.EmbeddingBag with
sparse gradients and a sparse optimizer (and TorchRec's EmbeddingBagCollection with its fused
optimizer where torchrec is importable), on the same tables and the same batches.

    python bench/embedding.py             # full run (~10 min on 2 shared cores)
    python bench/embedding.py --quick     # smoke run (~1 min)
    python bench/embedding.py --torchrec-python /path/to/venv/bin/python   # adds TorchRec

Setting: ``--tables`` tables (default 4) of ``--dim`` (64) float32 columns, each sample a bag of
``--bag`` (10) ids per table, ``--batch`` (2048) samples a step, sum pooling, ids drawn
Zipf(1.05) over each table's rows (rank r maps to row ``r * 2654435761 % rows``, so the hot rows
are spread over the table), the same seeded batches for every peer. A step is forward, a loss
(the pooled embeddings against a fixed random projection), backward and the optimizer step:

- dense: one ``nn.EmbeddingBag(sparse=True)`` per table and ``torch.optim.Adagrad``, which
  takes sparse gradients (its state is element-wise, one dense tensor the size of the table);
- dpsn: ``PoolEmbeddingCollection.shared`` (every table an id range of one pool, one page-in and
  one fused row step a step), row-wise AdaGrad, a device cache of ``--cache-rows`` rows; rows
  never trained cost nothing, so the pool may be far larger than memory;
- TorchRec (optional): ``EmbeddingBagCollection`` fused with ``EXACT_ROWWISE_ADAGRAD`` through
  ``apply_optimizer_in_backward``, run by the Python of a separate environment that has
  torchrec and a fbgemm-gpu-cpu built for its torch.

Each (peer, size) runs in a fresh process: peak memory is that process's high-water RSS
(VmHWM), including ~220 MiB of Python and torch. Step time is the median of ``--steps`` timed
steps after ``--warmup``; in wall-clock time and in the process's CPU time (on a shared
machine the CPU time is the steadier one); rows/s counts looked-up ids (tables x batch x bag)
per second of CPU time. The dense peers run only where their table and optimizer state fit in
half of MemAvailable; beyond that dpsn runs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def batches(cfg: dict[str, Any]) -> list[list[tuple[Any, Any]]]:
    """``steps + warmup`` batches: per table, (ids ``[batch * bag]``, offsets ``[batch]``)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(cfg["seed"])
    out = []
    n = cfg["batch"] * cfg["bag"]
    offsets = torch.arange(0, n, cfg["bag"], dtype=torch.int64)
    for _ in range(cfg["steps"] + cfg["warmup"]):
        step = []
        for _ in range(cfg["tables"]):
            rank = rng.zipf(1.05, size=n).astype(np.uint64) % np.uint64(cfg["rows"])
            ids = (rank * np.uint64(2654435761)) % np.uint64(cfg["rows"])
            step.append((torch.from_numpy(ids.astype(np.int64)), offsets))
        out.append(step)
    return out


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_steps(cfg: dict[str, Any], step: Any) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    data = batches(cfg)
    proj = torch.randn(cfg["tables"], cfg["dim"])
    walls, cpus = [], []
    for i, batch in enumerate(data):
        w, c = time.perf_counter(), time.process_time()
        step(batch, proj)
        if i >= cfg["warmup"]:
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    ids = cfg["tables"] * cfg["batch"] * cfg["bag"]
    cpu = statistics.median(cpus)
    return {
        "step_wall_s": statistics.median(walls),
        "step_cpu_s": cpu,
        "rows_per_s": ids / cpu,
        "peak_rss": peak_rss(),
    }


def child_dense(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch import nn

    torch.set_num_threads(cfg["threads"])
    tables = [
        nn.EmbeddingBag(cfg["rows"], cfg["dim"], mode="sum", sparse=True)
        for _ in range(cfg["tables"])
    ]
    params = [p for t in tables for p in t.parameters()]
    opt = torch.optim.Adagrad(params, lr=cfg["lr"])

    def step(batch, proj):
        loss = sum(
            (t(ids, offs) @ proj[i]).square().mean()
            for i, (t, (ids, offs)) in enumerate(zip(tables, batch, strict=True))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    return run_steps(cfg, step)


def child_dpsn(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    import dpsn

    torch.set_num_threads(cfg["threads"])
    root = Path(tempfile.mkdtemp(prefix="dpsn-emb-"))
    try:
        pool = dpsn.create(
            root / "tables",
            rows=cfg["rows"] * cfg["tables"],
            dim=cfg["dim"],
            seed=0,
            cache_rows=cfg["cache_rows"],
        )
        names = [f"t{i}" for i in range(cfg["tables"])]
        coll = dpsn.PoolEmbeddingCollection.shared(
            pool, dict.fromkeys(names, cfg["rows"]), row_lr=cfg["lr"]
        )

        def step(batch, proj):
            feats = {
                n: {"values": ids, "lengths": torch.full((len(offs),), cfg["bag"])}
                for n, (ids, offs) in zip(names, batch, strict=True)
            }
            out = coll(feats)
            loss = sum((out[n] @ proj[i]).square().mean() for i, n in enumerate(names))
            loss.backward()

        result = run_steps(cfg, step)
        t = time.perf_counter()
        coll.commit("bench")
        result["commit_s"] = time.perf_counter() - t
        result["spilled_batches"] = pool.stats().get("spilled_batches")
        pool.close()
        result["on_disk"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def child_torchrec(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    torch.set_num_threads(cfg["threads"])
    names = [f"t{i}" for i in range(cfg["tables"])]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=n, embedding_dim=cfg["dim"], num_embeddings=cfg["rows"], feature_names=[n]
            )
            for n in names
        ]
    )
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": cfg["lr"]})

    def step(batch, proj):
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=names,
            values=torch.cat([ids for ids, _ in batch]),
            lengths=torch.full((cfg["tables"] * cfg["batch"],), cfg["bag"]),
        )
        out = ebc(kjt).to_dict()
        loss = sum((out[n] @ proj[i]).square().mean() for i, n in enumerate(names))
        loss.backward()

    return run_steps(cfg, step)


CHILDREN = {"dense": child_dense, "dpsn": child_dpsn, "torchrec": child_torchrec}


def spawn(peer: str, cfg: dict[str, Any], python: str) -> dict[str, Any]:
    """Run one (peer, size) in a fresh interpreter; its JSON result or an error line."""
    cmd = [python, str(Path(__file__).resolve()), "--child", peer, "--config", json.dumps(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two sizes, few steps (~1 min)")
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--bag", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30; quick 8)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-rows", type=int, default=1 << 18)
    ap.add_argument("--sizes", default=None, help="rows per table, e.g. 1e5,1e6,1e8,1e10")
    ap.add_argument("--torchrec-python", default=None, help="a Python with torchrec installed")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    from _common import add_out_argument

    add_out_argument(ap)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](json.loads(args.config))))
        return

    from _common import print_table, write_json

    quick = args.quick
    sizes = (
        [int(float(s)) for s in args.sizes.split(",")]
        if args.sizes
        else ([10**5, 10**9] if quick else [10**5, 10**6, 10**7, 10**9, 10**11])
    )
    base = {
        "tables": args.tables,
        "dim": args.dim,
        "bag": args.bag,
        "batch": args.batch,
        "steps": args.steps or (8 if quick else 30),
        "warmup": args.warmup if args.warmup is not None else (2 if quick else 5),
        "threads": args.threads,
        "cache_rows": args.cache_rows,
        "lr": 0.05,
        "seed": 0,
    }
    peers = ["dense", "dpsn"] + (["torchrec"] if args.torchrec_python else [])
    results, rows_out = [], []
    for rows in sizes:
        cfg = {**base, "rows": rows}
        # table + AdaGrad state + the sparse gradients' working copies
        dense_bytes = 2 * rows * args.dim * 4 * args.tables
        fits = dense_bytes < mem_available() / 2
        by_peer: dict[str, Any] = {}
        for peer in peers:
            if peer != "dpsn" and not fits:
                by_peer[peer] = {"skipped": f"needs {gib(dense_bytes)}"}
                continue
            python = args.torchrec_python if peer == "torchrec" else sys.executable
            by_peer[peer] = spawn(peer, cfg, python)
            print(f"rows {rows:.0e} {peer}: {by_peer[peer]}", flush=True)
        results.append({"rows_per_table": rows, "dense_bytes": dense_bytes, **by_peer})
        dense = by_peer.get("dense", {})
        for peer in peers:
            r = by_peer[peer]
            if "skipped" in r or "error" in r:
                rows_out.append(
                    [f"{rows:.0e}", peer, r.get("skipped") or r["error"][:60], "-", "-", "-", "-"]
                )
                continue
            ratio = (
                f"{r['rows_per_s'] / dense['rows_per_s']:.2f}x" if "rows_per_s" in dense else "-"
            )
            rows_out.append(
                [
                    f"{rows:.0e}",
                    peer,
                    f"{r['step_wall_s'] * 1e3:.1f} ms",
                    f"{r['step_cpu_s'] * 1e3:.1f} ms",
                    f"{r['rows_per_s']:,.0f}",
                    ratio,
                    gib(r["peak_rss"]),
                ]
            )
    print_table(
        f"embedding tables ({args.tables} x dim {args.dim}, batch {args.batch} x bag {args.bag}, "
        f"{base['steps']} steps)",
        ["rows/table", "peer", "step (wall)", "step (CPU)", "ids/s (CPU)", "vs dense", "peak RSS"],
        rows_out,
    )
    write_json("embedding", {"config": base, "quick": quick, "results": results}, out=args.out)


if __name__ == "__main__":
    main()
