"""The per-input budget: how many rows each input gets, between ``k_min`` and ``k_max``.

Simple inputs should cost less than hard ones (DESIGN: "simple inputs get fewer rows"). A router
ranks ``k_max`` candidates for every input; the budget maps a complexity signal ``c`` in [0, 1] to
``k = k_min + round(c * (k_max - k_min))`` and the router keeps the best ``k`` candidates. The
signals:

- ``"fixed"``: c = 1, every input gets ``k_max`` (the baseline the savings are measured against).
- ``"entropy"``: normalised entropy of softmax(scores / temperature) over the candidates. A flat
  score profile means no few rows stand out, so the input gets more of them.
- ``"novelty"``: distance to the nearest VQ region, ``d / (1 + d)`` with d in units of the mean
  distance seen at ``fit``; inputs far from every centroid are unfamiliar and get more rows.
- ``"learned"``: ``sigmoid(w . x + b)``, a one-layer head, trained against its cost (below).

Learning a budget against its cost (``budget_cost``, a price in loss units per row and input;
dynamic-k MoE routers add such a compute term to the loss). k is an integer and carries no
gradient, so two differentiable paths stand in for it while training:

- the task side: ``RouteResult.keep`` ``[T, K]``, a soft keep-weight per kept candidate,
  ``s_j = sigmoid((k_soft - j - 1/2) / KEEP_TEMPERATURE)`` with ``j`` its 0-based rank and
  ``k_soft = k_min + c * (k_max - k_min)`` (0 on padding; ``k = round(k_soft)`` rows are kept).
  A consumer multiplies each row's *output* by it (``RouteResult.gates()`` does:
  ``softmax(scores) * keep``, what ``PoolLayer`` uses), so the training loss is a smooth function
  of ``k_soft`` and its gradient says whether more of the rows at the budget's edge would lower
  the loss. The edge row weighs between 0.5 and 0.88 while training: the gradient is taken
  around the middle of "row in" and "row out" (a midpoint rule), which makes it an estimate of
  what keeping the row is worth. Only while a learned head trains (grad mode): routing in eval
  or under ``no_grad`` has no ``keep`` and weighs every kept row fully, so a trained model's
  outputs differ slightly from its training-time ones (as dropout's do).

  Two earlier signals collapsed to ``k_min`` even at price 0 (bench/quality.py
  ``--budget-prices 0``, docs/generators.md): the same weights put on the *scores* (with softmax
  gates, raising a low-ranked row's score takes weight from the better rows above it, so the
  edge row always looked harmful), and on the outputs as a straight-through factor of value 1
  (the derivative at "row fully in" is biased toward removing it: a loss that curves upward
  around its minimum rises with any row's own contribution, by half its curvature term);
- the cost side: ``budget_cost * mean_t(k_soft)`` (the expected rows per input times the price)
  is added to whatever loss the scores reach, by an identity on the scores whose backward also
  feeds the penalty a gradient of one (DeepSeek-MoE's ``AddAuxiliaryLoss``). The caller's
  training loop is unchanged; ``RouteResult.cost`` holds the penalty for logging (do not add it
  to the loss again). The loss is taken to be a mean, unscaled (a ``GradScaler``'s scale does
  not reach the penalty: with one, scale ``budget_cost`` by hand).

Easy inputs (where the edge rows barely change the loss) then drift to ``k_min`` and hard ones
keep more rows; ``bench/quality.py --budget-prices`` measures quality and mean k at a few prices.

Calibration. Raw entropy and novelty are not spread evenly over [0, 1] (entropy of a few
similar scores sits near 1, so every input would get ``k_max``). ``calibrate(raw)`` stores the
quantiles of the raw signal over a sample; from then on ``c`` is the signal's empirical CDF, so
budgets spread evenly over ``[k_min, k_max]`` on inputs like the sample and unusual inputs land
at the ends. ``Router.calibrate_budget(x_sample)`` does this (VQ/LSH ``fit`` calls it); redo it
after the keys have trained for a while, since the scores they produce move.

The mapping depends on the router's state only (parameters, quantile buffer), not on history, so
routing is deterministic for a given state. The counters (``inputs``, ``rows``) are statistics.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._errors import RouterConfigError

__all__ = ["SIGNALS", "Budget", "BudgetSignal"]

BudgetSignal = Literal["fixed", "entropy", "novelty", "learned"]
SIGNALS: tuple[str, ...] = ("fixed", "entropy", "novelty", "learned")
_QUANTILES = 65  # points of the stored empirical CDF
# Width of the soft edge of a training budget (in rows): the last kept row weighs 0.5-0.88, the
# one before it 0.88-0.98, rows further in ~1 (module docstring).
KEEP_TEMPERATURE = 0.5


def _seeded_linear(d_in: int, d_out: int, seed: int) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default init drawn from ``seed``, not the global RNG.

    DESIGN: routing is a pure function of the router's state and no global RNG state is
    consulted; ``nn.Linear(...)`` would both read and advance ``torch``'s global generator.
    """
    lin = torch.nn.utils.skip_init(nn.Linear, d_in, d_out)
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        lin.weight.copy_(torch.rand(d_out, d_in, generator=g) * 2 * bound - bound)
        lin.bias.copy_(torch.rand(d_out, generator=g) * 2 * bound - bound)
    return lin


class _AddPenalty(torch.autograd.Function):
    """``x`` unchanged; its backward passes ``x``'s gradient through and gives ``penalty`` a
    gradient of one, which adds ``penalty`` to any (mean) loss that ``x`` reaches."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, penalty: Tensor) -> Tensor:
        ctx.penalty_meta = (penalty.shape, penalty.dtype, penalty.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        shape, dtype, device = ctx.penalty_meta
        return grad, torch.ones(shape, dtype=dtype, device=device)


class Budget(nn.Module):
    """Maps a per-input complexity signal to a row budget ``k`` in ``[k_min, k_max]``.

    Axes: T inputs, K = k_max candidates. ``seed`` draws the learned head's initial weights;
    ``cost`` is the price per row of a learned budget (see the module docstring).
    """

    def __init__(
        self,
        *,
        k_min: int,
        k_max: int,
        signal: BudgetSignal,
        d_in: int,
        temperature: float = 1.0,
        seed: int = 0,
        cost: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= k_min <= k_max:
            raise RouterConfigError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k={k_max}")
        if signal not in SIGNALS:
            raise RouterConfigError(f"budget signal must be one of {SIGNALS}, got {signal!r}")
        if not temperature > 0:
            raise RouterConfigError(f"budget temperature must be > 0, got {temperature}")
        if isinstance(cost, bool) or not isinstance(cost, int | float) or not 0 <= cost < math.inf:
            raise RouterConfigError(f"budget_cost must be a finite price >= 0, got {cost!r}")
        if cost and signal != "learned":
            raise RouterConfigError(
                f"budget_cost trains a learned budget head; budget {signal!r} has none: "
                "use budget='learned' (with k_min < k)"
            )
        self.cost = float(cost)
        self.k_min = int(k_min)
        self.k_max = int(k_max)
        self.signal = signal
        self.temperature = float(temperature)
        self.head = _seeded_linear(d_in, 1, seed) if signal == "learned" else None
        self.register_buffer("quantiles", torch.zeros(_QUANTILES))
        self.register_buffer("calibrated", torch.tensor(False))
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the statistics behind :attr:`mean_k` and :attr:`compute_saved`."""
        self._inputs: Tensor | None = None
        self._rows: Tensor | None = None

    def complexity(self, x: Tensor, scores: Tensor | None, novelty: Tensor | None) -> Tensor:
        """``[T]`` in [0, 1]; ``x [T, d_in]``, ``scores [T, K]`` (all finite; the ``"learned"``
        and ``"fixed"`` signals read x alone), ``novelty [T]``."""
        raw = self.raw(x, scores, novelty)
        if self.signal in ("entropy", "novelty") and bool(self.calibrated):
            return self._cdf(raw)
        return raw

    @torch.no_grad()
    def calibrate(self, raw: Tensor) -> None:
        """Store the quantiles of raw signals ``[n]`` measured on a representative sample."""
        if self.signal not in ("entropy", "novelty"):
            raise RouterConfigError(
                f"only 'entropy' and 'novelty' budgets are calibrated, not {self.signal!r}"
            )
        if raw.numel() < 2:
            raise RouterConfigError("calibrating the budget needs at least 2 samples")
        levels = torch.linspace(0, 1, _QUANTILES, dtype=torch.float64)
        q = torch.quantile(raw.detach().double().cpu(), levels)
        self.quantiles.copy_(q.to(self.quantiles))
        self.calibrated.fill_(True)

    def _cdf(self, raw: Tensor) -> Tensor:
        # piecewise-linear empirical CDF through the stored quantiles, clipped to [0, 1]
        q = self.quantiles.to(raw.dtype)
        n = q.numel()
        hi = torch.searchsorted(q, raw.detach().contiguous()).clamp(1, n - 1)
        lo_v, hi_v = q[hi - 1], q[hi]
        gap = hi_v - lo_v
        frac = torch.where(gap > 0, (raw - lo_v) / gap.clamp_min(1e-30), 0.5).clamp(0.0, 1.0)
        return ((hi - 1).to(raw.dtype) + frac) / (n - 1)

    def raw(self, x: Tensor, scores: Tensor | None, novelty: Tensor | None) -> Tensor:
        """The uncalibrated signal, ``[T]`` in [0, 1]."""
        t = x.shape[0]
        if self.signal == "fixed":
            return x.new_ones(t)
        if self.signal == "entropy":
            if scores is None:
                raise RouterConfigError("budget signal 'entropy' needs the candidates' scores")
            kk = scores.shape[-1]
            if kk < 2:
                return x.new_ones(t)
            logp = torch.log_softmax(scores / self.temperature, dim=-1)
            ent = -(logp.exp() * logp).sum(-1)
            return (ent / math.log(kk)).clamp(0.0, 1.0)
        if self.signal == "novelty":
            if novelty is None:
                raise RouterConfigError(
                    "budget signal 'novelty' needs a router with regions (VQRouter); "
                    "use 'entropy' or 'learned' for this router"
                )
            d = novelty.clamp_min(0.0)
            return d / (1.0 + d)
        assert self.head is not None
        return torch.sigmoid(self.head(x).squeeze(-1))

    def k_for(self, complexity: Tensor) -> Tensor:
        """``[T]`` int64 budgets from complexities in [0, 1]."""
        span = self.k_max - self.k_min
        k = self.k_min + torch.round(complexity.detach().float() * span).to(torch.int64)
        return k.clamp_(self.k_min, self.k_max)

    def expected_k(self, complexity: Tensor) -> Tensor:
        """``[T]`` the budget before rounding, ``k_min + c * (k_max - k_min)`` (differentiable)."""
        return self.k_min + complexity * (self.k_max - self.k_min)

    def train_signal(
        self, scores: Tensor, complexity: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(scores, keep, penalty)`` while a learned head trains: the scores (values unchanged;
        with a price, their backward also adds the penalty to the loss), the soft keep-weights
        ``[T, K]`` (0 on padding; their gradient trains the head) and the penalty (None without
        a price). See the module docstring."""
        k_soft = self.expected_k(complexity)  # [T]
        ranks = torch.arange(scores.shape[-1], device=scores.device, dtype=k_soft.dtype)
        edge = torch.sigmoid((k_soft[:, None] - ranks - 0.5) / KEEP_TEMPERATURE)  # [T, K]
        keep = torch.where(mask, edge, torch.zeros_like(edge))
        keep = keep.to(scores.dtype)
        if not self.cost:
            return scores, keep, None
        penalty = self.cost * k_soft.mean()
        return _AddPenalty.apply(scores, penalty), keep, penalty

    @torch.no_grad()
    def observe(self, k: Tensor) -> None:
        """Add one batch of budgets to the counters (kept on k's device: no sync)."""
        n = torch.tensor(k.numel(), dtype=torch.int64, device=k.device)
        s = k.sum()
        if self._inputs is None or self._rows is None:
            self._inputs, self._rows = n, s
        else:
            self._inputs = self._inputs + n
            self._rows = self._rows + s

    @property
    def inputs(self) -> int:
        """Inputs routed since the last reset."""
        return 0 if self._inputs is None else int(self._inputs)

    @property
    def rows(self) -> int:
        """Rows handed out since the last reset (sum of k)."""
        return 0 if self._rows is None else int(self._rows)

    @property
    def mean_k(self) -> float:
        """Average budget per input since the last reset (``k_max`` before any input)."""
        return self.rows / self.inputs if self.inputs else float(self.k_max)

    @property
    def compute_saved(self) -> float:
        """Fraction of row work saved against a fixed ``k = k_max``: ``1 - mean_k / k_max``."""
        return 1.0 - self.mean_k / self.k_max
