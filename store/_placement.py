"""Co-use placement: an order of rows that puts rows used together in the same segment chunks.

Why: a cold batch reads every chunk that holds one of its rows, whole (``chunk_rows`` rows of
each column). Rows written in id order scatter the rows of one token or bag over as many chunks
as it has rows; rows that fire together, written next to each other, share chunks, so the
same batch reads fewer of them. Compaction (``_compact.py``) writes a segment in this order
when it is given co-use statistics (format 4, "placed segments": docs/format.md).

The order is a hierarchical clustering of the co-use graph (rows as nodes, pair counts as edge
weights), read off as its leaf order, so that any run of ``chunk_rows`` consecutive rows is a
subtree (or a few) of tightly linked rows. It is built by rounds of heavy-edge matching, the
coarsening of multilevel graph partitioners (METIS: Karypis and Kumar 1998): each cluster
picks the neighbour it shares the most weight with, normalised by ``sqrt(size_a * size_b)``
(so that a large cluster does not swallow everything its rows touch), and mutual picks merge.
Each round is a few sorts over the edges (no loop per row or pair); rounds stop when no pair
merges, after at most ``max_rounds``.

This module knows nothing of where the pairs come from (``dpsn.tiers.CoUse.pairs``): plain
numpy arrays in, a permutation out (the store never imports torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dpsn.errors import InvalidArgumentError

from ._format import DB_META, FORMAT_PLACED, META_FORMAT, u64_key
from ._records import read_u64

__all__ = ["DEFAULT_MIN_WEIGHT", "Placement", "cluster_order", "place", "raise_format"]

# Pairs seen once are mostly chance (two rows of one batch): measured on bench/cache.py's router
# trace, ignoring them placed better (-31% chunk reads against -29%) and ran 4x faster.
DEFAULT_MIN_WEIGHT = 2.0


def cluster_order(
    ids: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    weight: np.ndarray,
    *,
    min_weight: float = DEFAULT_MIN_WEIGHT,
    max_rounds: int = 1024,
) -> np.ndarray:
    """A permutation of ``ids`` (1-D, distinct, any order) that puts rows joined by heavy
    pairs next to each other: ``ids[order]`` is the layout. ``(a[i], b[i], weight[i])`` are
    co-used pairs and how often (pairs naming a row outside ``ids``, or lighter than
    ``min_weight``, are ignored). Rows in no pair keep their id order among the clusters (each
    cluster sits where its smallest id would). Deterministic: the same input gives the same
    order."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 0:
        raise InvalidArgumentError(f"max_rounds must be a non-negative int, got {max_rounds!r}")
    n = len(ids)
    by_id = np.argsort(ids, kind="stable")
    sorted_ids = ids[by_id]
    if n > 1 and bool(np.any(sorted_ids[1:] == sorted_ids[:-1])):
        raise InvalidArgumentError("cluster_order: ids must be distinct")
    a = np.asarray(a, dtype=np.int64).reshape(-1)
    b = np.asarray(b, dtype=np.int64).reshape(-1)
    w = np.asarray(weight, dtype=np.float64).reshape(-1)
    if not len(a) == len(b) == len(w):
        raise InvalidArgumentError("cluster_order: a, b and weight must have one length")
    if n == 0 or len(a) == 0:
        return by_id
    # nodes are positions in sorted_ids; keep the pairs between two of them
    u = np.minimum(np.searchsorted(sorted_ids, a), n - 1)
    v = np.minimum(np.searchsorted(sorted_ids, b), n - 1)
    keep = (sorted_ids[u] == a) & (sorted_ids[v] == b) & (u != v) & (w >= min_weight)
    u, v, w = u[keep], v[keep], w[keep]
    if len(u) == 0:
        return by_id
    # Work on the m rows that have a pair (m <= 2 * pairs, whatever n is): each round costs
    # O(m + pairs), never O(n).
    node, uv = np.unique(np.concatenate([u, v]), return_inverse=True)
    m = len(node)
    u, v = uv[: len(u)], uv[len(u) :]
    label = np.arange(m)  # each row's cluster: its smallest member (order kept with ids)
    size = np.ones(m)
    offset = np.zeros(m, dtype=np.int64)  # each row's place in its cluster's leaf order
    for _ in range(max_rounds):
        lu, lv = label[u], label[v]
        cross = lu != lv
        if not cross.any():
            break
        u, v, w = u[cross], v[cross], w[cross]  # pairs inside a cluster are done with
        lo, hi = np.minimum(lu[cross], lv[cross]), np.maximum(lu[cross], lv[cross])
        # the weight between two clusters: every pair between their rows
        key, inv = np.unique(lo * m + hi, return_inverse=True)
        total = np.bincount(inv.reshape(-1), weights=w)
        lo, hi = key // m, key % m
        score = total / np.sqrt(size[lo] * size[hi])
        # each cluster's best neighbour (ties: the smaller label), both directions of each edge
        src = np.concatenate([lo, hi])
        dst = np.concatenate([hi, lo])
        pick = np.lexsort((dst, -np.concatenate([score, score]), src))
        src, dst = src[pick], dst[pick]
        first = np.ones(len(src), dtype=bool)
        first[1:] = src[1:] != src[:-1]
        best = np.full(m, -1, dtype=np.int64)
        best[src[first]] = dst[first]
        has = np.flatnonzero(best >= 0)
        mutual = has[best[best[has]] == has]
        if len(mutual) == 0:
            break
        # a mutual pair merges: the cluster of the larger label follows the other's rows
        gone = mutual[mutual > best[mutual]]
        kept = best[gone]
        shift = np.zeros(m, dtype=np.int64)
        shift[gone] = size[kept].astype(np.int64)
        offset += shift[label]
        merged = np.arange(m)
        merged[gone] = kept
        size = np.bincount(merged, weights=size, minlength=m)
        label = merged[label]
    # every row by (where its cluster sits: its smallest row, or itself; place inside it)
    where = np.arange(n)
    where[node] = node[label]
    inside = np.zeros(n, dtype=np.int64)
    inside[node] = offset
    return by_id[np.lexsort((inside, where))]


# Given a new segment's sorted ids, the order to write them in (a permutation of 0..n-1).
Placement = Callable[[np.ndarray], np.ndarray]


def place(ids: np.ndarray, placement: Placement | None) -> np.ndarray | None:
    """The permutation ``placement`` gives sorted ``ids``, checked (a caller's function is
    untrusted: a wrong answer would point rows at other rows' deltas), or None where there is
    nothing to place or the order is the id order (the segment is then an ordinary one)."""
    if placement is None or len(ids) < 2:
        return None
    perm = np.asarray(placement(ids))
    n = len(ids)
    if (
        perm.shape != (n,)
        or perm.dtype.kind not in "iu"
        or not np.array_equal(np.sort(perm), np.arange(n))
    ):
        raise InvalidArgumentError(
            f"a compaction's placement must return a permutation of 0..{n - 1} for the {n} "
            f"rows it is given, got an array of shape {perm.shape} and dtype {perm.dtype}"
        )
    perm = perm.astype(np.int64)
    if bool(np.all(perm[1:] > perm[:-1])):
        return None
    return perm


def raise_format(txn: Any, meta_db: Any, writer: Any) -> None:
    """Inside the compaction's LMDB transaction: the index says format 4 (placed segments)
    from now on, so that a dpsn that reads only sorted segments refuses the store instead of
    misreading it."""
    version = read_u64(txn.get(META_FORMAT, db=meta_db), "format version")
    if version < FORMAT_PLACED:
        writer.put(DB_META, META_FORMAT, u64_key(FORMAT_PLACED))
