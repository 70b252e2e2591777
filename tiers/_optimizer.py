"""The row optimizer interface: one definition, owned by the row path that calls it.

The tier stack steps rows through it (``RowStack.apply_grads``) and ``dpsn.pool`` implements it
(``RowSGD``, ``RowAdagrad``, ``RowAdam``); executors and users subclass it for their own rules.
It used to be defined twice (a Protocol here, an ABC in pool); now both packages name this one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from dpsn import _kernels


class RowOptimizer(ABC):
    """Updates ``delta [n, dim]`` from ``grad [n, dim]`` and ``state [n, state_width(dim)]``.

    The built-in optimizers also name a fused native loop (``native``, see
    ``dpsn._kernels``) that the tier stack runs on the cache's columns in one pass; their
    :meth:`step` runs the same loop on CPU float32 tensors, so cached and spilled rows take the
    same code (the tests compare them bit for bit); the PyTorch expressions below agree with
    it to float32 rounding (the tests allow relative 1e-5). A subclass of your own needs only
    :meth:`state_width` and :meth:`step`; a subclass of a built-in one that overrides its step,
    state width or hyperparameters loses the native loop (``native = None``) unless it sets
    ``native`` itself, and the loop runs only for the state width the kernel uses
    (``dpsn._kernels.native_kind``).
    """

    name: ClassVar[str]
    native: ClassVar[int | None] = None  # the loop's optimizer kind, if it has one

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overrides = {"step", "state_width", "native_hyper"} & cls.__dict__.keys()
        if overrides and "native" not in cls.__dict__:
            cls.native = None  # a new step or state: the inherited loop no longer computes it

    def __init__(self, *, lr: float) -> None:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"row learning rate must be positive and finite, got {lr}")
        self.lr = float(lr)

    @abstractmethod
    def state_width(self, dim: int) -> int:
        """Floats of optimizer state kept beside each row's delta, for rows ``dim`` wide."""

    @abstractmethod
    def step(
        self, delta: torch.Tensor, grad: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the new (delta, state). Inputs are float32 and must not be modified."""

    def config(self) -> dict[str, Any]:
        """The optimizer's settings as JSON (what a saved module records)."""
        return {"name": self.name, "lr": self.lr}

    def native_hyper(self) -> tuple[float, float, float, float]:
        """(lr, eps, beta1, beta2) for the native loop."""
        return (self.lr, 0.0, 0.0, 0.0)

    def _native_step(
        self, delta: torch.Tensor, grad: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The native loop on copies of the inputs, when it can run on them."""
        if not _kernels.usable(delta, grad, state) or delta.dim() != 2:
            return None
        kind = _kernels.native_kind(self, delta.shape[1])
        if kind is None or not all(t.dtype == torch.float32 for t in (delta, grad, state)):
            return None
        new, new_state = delta.contiguous().clone(), state.contiguous().clone()
        _kernels.step_rows(kind, self.native_hyper(), new, new_state, grad.contiguous())
        return new, new_state
