"""Sharded PoolEmbedding over gloo on one machine: rows/s, step time and bytes moved per step
for 1, 2 and 4 ranks, weak scaling (batch and id space grow with the ranks) and strong scaling
(one global batch split over the ranks); reads of a store published to a bucket (moto's S3
server on localhost, when moto and s3fs are installed) cold and warm through the disk cache
against the local store; and a model on paper for many hosts from the measured per-rank costs.

    python bench/distributed.py            # 1, 2, 4 ranks, 30 timed steps each
    python bench/distributed.py --quick    # 1, 2 ranks, 8 steps
    python bench/distributed.py --quick --remote-only   # only the reads from a bucket

Every rank is a forked process on this machine and talks over loopback: on a machine with
fewer cores than ranks the ranks share cores, so the scaling figures measure that machine's
limit as much as dpsn's; the table prints the core count beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import print_table, write_json

DIM = 64
ID_SPACE = 20_000  # ids per rank (weak scaling) or in all (strong scaling)
GEN = {"kind": "hashed_slices", "memory_size": 1 << 16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str, cfg: dict[str, Any]) -> None:
    import dpsn
    import dpsn.distributed as dd

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    bags, per_bag, space = cfg["bags"], cfg["per_bag"], cfg["id_space"]
    if cfg.get("independent"):  # the machine's limit: W unsharded pools at once, no exchange
        pool = dpsn.create(
            Path(out) / f"solo{rank}", 10**12, DIM, generator=GEN, cache_rows=cfg["cache_rows"]
        )
        pool.traffic = {"bytes_sent": 0, "exchanges": 0, "seconds": 0.0}
    else:
        pool = dd.create(
            Path(out) / "root", 10**12, DIM, generator=GEN, cache_rows=cfg["cache_rows"]
        )
    emb = dpsn.PoolEmbedding(pool, mode="sum", row_optimizer="adagrad")
    g = torch.Generator().manual_seed(rank)
    target = torch.randn(bags, DIM, generator=g)
    times = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        ids = torch.randint(0, space, (bags, per_bag), generator=g)
        torch.distributed.barrier()
        if step == cfg["warmup"]:
            pool.traffic.update(bytes_sent=0, exchanges=0, seconds=0.0)
        t = time.perf_counter()
        (emb(ids) * target).sum().backward()
        times.append(time.perf_counter() - t)
    timed = times[cfg["warmup"] :]
    t = time.perf_counter()
    pool.commit("bench")
    commit_s = time.perf_counter() - t
    result = {
        "step_s": sorted(timed)[len(timed) // 2],
        "ids_per_step": bags * per_bag,
        "bytes_sent_per_step": pool.traffic["bytes_sent"] / cfg["steps"],
        "exchange_s": pool.traffic["seconds"] / cfg["steps"],
        "commit_s": commit_s,
    }
    pool.close()
    torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run(world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, world, port, out, cfg)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    step = max(r["step_s"] for r in ranks)  # a step ends when its slowest rank does
    ids = sum(r["ids_per_step"] for r in ranks)
    return {
        "ranks": world,
        "step_ms": step * 1e3,
        "rows_per_s": ids / step,
        "ids_per_step": ids,
        "bytes_sent_per_rank_step": sum(r["bytes_sent_per_step"] for r in ranks) / world,
        "exchange_ms": max(r["exchange_s"] for r in ranks) * 1e3,
        "commit_ms": max(r["commit_s"] for r in ranks) * 1e3,
    }


def remote_reads(rows: int, repeat: int = 3) -> dict[str, Any]:
    """Read every persisted row of a store locally, then from a bucket (moto's S3 server on
    localhost, started here) cold (an empty disk cache: the download is timed) and warm; and
    the server's own throughput (every object fetched raw). None without moto and s3fs."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        return {}
    import logging

    import dpsn
    from dpsn.store import remote

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    try:
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("bench", region_name="eu-west-1")
        ids = torch.arange(rows)
        with tempfile.TemporaryDirectory() as tmp:
            with dpsn.create(Path(tmp) / "s", 10**9, DIM, generator=GEN) as pool:
                g = torch.Generator().manual_seed(0)
                pool.write(ids, torch.randn(rows, DIM, generator=g))
                pool.commit()
                pool.publish("s3://bench/pool", opts)
                path = pool.path

            def read(where: Any, **kw: Any) -> tuple[float, float]:
                """(open s, read s) of one open and a read of every row."""
                t0 = time.perf_counter()
                with dpsn.open(where, cache_rows=0, **kw) as p:
                    t1 = time.perf_counter()
                    p.read(ids)
                    return t1 - t0, time.perf_counter() - t1

            def from_bucket(c: Path) -> tuple[float, float]:
                return read("s3://bench/pool", storage_options=opts, cache_dir=c)

            out: dict[str, Any] = {"rows": rows}
            colds, warms, locals_ = [], [], []
            for i in range(repeat):
                cache = Path(tmp) / f"cache{i}"
                colds.append(sum(from_bucket(cache)))
            # local and warm alternate, so that the machine's load falls on both alike
            for _ in range(repeat):
                for i in range(repeat):
                    locals_.append(read(path))
                    warms.append(from_bucket(Path(tmp) / f"cache{i}"))
            out["local_s"] = min(map(sum, locals_))
            out["local_open_s"] = min(o for o, _ in locals_)
            out["local_read_s"] = min(r for _, r in locals_)
            out["warm_open_s"] = min(o for o, _ in warms)
            out["warm_read_s"] = min(r for _, r in warms)
            warms = [sum(w) for w in warms]
            out["cold_s"], out["warm_s"] = min(colds), min(warms)
            # a sparse read (0.1% of the rows, random): the chunk cache fetches only their chunks
            few = torch.randperm(rows, generator=torch.Generator().manual_seed(1))[: rows // 1000]

            def read_few(where: Any, **kw: Any) -> dict[str, int] | None:
                with dpsn.open(where, cache_rows=0, **kw) as p:
                    p.read(few)
                    return remote.cache_counters(p.path)

            out["few_rows"] = len(few)
            out["few_local_s"] = min(_timed(lambda: read_few(path)) for _ in range(repeat))
            colds, warms, fetched = [], [], []
            for i in range(repeat):
                cache = Path(tmp) / f"few{i}"
                kw = {"storage_options": opts, "cache_dir": cache}
                t = time.perf_counter()
                counters = read_few("s3://bench/pool", **kw)
                colds.append(time.perf_counter() - t)
                fetched.append(counters["fetched_bytes"] if counters else 0)
                warms.append(_timed(lambda kw=kw: read_few("s3://bench/pool", **kw)))
            out["few_cold_s"], out["few_warm_s"] = min(colds), min(warms)
            out["few_fetched_bytes"] = min(fetched)
            objs = fs.find("bench/pool/objects")
            nbytes = sum(fs.size(o) for o in objs)
            out["bucket_bytes"] = nbytes
            out["server_mb_s"] = (
                nbytes
                / 1e6
                / min(_timed(lambda: [fs.cat_file(o) for o in objs]) for _ in range(repeat))
            )
            return out
    finally:
        server.stop()


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def paper_model(
    one: dict[str, Any],
    two: dict[str, Any],
    *,
    hosts: int,
    gbps: float,
    latency_s: float,
    batch_ids: int,
    rows: float,
    learned: float,
) -> dict[str, Any]:
    """Step time and memory per host at ``hosts`` hosts from measured per-rank costs.

    compute: one rank's measured step time per id less its time in the (1-rank, local)
    all-to-alls, times the ids a host looks up; network: the bytes per id the 2-rank run moved
    to the other rank, scaled by (H-1)/H (a hashed id leaves its host with that chance),
    over ``gbps``, plus three all-to-alls' latency; memory: the learned rows (``learned`` of
    ``rows``) spread over the hosts, delta + optimizer state + index entry each."""
    per_id_compute = (one["step_ms"] - one["exchange_ms"]) / 1e3 / one["ids_per_step"]
    # the 2-rank run sends half its distinct ids away; bytes per id that leaves its host:
    per_id_bytes = two["bytes_sent_per_rank_step"] / (two["ids_per_step"] / 2) / 0.5
    leave = (hosts - 1) / hosts
    compute = per_id_compute * batch_ids
    network = batch_ids * leave * per_id_bytes / (gbps * 1e9 / 8) + 3 * latency_s * hosts
    learned_rows = rows * learned / hosts
    row_bytes = DIM * 4 + 4 + 24  # f32 delta, adagrad state, LMDB entry (id, segment, offset)
    return {
        "hosts": hosts,
        "rows": rows,
        "batch_ids_per_host": batch_ids,
        "compute_ms": compute * 1e3,
        "network_ms": network * 1e3,
        "step_ms": (compute + network) * 1e3,
        "learned_rows_per_host": learned_rows,
        "disk_gb_per_host": learned_rows * row_bytes / 1e9,
        "bytes_per_remote_id": per_id_bytes,
    }


def _print_remote(r: dict[str, Any]) -> None:
    if not r:
        return
    print_table(
        f"remote reads: {r['rows']} rows of dim {DIM} (open + read all), moto S3 on localhost",
        ["local s", "cold s", "warm s", "warm / local", "bucket MB", "server MB/s"],
        [
            [
                r["local_s"],
                r["cold_s"],
                r["warm_s"],
                r["local_s"] / r["warm_s"],
                r["bucket_bytes"] / 1e6,
                r["server_mb_s"],
            ]
        ],
    )
    print_table(
        "the same, open and read apart (best of the alternated local and warm runs)",
        ["local open s", "warm open s", "local read s", "warm read s", "read: warm / local"],
        [
            [
                r["local_open_s"],
                r["warm_open_s"],
                r["local_read_s"],
                r["warm_read_s"],
                r["local_read_s"] / r["warm_read_s"],
            ]
        ],
    )
    print_table(
        f"remote reads: {r['few_rows']} random rows of {r['rows']} (open + read), chunk cache",
        ["local s", "cold s", "warm s", "warm / local", "fetched MB", "of bucket"],
        [
            [
                r["few_local_s"],
                r["few_cold_s"],
                r["few_warm_s"],
                r["few_local_s"] / r["few_warm_s"],
                r["few_fetched_bytes"] / 1e6,
                r["few_fetched_bytes"] / r["bucket_bytes"],
            ]
        ],
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 2 ranks, few steps")
    ap.add_argument("--bags", type=int, default=256, help="bags per rank (weak scaling)")
    ap.add_argument("--gbps", type=float, default=100.0, help="network bandwidth of the model")
    ap.add_argument(
        "--remote-only", action="store_true", help="only the reads from a bucket (no ranks)"
    )
    args = ap.parse_args(argv)
    if args.remote_only:
        remote = remote_reads(20_000 if args.quick else 200_000)
        _print_remote(remote)
        write_json("distributed_remote", {"remote": remote, "args": vars(args)})
        return
    worlds = [1, 2] if args.quick else [1, 2, 4]
    steps, warmup = (8, 6) if args.quick else (30, 12)
    # Every rank's cache holds its whole share of the id space, whatever the rank count, and
    # the warm-up steps touch most ids once: the table compares warm steps, not the aggregate
    # cache growing with the ranks (which made 2 ranks look 2.6x faster than 1 in a first run).
    base = {"per_bag": 16, "steps": steps, "warmup": warmup, "cache_rows": 1 << 15}
    weak, strong, limit = [], [], []
    for w in worlds:
        # the same per-process work as weak scaling's, in W independent processes at once
        limit.append(run(w, base | {"bags": args.bags, "id_space": ID_SPACE, "independent": 1}))
        weak.append(run(w, base | {"bags": args.bags, "id_space": ID_SPACE * w}))
        strong.append(run(w, base | {"bags": args.bags * max(worlds) // w, "id_space": ID_SPACE}))
    cores = os.cpu_count()
    headers = [
        "ranks",
        "step ms",
        "in all-to-alls ms",
        "rows/s",
        "ids/step",
        "bytes sent/rank/step",
        "commit ms",
    ]
    keys = [
        "ranks",
        "step_ms",
        "exchange_ms",
        "rows_per_s",
        "ids_per_step",
        "bytes_sent_per_rank_step",
        "commit_ms",
    ]
    for name, res in (
        ("machine limit (W unsharded pools at once, no exchange)", limit),
        ("weak", weak),
        ("strong", strong),
    ):
        base_rate = res[0]["rows_per_s"]
        rows = [[r[k] for k in keys] for r in res]
        print_table(
            f"{name} scaling, PoolEmbedding dim {DIM}, gloo loopback, {cores} cores", headers, rows
        )
        for r in res[1:]:
            eff = r["rows_per_s"] / (r["ranks"] * base_rate)
            print(f"  {r['ranks']} ranks: {eff:.2f}x of {r['ranks']} x one rank's rows/s")
    remote = remote_reads(20_000 if args.quick else 200_000)
    _print_remote(remote)
    model = paper_model(
        weak[0],
        weak[1],
        hosts=64,
        gbps=args.gbps,
        latency_s=20e-6,
        batch_ids=65_536,
        rows=1e12,
        learned=1e-3,
    )
    print_table(
        f"paper model: 64 hosts, 10^12 rows (0.1% learned), {args.gbps:g} Gb/s, 20 us latency",
        list(model),
        [list(model.values())],
    )
    write_json(
        "distributed",
        {
            "remote": remote,
            "cores": cores,
            "weak": weak,
            "limit": limit,
            "strong": strong,
            "model": model,
            "args": vars(args),
        },
    )


if __name__ == "__main__":
    main()
