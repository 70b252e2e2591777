"""How executors train rows: the fused row step and the PyTorch habits it must honour.

Rows are updated inside the backward pass, as FBGEMM's TBE and TorchRec's fused optimizers do:
the executor's backward sums each used row's gradient and hands the sums to a :class:`RowTrainer`,
which applies the row optimizer to the deltas in the tier stack. Since no ``.grad`` ever exists
for a row, the habits that act on ``.grad`` elsewhere are rules here (each tested):

- a graph's row step applies once: a second backward through the same graph raises;
- ``grad_scaler=``: row gradients are divided by the scaler's current scale, and a step whose
  row gradients hold inf or NaN is skipped for the rows (``stats()["skipped_row_steps"]``), as
  ``GradScaler.step`` skips the dense optimizer's;
- ``accumulate()``: row gradients are summed over micro-batches and one row step is applied when
  the block exits (for SGD, the step of the concatenated batch);
- ``row_clip=``: each row's gradient is clipped to that norm (``clip_grad_norm_`` cannot see
  rows, which have no ``.grad``);
- no row update without a backward: a forward under ``torch.no_grad()`` or
  ``torch.inference_mode()`` builds no graph and releases its rows at once;
- ``row_selection=``: a :class:`RowSelection` (``_selection.py``) picks the rows a step
  updates (e.g. :class:`SparseFinetune`), after unscaling and clipping; protected rows
  (``Pool.protect``) are left out of every step whatever it picks.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dpsn.tiers import SECOND_BACKWARD, RowBatch, RowOptimizer

from . import _profile
from ._profile import ROW_STEP, scope
from ._selection import check_row_selection


def sum_by_row(
    batch: RowBatch, coef: torch.Tensor, vectors: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """``[n, F]``: for each distinct row of ``batch``, the sum over its uses ``u`` of
    ``coef[u] * vectors[group[u]]`` (uses flattened in request order).

    The gradient of one use of a row is a scalar times one input vector (a token's ``x`` or
    ``dy``, a bag's ``dy``), so the per-row sums are one sparse ``[rows, groups]`` x dense
    matmul, with no ``[uses, F]`` intermediate. The sparse pattern is the batch's own grouping
    of uses by row (``order``, ``offsets``), computed once when the rows were paged in.
    """
    order = batch.order
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the matmul is not
        warnings.simplefilter("ignore", UserWarning)
        m = torch.sparse_csr_tensor(
            batch.offsets,
            group.reshape(-1)[order],
            coef.reshape(-1)[order].to(vectors.dtype),
            (len(batch), vectors.shape[0]),
            check_invariants=False,
        )
    return m @ vectors


class RowTrainer:
    """Turns an executor's summed row gradients into row steps (see the module docstring).

    It reaches the rows only through the batch it is given (``apply_grads``, ``skip_step``,
    ``regroup``): ``pool`` is held just to hand to a row selection, whose public signature is
    ``select(pool, batch, grads)``."""

    def __init__(
        self,
        pool: Any,
        optimizer: RowOptimizer,
        *,
        grad_scaler: Any = None,
        row_clip: float | None = None,
        row_selection: Any = None,
    ) -> None:
        self._select = check_row_selection(row_selection)
        self.row_selection = row_selection
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise TypeError("grad_scaler must be a torch.amp.GradScaler (or have get_scale())")
        if row_clip is not None and not (isinstance(row_clip, int | float) and row_clip > 0):
            raise ValueError(f"row_clip must be a positive number, got {row_clip!r}")
        if row_clip is not None and not math.isfinite(row_clip):
            raise ValueError(f"row_clip must be finite, got {row_clip!r}")
        self.pool = pool
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.row_clip = None if row_clip is None else float(row_clip)
        self._depth = 0  # nesting of accumulate()
        self._stash: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._regroup: Callable[[Any], Any] | None = None  # the stash's first batch's regroup

    def step(self, batch: RowBatch, grads: torch.Tensor) -> None:
        """The backward of ``batch`` produced ``grads`` ``[n, dim]`` (aligned with
        ``batch.ids``): apply one row step, or stash it inside ``accumulate()``."""
        if batch.applied:
            raise RuntimeError(SECOND_BACKWARD)
        if _profile.timing_on or _profile.profiling():
            with scope(ROW_STEP):
                self._step(batch, grads)
        else:  # nothing times or profiles the step: no scope to open
            self._step(batch, grads)

    def _step(self, batch: RowBatch, grads: torch.Tensor) -> None:
        grads = self._unscale(grads.float())
        if self._depth:
            batch.applied = True  # its gradient is taken; a second backward still raises
            if not self._stash:
                self._regroup = batch.regroup  # how the block's rows are paged in again
            self._stash.append((batch.ids, grads))
            return
        if self._ready(batch, grads):
            batch.apply_grads(grads, self.optimizer, rows=self._rows(batch, grads))
        else:
            batch.applied = True

    def _rows(self, batch: RowBatch, grads: torch.Tensor) -> torch.Tensor | None:
        """The selection's mask of rows to update (None: all)."""
        return None if self._select is None else self._select(self.pool, batch, grads)

    def _unscale(self, grads: torch.Tensor) -> torch.Tensor:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return grads
        return grads / float(scaler.get_scale())

    def _ready(self, batch: Any, grads: torch.Tensor) -> bool:
        """Check and clip ``grads`` in place; False (and counted) when they are not finite.

        One sum answers "all finite?" in one pass, since inf and NaN propagate through it
        (``isfinite(...).all()`` took four passes, ~10 ms a step for a layer's 20k x 256 row
        gradients); only a sum that overflows is looked at element by element."""
        finite = bool(torch.isfinite(grads.sum())) or bool(torch.isfinite(grads).all())
        if not finite:
            batch.skip_step()
            return False
        if self.row_clip is not None:
            norms = torch.linalg.vector_norm(grads, dim=1, keepdim=True)
            grads.mul_((self.row_clip / (norms + 1e-6)).clamp_(max=1.0))
        return True

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Sum row gradients over the backward passes inside the block; apply one row step on
        leaving it (nothing if the block raised)."""
        self._depth += 1
        try:
            yield
        except BaseException:
            if self._depth == 1:
                self._stash.clear()
                self._regroup = None
            raise
        finally:
            self._depth -= 1
        if self._depth == 0 and self._stash:
            stash, self._stash = self._stash, []
            regroup, self._regroup = self._regroup, None
            assert regroup is not None
            self._apply_stash(stash, regroup)

    def _apply_stash(
        self, stash: list[tuple[torch.Tensor, torch.Tensor]], regroup: Callable[[Any], Any]
    ) -> None:
        ids = torch.cat([i for i, _ in stash])
        grads = torch.cat([g for _, g in stash])
        with regroup(ids) as batch:  # the distinct rows, sorted, with use inverse
            summed = torch.zeros((len(batch), grads.shape[1]), device=grads.device)
            summed.index_add_(0, batch.inverse.reshape(-1), grads)
            if self._ready(batch, summed):
                batch.apply_grads(summed, self.optimizer, rows=self._rows(batch, summed))
