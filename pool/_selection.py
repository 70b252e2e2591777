"""Row selection: which of a step's rows the row optimizer updates (the row trainer's hook).

Every executor (``PoolLayer``, ``PoolEmbedding``) hands its summed row gradients to a row
trainer; with ``row_selection=`` the trainer first asks the selection which rows to update, and
steps only those (``RowBatch.apply_grads(..., rows=mask)``): the others keep their delta and
optimizer state, as protected rows do (``Pool.protect``), and their uses are still counted.

A selection is a :class:`RowSelection` (subclass it and implement :meth:`RowSelection.select`)
or any callable ``(pool, batch, grads) -> mask | None`` with the same contract. It is also the
public hook for anything else a row step needs before the optimizer sees the gradients: it may
change ``grads`` in place (scale, project, mask columns), since they are the trainer's own
unscaled, clipped copy.

:class:`SparseFinetune` is sparse memory finetuning's selection (Lin et al., "Continual
Learning via Sparse Memory Finetuning", 2025): update only the rows whose use in the new data
is high against their background use, a TF-IDF score.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch

from dpsn.errors import LifecycleError

__all__ = ["RowSelection", "SparseFinetune", "check_row_selection"]


@runtime_checkable
class RowSelection(Protocol):
    """The row trainer's hook: ``select(pool, batch, grads)`` returns a bool ``[n]`` mask of
    the rows of ``batch`` (aligned with ``batch.ids``) that the step updates, or None for all.

    ``grads`` ``[n, dim]`` float32 are the rows' summed gradients (unscaled and clipped); a
    selection may change them in place. Called inside backward, once per row step (once per
    ``accumulate()`` block); it must not page rows in or commit.
    """

    def select(self, pool: Any, batch: Any, grads: torch.Tensor) -> torch.Tensor | None:
        """The mask of ``batch``'s rows to update (bool ``[n]``, aligned with ``batch.ids``),
        or None for all."""
        ...


class SparseFinetune:
    """Sparse memory finetuning (Lin et al., 2025): each step updates only the ``top`` rows of
    the batch with the highest TF-IDF score::

        tf_i  = uses of row i in this step / all uses of the step
        idf_i = log(1 / (background_i + smooth))
        score = tf_i * idf_i

    where ``background_i`` is row i's background use frequency: the lifecycle's ``recent``
    statistic (a moving average of "used in this step", in [0, 1]) of ``background``, a pool
    whose statistics describe the data to keep (for instance a read-only view of a snapshot
    taken before the new data: ``dpsn.open(path, at="task-1")``), or, when None, of the pool
    being trained (its statistics as of now). Rows the background never used score highest;
    rows it used in most steps lowest.

    Args:
        top: rows updated per step: an int (at least 1), or a float in (0, 1] (that fraction
            of the step's distinct rows, at least one).
        background: a pool with a lifecycle, or None (the trained pool; it needs a lifecycle).
        smooth: added to the background frequency (bounds idf by ``log(1 / smooth)``).

    All three may be set again later (checked as in the constructor), which is how a
    continual run changes its selection at a task boundary.
    """

    def __init__(self, top: int | float, *, background: Any = None, smooth: float = 0.01):
        self.top = top
        self.background = background
        self.smooth = smooth

    # The settings are properties, checked when set, so a selection can change at a task
    # boundary without rebuilding the layer that holds it: start a run with ``top=1.0`` (every
    # row), then at the next task set ``background`` to a snapshot of what to keep and ``top``
    # to the fraction to update (docs/continual.md).

    @property
    def top(self) -> int | float:
        """Rows updated per step: an int (at least 1), or a float in (0, 1] (that fraction of
        the step's distinct rows, at least one; 1.0 updates every row and scores nothing)."""
        return self._top

    @top.setter
    def top(self, top: int | float) -> None:
        if isinstance(top, bool) or not isinstance(top, int | float):
            raise TypeError(f"top must be an int or a float, got {type(top).__name__}")
        if isinstance(top, int) and top < 1:
            raise ValueError(f"top (rows per step) must be at least 1, got {top}")
        if isinstance(top, float) and not (0.0 < top <= 1.0):
            raise ValueError(f"top as a fraction must be in (0, 1], got {top}")
        self._top = top

    @property
    def background(self) -> Any:
        """The pool whose usage statistics describe the data to keep, or None (the trained
        pool's own). The caller keeps it open while the selection is used."""
        return self._background

    @background.setter
    def background(self, background: Any) -> None:
        if background is not None and getattr(background, "lifecycle", None) is None:
            raise LifecycleError(
                "SparseFinetune's background pool has no row lifecycle, so no usage "
                "statistics: open it with a store that was trained with dpsn.Lifecycle()"
            )
        self._background = background

    @property
    def smooth(self) -> float:
        """Added to the background frequency (bounds idf by ``log(1 / smooth)``)."""
        return self._smooth

    @smooth.setter
    def smooth(self, smooth: float) -> None:
        if not (isinstance(smooth, int | float) and math.isfinite(smooth) and smooth > 0):
            raise ValueError(f"smooth must be a positive finite number, got {smooth!r}")
        self._smooth = float(smooth)

    def __repr__(self) -> str:
        bg = "the trained pool" if self.background is None else str(self.background.path)
        return f"SparseFinetune(top={self.top!r}, background={bg}, smooth={self.smooth})"

    def scores(self, pool: Any, batch: Any) -> torch.Tensor:
        """``[n]`` float64 TF-IDF scores of ``batch``'s rows (aligned with ``batch.ids``)."""
        source = pool if self.background is None else self.background
        if source.lifecycle is None:
            raise LifecycleError(
                "SparseFinetune scores rows by their usage statistics, and this pool has no "
                "row lifecycle: create or open it with lifecycle=dpsn.Lifecycle(), or pass "
                "background= a pool that has one"
            )
        ids = batch.ids.cpu()
        freq = source.usage(ids)["recent"].double().clamp(0.0, 1.0)
        counts = batch.counts.cpu().double()
        tf = counts / counts.sum().clamp(min=1.0)
        return tf * torch.log(1.0 / (freq + self.smooth))

    def select(self, pool: Any, batch: Any, grads: torch.Tensor) -> torch.Tensor | None:
        """The top rows of the batch by TF-IDF: use here high against background use. On a
        sharded pool the usage statistics live with each row's owner, so the selection runs
        there (each rank among its own rows; an int ``top`` is then per shard)."""
        if hasattr(batch, "select_at_owner"):
            batch.select_at_owner(self.select)
            return None
        n = len(batch)
        k = self.top if isinstance(self.top, int) else max(1, math.ceil(self.top * n))
        if k >= n:
            return None
        score = self.scores(pool, batch)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.topk(score, k, sorted=False).indices] = True
        return keep.to(batch.ids.device)


def check_row_selection(selection: Any) -> Any:
    """``selection`` as the trainer calls it: ``fn(pool, batch, grads)``, or None."""
    if selection is None:
        return None
    if isinstance(selection, RowSelection):
        return selection.select
    if callable(selection):
        return selection
    raise TypeError(
        "row_selection takes a dpsn.RowSelection (an object with select(pool, batch, grads)), "
        f"a callable with that signature, or None; got {type(selection).__name__}"
    )
