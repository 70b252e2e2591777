"""The base tier of an overlay store: base rows are another store's rows at a pinned commit.

An overlay's row is ``base_store_row(i) + delta(i)``: the base store's row (its procedural row
plus its own deltas, at the commit the overlay pins) in place of a procedural row. The tier
stack needs nothing else: it caches that base beside the overlay's delta, a lifecycle's FREE
rows decay toward it, and ``drop`` returns a row to it. The base is read through a callable
(``dpsn.pool`` passes a read-only pool of the base, shared by every overlay of that base in
the process), so this module stays free of the pool; it never writes the base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpsn.hypernet import Generator

from ._procedural import ProceduralTier

__all__ = ["OverlayBase"]


class OverlayBase(ProceduralTier):
    """A procedural tier whose rows come from ``read(ids) -> [n, dim]`` (the base store's rows
    at the pinned commit). ``generator`` is the base's generator (the overlay's own copy of its
    weights): kept for ``Pool.generator``, never trained, since the base commit is fixed."""

    def __init__(self, generator: Generator, read: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(generator)
        self._read = read

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.rows_generated += len(ids)
        return self._read(ids).to(ids.device, torch.float32)

    def generate_into(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(self(ids))

    def trainable(self) -> bool:
        return False  # the base is a fixed commit of another store
