"""Sparse row optimizers, applied inside the backward pass to the rows a step used.

The state of a row lives beside its delta (a cache column, staged and committed with it), so
training resumes exactly after a reopen. Following FBGEMM's TBE optimizers, the second moment
is kept per row (one scalar), not per element: it halves the state and, for rows that are
updated rarely and in bursts, adapts as well (Gupta et al., "Shampoo"/row-wise AdaGrad as used
for embedding tables). All updates are pure tensor functions of (delta, grad, state), one batch
of unique rows at a time, computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dpsn import _kernels
from dpsn.tiers import RowOptimizer


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
    if isinstance(spec, RowOptimizer):
        return spec
    if spec not in ROW_OPTIMIZERS:
        raise ValueError(f"unknown row optimizer {spec!r}; known: {sorted(ROW_OPTIMIZERS)}")
    return ROW_OPTIMIZERS[spec](**kwargs)
