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
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dpsn.tiers import RowBatch, RowOptimizer, make_row_optimizer

from ._pool import Pool
from ._reopen import (
    CONFIG_FORMAT,
    MODULE,
    field,
    open_source,
    optimizer_config,
    optimizer_from,
    saved_config,
)
from ._training import RowTrainer, sum_by_row

_MODES = ("sum", "mean", "max")
_MODE_CODE = {"sum": 0, "mean": 1, "max": 2}  # aten's embedding_bag modes


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
        ctx.batch, ctx.module = batch, module
        ctx.argmax = None
        if module.mode == "max":
            out, _, sizes, slots = torch.embedding_bag(
                batch.table, batch.use_index.reshape(-1), offsets, False, 2, False, None
            )
            # the distinct row that won each (bag, column), -1 for empty bags: mapped now,
            # while ``batch.index`` still names the slots the forward read
            if len(batch.index) == 0:  # no ids at all: every bag is empty
                ctx.argmax = torch.full(slots.shape, -1, dtype=torch.int64, device=slots.device)
            else:
                order = torch.argsort(batch.index)
                at = torch.searchsorted(batch.index[order], slots.clamp(min=0).reshape(-1))
                won = order[at.clamp(max=len(order) - 1)].reshape(slots.shape)
                ctx.argmax = torch.where(sizes[:, None] > 0, won, -1)
        else:
            out = F.embedding_bag(
                batch.use_index.reshape(-1),
                batch.table,
                offsets,
                mode=module.mode,
                per_sample_weights=weights,
            )
        ctx.save_for_backward(weights, offsets, bag)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, offsets, bag = ctx.saved_tensors
        batch, module = ctx.batch, ctx.module
        dout = dout.float()
        m = len(bag)
        if ctx.argmax is not None:  # max: each column's gradient goes to the row that won it
            won = ctx.argmax
            keep = won >= 0
            grads = torch.zeros((len(batch), dout.shape[1]), device=dout.device)
            grads.scatter_add_(0, won.clamp(min=0), torch.where(keep, dout, 0.0))
            if len(batch) and batch.writable:
                module.trainer.step(batch, grads)
            batch.release()
            return None, None, None, None, None, None
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
        if len(batch) and batch.writable:  # a read-only pool's rows never change
            module.trainer.step(batch, sum_by_row(batch, coef, dout, bag))
        batch.release()
        return None, dweights, None, None, None, None


class PoolEmbedding(nn.Module):
    """``nn.EmbeddingBag`` whose table is a dpsn pool: ``forward(input, offsets=None,
    per_sample_weights=None)`` with PyTorch's conventions:

    - ``input`` 2-D ``[B, N]``: B bags of N ids each (``offsets`` must be None);
    - ``input`` 1-D ``[m]`` with ``offsets`` ``[B]``: bag b is ``input[offsets[b]:offsets[b+1]]``
      (the last runs to the end; with ``include_last_offset=True`` offsets are ``[B + 1]`` and
      the last is ``len(input)``, TorchRec's convention); an empty bag gives zeros;
    - ``per_sample_weights`` (same shape as ``input``, ``mode="sum"`` only, as in PyTorch)
      scale each id's row, and receive a gradient when they require one;
    - ``mode``: ``"sum"``, ``"mean"`` or ``"max"`` (per column; its gradient goes to the row
      that won each column, as PyTorch's);
    - ``padding_idx``: ids equal to it are left out of their bag (a mean does not count them)
      and their row is never paged in nor trained. Negative values count from ``pool.rows``.

    ``nn.EmbeddingBag`` options that do not apply to a pool are refused (``TypeError`` naming
    them): ``max_norm`` / ``norm_type`` (renormalising rows in place would write untrained
    rows), ``scale_grad_by_freq`` and ``_weight``. ``sparse`` is accepted either way: rows are
    always updated sparsely, inside backward (there is no ``.weight`` gradient).

    Returns ``[B, pool.dim]`` in the pool's dtype. Rows are trained by ``row_optimizer``
    (default row-wise AdaGrad, the usual choice for embedding tables) inside backward; the
    pool must be writable for that. See :class:`PoolLayer` for ``grad_scaler``, ``row_clip``
    and ``row_selection``, and :meth:`accumulate` for gradient accumulation. :meth:`commit`
    saves the rows and this module's configuration; :meth:`from_store` rebuilds it.
    """

    def __init__(
        self,
        pool: Pool,
        mode: Literal["sum", "mean", "max"] = "mean",
        *,
        padding_idx: int | None = None,
        include_last_offset: bool = False,
        row_optimizer: str | RowOptimizer = "adagrad",
        row_lr: float | None = None,
        grad_scaler: Any = None,
        row_clip: float | None = None,
        row_selection: Any = None,
        **unsupported: Any,
    ) -> None:
        super().__init__()
        _refuse(unsupported)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES} (as nn.EmbeddingBag's), got {mode!r}")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
                raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
            if not -pool.rows <= padding_idx < pool.rows:
                raise ValueError(
                    f"padding_idx must be within [-{pool.rows}, {pool.rows}), got {padding_idx}"
                )
            padding_idx %= pool.rows
        self.pool = pool
        self.mode = mode
        self.padding_idx = padding_idx
        self.include_last_offset = bool(include_last_offset)
        kwargs = {} if row_lr is None else {"lr": row_lr}
        self.row_optimizer = make_row_optimizer(row_optimizer, **kwargs)
        self.row_clip = row_clip
        self.trainer = RowTrainer(
            pool,
            self.row_optimizer,
            grad_scaler=grad_scaler,
            row_clip=row_clip,
            row_selection=row_selection,
        )
        pool.set_state_width(self.row_optimizer.state_width(pool.dim))

    @classmethod
    def from_store(
        cls,
        source: str | Path | Pool,
        *,
        mode: str = "r",
        grad_scaler: Any = None,
        **open_kwargs: Any,
    ) -> PoolEmbedding:
        """The ``PoolEmbedding`` that :meth:`commit` saved in a store, rebuilt: same mode,
        ``padding_idx``, offsets convention and row optimizer. ``source`` is a store path
        (opened in ``mode``, with ``open_kwargs`` such as ``cache_rows``) or an open pool.
        On a read-only pool the module is returned in ``eval()`` mode."""
        pool = open_source(source, mode, open_kwargs)
        config = saved_config(pool, "PoolEmbedding")
        padding = config.get("padding_idx")
        if padding is not None:
            padding = field(config, "padding_idx", int)
        clip = config.get("row_clip")
        emb = cls(
            pool,
            field(config, "mode", str),
            padding_idx=padding,
            include_last_offset=field(config, "include_last_offset", bool),
            row_optimizer=optimizer_from(config.get("row_optimizer")),
            grad_scaler=grad_scaler,
            row_clip=None if clip is None else float(field(config, "row_clip", (int, float))),
        )
        return emb if pool.writable else emb.eval()

    def config(self) -> dict[str, Any]:
        """The JSON configuration :meth:`commit` saves and :meth:`from_store` reads."""
        return {
            "kind": "PoolEmbedding",
            "format": CONFIG_FORMAT,
            "mode": self.mode,
            "padding_idx": self.padding_idx,
            "include_last_offset": self.include_last_offset,
            "row_optimizer": optimizer_config(self.row_optimizer),
            "row_clip": self.row_clip,
        }

    def commit(self, message: str = "") -> Any:
        """Write back the trained rows and their optimizer state, with this module's
        configuration, in one atomic commit of the pool's store."""
        self.pool.save_module(MODULE, self.config())
        return self.pool.commit(message)

    @property
    def embedding_dim(self) -> int:
        """The width of a pooled embedding (the pool's ``dim``), as ``nn.EmbeddingBag``'s."""
        return self.pool.dim

    @property
    def num_embeddings(self) -> int:
        """The table's rows (the pool's, virtual), as ``nn.EmbeddingBag``'s."""
        return self.pool.rows

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (
            f"{self.pool.rows}, {self.pool.dim}, mode={self.mode!r}{pad}, "
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
        if self.padding_idx is not None:
            ids, offsets, bag, weights = self._drop_padding(ids, offsets, bag, weights)
        batch = self.pool.page_in(ids)
        out = _Bags.apply(batch.anchor, weights, batch, offsets, bag, self)
        if not out.requires_grad:
            batch.release()  # no backward will come for these rows (no_grad, inference_mode)
        return out

    def _drop_padding(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        bag: torch.Tensor,
        weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The bags without their ``padding_idx`` entries (bags keep their positions)."""
        keep = ids.to(bag.device) != self.padding_idx
        if bool(keep.all()):
            return ids, offsets, bag, weights
        sizes = torch.bincount(bag[keep], minlength=len(offsets))
        starts = torch.zeros_like(offsets)
        torch.cumsum(sizes[:-1], 0, out=starts[1:])
        w = None if weights is None else weights[keep]
        return ids[keep.to(ids.device)], starts, bag[keep], w

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
        if self.include_last_offset:
            if len(offsets) == 0 or int(offsets[-1]) != m:
                raise ValueError(
                    f"with include_last_offset=True offsets are [bags + 1] and end with "
                    f"len(input)={m}; got {offsets[-1:].tolist()}"
                )
            offsets = offsets[:-1]
            if len(offsets) == 0:
                return input, offsets, torch.zeros(0, dtype=torch.int64, device=dev)
        if len(offsets) == 0 or int(offsets[0]) != 0:
            raise ValueError("offsets must start with 0")
        if bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) > m:
            raise ValueError(f"offsets must be non-decreasing and at most len(input)={m}")
        positions = torch.arange(m, device=dev)
        bag = torch.searchsorted(offsets, positions, right=True) - 1
        return input, offsets, bag


_REFUSED = {
    "max_norm": (None, "rows are not renormalised in place (it would write untrained rows)"),
    "norm_type": (2.0, "goes with max_norm, which a pool does not support"),
    "scale_grad_by_freq": (False, "not supported; scale per_sample_weights instead"),
    "_weight": (None, "a pool's rows come from its store; use dpsn import for a table"),
}


def _refuse(options: dict[str, Any]) -> None:
    """``nn.EmbeddingBag`` options a pool cannot honour, refused by name (a default value is
    accepted, so code written for ``nn.EmbeddingBag`` runs when it does not rely on them)."""
    for name, value in options.items():
        if name not in _REFUSED and name != "sparse":
            raise TypeError(f"PoolEmbedding got an unexpected keyword argument {name!r}")
        if name == "sparse":
            continue  # either way: rows are always updated sparsely
        default, why = _REFUSED[name]
        if value != default:
            raise TypeError(f"PoolEmbedding does not support {name}={value!r}: {why}")
