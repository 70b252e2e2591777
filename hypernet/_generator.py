"""The generator interface: what the pool needs from anything that makes base rows.

Why this shape: a store persists a generator as ``kind`` + ``config()`` (JSON, in the manifest)
+ ``state_dict()`` (arrays, in Zarr) and rebuilds it with
``GENERATORS[kind](dim=, seed=, **config)`` followed by ``load_state_dict``. So a generator

- is fully described by keyword-only hyperparameters that are JSON values;
- keeps all persisted state in float32 ``nn.Parameter``s (buffers only for what is derivable
  from the config, registered ``persistent=False``), and nothing is pickled;
- initialises its weights from ``seed`` alone, never from the global RNG, so a fresh
  construction is bit-identical to the last one and needs no weights to regenerate base rows;
- maps int64 ids ``[...]`` to float32 rows ``[..., dim]``; each row depends only on its own id
  (never on the rest of the batch), so any row can be regenerated alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from ._hash import as_int64_ids, check_seed

__all__ = ["Generator"]


class Generator(nn.Module, ABC):
    """Base rows from row ids: ``forward(ids int64 [...]) -> float32 [..., dim]``.

    Subclasses set ``kind`` (the registry name; persisted in stores, so never rename one),
    accept their hyperparameters keyword-only, call ``super().__init__(dim=, seed=)`` first, and
    return from :meth:`config` every hyperparameter other than ``dim`` and ``seed``.
    """

    kind: ClassVar[str]

    dim: int
    seed: int

    def __init__(self, *, dim: int, seed: int) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.seed = check_seed(seed)

    @abstractmethod
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for ``ids`` (int64 ``[...]``): float32 ``[..., dim]`` on the module's device."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable kwargs, excluding ``dim`` and ``seed``, that rebuild this generator."""

    def generate_into(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Write the rows of 1-D ``ids`` into ``out`` (``[len(ids), dim]``, float32, on this
        module's device), without autograd. The cache calls this to fill rows straight into its
        own memory; a generator that can write there without an intermediate overrides it."""
        with torch.no_grad():
            out.copy_(self(ids))

    def observe_uses(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """Note that a row step trained rows ``ids [M]`` (distinct), used ``counts [M]`` times.

        The tier stack calls this at every row step, so a generator whose rows depend on use
        (``region_mlp``'s novelty) needs no call from the user. It must not change any row:
        rows move only at :meth:`refresh_from_uses`. The default ignores uses."""

    def refresh_from_uses(self) -> bool:
        """Fold the uses noted since the last call into the weights (True if a weight moved).

        The tier stack calls it before every commit, so rows move at commits only and the
        committed weights hold the values that made them (a reopened store reads the same
        rows). Deterministic: the same uses in the same order give the same weights."""
        return False

    @property
    def device(self) -> torch.device:
        """The device the parameters live on (and rows are produced on)."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _prepare_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` as int64 on this module's device; only the dtype is checked (the pool checks
        ranges), to keep the hot path cheap."""
        return as_int64_ids(ids).to(self.device)

    def extra_repr(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"dim={self.dim}, seed={self.seed}" + (f", {items}" if items else "")
