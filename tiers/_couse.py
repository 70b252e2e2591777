"""Co-activation statistics: which rows are used by the same token or bag (the seeds' Hebbian
rule, "what fires together belongs together"), kept in a bounded sketch.

Why a sketch: the pairs of rows that fire together grow with the square of a step's rows per
token, and a long run meets far more distinct pairs than are worth keeping. The sketch holds at
most ``slots`` pairs: a direct-mapped table of ``(a, b, count)`` entries (``a < b``), a pair's
slot chosen by an XXH64 of the pair. A step's pairs are counted with one ``torch.unique``; a
pair already in its slot adds its count; a pair whose slot holds another decrements the holder
by its count and takes the slot when the holder drops to zero or below (the "decay and
replace" rule of HeavyKeeper, Gong et al. 2018, with a decay of 1): frequent pairs keep their
slots, rare ones churn through the rest. Counts are exact for a pair that never lost its slot
and never overstated.

What reads it (each vectorized over the table, no Python loop per row or pair):

- :meth:`CoUse.partners`: a row's most frequent partners (prefetch a missed row's partners);
- :meth:`CoUse.circuits`: groups of rows joined by pairs seen at least ``min_support`` times
  (connected components, by min-label propagation), each with its support;
- :meth:`CoUse.placement`: an order of rows that puts rows used together next to each other
  (a compaction writes segments in it, so co-used rows share chunks);
- :meth:`CoUse.miss_partners`: what a cache miss prefetches (its rows' top partners).

Persisted as three plain numeric arrays (:meth:`CoUse.to_arrays` / :meth:`CoUse.from_arrays`,
which checks shapes, dtypes and invariants: a store is untrusted input); never a pickle.
"""

from __future__ import annotations

import numpy as np
import torch

from dpsn.errors import CorruptStoreError, InvalidArgumentError, InvalidIdsError
from dpsn.hypernet import xxh64_ids
from dpsn.store import DEFAULT_MIN_WEIGHT, cluster_order

__all__ = ["ADJACENCY_REFRESH", "COUSE_SEED", "CoUse"]

COUSE_SEED = 0x636F757365  # "couse": the slot hash's seed (persisted in effect: never change)
_EMPTY = -1
# Records between rebuilds of the partner table miss_partners reads: a rebuild sorts the whole
# table (~80 ms for 2**18 pairs on a loaded core), so it is amortized over many steps; partners
# a few hundred steps old are good advice.
ADJACENCY_REFRESH = 256
_MAX_SLOTS = 1 << 26


def _check_slots(slots: object) -> int:
    if isinstance(slots, bool) or not isinstance(slots, int):
        raise InvalidArgumentError(f"slots must be an int, got {type(slots).__name__}")
    if not 16 <= slots <= _MAX_SLOTS:
        raise InvalidArgumentError(f"slots must be in [16, {_MAX_SLOTS}], got {slots}")
    return slots


def _pair_key(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The hash that picks a pair's slot (persisted in effect: never change it)."""
    return xxh64_ids(xxh64_ids(b, COUSE_SEED) ^ a, COUSE_SEED)


def _components(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Connected components of the graph with edges ``(a[i], b[i])``: ``(nodes, comp_of,
    ea)`` with ``nodes`` the sorted distinct rows, ``comp_of`` each node's component (0..C-1)
    and ``ea`` each edge's first node (an index into ``nodes``). Min-label propagation with
    pointer jumping: a few vectorized rounds (about log of the diameter), no loop per row."""
    nodes, inv = torch.unique(torch.cat([a, b]), return_inverse=True)
    ea, eb = inv[: len(a)], inv[len(a) :]
    label = torch.arange(len(nodes))
    while True:
        m = torch.minimum(label[ea], label[eb])
        new = label.clone()
        new.scatter_reduce_(0, ea, m, reduce="amin")
        new.scatter_reduce_(0, eb, m, reduce="amin")
        new = new[new]  # pointer jumping: follow labels toward their roots
        if torch.equal(new, label):
            break
        label = new
    comp_of = torch.unique(label, return_inverse=True)[1]
    return nodes, comp_of, ea


class CoUse:
    """A bounded sketch of co-used row pairs; see the module docstring.

    ``slots``: the most pairs kept (memory: 20 bytes a slot). One thread updates it (the one
    driving the pool); readers take a consistent copy under the pool's lock.
    """

    def __init__(self, slots: int = 1 << 18) -> None:
        self.slots = _check_slots(slots)
        self.a = torch.full((self.slots,), _EMPTY, dtype=torch.int64)
        self.b = torch.full((self.slots,), _EMPTY, dtype=torch.int64)
        self.count = torch.zeros(self.slots, dtype=torch.float32)
        self.groups_seen = 0  # groups recorded (tokens or bags), for support as a fraction
        # Rows' partners as one immutable (row, partner, count) triple sorted by (row, -count),
        # built on first use by miss_partners and rebuilt every ADJACENCY_REFRESH records:
        # a miss's partners are then a searchsorted away, and the triple is swapped whole, so
        # a prefetch thread reading it never sees a half-updated table.
        self._adjacency: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._records_since = 0

    def __len__(self) -> int:
        """Pairs held."""
        return int((self.a >= 0).sum())

    # -- recording -----------------------------------------------------------------------------

    @torch.no_grad()
    def record(self, groups: torch.Tensor) -> None:
        """Count the pairs of rows used together: ``groups`` ``[G, H]`` int64, the H row ids of
        each of G tokens or bags (``-1``: no row; repeats in one group count once)."""
        if not isinstance(groups, torch.Tensor) or groups.dim() != 2:
            raise InvalidIdsError("groups must be a 2-D [groups, rows per group] id tensor")
        if groups.is_floating_point() or groups.dtype == torch.bool:
            raise InvalidIdsError(f"groups must hold integer ids, got {groups.dtype}")
        g = groups.detach().to("cpu", torch.int64)
        n, h = g.shape
        self.groups_seen += n
        if h < 2 or n == 0:
            return
        g = torch.sort(g, dim=1).values  # a row repeated in one group counts once
        g[:, 1:][g[:, 1:] == g[:, :-1]] = _EMPTY
        i, j = torch.triu_indices(h, h, offset=1)
        x, y = g[:, i].reshape(-1), g[:, j].reshape(-1)  # (G * H(H-1)/2,)
        a, b = torch.minimum(x, y), torch.maximum(x, y)
        keep = (a >= 0) & (a != b)
        a, b = a[keep], b[keep]
        if len(a) == 0:
            return
        key = _pair_key(a, b)
        self._records_since += 1
        if self._adjacency is not None and self._records_since >= ADJACENCY_REFRESH:
            self._adjacency = None  # stale: rebuilt by the next miss_partners
        # Distinct pairs of the step: one sort by the pair's hash (pairs that share a hash but
        # differ stay apart: a new run starts wherever key, a or b changes).
        key, order = torch.sort(key)
        a, b = a[order], b[order]
        new = torch.ones(len(a), dtype=torch.bool)
        new[1:] = (key[1:] != key[:-1]) | (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        starts = torch.nonzero(new).squeeze(1)
        counts = torch.diff(starts, append=torch.tensor([len(a)])).to(torch.float32)
        a, b, key = a[starts], b[starts], key[starts]
        self._merge(a, b, key, counts)

    def _merge(self, a: torch.Tensor, b: torch.Tensor, key: torch.Tensor, c: torch.Tensor) -> None:
        slot = torch.remainder(key, self.slots)
        held = (self.a[slot] == a) & (self.b[slot] == b)
        self.count.index_add_(0, slot[held], c[held])
        a, b, slot, c = a[~held], b[~held], slot[~held], c[~held]
        if len(a) == 0:
            return
        # Several new pairs may want one slot: the most frequent of them contends for it (ties:
        # the first in hash order), the others are dropped this step (they may win a later one).
        # One sort by (slot, -count): counts of one step are far below 2**31.
        rank = (slot << 32) | ((1 << 31) - 1 - c.to(torch.int64))
        rank, order = torch.sort(rank, stable=True)
        first = torch.ones(len(rank), dtype=torch.bool)
        first[1:] = (rank[1:] >> 32) != (rank[:-1] >> 32)
        win = order[first]
        a, b, slot, c = a[win], b[win], slot[win], c[win]
        left = self.count[slot] - c
        take = (self.a[slot] < 0) | (left <= 0)
        # a taken slot counts what the newcomer has beyond the holder (at least 1, at most c)
        self.count[slot] = torch.where(
            take, torch.where(self.a[slot] < 0, c, (-left).clamp(min=1)), left
        )
        self.a[slot] = torch.where(take, a, self.a[slot])
        self.b[slot] = torch.where(take, b, self.b[slot])

    def decay(self, factor: float) -> None:
        """Multiply every count by ``factor`` in ``[0, 1]`` (old co-use fades); pairs whose
        count falls below 0.5 are forgotten."""
        if not 0.0 <= factor <= 1.0:
            raise InvalidArgumentError(f"decay factor must be in [0, 1], got {factor}")
        self.count.mul_(factor)
        gone = self.count < 0.5
        self.a[gone], self.b[gone], self.count[gone] = _EMPTY, _EMPTY, 0.0
        self._adjacency = None

    # -- reading -------------------------------------------------------------------------------

    def pairs(self, min_support: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, count)`` of every held pair with ``count >= min_support``, by count
        (highest first)."""
        sel = (self.a >= 0) & (self.count >= min_support)
        a, b, c = self.a[sel], self.b[sel], self.count[sel]
        order = torch.argsort(c, descending=True, stable=True)
        return a[order], b[order], c[order]

    def partners(
        self, ids: torch.Tensor, k: int = 4, *, min_support: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each of ``ids``' (1-D) up to ``k`` most frequent partners: ``(row, partner, count)``
        flat tensors, grouped by row (in ``ids``' sorted order), highest count first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k must be a positive int, got {k!r}")
        q = torch.unique(ids.detach().to("cpu", torch.int64).reshape(-1))
        a, b, c = self.pairs(min_support)
        row = torch.cat([a, b])
        other = torch.cat([b, a])
        cnt = torch.cat([c, c])
        sel = torch.isin(row, q)
        row, other, cnt = row[sel], other[sel], cnt[sel]
        order = torch.argsort(cnt, descending=True, stable=True)
        order = order[torch.argsort(row[order], stable=True)]
        row, other, cnt = row[order], other[order], cnt[order]
        first = torch.searchsorted(row, row)  # the first position of each row's block
        rank = torch.arange(len(row)) - first
        keep = rank < k
        return row[keep], other[keep], cnt[keep]

    def _partner_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        adj = self._adjacency
        if adj is None:
            a, b, c = self.a.clone(), self.b.clone(), self.count.clone()
            keep = (a >= 0) & (b >= 0)  # (a copy taken while another thread records)
            a, b, c = a[keep], b[keep], c[keep]
            row, other, cnt = torch.cat([a, b]), torch.cat([b, a]), torch.cat([c, c])
            order = torch.argsort(cnt, descending=True, stable=True)
            order = order[torch.argsort(row[order], stable=True)]
            adj = (row[order], other[order], cnt[order])
            self._adjacency, self._records_since = adj, 0
        return adj

    def miss_partners(
        self,
        missed: torch.Tensor,
        k: int = 2,
        *,
        limit: int = 256,
        rows: int | None = None,
        min_support: float = 2.0,
    ) -> torch.Tensor:
        """What a cache miss prefetches: the distinct top-``k`` partners (pairs seen at least
        ``min_support`` times) of the ``missed`` rows, the rows themselves excluded, ids below
        ``rows``; at most ``limit``, strongest pairs first. Vectorized (one ``searchsorted``
        into a partner table rebuilt every ``ADJACENCY_REFRESH`` records); safe to call from a
        prefetch thread while the driving thread records."""
        missed = torch.unique(missed.detach().to("cpu", torch.int64).reshape(-1))
        row, other, cnt = self._partner_table()
        empty = torch.empty(0, dtype=torch.int64)
        if len(row) == 0 or len(missed) == 0 or k < 1 or limit < 1:
            return empty
        lo = torch.searchsorted(row, missed)
        hi = torch.searchsorted(row, missed, right=True)
        take = (hi - lo).clamp(max=k)
        if int(take.sum()) == 0:
            return empty
        # positions lo[i] .. lo[i] + take[i] - 1 of each missed row, flattened
        start = torch.repeat_interleave(lo, take)
        first = torch.repeat_interleave(torch.cumsum(take, 0) - take, take)
        at = start + torch.arange(len(start)) - first
        got, strength = other[at], cnt[at]
        keep = (strength >= min_support) & ~torch.isin(got, missed)
        if rows is not None:
            keep &= got < rows
        got, strength = got[keep], strength[keep]
        got = got[torch.argsort(strength, descending=True, stable=True)]
        uniq, inv = torch.unique(got, return_inverse=True)
        first_at = torch.full((len(uniq),), len(got), dtype=torch.int64)
        first_at.scatter_reduce_(0, inv, torch.arange(len(got)), reduce="amin")
        return uniq[torch.argsort(first_at)][:limit]

    def circuits(self, min_support: float = 2.0) -> list[tuple[torch.Tensor, float]]:
        """Groups of rows joined by pairs seen at least ``min_support`` times: a list of
        ``(rows, support)``, ``rows`` sorted, ``support`` the mean count of the group's pairs
        (times its rows were used together), largest groups first."""
        a, b, c = self.pairs(min_support)
        if len(a) == 0:
            return []
        nodes, comp_of, ea = _components(a, b)
        ncomp = int(comp_of.max()) + 1
        order = torch.argsort(comp_of, stable=True)
        sizes = torch.bincount(comp_of, minlength=ncomp)
        edge_comp = comp_of[ea]
        sums = torch.zeros(ncomp).index_add_(0, edge_comp, c)
        edges = torch.bincount(edge_comp, minlength=ncomp).clamp(min=1)
        support = (sums / edges).tolist()
        groups = torch.split(nodes[order], sizes.tolist())
        out = [(rows, support[i]) for i, rows in enumerate(groups)]
        out.sort(key=lambda x: (-len(x[0]), -x[1], int(x[0][0])))
        return out

    def placement(
        self, ids: np.ndarray, *, min_support: float = DEFAULT_MIN_WEIGHT, max_rounds: int = 1024
    ) -> np.ndarray:
        """A permutation of ``ids`` (1-D, distinct) that puts co-used rows next to each other,
        so that where rows are written in this order (a compaction given these statistics:
        ``Pool.compact``) rows that fire together share chunks: the leaf order of a
        hierarchical clustering of the pairs seen ``min_support`` times or more
        (``dpsn.store.cluster_order``: rounds of heavy-edge matching, vectorized)."""
        a, b, c = self.pairs(min_support)
        return cluster_order(
            ids, a.numpy(), b.numpy(), c.numpy(), min_weight=min_support, max_rounds=max_rounds
        )

    # -- persistence ---------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The held pairs as plain arrays (``a``, ``b`` int64, ``count`` float32) and the groups
        recorded, for storing beside the usage statistics."""
        sel = self.a >= 0
        return {
            "a": self.a[sel].numpy().copy(),
            "b": self.b[sel].numpy().copy(),
            "count": self.count[sel].numpy().copy(),
            "groups_seen": np.array([self.groups_seen], dtype=np.int64),
            "slots": np.array([self.slots], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], where: str = "store") -> CoUse:
        """Rebuild a sketch from :meth:`to_arrays`' output, checking it as untrusted input."""

        def bad(why: str) -> CorruptStoreError:
            return CorruptStoreError(f"{where}: co-use statistics are damaged ({why})")

        need = {"a": np.int64, "b": np.int64, "count": np.float32}
        for name, dt in (*need.items(), ("groups_seen", np.int64), ("slots", np.int64)):
            arr = arrays.get(name)
            if not isinstance(arr, np.ndarray) or arr.dtype != dt or arr.ndim != 1:
                raise bad(f"{name} missing or not a 1-D {np.dtype(dt).name} array")
        slots = int(arrays["slots"][0]) if len(arrays["slots"]) == 1 else -1
        if not 16 <= slots <= _MAX_SLOTS:
            raise bad(f"slots {slots} out of range")
        a, b, c = arrays["a"], arrays["b"], arrays["count"]
        if not len(a) == len(b) == len(c) or len(a) > slots:
            raise bad("pair arrays of different lengths or more pairs than slots")
        if len(a) and (
            bool((a < 0).any()) or bool((b <= a).any()) or not bool(np.isfinite(c).all())
        ):
            raise bad("a pair that is not (a < b) of row ids, or a non-finite count")
        if len(a) and bool((c <= 0).any()):
            raise bad("a non-positive count")
        out = cls(slots)
        ta, tb = torch.from_numpy(a.copy()), torch.from_numpy(b.copy())
        key = _pair_key(ta, tb)
        slot = torch.remainder(key, slots)
        if len(torch.unique(slot)) != len(slot):
            raise bad("two pairs in one slot")
        out.a[slot], out.b[slot] = ta, tb
        out.count[slot] = torch.from_numpy(c.copy())
        out.groups_seen = int(arrays["groups_seen"][0]) if len(arrays["groups_seen"]) else 0
        return out
