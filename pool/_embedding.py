"""``PoolEmbedding``: the ``nn.EmbeddingBag`` of a pool, for recommender and embedding-table
models (the users TorchRec and HugeCTR serve): an id space of up to 2**63 rows, of which only
the rows that training touched cost storage.

It is also the second executor on the tier stack's public contract (``pool.page_in`` ->
``RowBatch`` -> ``apply_grads`` -> ``release``), next to ``PoolLayer``: the forward pools the
batch's rows with ``F.embedding_bag`` straight from the cache's row column, the backward sums
each row's gradient with one sparse matmul and hands it to the same row trainer (and so follows
the same rules: once per graph, ``grad_scaler``, ``accumulate()``, ``row_clip``).

Axes: B bags, m ids in all, n distinct rows, D = pool.dim.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dpsn.tiers import RowBatch

from ._optim import RowOptimizer, make_row_optimizer
from ._pool import Pool
from ._training import RowTrainer, sum_by_row

_MODES = ("sum", "mean")


class _Bags(torch.autograd.Function):
    """Bags of a paged-in batch; backward: row steps and ``per_sample_weights``' gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        anchor: torch.Tensor,
        weights: torch.Tensor | None,
        batch: RowBatch,
        offsets: torch.Tensor,
        bag: torch.Tensor,
        module: PoolEmbedding,
    ) -> torch.Tensor:
        out = F.embedding_bag(
            batch.use_index.reshape(-1),
            batch.table,
            offsets,
            mode=module.mode,
            per_sample_weights=weights,
        )
        ctx.batch, ctx.module = batch, module
        ctx.save_for_backward(weights, offsets, bag)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, offsets, bag = ctx.saved_tensors
        batch, module = ctx.batch, ctx.module
        dout = dout.float()
        m = len(bag)
        if weights is not None:
            coef = weights.float()
        elif module.mode == "mean":
            sizes = torch.diff(offsets, append=torch.tensor([m], device=offsets.device))
            coef = 1.0 / sizes.clamp(min=1).float()[bag]
        else:
            coef = torch.ones(m, device=dout.device)
        dweights = None
        if weights is not None and ctx.needs_input_grad[1]:
            rows = torch.index_select(batch.table, 0, batch.use_index.reshape(-1)).float()
            dweights = (rows * dout[bag]).sum(dim=1).to(weights.dtype)  # (m,)
        if len(batch) and module.pool.writable:  # a read-only pool's rows never change
            module.trainer.step(batch, sum_by_row(batch, coef, dout, bag))
        batch.release()
        return None, dweights, None, None, None, None


class PoolEmbedding(nn.Module):
    """``nn.EmbeddingBag`` whose table is a dpsn pool: ``forward(input, offsets=None,
    per_sample_weights=None)`` with PyTorch's conventions:

    - ``input`` 2-D ``[B, N]``: B bags of N ids each (``offsets`` must be None);
    - ``input`` 1-D ``[m]`` with ``offsets`` ``[B]``: bag b is ``input[offsets[b]:offsets[b+1]]``
      (the last runs to the end); an empty bag gives zeros;
    - ``per_sample_weights`` (same shape as ``input``, ``mode="sum"`` only, as in PyTorch)
      scale each id's row, and receive a gradient when they require one.

    Returns ``[B, pool.dim]`` in the pool's dtype. Rows are trained by ``row_optimizer``
    (default row-wise AdaGrad, the usual choice for embedding tables) inside backward; the
    pool must be writable for that. See :class:`PoolLayer` for ``grad_scaler``, ``row_clip``
    and ``row_selection``, and :meth:`accumulate` for gradient accumulation.
    """

    def __init__(
        self,
        pool: Pool,
        mode: Literal["sum", "mean"] = "mean",
        *,
        row_optimizer: str | RowOptimizer = "adagrad",
        row_lr: float | None = None,
        grad_scaler: Any = None,
        row_clip: float | None = None,
        row_selection: Any = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES} (as nn.EmbeddingBag's), got {mode!r}")
        self.pool = pool
        self.mode = mode
        kwargs = {} if row_lr is None else {"lr": row_lr}
        self.row_optimizer = make_row_optimizer(row_optimizer, **kwargs)
        self.trainer = RowTrainer(
            pool,
            self.row_optimizer,
            grad_scaler=grad_scaler,
            row_clip=row_clip,
            row_selection=row_selection,
        )
        pool.set_state_width(self.row_optimizer.state_width(pool.dim))

    @property
    def embedding_dim(self) -> int:
        return self.pool.dim

    @property
    def num_embeddings(self) -> int:
        return self.pool.rows

    def extra_repr(self) -> str:
        return (
            f"{self.pool.rows}, {self.pool.dim}, mode={self.mode!r}, "
            f"row_optimizer={self.row_optimizer.name}"
        )

    def accumulate(self) -> AbstractContextManager[None]:
        """``with emb.accumulate():`` sums the rows' gradients over the backward passes in the
        block and applies one row step when it exits."""
        return self.trainer.accumulate()

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ids, offsets, bag = self._bags(input, offsets)
        weights = None
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError('per_sample_weights are only supported with mode="sum"')
            if per_sample_weights.shape != input.shape:
                raise ValueError(
                    f"per_sample_weights must have input's shape {tuple(input.shape)}, got "
                    f"{tuple(per_sample_weights.shape)}"
                )
            weights = per_sample_weights.reshape(-1).to(self.pool.device, self.pool.dtype)
        batch = self.pool.page_in(ids)
        out = _Bags.apply(batch.anchor, weights, batch, offsets, bag, self)
        if not out.requires_grad:
            batch.release()  # no backward will come for these rows (no_grad, inference_mode)
        return out

    def _bags(
        self, input: torch.Tensor, offsets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids ``[m]``, bag starts ``[B]``, bag of each id ``[m]``) on the pool's device."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a tensor of ids, got {type(input).__name__}")
        dev = self.pool.device
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D (bags of equal size)")
            b, n = input.shape
            starts = torch.arange(0, b * n, n, device=dev)
            bag = torch.arange(b, device=dev).repeat_interleave(n)
            return input.reshape(-1), starts, bag
        if input.dim() != 1 or offsets is None or offsets.dim() != 1:
            raise ValueError(
                "input must be 2-D [bags, ids], or 1-D [ids] with 1-D offsets [bags] "
                f"(as nn.EmbeddingBag); got input {tuple(input.shape)}, offsets "
                f"{None if offsets is None else tuple(offsets.shape)}"
            )
        if offsets.is_floating_point() or offsets.dtype == torch.bool:
            raise ValueError(f"offsets must be integers, got {offsets.dtype}")
        offsets = offsets.to(dev, torch.int64)
        m = len(input)
        if len(offsets) == 0 or int(offsets[0]) != 0:
            raise ValueError("offsets must start with 0")
        if bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) > m:
            raise ValueError(f"offsets must be non-decreasing and at most len(input)={m}")
        positions = torch.arange(m, device=dev)
        bag = torch.searchsorted(offsets, positions, right=True) - 1
        return input, offsets, bag
