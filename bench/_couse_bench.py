"""bench/cache.py's co-use part: what the co-activation statistics (``dpsn.tiers.CoUse``) buy
the row path, on a trace whose ids come in groups (the ``k`` ids of one token or bag).

The trace's first half feeds the statistics (each group recorded as one co-used set); the
second half is measured:

- hit rate of a ``DeviceCache`` (LRU) with and without co-use prefetch: after each batch, the
  ``partners`` most frequent partners of each row the batch missed are paged in too (their
  lookups are not counted as accesses; the extra rows read are reported);
- chunk reads per cold batch: every distinct id of the trace laid out in chunks of
  ``chunk_rows`` rows, in id order (how segments are written today) or in ``CoUse.placement``
  order (co-used rows grouped, at most a chunk per group); a cold batch reads each chunk its
  ids touch once.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

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
        _, more, _ = sketch.partners(torch.cat(missed), partners)
        more = torch.unique(more)[: capacity // 2]  # advice: never more than half the cache
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
    placed = layout[sketch.placement(layout, max_group=chunk_rows)]
    place_s = time.perf_counter() - t0
    by_id = _chunk_reads(test, batch, layout, chunk_rows)
    by_couse = _chunk_reads(test, batch, placed, chunk_rows)
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
    }
