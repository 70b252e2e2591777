"""Row optimizers: the interface the row path steps rows through, and the built-in ones.

The tier stack steps rows through :class:`RowOptimizer` (``RowStack.apply_grads``); executors
and users pick one of the built-ins (``RowSGD``, ``RowAdagrad``, ``RowAdam``, by name through
:func:`make_row_optimizer`) or subclass it for their own rules. One module holds the interface
and its implementations (they used to sit in two packages, so a step entered both); ``dpsn.pool``
re-exports the same names.

The state of a row lives beside its delta (a cache column, staged and committed with it), so
training resumes exactly after a reopen. Following FBGEMM's TBE optimizers, the second moment
is kept per row (one scalar), not per element: it halves the state and, for rows that are
updated rarely and in bursts, adapts as well (Gupta et al., "Shampoo"/row-wise AdaGrad as used
for embedding tables). All updates are pure tensor functions of (delta, grad, state), one batch
of unique rows at a time, computed in float32.
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
        native = self.native
        if native is None or not _kernels.usable(delta, grad, state) or delta.dim() != 2:
            return None
        dim = delta.shape[1]
        kind = _kernels.native_kind(native, self.state_width(dim), dim)
        if kind is None or not all(t.dtype == torch.float32 for t in (delta, grad, state)):
            return None
        new, new_state = delta.contiguous().clone(), state.contiguous().clone()
        _kernels.step_rows(kind, self.native_hyper(), new, new_state, grad.contiguous())
        return new, new_state


def _eps(eps: float) -> float:
    """A denominator's ``eps``: positive and finite, so that a row with no gradient history
    (a zero second moment) never divides zero by zero into its delta."""
    if not (isinstance(eps, int | float) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


class RowSGD(RowOptimizer):
    """Plain SGD on each used row's delta: ``delta -= lr * grad``. No state."""

    name = "sgd"
    native = _kernels.OPT_SGD

    def __init__(self, *, lr: float = 0.1) -> None:
        super().__init__(lr=lr)

    def state_width(self, dim: int) -> int:
        return 0

    def step(self, delta, grad, state):
        fused = self._native_step(delta, grad, state)
        if fused is not None:
            return fused
        return delta - self.lr * grad, state


class RowAdagrad(RowOptimizer):
    """Row-wise AdaGrad: ``G += mean(g^2)``, ``delta -= lr * g / (sqrt(G) + eps)``."""

    name = "adagrad"
    native = _kernels.OPT_ADAGRAD

    def __init__(self, *, lr: float = 0.05, eps: float = 1e-8) -> None:
        super().__init__(lr=lr)
        self.eps = _eps(eps)

    def state_width(self, dim: int) -> int:
        return 1

    def native_hyper(self) -> tuple[float, float, float, float]:
        return (self.lr, self.eps, 0.0, 0.0)

    def step(self, delta, grad, state):
        fused = self._native_step(delta, grad, state)
        if fused is not None:
            return fused
        g2 = state[:, :1] + grad.pow(2).mean(dim=1, keepdim=True)
        return delta - self.lr * grad / (g2.sqrt() + self.eps), g2

    def config(self) -> dict[str, Any]:
        return {**super().config(), "eps": self.eps}


class RowAdam(RowOptimizer):
    """Adam with an element-wise first moment and a row-wise second moment (FBGEMM's
    partial row-wise Adam). Bias correction uses each row's own step count, since rows are
    updated at different times. State per row: ``[m (dim) | v | t]``."""

    name = "adam"
    native = _kernels.OPT_ADAM

    def __init__(
        self, *, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__(lr=lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _eps(eps)

    def state_width(self, dim: int) -> int:
        return dim + 2

    def native_hyper(self) -> tuple[float, float, float, float]:
        return (self.lr, self.eps, *self.betas)

    def step(self, delta, grad, state):
        fused = self._native_step(delta, grad, state)
        if fused is not None:
            return fused
        dim = grad.shape[1]
        b1, b2 = self.betas
        m = b1 * state[:, :dim] + (1 - b1) * grad
        v = b2 * state[:, dim : dim + 1] + (1 - b2) * grad.pow(2).mean(dim=1, keepdim=True)
        t = state[:, dim + 1 : dim + 2] + 1
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        new = delta - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return new, torch.cat([m, v, t], dim=1)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "betas": list(self.betas), "eps": self.eps}


ROW_OPTIMIZERS: dict[str, type[RowOptimizer]] = {
    cls.name: cls for cls in (RowSGD, RowAdagrad, RowAdam)
}


def make_row_optimizer(spec: str | RowOptimizer, **kwargs: Any) -> RowOptimizer:
    """``spec`` itself if it is a :class:`RowOptimizer`, else the built-in of that name
    (``ROW_OPTIMIZERS``) made with ``kwargs``; ValueError naming the known ones otherwise."""
    if isinstance(spec, RowOptimizer):
        return spec
    if spec not in ROW_OPTIMIZERS:
        raise ValueError(f"unknown row optimizer {spec!r}; known: {sorted(ROW_OPTIMIZERS)}")
    return ROW_OPTIMIZERS[spec](**kwargs)
