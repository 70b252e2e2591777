"""How ``tests/data/format1`` was made (kept for the record; the tests never run this).

A tiny store of on-disk format 1, written by dpsn 0.1.0 at commit ec2c6be, checked in so that
every later dpsn is tested against real bytes of the first format: two pools (float32 with a
row optimizer's state column and a saved router; bfloat16), a drop, a snapshot, and the bits a
reader must get back (``expected.json``: row values as float32 hex bit patterns).

    python tests/data/make_format1_store.py    # rewrites tests/data/format1/
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import dpsn
from dpsn.index import ProductKeyRouter

HERE = Path(__file__).resolve().parent / "format1"
IDS = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 999]


def bits(t: torch.Tensor) -> list[str]:
    return [f"{v:08x}" for v in t.float().contiguous().view(torch.int32).reshape(-1).tolist()]


def make(name: str, dtype: str) -> dict:
    path = HERE / name
    g = torch.Generator().manual_seed(1)
    pool = dpsn.create(
        path,
        rows=1000,
        dim=8,
        seed=3,
        dtype=dtype,
        chunk_rows=4,
        generator={"kind": "hashed_slices", "memory_size": 64, "slice_size": 4},
        cache_rows=0,
    )
    if dtype == "float32":
        pool.enable_row_state(3)
    pool.write([1, 2, 3, 5, 8, 13], torch.randn(6, 8, generator=g))
    pool.commit("first")
    pool.snapshot("v1")
    at_v1 = pool.read(IDS)
    pool.write([2, 21, 987], torch.randn(3, 8, generator=g), add=True)
    pool.drop([13])
    if dtype == "float32":
        pool.save_router("router", ProductKeyRouter(d_in=4, num_rows=1000, k=2, d_key=4))
    pool.commit("second")
    head = pool.read(IDS)
    delta = pool.delta(IDS)
    base = pool.base(IDS)
    persisted, commits = pool.info()["persisted_rows"], len(pool.log())
    pool.close()
    for stale in path.rglob("lock.mdb"):  # LMDB's reader table: runtime state, not data
        stale.unlink()
    return {
        "ids": IDS,
        "head_rows": bits(head),
        "head_deltas": bits(delta),
        "bases": bits(base),
        "v1_rows": bits(at_v1),
        "commits": commits,
        "persisted_rows": persisted,
    }


if __name__ == "__main__":
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir(parents=True)
    expected = {name: make(name, dt) for name, dt in (("f32", "float32"), ("bf16", "bfloat16"))}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
