"""The device cache's id -> slot map: a cuckoo hash table run as batched tensor ops.

Why this shape: a batch of 10^3-10^5 ids must be looked up in a few tensor ops on the cache's
device, with no Python loop per id and no work proportional to the capacity (the sorted key
column this replaces was rebuilt at O(capacity) on every batch with a miss). On the CPU each
tensor op costs a few microseconds whatever its size, so the number of ops per lookup matters
as much as the work they do.

Cuckoo hashing (Pagh and Rodler, 2001) gives every id exactly two places, one in each half of
the table: a lookup is one probe of every id's first place and one of the second place for the
few it did not answer, whatever the table holds; there are no probe chains. Each half has
``2^b >= 8 x capacity`` entries (4 bytes each), so on a full cache ~94% of ids are found in
their first place (inserts prefer it) and the rest in their second.

Nothing in the table is trusted on its own: an entry answers for id ``x`` only if the slot it
names holds ``x`` now (``slot_ids``, owned by the cache). An entry is *live* while
``home[slot]`` points back at it; the cache releases a slot's home when it empties the slot, so
evicting a row costs one write here and its entries are free for the next insert. An insert
takes a free one of an id's two places, or evicts the live row in its first place, which moves
to its own other place, and so on. On the CPU a C loop (``dpsn._kernels.cuckoo_insert``) inserts
the ids one after another; elsewhere (CUDA, or no extension) the PyTorch path is vectorized,
every pending id moving in the same round (a cold fill of 32k rows spent ~6 ms in those rounds,
~1 ms in the loop). At this load a chain of moves ends within a few steps; should it not, the
table is rebuilt with other hash functions. Both paths give a table that answers the same; its
layout may differ.
"""

from __future__ import annotations

import torch

from dpsn import _kernels

from . import _hugepages

# Odd multipliers as signed int64 (the top bits of the wrapped product are the hash): the golden
# ratio and XXH64's primes; a rebuild after a failed insert moves on to the next pair.
_MULTIPLIERS = (
    -7046029254386353131,
    -4417276706812531889,
    -7046029288634856825,
    1609587929392839161,
    2870177450012600261,
    -2048144777,
)
_MAX_ROUNDS = 64
_MAX_KICKS = 500  # moves one insertion may cause in the C loop before a rebuild


class SlotTable:
    """Maps cached ids to their slots; see the module docstring for the scheme.

    ``slot_ids`` is the cache's own tensor (``slot -> id``, ``-1`` when empty) with one extra
    entry past the capacity that is always ``-1``: empty table entries name that sentinel slot,
    so a probe needs no masking. The table reads it to confirm every answer, never writes it.
    """

    def __init__(self, capacity: int, slot_ids: torch.Tensor) -> None:
        if len(slot_ids) != capacity + 1:
            raise ValueError("slot_ids needs capacity + 1 entries (the last one a sentinel)")
        self.capacity = capacity
        self.device = slot_ids.device
        self._slot_ids = slot_ids
        self.bits = max(2, (8 * capacity - 1).bit_length())  # each half: 2^bits entries
        self.half = 1 << self.bits
        self.mask = self.half - 1
        dtype = torch.int32 if capacity < 2**31 - 1 else torch.int64
        self.entries = _hugepages.full((2 * self.half,), capacity, dtype, self.device)
        self.home = torch.full((capacity + 1,), -1, dtype=torch.int64, device=self.device)
        self._claims = torch.empty(2 * self.half, dtype=torch.int64, device=self.device)
        self._seed = 0
        self.rebuilds = 0
        self._checked: _kernels.CuckooTable | None = None  # for the C loops, see _native
        self._checked_key: tuple[int, ...] = ()

    def _multipliers(self) -> tuple[int, int]:
        n = len(_MULTIPLIERS)
        return _MULTIPLIERS[(2 * self._seed) % n], _MULTIPLIERS[(2 * self._seed + 1) % n]

    def _native(self) -> _kernels.CuckooTable:
        """The table's arguments for the C loops, checked when one of them last changed (a
        rebuild's new hash functions, or an attribute replaced) rather than on every lookup."""
        key = (self.half, self.bits, self.capacity, self._seed)
        checked = self._checked
        if (
            checked is None
            or checked.entries is not self.entries
            or checked.slot_ids is not self._slot_ids
            or key != self._checked_key
        ):
            first, second = self._multipliers()
            checked = _kernels.CuckooTable(
                self.entries, self.half, self.bits, first, second, self._slot_ids, self.capacity
            )
            self._checked, self._checked_key = checked, key
        return checked

    def _place(self, ids: torch.Tensor, which: int) -> torch.Tensor:
        """Entry index of ``ids``' first (0) or second (1) place."""
        h = ids * self._multipliers()[which]
        h >>= 64 - self.bits
        h.bitwise_and_(self.mask)  # the arithmetic shift sign-extends: keep the low bits
        return h.add_(self.half) if which else h

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of ``ids`` (int64, any order, repeats allowed) and a hit mask; a slot is
        meaningless (but in range) where the mask is False."""
        if _kernels.usable(ids, self.entries):  # the same probes, in one C loop
            return _kernels.cuckoo_find_in(self._native(), ids)
        slot = torch.index_select(self.entries, 0, self._place(ids, 0))
        hit = torch.index_select(self._slot_ids, 0, slot) == ids
        if not bool(hit.all()):
            rest = torch.nonzero(~hit).flatten()
            sub = torch.index_select(ids, 0, rest)
            second = torch.index_select(self.entries, 0, self._place(sub, 1))
            slot.index_copy_(0, rest, second)
            hit.index_copy_(0, rest, torch.index_select(self._slot_ids, 0, second) == sub)
        # an empty slot (and the sentinel) holds -1: a negative id (index.PAD_ID) is never
        # cached, whatever it met (the C loop's probe says the same)
        hit &= ids >= 0
        return slot.long().clamp_(max=self.capacity - 1), hit

    def find_gather(
        self,
        ids: torch.Tensor,
        table: torch.Tensor,
        last: torch.Tensor | None = None,
        step: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a hot read: the slots of ``ids`` and their rows of ``table`` (``[capacity, w]``)
        in one C pass (and ``last[slot] = step`` for an LRU policy's column), or None when some
        id is not cached (a negative one never is) or the loop cannot run here."""
        if not _kernels.usable(ids, self.entries, table) or not table.is_contiguous():
            return None
        return _kernels.find_gather_in(self._native(), ids.contiguous(), table, last, step)

    def insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Record that unique ``ids`` (absent from the table, each >= 0) now live in ``slots``
        (each below the capacity); the cache has already written ``slot_ids[slots] = ids``.
        IndexError, with the table unchanged, for an id or slot out of range."""
        if len(ids) != len(slots):
            raise ValueError(f"{len(ids)} ids for {len(slots)} slots")
        if len(ids) and (
            int(ids.min()) < 0 or int(slots.min()) < 0 or int(slots.max()) >= self.capacity
        ):
            raise IndexError("slot table: a negative id, or a slot outside the cache")
        while not self._insert(ids, slots):
            self.rebuild(exclude=slots)  # other hash functions, then try again

    def release(self, slots: torch.Tensor) -> None:
        """``slots`` were emptied (evicted, invalidated): their entries are free from now on."""
        self.home.index_fill_(0, slots, -1)

    def _free(self, at: torch.Tensor) -> torch.Tensor:
        """Which entries ``at`` hold no live row (a live row's slot points back at its entry;
        an emptied slot's was released)."""
        held = torch.index_select(self.entries, 0, at).long()
        return torch.index_select(self.home, 0, held) != at

    def _insert(self, ids: torch.Tensor, slots: torch.Tensor) -> bool:
        """One cuckoo insertion; False if it did not settle (nothing is lost: the caller
        rebuilds, which re-inserts every occupied slot)."""
        if _kernels.usable(ids, self.entries):  # one id after another, in one C loop
            return _kernels.cuckoo_insert_in(self._native(), self.home, ids, slots, _MAX_KICKS)
        return self._insert_vectorized(ids, slots)

    def _insert_vectorized(self, ids: torch.Tensor, slots: torch.Tensor) -> bool:
        """The PyTorch insertion (CUDA, or no extension): every pending id moves in the same
        round."""
        at = self._target(ids)
        for _ in range(_MAX_ROUNDS):
            if len(ids) == 0:
                return True
            # Several rows may want one entry in the same round: one wins, the others choose
            # again next round.
            rank = torch.arange(len(ids), device=self.device)
            self._claims.index_copy_(0, at, rank)
            won = torch.index_select(self._claims, 0, at) == rank
            take = torch.nonzero(won).flatten()
            t, s = at[take], slots[take]
            # a live row where a winner goes is evicted: it moves to its other place
            held = torch.index_select(self.entries, 0, t).long()
            evicted = torch.index_select(self.home, 0, held) == t
            kicked, was_at = held[evicted], t[evicted]
            self.entries.index_copy_(0, t, s.to(self.entries.dtype))
            self.home.index_copy_(0, s, t)
            lost = torch.nonzero(~won).flatten()
            kicked_ids = self._slot_ids[kicked]
            other = torch.where(
                was_at >= self.half, self._place(kicked_ids, 0), self._place(kicked_ids, 1)
            )
            ids = torch.cat([ids[lost], kicked_ids])
            slots = torch.cat([slots[lost], kicked])
            at = torch.cat([self._target(ids[: len(lost)]), other])
        return len(ids) == 0

    def _target(self, ids: torch.Tensor) -> torch.Tensor:
        """Where a new row goes: a free first place, else a free second place, else its first
        place (evicting the row there)."""
        at = self._place(ids, 0)
        taken = torch.nonzero(~self._free(at)).flatten()
        if len(taken):
            second = self._place(ids[taken], 1)
            at.index_copy_(0, taken, torch.where(self._free(second), second, at[taken]))
        return at

    def rebuild(self, exclude: torch.Tensor | None = None) -> None:
        """Re-insert every occupied slot (but ``exclude``, which the caller inserts next) with
        the next pair of hash functions."""
        self._seed += 1
        self.rebuilds += 1
        self.clear()
        occupied = self._slot_ids[: self.capacity] >= 0
        if exclude is not None and len(exclude):
            occupied[exclude] = False
        slots = torch.nonzero(occupied).flatten()
        if not self._insert(self._slot_ids[slots], slots):
            self.rebuild(exclude)

    def clear(self) -> None:
        self.entries.fill_(self.capacity)
        self.home.fill_(-1)
