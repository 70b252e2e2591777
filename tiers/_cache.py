"""A fixed-capacity, fully associative row cache on the compute device.

The id -> slot map is two direct-mapped tables of slot guesses (confirmed against
``slot_ids``) in front of a sorted key column searched with ``torch.searchsorted``: a batch
lookup is a handful of tensor ops on the device, with no Python loop or dict per id (the
alternative the issue names beside FBGEMM's set-associative TBE cache). Full associativity
keeps the replacement exact, so the policies behave as their textbook versions, which is what
lets them be compared with Belady's optimum (``bench/cache.py``).

Each slot holds named columns (e.g. a row's delta, its materialized value, optimizer state). The
cache knows nothing of what they mean: its owner fills missing rows through a callback, is handed
dirty rows before they are evicted (write-back), and says which slots it changed (dirty). Rows of
a step in flight or of a pending prefetch are pinned and never chosen as victims. A pin is a
slot tensor kept under its holder's key, not a per-slot counter: setting one costs nothing on a
hit, and the pins are only consulted when a miss must evict.

Not thread-safe by itself: ``mutex`` serialises lookups when a prefetch thread is running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from dpsn.errors import CacheCapacityError

from ._policies import make_policy

FillFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]
EvictFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], None]

# Multiplicative hashes (odd multipliers as signed int64, shift): 0x9E3779B97F4A7C15 (Fibonacci)
# and 0xC2B2AE3D27D4EB4F (XXH64's second prime), taking different bits of the product.
_HASHES = ((-7046029254386353131, 20), (-4417276706812531889, 27))

_COUNTERS = (
    "lookups",
    "hits",
    "misses",
    "evictions",
    "writebacks",
    "bytes_to_device",
    "bytes_written_back",
)


@dataclass
class CacheStats:
    """Counters in total and for the most recent lookup (one model step's read)."""

    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    last: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))

    def add(self, **counts: int) -> None:
        for k, v in counts.items():
            self.total[k] = self.total.get(k, 0) + v
            self.last[k] = self.last.get(k, 0) + v

    def new_step(self) -> None:
        self.last = dict.fromkeys(self.total, 0)

    @property
    def hit_rate(self) -> float | None:
        n = self.total["hits"] + self.total["misses"]
        return self.total["hits"] / n if n else None


class DeviceCache:
    def __init__(
        self,
        capacity: int,
        columns: dict[str, tuple[int, torch.dtype]],
        *,
        device: torch.device | str = "cpu",
        policy: str = "lru",
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"cache capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.policy = make_policy(policy, capacity, self.device)
        # Uninitialised: a slot's columns are always written before the slot is used.
        self.columns = {
            name: torch.empty((capacity, width), dtype=dtype, device=self.device)
            for name, (width, dtype) in columns.items()
        }
        self.slot_ids = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self.dirty = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self._pins: dict[Hashable, torch.Tensor] = {}  # holder -> slots it keeps from eviction
        self._keys = torch.empty(0, dtype=torch.int64, device=self.device)  # sorted cached ids
        self._slots = torch.empty(0, dtype=torch.int64, device=self.device)  # their slots
        # Two direct-mapped tables of slot *guesses*, by two hashes of the id, each 8-16x the
        # capacity (4 bytes an entry). A guess counts only if ``slot_ids`` confirms it, so stale
        # or colliding entries are harmless. New rows claim their bucket in both tables; an id
        # whose first bucket was taken by another is almost always still in its second, and only
        # the few that lost both fall back to the sorted keys (and reclaim their buckets). On a
        # full cache ~94% of ids are answered by the first table, ~99.5% by the two.
        bits = max(4, (8 * capacity - 1).bit_length())
        self._hint_mask = (1 << bits) - 1
        slot_dtype = torch.int32 if capacity < 2**31 else torch.int64
        self._hints = tuple(
            torch.zeros(1 << bits, dtype=slot_dtype, device=self.device) for _ in _HASHES
        )
        self._fresh = 0  # slots [_fresh, capacity) were never used: taken in order, no search
        self.step = 0
        self.stats = CacheStats()
        self.mutex = threading.RLock()

    def __len__(self) -> int:
        return len(self._keys)

    def row_bytes(self) -> int:
        return sum(c.shape[1] * c.element_size() for c in self.columns.values())

    # -- lookup --------------------------------------------------------------------------------

    def _hash(self, ids: torch.Tensor, which: int) -> torch.Tensor:
        # wrapping int64 multiply; the mask drops the sign-extended high bits of the shift
        multiplier, shift = _HASHES[which]
        h = ids * multiplier
        h >>= shift
        return h.bitwise_and_(self._hint_mask)

    def _guess(self, ids: torch.Tensor, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select, not advanced indexing: several times faster for 1-D gathers on the CPU
        guess = torch.index_select(self._hints[which], 0, self._hash(ids, which))
        return guess.long(), torch.index_select(self.slot_ids, 0, guess) == ids

    def _claim(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Point both guess tables' buckets of ``ids`` at their ``slots``."""
        for which, table in enumerate(self._hints):
            table[self._hash(ids, which)] = slots.to(table.dtype)

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of ``ids`` (device int64, any order) and a hit mask (slots are meaningless where
        it is False); no fill, no stats."""
        slots, hit, _ = self._find(ids)
        return slots, hit

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if len(self._keys) == 0:
            return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool), len(ids) == 0
        slots, hit = self._guess(ids, 0)
        if bool(hit.all()):
            return slots, hit, True
        rest = torch.nonzero(~hit).flatten()
        sub = ids[rest]
        slots2, hit2 = self._guess(sub, 1)
        slots.index_copy_(0, rest, slots2)
        hit.index_copy_(0, rest, hit2)
        if bool(hit2.all()):
            return slots, hit, True
        rest, sub = rest[~hit2], sub[~hit2]
        pos = torch.searchsorted(self._keys, sub).clamp_(max=len(self._keys) - 1)
        found = self._keys[pos] == sub
        slots[rest] = self._slots[pos]
        hit[rest] = found
        self._claim(sub[found], self._slots[pos[found]])
        return slots, hit, bool(found.all())

    def lookup(self, ids: torch.Tensor, fill: FillFn, evict: EvictFn) -> torch.Tensor:
        """Slots holding ``ids`` (1-D int64), paging in the misses in one batch.

        ``fill(missing_ids_cpu)`` returns each column's values for the missing ids (unique,
        sorted); ``evict(ids_cpu, columns_cpu)`` receives dirty rows before their slots are
        reused. Each distinct missing id is filled once however often it occurs.
        """
        with self.mutex:
            self.step += 1
            self.stats.new_step()
            ids = ids.to(self.device)
            slots, hit, all_hit = self._find(ids)
            n_miss = 0
            if not all_hit:
                missing = torch.unique(ids[~hit])
                n_miss = len(missing)
                self._admit(ids, slots, hit, missing, fill, evict)
                slots, hit = self.find(ids)
            self.policy.access(ids, slots, self.step)
            self.stats.add(lookups=1, hits=len(ids) - n_miss, misses=n_miss)
            return slots

    def _admit(
        self,
        ids: torch.Tensor,
        slots: torch.Tensor,
        hit: torch.Tensor,
        missing: torch.Tensor,
        fill: FillFn,
        evict: EvictFn,
    ) -> None:
        distinct = len(missing) + int(torch.unique(slots[hit]).numel())
        if distinct > self.capacity:
            raise CacheCapacityError(
                f"a batch needs {distinct} distinct rows but the cache holds {self.capacity}; "
                "raise cache_rows (or pass cache_rows=0 to read without a cache)"
            )
        n = len(missing)
        if self._fresh + n <= self.capacity:  # warming up: never-used slots, no eviction
            victims = torch.arange(self._fresh, self._fresh + n, device=self.device)
            self._fresh += n
        else:
            evictable = ~self.pinned()
            evictable[slots[hit]] = False  # never evict a row this very batch uses
            occupied = self.slot_ids >= 0
            victims = self.policy.victims(evictable, occupied, n)
            # Victims may include never-used slots: the bump region must not hand them out again.
            self._fresh = max(self._fresh, int(victims.max()) + 1)
            self._evict(victims, evict)
        values = fill(missing.cpu())
        for name, col in self.columns.items():
            value = values[name]
            if self.device.type == "cuda" and value.device.type == "cpu":
                # Pinned staging makes the host-to-device copy truly asynchronous, so a
                # prefetch on a side stream overlaps the step computing on the main one.
                value = value.pin_memory()
            col[victims] = value.to(self.device, col.dtype, non_blocking=True)
        self.slot_ids[victims] = missing
        self.dirty[victims] = False
        self._index_insert(missing, victims)
        self._claim(missing, victims)
        self.policy.insert(victims, self.step)
        self.stats.add(bytes_to_device=len(missing) * self.row_bytes())

    def _evict(self, victims: torch.Tensor, evict: EvictFn) -> None:
        old = self.slot_ids[victims]
        occupied = old >= 0
        if not bool(occupied.any()):
            return
        gone = victims[occupied]
        dirty = gone[self.dirty[gone]]
        if len(dirty):
            evict(
                self.slot_ids[dirty].cpu(),
                {name: col[dirty].cpu() for name, col in self.columns.items()},
            )
            self.stats.add(writebacks=len(dirty), bytes_written_back=len(dirty) * self.row_bytes())
        self._forget(gone)
        self.stats.add(evictions=len(gone))

    # -- sorted index maintenance --------------------------------------------------------------

    def _forget(self, slots: torch.Tensor) -> None:
        """Remove ``slots`` (occupied) from the id index and mark them empty."""
        keep = ~torch.isin(self._slots, slots)
        self._keys, self._slots = self._keys[keep], self._slots[keep]
        self.slot_ids[slots] = -1
        self.dirty[slots] = False

    def _index_insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Merge sorted unique ``ids`` (absent from the index) into the sorted key column."""
        n_old, n_new = len(self._keys), len(ids)
        # Each new id lands after the old keys below it and after the new ids before it.
        new_pos = torch.searchsorted(self._keys, ids) + torch.arange(n_new, device=self.device)
        is_new = torch.zeros(n_old + n_new, dtype=torch.bool, device=self.device)
        is_new[new_pos] = True
        keys = torch.empty(n_old + n_new, dtype=torch.int64, device=self.device)
        vals = torch.empty_like(keys)
        keys[new_pos], vals[new_pos] = ids, slots
        keys[~is_new], vals[~is_new] = self._keys, self._slots
        self._keys, self._slots = keys, vals

    # -- owner's hooks -------------------------------------------------------------------------

    def mark_dirty(self, slots: torch.Tensor) -> None:
        self.dirty[slots] = True

    def dirty_rows(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Ids (CPU) and column values (CPU) of every dirty slot, for write-back at commit."""
        slots = torch.nonzero(self.dirty).flatten()
        return self.slot_ids[slots].cpu(), {n: c[slots].cpu() for n, c in self.columns.items()}

    def clean(self) -> None:
        self.dirty.zero_()

    def invalidate(self, ids: torch.Tensor) -> None:
        """Drop ``ids`` from the cache without write-back (they were dropped or discarded)."""
        with self.mutex:
            slots, hit = self.find(ids.to(self.device))
            if bool(hit.any()):
                self._forget(torch.unique(slots[hit]))

    def clear(self) -> None:
        with self.mutex:
            self.slot_ids.fill_(-1)
            self.dirty.zero_()
            self._fresh = 0
            self._keys = self._keys[:0]
            self._slots = self._slots[:0]

    def pin(self, holder: Hashable, slots: torch.Tensor) -> None:
        """Keep ``slots`` from eviction until ``holder`` pins others or unpins (replaces the
        holder's previous pin: a step in flight holds its own rows, not the last step's)."""
        with self.mutex:
            self._pins[holder] = slots

    def unpin(self, holder: Hashable) -> None:
        with self.mutex:
            self._pins.pop(holder, None)

    def unpin_all(self) -> None:
        with self.mutex:
            self._pins.clear()

    def pinned(self) -> torch.Tensor:
        """A bool mask of the slots some holder pins."""
        mask = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)
        with self.mutex:
            for slots in self._pins.values():
                mask[slots] = True
        return mask

    def occupied_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted cached ids and their slots."""
        return self._keys, self._slots
