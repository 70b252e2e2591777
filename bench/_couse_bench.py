"""bench/cache.py's co-use part: what the co-activation statistics (``dpsn.tiers.CoUse``) buy
the row path, on a trace whose ids come in groups (the ``k`` ids of one token or bag).

The trace's first half feeds the statistics (each group recorded as one co-used set); the
second half is measured:

- hit rate of a ``DeviceCache`` (LRU) with and without co-use prefetch: after each batch, what
  ``CoUse.miss_partners`` gives for the rows the batch missed (the ``partners`` strongest
  partners of each, pairs seen twice or more, at most an eighth of the cache: what a pool's
  miss pages in, ``Pool.prefetch_partners_on_miss``) is paged in too (not counted as accesses;
  the extra rows read are reported);
- chunk reads per cold batch, rows in chunks of ``chunk_rows``, in id order (how commits write
  segments) or in ``CoUse.placement`` order (how a compaction given the statistics writes
  them, format 4), two ways: every distinct id of the trace laid out (rows the first half
  never used included: they have no pairs and keep id order), and only the rows a store
  trained on the first half holds (the others are procedural: no chunk to read), the latter
  measured on real stores: the rows written in one commit (id order), and that segment
  compacted with the placement; chunks counted from the store's row index.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dpsn
from dpsn.store import PersistedStore
from dpsn.tiers import Column, CoUse, DeviceCache


def _record(sketch: CoUse, ids: np.ndarray, group: int) -> None:
    g = ids[: len(ids) // group * group].reshape(-1, group)
    for s in range(0, len(g), 4096):
        sketch.record(torch.from_numpy(g[s : s + 4096]))


def _hit_rate(
    ids: np.ndarray, batch: int, capacity: int, sketch: CoUse | None, partners: int
) -> tuple[float, float]:
    """(hit rate, extra rows paged in per batch) of an LRU ``DeviceCache``."""
    cache = DeviceCache(capacity, [Column("x", 1, torch.float32, persisted=False)], device="cpu")
    trace = torch.from_numpy(ids)
    missed: list[torch.Tensor] = []

    def fill(missing: torch.Tensor, slots: torch.Tensor) -> None:
        missed.append(missing.clone())

    def evict(slots: torch.Tensor) -> None:
        raise AssertionError("no row was marked dirty")

    extra = 0
    batches = 0
    for s in range(0, len(ids), batch):
        missed.clear()
        cache.lookup(trace[s : s + batch], fill, evict)
        batches += 1
        if sketch is None or not missed:
            continue
        more = sketch.miss_partners(torch.cat(missed), partners, limit=max(1, capacity // 8))
        if len(more):
            saved = dict(cache.stats.total)
            n_before = len(missed)
            cache.lookup(more, fill, evict)
            extra += sum(len(m) for m in missed[n_before:])
            cache.stats.total = saved  # prefetch lookups are not accesses
    total = cache.stats.total
    return total["hits"] / (total["hits"] + total["misses"]), extra / max(1, batches)


def _chunk_reads(ids: np.ndarray, batch: int, order: np.ndarray, chunk_rows: int) -> float:
    """Mean distinct chunks per batch, rows laid out as ``order`` (sorted distinct ids in their
    layout order)."""
    sorted_ids = np.sort(order)
    position = np.empty(len(order), dtype=np.int64)
    position[np.searchsorted(sorted_ids, order)] = np.arange(len(order))
    chunk = position[np.searchsorted(sorted_ids, ids)] // chunk_rows
    b = np.arange(len(ids)) // batch
    pairs = np.unique(b * (chunk.max() + 1) + chunk)
    return len(pairs) / (b[-1] + 1)


def _store_chunk_reads(
    tmp: Path, held: np.ndarray, test: np.ndarray, batch: int, sketch: CoUse, chunk_rows: int
) -> tuple[float, float]:
    """Mean chunk reads per cold batch of ``test`` on a real store holding rows ``held``:
    (written by one commit in id order, after a compaction placed by ``sketch``)."""
    path = tmp / "store"
    rows = int(held.max()) + 1
    with dpsn.create(path, rows=rows, dim=4, chunk_rows=chunk_rows, cache_rows=0) as pool:
        pool.write(torch.from_numpy(held), torch.randn(len(held), 4))
        pool.commit("trained")
    out = []
    with PersistedStore.open(path, writable=True) as store:
        for placed in (False, True):
            head, index = store.load_head()
            if placed:
                seg = int(index.segments()[0])
                result = store.compact(index, head, segments=[seg], placement=sketch.placement)
                index = result.index
            keep = np.isin(test, held)
            b = np.arange(len(test))[keep] // batch
            _, seg, off, _ = index.lookup(test[keep])
            key = (b * (int(seg.max()) + 1) + seg) * (int(off.max()) // chunk_rows + 1)
            out.append(len(np.unique(key + off // chunk_rows)) / (len(test) // batch + 1))
    return out[0], out[1]


def couse_compare(
    name: str,
    ids: np.ndarray,
    *,
    group: int,
    batch: int,
    fraction: float,
    chunk_rows: int,
    partners: int = 2,
    slots: int = 1 << 18,
) -> dict[str, Any]:
    half = len(ids) // 2 // group * group
    train, test = ids[:half], ids[half:]
    sketch = CoUse(slots)
    t0 = time.perf_counter()
    _record(sketch, train, group)
    record_s = time.perf_counter() - t0
    distinct = len(np.unique(test))
    capacity = max(round(fraction * distinct), 2 * batch)
    base_hit, _ = _hit_rate(test, batch, capacity, None, partners)
    co_hit, extra = _hit_rate(test, batch, capacity, sketch, partners)
    layout = np.unique(ids)
    t0 = time.perf_counter()
    placed = layout[sketch.placement(layout)]
    place_s = time.perf_counter() - t0
    by_id = _chunk_reads(test, batch, layout, chunk_rows)
    by_couse = _chunk_reads(test, batch, placed, chunk_rows)
    held = np.unique(train)
    tmp = Path(tempfile.mkdtemp(prefix="dpsn-bench-couse-"))
    try:
        t0 = time.perf_counter()
        store_id, store_placed = _store_chunk_reads(tmp, held, test, batch, sketch, chunk_rows)
        store_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "trace": name,
        "accesses": len(ids),
        "group": group,
        "batch": batch,
        "capacity": capacity,
        "fraction": fraction,
        "pairs_held": len(sketch),
        "record_s": record_s,
        "record_us_per_group": 1e6 * record_s / (len(train) // group),
        "hit_rate": base_hit,
        "hit_rate_couse_prefetch": co_hit,
        "prefetched_rows_per_batch": extra,
        "chunk_rows": chunk_rows,
        "chunk_reads_per_cold_batch": by_id,
        "chunk_reads_per_cold_batch_placed": by_couse,
        "chunk_reads_change": by_couse / by_id - 1,
        "placement_s": place_s,
        "store_rows": len(held),
        "store_chunk_reads_per_cold_batch": store_id,
        "store_chunk_reads_per_cold_batch_placed": store_placed,
        "store_chunk_reads_change": store_placed / store_id - 1,
        "store_s": store_s,
    }
