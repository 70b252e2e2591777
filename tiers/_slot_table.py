"""The device cache's id -> slot map: an open-addressing hash table run as batched tensor ops.

Why this shape: a batch of 10^4-10^5 ids must be looked up in a few tensor ops on the cache's
device, with no Python loop per id and no work proportional to the capacity (the sorted key
column this replaces was rebuilt at O(capacity) on every batch with a miss).

Layout: ``buckets`` (``2^b >= 4 x capacity`` entries) holds slot numbers, ``-1`` for a bucket
never used; an id's probe sequence is ``h1, h1 + h2, h1 + 2 h2, ...`` (double hashing; ``h2``
odd, so the sequence visits every bucket of the power-of-two table). Nothing in the table is
trusted on its own: a bucket answers for id ``x`` only if the slot it names holds ``x`` now
(``slot_ids``, owned by the cache). So evicting a row costs nothing here: its bucket simply
stops confirming, and acts as a tombstone that lookups probe past and inserts may reclaim.
A bucket is *live* while ``home[slot] == bucket`` and the slot is occupied (the row it points
to was inserted there and is still cached); any other non-empty bucket is reclaimable.

Buckets never return to empty, so probe chains only grow; when more than half of the buckets
have ever been used, the table is rebuilt from the occupied slots. That costs O(capacity) but
happens at most once per ~capacity insertions, so inserts stay O(1) amortized, and the load
(<= 1/2 used, <= 1/4 live) keeps the expected probes per lookup near 1.
"""

from __future__ import annotations

import torch

# Odd multipliers as signed int64 (the golden ratio and XXH64's second prime); the top bits of
# the wrapped product are the hash.
_MUL1 = -7046029254386353131
_MUL2 = -4417276706812531889


class SlotTable:
    """Maps cached ids to their slots; see the module docstring for the scheme.

    ``slot_ids`` is the cache's own tensor (``slot -> id``, ``-1`` when empty): the table reads
    it to confirm every answer and never writes it.
    """

    def __init__(self, capacity: int, slot_ids: torch.Tensor) -> None:
        self.capacity = capacity
        self.device = slot_ids.device
        self._slot_ids = slot_ids
        self.bits = max(4, (4 * capacity - 1).bit_length())
        self.mask = (1 << self.bits) - 1
        dtype = torch.int32 if capacity < 2**31 else torch.int64
        self.buckets = torch.full((1 << self.bits,), -1, dtype=dtype, device=self.device)
        self.home = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self._claims = torch.empty(1 << self.bits, dtype=torch.int64, device=self.device)
        self.used = 0  # buckets that are not empty (live or reclaimable)
        self.rebuilds = 0

    def _probe_start(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = 64 - self.bits
        h1 = (ids * _MUL1) >> shift
        h1 &= self.mask  # the arithmetic shift sign-extends: keep the low bits only
        h2 = (ids * _MUL2) >> shift
        h2 &= self.mask
        h2 |= 1
        return h1, h2

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of ``ids`` (int64, any order, repeats allowed) and a hit mask; a slot is
        meaningless where the mask is False."""
        n = len(ids)
        if n == 0 or self.used == 0:
            return torch.zeros_like(ids), torch.zeros(n, dtype=torch.bool, device=self.device)
        bucket, step = self._probe_start(ids)
        slot = torch.index_select(self.buckets, 0, bucket).long()
        held = torch.index_select(self._slot_ids, 0, slot.clamp(min=0))
        hit = held == ids
        if bool(hit.all()):  # the common case for a warm cache: one probe each
            return slot, hit
        slots = torch.where(hit, slot, 0)
        # Probe on for ids whose bucket was used by another row; stop at a never-used one.
        more = torch.nonzero(~hit & (slot >= 0)).flatten()
        bucket, step, sub = bucket[more], step[more], ids[more]
        while len(more):
            bucket = (bucket + step) & self.mask
            slot = torch.index_select(self.buckets, 0, bucket).long()
            found = torch.index_select(self._slot_ids, 0, slot.clamp(min=0)) == sub
            slots[more[found]] = slot[found]
            hit[more[found]] = True
            go_on = ~found & (slot >= 0)
            more, bucket, step, sub = more[go_on], bucket[go_on], step[go_on], sub[go_on]
        return slots, hit

    def insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Record that unique ``ids`` (absent from the table) now live in ``slots``; the cache
        has already written ``slot_ids[slots] = ids``."""
        if len(ids) == 0:
            return
        if 2 * (self.used + len(ids)) > len(self.buckets):
            self.rebuild(exclude=slots)
        self._insert(ids, slots)

    def _insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        bucket, step = self._probe_start(ids)
        while len(slots):
            current = torch.index_select(self.buckets, 0, bucket).long()
            empty = current < 0
            free = empty
            if self.used:  # else every bucket is empty, hence free
                held = current.clamp_(min=0)
                free = empty | (torch.index_select(self.home, 0, held) != bucket)
                free |= torch.index_select(self._slot_ids, 0, held) < 0
            # Several ids may probe one free bucket in the same round: one wins, the rest go
            # on. (A bucket is free or not for everyone probing it, so all may write a claim.)
            rank = torch.arange(len(slots), device=self.device)
            self._claims.index_copy_(0, bucket, rank)
            won = free & (torch.index_select(self._claims, 0, bucket) == rank)
            take = torch.nonzero(won).flatten()
            b, s = bucket[take], slots[take]
            self.used += int(empty[take].sum())
            self.buckets.index_copy_(0, b, s.to(self.buckets.dtype))
            self.home.index_copy_(0, s, b)
            if len(take) == len(slots):
                return
            rest = torch.nonzero(~won).flatten()
            slots, step = slots[rest], step[rest]
            bucket = (bucket[rest] + step) & self.mask

    def rebuild(self, exclude: torch.Tensor | None = None) -> None:
        """Empty the table and re-insert every occupied slot (but ``exclude``, about to be
        inserted by the caller)."""
        self.buckets.fill_(-1)
        self.home.fill_(-1)
        self.used = 0
        self.rebuilds += 1
        occupied = self._slot_ids >= 0
        if exclude is not None and len(exclude):
            occupied[exclude] = False
        slots = torch.nonzero(occupied).flatten()
        self._insert(self._slot_ids[slots], slots)

    def clear(self) -> None:
        self.buckets.fill_(-1)
        self.home.fill_(-1)
        self.used = 0
