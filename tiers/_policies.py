"""Eviction policies for the device cache, chosen by name.

A policy keeps one score column per slot and answers one question in a single tensor op: which
``n`` of these candidate slots should go. Lower score = evicted first. New policies subclass
:class:`EvictionPolicy` and register with :func:`register_policy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from dpsn.errors import CacheCapacityError


class EvictionPolicy(ABC):
    name: ClassVar[str]

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device

    @abstractmethod
    def touch(self, slots: torch.Tensor, step: int) -> None:
        """Record one access to each of ``slots`` (unique) at ``step``."""

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


_POLICIES: dict[str, type[EvictionPolicy]] = {}


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    _POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, capacity: int, device: torch.device) -> EvictionPolicy:
    try:
        return _POLICIES[name](capacity, device)
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; known: {', '.join(sorted(_POLICIES))}"
        ) from None


def policies() -> list[str]:
    return sorted(_POLICIES)


register_policy(LRU)
register_policy(LFU)
