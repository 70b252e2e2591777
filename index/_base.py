"""The router interface and what a routing call returns.

A router decides, for each input vector, which rows of the pool it needs and how many, without
looking at the rows one by one. Every router ranks ``k_max`` candidates per input, then the
budget (``_budget.py``) keeps the best ``k[t]`` of them; the rest of the row is padding.

Padding convention (the contract consumers rely on):

- ``ids[t, j] == PAD_ID`` (-1) and ``scores[t, j] == -inf`` for every ``j >= k[t]``;
- valid entries come first, best first, so ``mask = arange(k_max) < k[:, None]`` selects them;
- -inf makes ``softmax(scores, -1)`` give padding exactly zero weight, and -1 can never be
  mistaken for a row. Do not multiply padded scores by a 0/1 mask (``-inf * 0`` is NaN): use
  ``torch.where(mask, scores, 0)`` or the softmax. Gather rows with ``ids.clamp_min(0)`` and mask.

Axes used throughout: T inputs, K = k_max candidates per input, H heads, D dense key width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._budget import SIGNALS, Budget
from ._config import RouterConfig
from ._errors import RouterConfigError, RouterInputError
from ._topk import merge_topk
from ._usage import UsageCounter

__all__ = ["MAX_ROWS", "PAD_ID", "PAD_SCORE", "RouteResult", "Router"]

PAD_ID = -1
PAD_SCORE = float("-inf")
MAX_ROWS = 1 << 62  # ids are int64 and region arithmetic must not overflow


@dataclass(frozen=True, slots=True, eq=False)
class RouteResult:
    """The rows chosen for a batch of inputs (see the module docstring for the padding).

    - ``ids``: ``[T, K]`` int64 row ids, padding ``PAD_ID``.
    - ``scores``: ``[T, K]`` float, padding ``-inf``; differentiable w.r.t. the router's query
      and keys (and the input) where the router is.
    - ``k``: ``[T]`` int64 budget actually used per input.
    - ``complexity``: ``[T]`` in [0, 1], the budget signal (differentiable for a learned head).
    - ``regions``: ``[T, B]`` int64 regions searched (VQ/LSH, best first), else ``None``.
    - ``cost``: the compute penalty ``budget_cost * mean(expected k)`` of a learned budget
      with a price (already added to the loss through the scores' backward; for logging),
      else ``None``.
    - ``keep``: ``[T, K]`` soft keep-weights of a learned budget being trained (in (0.5, 1] on
      kept rows, 0 on padding; multiply each row's output by it so the loss trains the budget
      head, as :meth:`gates` does; see ``dpsn.index`` budgets), else ``None``.
    """

    ids: Tensor
    scores: Tensor
    k: Tensor
    complexity: Tensor
    regions: Tensor | None = None
    cost: Tensor | None = None
    keep: Tensor | None = None

    @property
    def k_max(self) -> int:
        """Width K of ``ids``/``scores``."""
        return self.ids.shape[-1]

    @property
    def mask(self) -> Tensor:
        """``[T, K]`` bool, True where the entry is a real row (``arange(K) < k[:, None]``)."""
        return torch.arange(self.k_max, device=self.k.device) < self.k[:, None]

    def gates(self) -> Tensor:
        """``[T, K]`` mixing weights of the chosen rows: ``softmax(scores)`` (padding exactly 0),
        times :attr:`keep` while a learned budget trains (the soft budget edge through which the
        loss trains the budget head)."""
        g = torch.softmax(self.scores, dim=-1)
        return g if self.keep is None else g * self.keep

    @property
    def mean_k(self) -> float:
        """Average budget of this batch."""
        return float(self.k.float().mean()) if self.k.numel() else 0.0

    @property
    def compute_saved(self) -> float:
        """Fraction of row work this batch saved against a fixed ``k = k_max``."""
        return 1.0 - self.mean_k / self.k_max if self.k.numel() else 0.0


class Router(nn.Module, ABC):
    """Base of every router: input checks, the budget, padding, usage counters, brute force.

    Subclasses implement ``_candidates`` (the ranked ``k_max`` candidates with differentiable
    scores) and the dense view of their scores (``dense_queries``/``dense_keys``/
    ``dense_offset``), in which ``score(t, i) = max_h q[t, h] . key[i] + offset[t]``. The dense
    view is what tests and ``bench/routing.py`` brute-force against; it is never used to route.

    Routing is a pure function of the router's state (parameters and buffers) and ``x``, in
    eval mode (train-mode batch norm on the query uses batch statistics, as any BN does).
    """

    kind: ClassVar[str]
    Config: ClassVar[type[RouterConfig]] = RouterConfig  # the config dataclass of this kind
    default_signal: ClassVar[str] = "entropy"
    provides_novelty: ClassVar[bool] = False
    # whether ``_candidates`` takes ``budgets`` and may stop its search there
    stops_at_budget: ClassVar[bool] = False

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        d_in, num_rows, k = config.d_in, config.num_rows, config.k
        if not isinstance(d_in, int) or d_in < 1:
            raise RouterConfigError(f"d_in must be a positive int, got {d_in!r}")
        if not isinstance(num_rows, int) or not 1 <= num_rows <= MAX_ROWS:
            raise RouterConfigError(f"num_rows must be an int in [1, 2**62], got {num_rows!r}")
        if not isinstance(k, int) or not 1 <= k <= num_rows:
            raise RouterConfigError(f"k must be an int in [1, num_rows={num_rows}], got {k!r}")
        k_min = k if config.k_min is None else config.k_min
        budget = config.budget
        if budget == "auto":
            budget = "fixed" if k_min == k else self.default_signal
        if budget not in SIGNALS:
            raise RouterConfigError(f"budget must be 'auto' or one of {SIGNALS}, got {budget!r}")
        if budget == "novelty" and not self.provides_novelty:
            raise RouterConfigError(
                f"budget 'novelty' needs region distances; {type(self).__name__} has none: "
                "use 'entropy' or 'learned'"
            )
        self.cfg = config.with_(k_min=k_min, budget=budget)
        self.d_in = d_in
        self.num_rows = num_rows
        self.k_max = k
        self.k_min = k_min
        self.budget = Budget(
            k_min=k_min,
            k_max=k,
            signal=budget,  # type: ignore[arg-type]
            d_in=d_in,
            temperature=config.temperature,
            seed=config.seed,
            cost=config.budget_cost,
        )
        self.usage_counter = UsageCounter(num_rows)
        self.track_usage = True

    # -- what subclasses provide -------------------------------------------------------------

    @abstractmethod
    def _candidates(
        self, x: Tensor, budgets: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(ids [T, K], scores [T, K], novelty [T] | None, regions [T, B] | None)``.

        ``ids`` are K distinct valid rows, ranked best first; ``scores`` carry gradients.
        ``budgets`` (int64 ``[T]``, passed when the budget is known before the search and the
        class sets ``stops_at_budget``): input ``t`` keeps only its first ``budgets[t]``
        entries, so the search may stop there and pad the rest (``PAD_ID``, ``PAD_SCORE``).
        """

    @abstractmethod
    def dense_queries(self, x: Tensor) -> Tensor:
        """``[T, H, D]`` queries of the dense view of this router's scores."""

    @abstractmethod
    def dense_keys(self, ids: Tensor) -> Tensor:
        """``[n, D]`` keys of rows ``ids [n]`` in the dense view (materialised on demand)."""

    def dense_offset(self, x: Tensor) -> Tensor:
        """``[T]`` per-input constant added to the dense score (does not change rankings)."""
        return x.new_zeros(x.shape[0])

    # -- the call ----------------------------------------------------------------------------

    def forward(self, x: Tensor) -> RouteResult:
        """Route ``x [T, d_in]``; see :class:`RouteResult` for what comes back."""
        x = self.check_input(x)
        if self.budget.signal == "learned":  # x alone sets the budget: search only that far
            complexity = self.budget.complexity(x, None, None)
            k = self.budget.k_for(complexity)
            if self.stops_at_budget:
                ids, scores, novelty, regions = self._candidates(x, k)
            else:  # a subclass written before budgets reached the search
                ids, scores, novelty, regions = self._candidates(x)
        else:  # the signal reads the candidates' scores (or is fixed)
            ids, scores, novelty, regions = self._candidates(x)
            complexity = self.budget.complexity(x, scores.detach(), novelty)
            k = self.budget.k_for(complexity)
        cost = keep = None
        if self.budget.signal != "fixed":  # a fixed budget leaves no padding to mark
            mask = torch.arange(self.k_max, device=x.device) < k[:, None]  # [T, K]
            ids = ids.masked_fill(~mask, PAD_ID)
            scores = scores.masked_fill(~mask, PAD_SCORE)
            if self.budget.signal == "learned" and complexity.requires_grad:  # graph being built
                scores, keep, cost = self.budget.train_signal(scores, complexity, mask)
        if self.track_usage:
            self.usage_counter.observe(ids)  # padding (PAD_ID) is not counted
            self.budget.observe(k)
        return RouteResult(
            ids=ids,
            scores=scores,
            k=k,
            complexity=complexity,
            regions=regions,
            cost=cost,
            keep=keep,
        )

    def check_input(self, x: Tensor) -> Tensor:
        """Validate ``x`` and cast it to the router's float dtype; raise RouterInputError."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise RouterInputError(f"{name} expects a torch.Tensor [T, {self.d_in}], got {type(x)}")
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise RouterInputError(
                f"{name} expects x of shape [T, d_in={self.d_in}], got {tuple(x.shape)}; "
                "flatten leading axes with x.reshape(-1, d_in)"
            )
        if not x.is_floating_point():
            raise RouterInputError(
                f"{name} expects a floating-point x, got {x.dtype}; cast with x.float()"
            )
        ref = self._reference()
        if x.device != ref.device:
            raise RouterInputError(
                f"x is on {x.device} but the router is on {ref.device}; move one with .to()"
            )
        # one pass: inf and NaN reach the sum (only if it overflows, look element by element)
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise RouterInputError(f"{name} got NaN or Inf in x; fix the upstream activations")
        return x.to(ref.dtype)

    def _reference(self) -> Tensor:
        for t in self.parameters():
            return t
        for t in self.buffers():
            return t
        raise RuntimeError("router has no parameters or buffers")  # pragma: no cover

    # -- brute force over the dense view ----------------------------------------------------

    @torch.no_grad()
    def exact_topk(
        self, x: Tensor, k: int | None = None, *, rows_per_chunk: int = 1 << 18
    ) -> tuple[Tensor, Tensor]:
        """Exact top-k over all ``num_rows`` rows by scoring every one: ``(ids, scores)``.

        Only for checks (tests, benchmarks): it costs ``T * num_rows * D``. Refuses pools above
        2**28 rows.
        """
        if self.num_rows > 1 << 28:
            raise RouterConfigError(
                f"exact_topk scores every row; num_rows={self.num_rows} is too many"
            )
        x = self.check_input(x)
        k = self.k_max if k is None else k
        q = self.dense_queries(x)  # [T, H, D]
        vals: list[Tensor] = []
        idx: list[Tensor] = []
        for s in range(0, self.num_rows, rows_per_chunk):
            rows = torch.arange(s, min(s + rows_per_chunk, self.num_rows), device=x.device)
            keys = self.dense_keys(rows)  # [n, D]
            sc = torch.einsum("thd,nd->thn", q, keys).amax(dim=1)  # [T, n]
            v, i = sc.topk(min(k, sc.shape[1]), dim=-1)
            vals.append(v)
            idx.append(rows[i])
            if len(vals) > 8:
                v, i = merge_topk(vals, idx, k)
                vals, idx = [v], [i]
        v, i = merge_topk(vals, idx, k)
        return i, v + self.dense_offset(x)[:, None]

    @torch.no_grad()
    def calibrate_budget(self, x_sample: Tensor, *, batch: int = 4096) -> None:
        """Spread budgets evenly over [k_min, k_max] on inputs like ``x_sample``.

        Routes the sample (without counting usage) and stores the quantiles of the budget signal
        (see ``_budget``). A no-op for a fixed budget; refused for a learned one. The sample is
        routed in eval mode, so a query batch norm's running statistics are left as they were
        (and the budget is calibrated on the scores routing will actually produce).
        """
        if self.budget.signal == "fixed":
            return
        x = self.check_input(x_sample)
        was_training = self.training
        self.eval()
        try:
            raws = []
            for s in range(0, x.shape[0], batch):
                xb = x[s : s + batch]
                _, scores, novelty, _ = self._candidates(xb)
                raws.append(self.budget.raw(xb, scores.detach(), novelty))
        finally:
            self.train(was_training)
        self.budget.calibrate(torch.cat(raws))

    # -- statistics and persistence hooks -----------------------------------------------------

    def usage(self) -> dict[str, float]:
        """Usage figures (fraction of rows ever selected, KL from uniform, Gini) plus budget.

        ``mean_k`` and ``compute_saved`` compare the budgets used with a fixed ``k = k_max``.
        """
        out = self.usage_counter.figures()
        out["mean_k"] = self.budget.mean_k
        out["compute_saved"] = self.budget.compute_saved
        out["inputs"] = float(self.budget.inputs)
        return out

    def reset_usage(self) -> None:
        """Zero the usage and budget counters (they are statistics, never routing state)."""
        self.usage_counter.reset()
        self.budget.reset_counters()

    def config(self) -> RouterConfig:
        """The resolved, frozen configuration: ``type(self)(config())`` rebuilds the shape, and
        it is what ``save_router`` persists."""
        return self.cfg

    def extra_arrays(self) -> dict[str, Any]:
        """Arrays beyond ``state_dict`` to persist (FAISS index blobs), name -> uint8 ndarray."""
        return {}

    def load_extra_arrays(self, arrays: dict[str, Any]) -> None:
        """Restore what :meth:`extra_arrays` returned."""
