"""A fixed-capacity, fully associative row cache on the compute device.

The id -> slot map is a hash table run as batched tensor ops (``_slot_table.py``): a batch of
ids is looked up in a few tensor ops on the device, with no Python loop or dict per id, and an
insertion or eviction costs O(1) per row, never O(capacity). Full associativity keeps the
replacement exact, so the policies behave as their textbook versions, which is what lets them be
compared with Belady's optimum (``bench/cache.py``).

Each slot holds the columns its owner declares (``_columns.Column``: the row's value, its delta,
optimizer state, ...). The cache allocates them and knows nothing of what they mean. A lookup
with misses is a few steps its owner drives (``admit`` -> save the dirty victims -> ``place``
-> write the new rows' columns -> ``finish``, or ``abandon``): the cache never calls its
owner back. The owner says which slots it changed (``mark_dirty``). Rows of a
step in flight or of a pending prefetch are pinned and never chosen as victims. A pin is a slot
tensor kept under its holder's key, not a per-slot counter: setting one costs nothing on a hit,
and the pins are only consulted when a miss must evict.

Not thread-safe by itself: ``mutex`` serialises lookups when a prefetch thread is running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from dpsn import _kernels
from dpsn.errors import CacheCapacityError

from . import _hugepages
from ._columns import Column
from ._policies import make_policy
from ._slot_table import SlotTable

FillFn = Callable[[torch.Tensor, torch.Tensor], None]
"""``fill(ids, slots)``: write every column of distinct ``ids`` (CPU) into ``slots``. The ids
come in the order the batch asked for them when it holds no repeated miss (so that a cold batch's
rows fill a run of fresh slots in batch order, and its read is one block copy), else sorted."""
EvictFn = Callable[[torch.Tensor], None]
"""``evict(slots)``: dirty ``slots`` are about to be reused; save what they hold."""

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


@dataclass
class Admission:
    """The misses of one lookup, admitted in steps its owner drives (:meth:`DeviceCache.admit`,
    then ``place``, ``finish`` or ``abandon``): the cache calls nothing of its owner's.

    ``missing`` are the distinct missing ids (device; in batch order when none repeats, else
    sorted, so that a cold batch's rows fill a run of fresh slots in batch order) and
    ``victims`` the slots they get, in the same order; ``dirty`` are the victims whose rows
    changed since they were written back (the owner saves them before ``place``: their
    columns still hold them until it writes the new rows). The rest is the lookup's own:
    the batch's ``ids``, ``slots`` of its hits, ``counts``, the positions that missed
    (``miss``) and where each went among the missing (``where``, None when none repeats)."""

    ids: torch.Tensor
    slots: torch.Tensor
    counts: torch.Tensor | None
    miss: torch.Tensor
    where: torch.Tensor | None
    missing: torch.Tensor
    victims: torch.Tensor
    gone: torch.Tensor  # victims that held a row
    dirty: torch.Tensor
    cold: bool = False  # rows paged in on advice: placed, not a lookup (see DeviceCache.admit)


class DeviceCache:
    """``capacity`` slots of ``columns`` on ``device``, replaced by ``policy``.

    Column memory is allocated zeroed when the cache is built, so its pages are committed once
    up front instead of faulting in on the first fills (a cold 32 MiB fill paid 4x its copy time
    in page faults).
    """

    def __init__(
        self,
        capacity: int,
        columns: Sequence[Column],
        *,
        device: torch.device | str = "cpu",
        policy: str = "lru",
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"cache capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.policy = make_policy(policy, capacity, self.device)
        # LRU's recency column, asked for once: a lookup stamps it in place of calling the
        # policy's access and insert, which for LRU are that stamp (None: call them)
        self._recency = self.policy.recency_column()
        self._data: dict[str, torch.Tensor] = {}
        for col in columns:
            self.set_column(col)
        # slot -> id (-1: empty), and past the end a sentinel slot the id table points empty
        # entries at, which never holds an id
        ids = torch.full((capacity + 1,), -1, dtype=torch.int64, device=self.device)
        self.slot_ids = ids[:capacity]
        self.dirty = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.table = SlotTable(capacity, ids)
        self._pins: dict[Hashable, torch.Tensor] = {}  # holder -> slots it keeps from eviction
        self._occupied = 0
        self._fresh = 0  # slots [_fresh, capacity) were never used: taken in order, no search
        self.step = 0
        self.stats = CacheStats()
        self.mutex = threading.RLock()

    def __len__(self) -> int:
        return self._occupied

    # -- columns -------------------------------------------------------------------------------

    def column(self, col: Column) -> torch.Tensor:
        """The ``[capacity, width]`` tensor of ``col`` (rows of empty slots are garbage)."""
        return self._data[col.name]

    def set_column(self, col: Column) -> torch.Tensor:
        """Allocate ``col`` (zeroed), replacing a column of the same name (e.g. a new width)."""
        t = _hugepages.full((self.capacity, col.width), 0, col.dtype, self.device)
        self._data[col.name] = t
        return t

    def row_bytes(self) -> int:
        return sum(c.shape[1] * c.element_size() for c in self._data.values())

    # -- lookup --------------------------------------------------------------------------------

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of ``ids`` (device int64, any order) and a hit mask (slots are meaningless where
        it is False); no fill, no stats."""
        return self.table.find(ids)

    def read_hits(self, ids: torch.Tensor, col: Column) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fast path of a read whose ids are all cached: ``(slots, rows of col)`` found and
        gathered in one pass and counted as a lookup of hits, or None (nothing counted, nothing
        changed: do a :meth:`lookup`)."""
        with self.mutex:
            last = self._recency
            found = self.table.find_gather(ids, self._data[col.name], last, self.step + 1)
            if found is None:
                return None
            slots, rows = found
            self.step += 1
            self.stats.new_step()
            if last is None:  # else the loop stamped the recency already (LRU)
                self.policy.access(ids, slots, self.step)
            self.stats.add(lookups=1, hits=len(ids))
            return slots, rows

    def lookup(
        self,
        ids: torch.Tensor,
        fill: FillFn,
        evict: EvictFn,
        *,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Slots holding ``ids`` (1-D int64), paging in the misses in one batch: the steps of
        :meth:`admit` run with ``fill`` and ``evict`` as the owner's part (a convenience for
        tests and benchmarks; the row stack drives the steps itself, with no callbacks).

        ``ids`` may repeat, or be unique with ``counts`` saying how often each was asked for
        (the statistics and the frequency policies count uses, not distinct ids). Each distinct
        missing id is filled once. Raises :class:`CacheCapacityError`, with nothing changed,
        when the batch needs more slots than can be freed.
        """
        with self.mutex:
            admission = self.admit(ids, counts=counts)
            if isinstance(admission, torch.Tensor):
                return admission
            if len(admission.dirty):
                evict(admission.dirty)
            self.place(admission)
            try:
                fill(admission.missing.cpu(), admission.victims)
            except BaseException:
                self.abandon(admission)
                raise
            return self.finish(admission)

    def admit(
        self, ids: torch.Tensor, *, counts: torch.Tensor | None = None, cold: bool = False
    ) -> torch.Tensor | Admission:
        """The first step of a lookup of ``ids`` (see :meth:`lookup`): their slots when all
        are cached (counted, done), else an :class:`Admission` of the misses, nothing changed
        yet. The owner then saves ``admission.dirty`` (their columns still hold the rows),
        calls :meth:`place`, writes the rows' columns into ``admission.victims`` and calls
        :meth:`finish` (or :meth:`abandon` if it could not). The caller holds ``mutex``
        throughout. Raises :class:`CacheCapacityError`, nothing changed, when the batch needs
        more slots than can be freed.

        ``cold``: rows paged in on advice (a missed row's co-use partners), which nobody has
        used yet: they are admitted as new rows (the policy's ``insert``), but the admission is
        no lookup: the step clock, the lookup/hit/miss counters and the policy's access counts
        stay as they are, so a guess never ranks as a use (a frequency policy would otherwise
        keep unused partners over rows really read). The bytes and evictions they cost are
        counted, as they happened."""
        with self.mutex:
            if not cold:
                self.step += 1
                self.stats.new_step()
            ids = ids.to(self.device)
            slots, hit = self.find(ids)
            if bool(hit.all()):
                if cold:
                    return slots
                uses = len(ids) if counts is None else int(counts.sum())
                if self._recency is not None:  # LRU: its access is this stamp
                    self._recency.scatter_(0, slots, float(self.step))
                else:
                    self.policy.access(ids, slots, self.step, counts)
                self.stats.add(lookups=1, hits=uses)
                return slots
            miss = torch.nonzero(~hit).flatten()
            if counts is None:  # ids may repeat: each distinct missing id once
                missing, where = _distinct(ids[miss])
            else:  # distinct already
                missing, where = ids[miss], None
            if int(missing.min()) < 0:  # never cached (-1 is an empty slot's mark)
                raise IndexError("the cache holds no negative ids (index.PAD_ID is -1)")
            victims = self._victims(slots[hit], counts is not None, len(missing))
            gone = victims[self.slot_ids[victims] >= 0]
            return Admission(
                ids,
                slots,
                counts,
                miss,
                where,
                missing,
                victims,
                gone,
                gone[self.dirty[gone]],
                cold,
            )

    def place(self, admission: Admission) -> None:
        """The victims' rows leave (their dirty ones saved by the owner) and the missing ids
        take their slots: from now on they are found there, their columns not yet written."""
        a = self._evicted(admission)
        self.slot_ids[a.victims] = a.missing
        self.dirty[a.victims] = False
        self.table.insert(a.missing, a.victims)
        self._occupied += len(a.missing)

    def abandon(self, admission: Admission) -> None:
        """The owner could not write the victims' columns: the slots hold nothing valid, so
        they are forgotten (their table entries stop confirming). Dirty rows they held were
        saved before :meth:`place`, so nothing is lost."""
        a = admission
        self.slot_ids[a.victims] = -1
        self.table.release(a.victims)
        self._occupied -= len(a.missing)

    def finish(self, admission: Admission) -> torch.Tensor:
        """The rows are written: the policy learns of them and the batch's uses, and the
        lookup is counted. Returns the slots of every id of the batch."""
        a = admission
        slots = a.slots
        if a.where is None and len(a.miss) == len(a.ids):  # all missed: slots in batch order
            slots = a.victims
        else:
            slots[a.miss] = a.victims if a.where is None else a.victims[a.where]
        if a.cold:  # new rows, not a use (see admit)
            self.policy.insert(a.victims, self.step)
            return slots
        if self._recency is not None:  # LRU: insert and access both stamp; slots cover victims
            self._recency.scatter_(0, slots, float(self.step))
        else:
            self.policy.insert(a.victims, self.step)
            self.policy.access(a.ids, slots, self.step, a.counts)
        uses = len(a.ids) if a.counts is None else int(a.counts.sum())
        n_miss = len(a.missing)
        self.stats.add(lookups=1, hits=uses - n_miss, misses=n_miss)
        return slots

    def _victims(self, hit_slots: torch.Tensor, hits_unique: bool, n: int) -> torch.Tensor:
        """``n`` slots for new rows, never one this batch's hits use nor a pinned one."""
        in_use = len(hit_slots) if hits_unique else int(torch.unique(hit_slots).numel())
        if n + in_use > self.capacity:
            raise CacheCapacityError(
                f"a batch needs {n + in_use} distinct rows but the cache holds {self.capacity}"
            )
        if self._fresh + n <= self.capacity:  # warming up: never-used slots, no eviction
            victims = torch.arange(self._fresh, self._fresh + n, device=self.device)
            self._fresh += n
            return victims
        evictable = ~self.pinned()
        evictable[hit_slots] = False  # never evict a row this very batch uses
        victims = self.policy.victims(evictable, self.slot_ids >= 0, n)
        # Victims may include never-used slots: the bump region must not hand them out again.
        self._fresh = max(self._fresh, int(victims.max()) + 1)
        return victims

    def _evicted(self, admission: Admission) -> Admission:
        """The rows the admission's victims held leave the cache (counted)."""
        gone, dirty = admission.gone, admission.dirty
        if len(gone):
            if len(dirty):
                self.stats.add(writebacks=len(dirty))
            self.slot_ids[gone] = -1
            self.table.release(gone)
            self._occupied -= len(gone)
            self.stats.add(evictions=len(gone))
        return admission

    # -- owner's hooks -------------------------------------------------------------------------

    def mark_dirty(self, slots: torch.Tensor) -> None:
        self.dirty[slots] = True

    def dirty_slots(self) -> torch.Tensor:
        return torch.nonzero(self.dirty).flatten()

    def clean(self) -> None:
        self.dirty.zero_()

    def invalidate(self, ids: torch.Tensor) -> None:
        """Drop ``ids`` from the cache without write-back (they were dropped or discarded)."""
        with self.mutex:
            slots, hit = self.find(ids.to(self.device))
            if bool(hit.any()):
                gone = torch.unique(slots[hit])
                self.slot_ids[gone] = -1
                self.table.release(gone)
                self.dirty[gone] = False
                self._occupied -= len(gone)

    def clear(self) -> None:
        with self.mutex:
            self.slot_ids.fill_(-1)
            self.dirty.zero_()
            self.table.clear()
            self._fresh = 0
            self._occupied = 0

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
        """Cached ids, sorted, and their slots."""
        slots = torch.nonzero(self.slot_ids >= 0).flatten()
        ids, order = torch.sort(self.slot_ids[slots])
        return ids, slots[order]


def _distinct(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distinct ids of a batch's misses and, if some repeat, where each miss went:
    ``(ids, None)`` when none repeats (kept in batch order), else ``(sorted distinct ids,
    inverse)``. The native radix grouping when it can run (non-negative ids on the CPU), else
    ``torch.unique``."""
    if _kernels.usable(ids):
        try:
            uniq, _, inverse, _ = _kernels.group_ids(ids)
        except ValueError:  # a negative id (the radix sort takes none): the general path
            uniq, inverse = torch.unique(ids, return_inverse=True)
    else:
        uniq, inverse = torch.unique(ids, return_inverse=True)
    if len(uniq) == len(ids):
        return ids, None
    return uniq, inverse
