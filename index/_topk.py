"""Exact inner-product top-k over large key sets in bounded memory, and head merging.

This is the search kernel under every router: the sub-keys of product keys (up to 10**6 per half
at N = 10**12) and brute-force checks. It never materialises the full ``[M, n]`` score matrix:
keys are scored in chunks of at most ``max_elems`` scores, and each chunk is reduced with the
block-max trick (the top-k of a row lies in the k blocks whose maxima are largest), which is exact
and several times faster than ``torch.topk`` over the whole chunk on CPU.

Axes: G groups (heads), M queries, n keys, e key width, k results.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["merge_heads", "merge_topk", "sorted_pair_candidates", "topk_ip"]

_BLOCK = 32  # keys per block for the block-max reduction
_DEFAULT_MAX_ELEMS = 1 << 22  # scores alive at once per chunk (16 MiB of float32)
_CHUNK = 1 << 14


def merge_topk(vals: list[Tensor], idx: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the concatenation of several partial top-k lists along the last axis."""
    # one list needs no concatenation (a copy of every candidate)
    v = vals[0] if len(vals) == 1 else torch.cat(vals, dim=-1)
    i = idx[0] if len(idx) == 1 else torch.cat(idx, dim=-1)
    kk = min(k, v.shape[-1])
    top_v, pos = v.topk(kk, dim=-1)
    return top_v, i.gather(-1, pos)


def _chunk_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    # scores: [G, M, c] -> top-k values and positions within the chunk, exact.
    g, m, c = scores.shape
    nb = c // _BLOCK
    if nb * _BLOCK != c or nb <= 2 * k:
        return scores.topk(min(k, c), dim=-1)
    blocks = scores.view(g, m, nb, _BLOCK)
    _, bi = blocks.amax(dim=-1).topk(k, dim=-1)  # [G, M, k] best blocks
    cand = blocks.gather(2, bi[..., None].expand(g, m, k, _BLOCK)).reshape(g, m, k * _BLOCK)
    v, p = cand.topk(k, dim=-1)
    return v, bi.gather(-1, p // _BLOCK) * _BLOCK + p % _BLOCK


@torch.no_grad()
def topk_ip(
    q: Tensor,
    keys: Tensor,
    k: int,
    *,
    start: int = 0,
    stop: int | None = None,
    max_elems: int = _DEFAULT_MAX_ELEMS,
) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``q @ keys[start:stop].T`` per query, without gradients.

    ``q`` is ``[G, M, e]`` and ``keys`` ``[G, n, e]`` (one key set per group/head). Returns values
    and key indices (absolute, in ``[start, stop)``), each ``[G, M, min(k, stop - start)]``,
    sorted descending. At most about ``max(max_elems, G * 128 * k)`` scores are alive at once:
    keys are scored in chunks and, for large batches, queries in groups. Callers that need
    gradients recompute the selected scores (cheap, and it keeps autograd from holding the
    chunked score matrices).
    """
    g, m, _ = q.shape
    stop = keys.shape[1] if stop is None else stop
    n = stop - start
    kk = min(k, n)
    if kk <= 0 or m == 0:
        empty = q.new_empty(g, m, max(kk, 0))
        return empty, torch.empty(g, m, max(kk, 0), dtype=torch.int64, device=q.device)
    # key chunks of ~16k measured fastest on CPU (block-max prunes well, scores stay in cache)
    chunk = min(max(_BLOCK * 4 * kk, _CHUNK), -(-n // _BLOCK) * _BLOCK)
    rows = max(1, max_elems // (g * chunk))  # queries per pass that fit max_elems
    if m > rows:  # many queries: split them so the scores alive stay near max_elems
        parts = [
            topk_ip(q[:, s : s + rows], keys, k, start=start, stop=stop, max_elems=max_elems)
            for s in range(0, m, rows)
        ]
        return torch.cat([v for v, _ in parts], dim=1), torch.cat([i for _, i in parts], dim=1)
    chunk = max(chunk, (max_elems // (g * m)) // _BLOCK * _BLOCK)
    vals: list[Tensor] = []
    idx: list[Tensor] = []
    for s in range(start, stop, chunk):
        e = min(s + chunk, stop)
        scores = torch.bmm(q, keys[:, s:e].transpose(1, 2))  # [G, M, c]
        v, i = _chunk_topk(scores, kk)
        vals.append(v)
        idx.append(i + s)
        if len(vals) > 8:  # keep the running list short
            v, i = merge_topk(vals, idx, kk)
            vals, idx = [v], [i]
    return merge_topk(vals, idx, kk)


def sorted_pair_candidates(n1: int, n2: int, k: int, device: torch.device) -> Tensor:
    """Flat positions ``i * n2 + j`` of the pairs that can be in the top-k of
    ``a[i] + b[j]`` when ``a`` (n1) and ``b`` (n2) are each sorted descending.

    Pair (i, j) is beaten or tied by every pair (i', j') with i' <= i and j' <= j, so it can rank
    among the first k only if (i + 1) * (j + 1) <= k: about k * ln(k) pairs instead of n1 * n2
    (119 of 1,024 at k = 32), with the same top-k values (rows whose sums tie exactly, which
    float32 sums do now and then, may come out in another order than from all n1 * n2).
    """
    i = torch.arange(min(n1, k), device=device)
    reach = torch.clamp(k // (i + 1), max=n2)  # how many j each i may pair with
    rows = torch.repeat_interleave(i, reach)
    starts = torch.cumsum(reach, 0) - reach
    cols = torch.arange(len(rows), device=device) - torch.repeat_interleave(starts, reach)
    return rows * n2 + cols


@torch.no_grad()
def merge_heads(ids: Tensor, scores: Tensor, k: int) -> Tensor:
    """Positions of the top-k distinct ids among ``ids [T, P]`` ranked by ``scores [T, P]``.

    Several heads may pick the same row; it is kept once, with its best score (so the result is
    the exact top-k of ``max_h score_h(row)`` when each head contributed its own exact top-k).
    Returns ``[T, min(k, P)]`` positions into the P axis, best first.
    """
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ids_o = ids.gather(-1, order)
    by_id = ids_o.argsort(dim=-1, stable=True)  # equal ids stay in score order
    ids_s = ids_o.gather(-1, by_id)
    dup = torch.zeros_like(ids_s, dtype=torch.bool)
    dup[:, 1:] = ids_s[:, 1:] == ids_s[:, :-1]
    masked = scores.gather(-1, order).gather(-1, by_id).masked_fill(dup, float("-inf"))
    _, pos = masked.topk(min(k, masked.shape[-1]), dim=-1)
    return order.gather(-1, by_id.gather(-1, pos))
