"""Merges: fold many stores' deltas into one target in one atomic commit (the design's
horizontal resonance).

Each source contributes its own persisted deltas (for an overlay: what it learned on top of its
base). Per row, over the sources that hold a delta for it (``c_s``, each ``[dim]``):

- ``"sum"``: ``sum_s c_s``;
- ``"mean"``: ``sum_s c_s / n`` (``n``: the sources holding the row);
- ``"resonance"``: with the consensus direction ``d = sum_s c_s / |sum_s c_s|`` and each
  contribution's alignment ``a_s = cos(c_s, d)``, the contribution is weighted by
  ``1 + alpha * a_s`` when aligned (``a_s >= 0``) and by ``1 + beta * |a_s|`` when opposing
  (``beta`` in ``[-1, 0]``: damped, ``-1`` cancels a fully opposing one). The consensus is the
  plain sum of all contributions, so the result does not depend on the sources' order.
  A row's *conflicts* are its opposing contributions.

The merged change is added to the target's rows (``write(add=True)``) and committed once; the
report counts rows, contributors and conflicts per row. Vectorized per source: one
``delta`` read per chunk of rows, one scatter-add per source.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from dpsn.errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["MergeReport", "merge"]

RULES = ("sum", "mean", "resonance")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge` did: the commit, the merged ``ids`` (sorted), per row how many
    sources contributed (``contributors``) and how many opposed the consensus
    (``conflicts``, resonance only; zeros otherwise)."""

    commit: Any
    rule: str
    ids: torch.Tensor
    contributors: torch.Tensor
    conflicts: torch.Tensor

    @property
    def rows(self) -> int:
        """Rows the merge wrote into the target."""
        return len(self.ids)

    @property
    def conflicting_rows(self) -> int:
        """Rows where at least one contribution opposed the consensus direction."""
        return int((self.conflicts > 0).sum())


def _contributions(source: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ids = source.delta_ids()
    parts = [source.delta(ids[a : a + _CHUNK]).double() for a in range(0, len(ids), _CHUNK)]
    deltas = torch.cat(parts) if parts else torch.empty((0, source.dim), dtype=torch.float64)
    return ids, deltas


def merge(
    target: Any,
    sources: list[Any],
    *,
    rule: str = "mean",
    alpha: float = 0.5,
    beta: float = -0.5,
    message: str = "",
) -> MergeReport:
    """Add the merged deltas of ``sources`` (pools or store paths, same ``rows`` and ``dim``
    as the target) to ``target`` (a writable pool, or a path opened ``r+`` for the merge) in
    one atomic commit; see the module docstring for the rules. Uncommitted changes of the
    target are committed with the merge. Returns a :class:`MergeReport`."""
    from ._api import open as open_pool

    if rule not in RULES:
        raise InvalidArgumentError(f"rule must be one of {RULES}, got {rule!r}")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise InvalidArgumentTypeError(f"{name} must be a finite number, got {v!r}")
    if alpha < 0 or not -1.0 <= beta <= 0.0:
        raise InvalidArgumentError(f"need alpha >= 0 and -1 <= beta <= 0, got {alpha}, {beta}")
    if not isinstance(sources, list | tuple) or not sources:
        raise InvalidArgumentError("sources must be a non-empty list of pools or store paths")
    opened: list[Any] = []
    own_target = isinstance(target, str | os.PathLike)
    try:
        if own_target:
            target = open_pool(target, mode="r+")
        pools = []
        for s in sources:
            if isinstance(s, str | os.PathLike):
                s = open_pool(s, cache_rows=0)  # read once, in bulk: no cache to fill
                opened.append(s)
            if s.rows != target.rows or s.dim != target.dim:
                raise InvalidArgumentError(
                    f"source {s.path} has rows={s.rows}, dim={s.dim}; the target has "
                    f"rows={target.rows}, dim={target.dim}"
                )
            pools.append(s)
        contributions = [_contributions(s) for s in pools]
        ids, total, count, conflicts = _combine(contributions, target.dim, rule, alpha, beta)
        for a in range(0, len(ids), _CHUNK):
            target.write(ids[a : a + _CHUNK], total[a : a + _CHUNK].to(target.dtype), add=True)
        commit = target.commit(message or f"merge {len(pools)} sources ({rule})")
        return MergeReport(commit, rule, ids, count, conflicts)
    finally:
        for s in opened:
            s.close()
        if own_target:
            target.close()


def _combine(
    contributions: list[tuple[torch.Tensor, torch.Tensor]],
    dim: int,
    rule: str,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merged ``(ids, change [n, dim] float64, contributors [n], conflicts [n])``."""
    all_ids = torch.cat([i for i, _ in contributions])
    ids = torch.unique(all_ids)  # sorted
    n = len(ids)
    total = torch.zeros((n, dim), dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.int64)
    # a source's ids are distinct, so its positions are too: a plain indexed add (index_add_
    # on float64 rows was 4x slower here), or a whole-array add when it holds every row
    where = [torch.searchsorted(ids, i) for i, _ in contributions]
    for at, (_, d) in zip(where, contributions, strict=True):
        _add(total, at, d, n)
        count[at] += 1
    conflicts = torch.zeros(n, dtype=torch.int64)
    if rule == "mean":
        total /= count.clamp(min=1)[:, None]
    elif rule == "resonance":
        consensus = total / torch.linalg.vector_norm(total, dim=1, keepdim=True).clamp(min=1e-30)
        merged = torch.zeros_like(total)
        for at, (_, d) in zip(where, contributions, strict=True):
            norm = torch.linalg.vector_norm(d, dim=1).clamp(min=1e-30)
            align = (d * consensus[at]).sum(dim=1) / norm  # cos(c_s, d)
            weight = torch.where(align >= 0, 1.0 + alpha * align, 1.0 + beta * align.abs())
            _add(merged, at, d * weight[:, None], n)
            conflicts[at] += (align < 0).long()
        total = merged
    return ids, total, count, conflicts


def _add(out: torch.Tensor, at: torch.Tensor, values: torch.Tensor, n: int) -> None:
    """``out[at] += values`` for distinct ``at``."""
    if len(at) == n:  # every row, in order (both sides sorted and distinct)
        out += values
    else:
        out[at] += values
