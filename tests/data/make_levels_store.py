"""How ``tests/data/levels1`` was made (kept for the record; the tests never run this).

A tiny levelled store (root format ``dpsn-levels`` version 1): two persisted levels and a
context level, deltas on both persisted levels, a consolidation that migrates rows from the
fast level to the slow one (caps off, one-step hand-off), a snapshot, and the bits a reader must
get back (``expected.json``: float32 bit patterns of the rows and of each level's deltas).

    python tests/data/make_levels_store.py    # rewrites tests/data/levels1/
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import dpsn

HERE = Path(__file__).resolve().parent / "levels1"
IDS = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 999]


def bits(t: torch.Tensor) -> list[str]:
    flat = t.float().contiguous().view(torch.int32).reshape(-1).tolist()
    return [f"{v & 0xFFFFFFFF:08x}" for v in flat]


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    pool = dpsn.create(
        HERE / "store",
        rows=1000,
        dim=4,
        seed=3,
        chunk_rows=4,
        generator={"kind": "hashed_slices", "memory_size": 64, "slice_size": 4},
        cache_rows=0,
        map_size=64 << 10,
        levels=["slow", "fast", dpsn.Level("context", persist=False)],
        model_id="levels1",
        config={"note": "tests/data/make_levels_store.py"},
        migration=dpsn.Migration(
            caps=None, stable_windows=1, tau_stable=-1.0, handoff=1, consolidate_every=0
        ),
    )
    pool.write([1, 2, 3], torch.randn(3, 4, generator=g), level="slow")
    pool.consolidate()  # the slow level's window is folded in
    pool.write([2, 5, 8, 13], torch.randn(4, 4, generator=g))
    pool.commit("first")
    pool.snapshot("v1")
    for _ in range(2):  # the same direction twice: stable, migrated at the second window
        pool.write([5, 8], torch.full((2, 4), 0.25), add=True)
        pool.consolidate()
    pool.commit("migrated")
    expected = {
        "levels": pool.levels,
        "head": pool.head,
        "provenance": pool.provenance,
        "ids": IDS,
        "rows": bits(pool.read(IDS)),
        "deltas": {n: bits(pool.delta(IDS, level=n)) for n in ("slow", "fast")},
        "migrations": pool.migrations(),
    }
    pool.close()
    for stale in HERE.rglob("lock.mdb"):  # LMDB's reader table: runtime state, not data
        stale.unlink()
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
