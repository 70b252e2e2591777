"""Eviction policies for the device cache, chosen by name.

A policy keeps one score column per slot and answers one question in a single tensor op: which
``n`` of these candidate slots should go. Lower score = evicted first. New policies subclass
:class:`EvictionPolicy` and register with :func:`register_policy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from dpsn.errors import CacheCapacityError, InvalidArgumentError


class EvictionPolicy(ABC):
    """A device cache's eviction policy: picks the slots to evict (see ``register_policy``)."""

    name: ClassVar[str]

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device

    def access(
        self,
        ids: torch.Tensor,
        slots: torch.Tensor,
        step: int,
        counts: torch.Tensor | None = None,
    ) -> None:
        """One lookup's ``ids`` (all now cached) in ``slots``, at ``step``: either with repeats,
        or unique with ``counts`` uses each.

        The cache calls this once per lookup, after the misses are in. The default records the
        slots with :meth:`touch`; a policy that remembers ids beyond the cache's contents (a
        frequency sketch) overrides it."""
        self.touch(slots, step)

    def recency_column(self) -> torch.Tensor | None:
        """The float64 ``[capacity]`` column a lookup may stamp with the step in place of
        calling :meth:`access` and :meth:`insert` (what LRU's are), or None: call them. The
        cache asks once, when it is made: a policy that returns a column keeps that tensor
        for its life."""
        return None

    @abstractmethod
    def touch(self, slots: torch.Tensor, step: int) -> None:
        """Record one access to each of ``slots`` (may repeat) at ``step``."""

    @abstractmethod
    def insert(self, slots: torch.Tensor, step: int) -> None:
        """``slots`` now hold new rows (their history is forgotten)."""

    @abstractmethod
    def score(self) -> torch.Tensor:
        """A float score per slot; the lowest are evicted first."""

    def victims(self, evictable: torch.Tensor, occupied: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` slots to fill: empty ones first, then the lowest-scoring occupied ones."""
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        available = int(evictable.sum())
        if available < n:
            raise CacheCapacityError(
                f"the cache needs {n} free slots but only {available} of {self.capacity} can be "
                "evicted (the rest hold rows of this batch or of a prefetch in flight); raise "
                "cache_rows or use smaller batches"
            )
        score = self.score().clone()
        score[~occupied] = -torch.inf
        score[~evictable] = torch.inf
        return torch.topk(score, n, largest=False, sorted=False).indices


class LRU(EvictionPolicy):
    """Least recently used: evicts the slots whose last access is oldest."""

    name = "lru"

    def __init__(self, capacity: int, device: torch.device) -> None:
        super().__init__(capacity, device)
        self.last = torch.zeros(capacity, dtype=torch.float64, device=device)

    def touch(self, slots: torch.Tensor, step: int) -> None:
        self.last.scatter_(0, slots, float(step))

    def insert(self, slots: torch.Tensor, step: int) -> None:
        self.last.scatter_(0, slots, float(step))

    def score(self) -> torch.Tensor:
        return self.last

    def recency_column(self) -> torch.Tensor | None:
        # only while access, touch and insert are exactly the stamp (a subclass may change one)
        cls = type(self)
        exact = (
            cls.access is EvictionPolicy.access
            and cls.touch is LRU.touch
            and cls.insert is LRU.insert
        )
        return self.last if exact else None


class LFU(EvictionPolicy):
    """Least frequently used, with ageing: a slot's count decays by ``decay`` per step, so rows
    that were hot long ago make room for rows hot now (plain LFU never forgets). The decay is
    applied lazily from each slot's last access, so a step costs nothing for untouched slots."""

    name = "lfu"

    def __init__(self, capacity: int, device: torch.device, decay: float = 0.999) -> None:
        super().__init__(capacity, device)
        self.decay = decay
        self.count = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.last = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.now = 0

    def _aged(self, slots: torch.Tensor | slice, step: int) -> torch.Tensor:
        return self.count[slots] * torch.pow(self.decay, step - self.last[slots])

    def touch(self, slots: torch.Tensor, step: int) -> None:
        self.count[slots] = self._aged(slots, step) + 1.0
        self.last[slots] = float(step)
        self.now = max(self.now, step)

    def insert(self, slots: torch.Tensor, step: int) -> None:
        self.count[slots] = 1.0
        self.last[slots] = float(step)
        self.now = max(self.now, step)

    def score(self) -> torch.Tensor:
        # decayed count; recency breaks ties (scaled to stay far below one count unit)
        return self._aged(slice(None), self.now) + self.last * 1e-12


class TinyLFU(EvictionPolicy):
    """Frequency over every id seen, cached or not (TinyLFU's idea, Einziger et al. 2017).

    In-cache LFU forgets a row's count when it is evicted, so on a long-tailed trace a
    returning warm row starts again at 1, level with the one-off rows that flood the cache.
    Here a count-min sketch (``depth`` rows of int32 counters, each ``width`` x the capacity
    rounded up to a power of two) counts every access; a slot's score is its id's estimate at
    its last access, so a newly admitted row that was rarely seen before is the first to go
    again (the cache cannot refuse it: a batch's rows must all be resident). Counters and
    scores are halved every ``sample`` x capacity accesses, which ages out old popularity.

    Costs per lookup: one hash, one scatter-add and one gather of ``depth`` x batch entries;
    memory: 4 x depth x width bytes per cached row (256 B by default). The defaults were
    chosen on bench/cache.py's traces: a narrower sketch (width 4, halving every 10 x capacity
    as in the paper's admission filter) overcounts the one-off ids and did worse than LFU."""

    name = "tinylfu"
    # odd 64-bit multipliers as signed int64 (XXH64's primes 1, 2, 3, 5 and the golden ratio)
    _MULTIPLIERS = (
        -7046029288634856825,
        -4417276706812531889,
        1609587929392839161,
        2870177450012600261,
        -7046029254386353131,
    )

    def __init__(
        self,
        capacity: int,
        device: torch.device,
        depth: int = 4,
        width: int = 16,
        sample: int = 100,
    ) -> None:
        super().__init__(capacity, device)
        if not 1 <= depth <= len(self._MULTIPLIERS):
            raise ValueError(f"sketch depth must be 1..{len(self._MULTIPLIERS)}, got {depth}")
        bits = max(6, (width * capacity - 1).bit_length())
        self._shift, self._mask = 64 - bits, (1 << bits) - 1
        self.sketch = torch.zeros(depth << bits, dtype=torch.int32, device=device)
        self._mult = torch.tensor(self._MULTIPLIERS[:depth], device=device)[:, None]
        self._row_base = (torch.arange(depth, device=device) << bits)[:, None]
        self.freq = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.last = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.sample_size = sample * capacity
        self.counted = 0

    def _cells(self, ids: torch.Tensor) -> torch.Tensor:
        """The flat sketch cell of each id in each row: ``[depth, n]``."""
        h = ids[None, :] * self._mult  # wrapping multiply; the top bits are the hash
        h >>= self._shift
        h.bitwise_and_(self._mask)
        return h.add_(self._row_base)

    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated recent access count of each id (count-min: it may overcount, never
        undercount, the halved history)."""
        cells = self._cells(ids)
        return torch.index_select(self.sketch, 0, cells.flatten()).view(cells.shape).amin(0)

    def access(
        self,
        ids: torch.Tensor,
        slots: torch.Tensor,
        step: int,
        counts: torch.Tensor | None = None,
    ) -> None:
        cells = self._cells(ids).flatten()
        if counts is None:
            add = torch.ones_like(cells, dtype=torch.int32)
        else:
            add = counts.to(torch.int32).repeat(len(self._mult))
        self.sketch.index_add_(0, cells, add)
        est = torch.index_select(self.sketch, 0, cells).view(len(self._mult), -1).amin(0)
        self.freq.scatter_(0, slots, est.to(torch.float64))  # repeats carry equal estimates
        self.last.scatter_(0, slots, float(step))
        self.counted += len(ids) if counts is None else int(counts.sum())
        if self.counted >= self.sample_size:  # TinyLFU's reset: halve, so popularity ages
            self.sketch >>= 1
            self.freq.mul_(0.5)
            self.counted //= 2

    def touch(self, slots: torch.Tensor, step: int) -> None:
        self.last.scatter_(0, slots, float(step))

    def insert(self, slots: torch.Tensor, step: int) -> None:
        self.freq[slots] = 0.0
        self.last[slots] = float(step)

    def score(self) -> torch.Tensor:
        # estimated frequency; recency breaks ties (scaled to stay far below one count)
        return self.freq + self.last * 1e-12


_POLICIES: dict[str, type[EvictionPolicy]] = {}


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Register an ``EvictionPolicy`` subclass under its ``name`` (usable as a decorator)."""
    _POLICIES[cls.name] = cls
    return cls


def check_policy(name: str) -> None:
    """Raise ``InvalidArgumentError`` (a ``ValueError``) naming the known policies unless
    ``name`` is one."""
    if not isinstance(name, str) or name not in _POLICIES:
        raise InvalidArgumentError(
            f"unknown eviction policy {name!r}; known: {', '.join(policies())}"
        )


def make_policy(name: str, capacity: int, device: torch.device) -> EvictionPolicy:
    """A new policy of a registered ``name`` for a cache of ``capacity`` slots."""
    check_policy(name)
    return _POLICIES[name](capacity, device)


def policies() -> list[str]:
    """The registered policy names."""
    return sorted(_POLICIES)


register_policy(LRU)
register_policy(LFU)
register_policy(TinyLFU)
