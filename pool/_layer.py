"""``PoolLayer``: a pool as a feed-forward block of single-neuron experts.

Each row is one neuron: an input vector ``u`` (``d_in``) and an output vector ``v``
(``d_out``), so the pool's ``dim`` is ``d_in + d_out``. For every token the router picks rows,
and the layer computes, as PEER does (He, "Mixture of A Million Experts", 2024)::

    y = sum_j g_j * act(x . u_j) * v_j        g = softmax(router scores over the chosen rows)

Axes: T tokens, K rows per token at most (k_max), M uses in all (the sum of the tokens' budgets:
uses are *packed*, token by token, so a budget below k_max leaves nothing to page, gather or
multiply), I = d_in, O = d_out, D = I + O.

Training: gradients reach the router's query and keys through the gates (ordinary autograd;
optimise ``layer.parameters()`` with any torch optimizer) and the rows through a fused update:
the backward pass sums each used row's gradient and applies the layer's row optimizer to its
delta right there, in the device cache, so rows never need a dense gradient or optimizer of
their own (FBGEMM TBE's and TorchRec's optimizer-in-backward). The row optimizer's state lives
beside each delta and is committed with it, so training resumes exactly.

The generator is frozen by default: rows that were never selected stay bit-identical through
any amount of training. ``train_generator=True`` also trains the generator's shared weights
(they join ``parameters()`` and are committed as a new generator version), which gives that
guarantee up: every row's base moves.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpsn import _kernels
from dpsn.errors import FreshRouterWarning
from dpsn.tiers import SECOND_BACKWARD, RowBatch, RowOptimizer, make_row_optimizer

from ._pool import Pool
from ._profile import EXECUTOR_BACKWARD, EXECUTOR_FORWARD, PAGE_IN, ROUTE, scope
from ._reopen import (
    CONFIG_FORMAT,
    MODULE,
    ROUTER,
    field,
    open_source,
    optimizer_config,
    optimizer_from,
    saved_config,
)
from ._training import RowTrainer, sum_by_row

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


class Uses:
    """The packed uses of one step: token ``t``'s rows are uses ``offsets[t]:offsets[t + 1]``
    (``token[u]`` is the token of use ``u``), with gates ``gates [M]``."""

    def __init__(self, route: Any) -> None:
        t, k = route.ids.shape
        device = route.ids.device
        # softmax(scores), padding exactly 0; a learned budget in training also scales each
        # row's output by its soft keep-weight, which carries the budget head's gradient
        gates = route.gates() if hasattr(route, "gates") else torch.softmax(route.scores, -1)
        mask = route.mask
        self.k = k if bool(mask.all()) else None  # uses per token, if every token has k_max
        if self.k is not None:  # a fixed budget: no padding, a regular layout
            self.ids = route.ids.reshape(-1)
            self.gates = gates.reshape(-1)
            self.offsets = torch.arange(0, t * k + 1, k, device=device)
            self.token = torch.arange(t, device=device).repeat_interleave(k)
        else:
            keep = torch.nonzero(mask.reshape(-1)).flatten()
            self.ids = torch.index_select(route.ids.reshape(-1), 0, keep)
            self.gates = torch.index_select(gates.reshape(-1), 0, keep)
            self.offsets = torch.zeros(t + 1, dtype=torch.int64, device=device)
            torch.cumsum(route.k, 0, out=self.offsets[1:])
            self.token = torch.arange(t, device=device).repeat_interleave(route.k)


def _gather(layer: PoolLayer, batch: RowBatch, owner: object) -> torch.Tensor:
    """Rows ``[M, D]`` of every use, float32, gathered into the layer's reusable buffer when no
    pending backward still needs it (``owner`` then holds it until its backward runs)."""
    index, table = batch.use_index, batch.table
    out = layer._row_buffer(len(index), table, owner)
    if out is not None:
        return torch.index_select(table, 0, index, out=out)
    return torch.index_select(table, 0, index).float()


class _PeerRows(torch.autograd.Function):
    """The whole PEER executor over a paged-in batch of rows, with a hand-written backward.

    ``y[t] = sum_{u of t} w[u] v[u]`` with ``w = gates * act(u[u] . x[t])``. Autograd would
    materialise each use's row gradient (``[M, I]`` and ``[M, O]`` outer products) and then sum
    them per row; but the gradient of use ``u`` is a scalar times ``x[t]`` (for u) or times
    ``dy[t]`` (for v), so the backward sums them per row directly and hands the sums to the row
    trainer. On the CPU with ``dpsn._native`` built, forward and backward are each one loop
    over the uses that reads every row where it is (``dpsn._kernels``): nothing is gathered.
    Returns the gradients of ``x`` and of the gates (which reach the router). The
    frozen-generator path; ``train_generator=True`` goes through autograd
    (:class:`_FusedDeltas`). ``anchor`` requires grad, so the rows train even when neither ``x``
    nor the router does.
    """

    @staticmethod
    def forward(
        ctx: Any,
        anchor: torch.Tensor,
        x: torch.Tensor,
        gates: torch.Tensor,
        batch: RowBatch,
        uses: Uses,
        layer: PoolLayer,
    ) -> torch.Tensor:
        ctx.layer, ctx.batch, ctx.uses = layer, batch, uses
        if _kernels.usable(x, batch.table) and batch.table.dtype == torch.float32:
            # one pass over the rows by index: nothing gathered, nothing kept (the batch keeps
            # its rows' values until its backward has read them)
            y, h = _kernels.peer_forward(
                batch.table,
                batch.index,
                batch.offsets,
                batch.order,
                uses.token,
                x.contiguous(),
                gates.contiguous(),
                layer.activation,
                layer.d_in,
            )
            ctx.save_for_backward(x, gates, h)
            ctx.rows = None
            return y
        rows = _gather(layer, batch, owner=ctx)
        u, v = rows[:, : layer.d_in], rows[:, layer.d_in :]
        if uses.k is not None:  # regular: batched matmuls over [T, K, .] views
            t, k = x.shape[0], uses.k
            h = torch.einsum("ti,tki->tk", x, u.view(t, k, layer.d_in)).reshape(-1)  # (M,)
            w = gates * _ACTIVATIONS[layer.activation](h)
            y = torch.matmul(w.view(t, 1, k), v.view(t, k, layer.d_out))[:, 0]  # (T, O)
        else:  # ragged budgets: per-use products summed per token
            h = (u * x[uses.token]).sum(dim=1)  # (M,)
            w = gates * _ACTIVATIONS[layer.activation](h)
            y = torch.zeros((x.shape[0], layer.d_out), dtype=torch.float32, device=x.device)
            y.index_add_(0, uses.token, w[:, None] * v)  # (T, O)
        ctx.save_for_backward(x, gates, h)
        ctx.rows, ctx.version = rows, rows._version
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        layer, batch = ctx.layer, ctx.batch
        dy = dy.float().contiguous()
        if batch.applied:
            raise RuntimeError(SECOND_BACKWARD)
        with scope(EXECUTOR_BACKWARD):
            dx, dgates, grads = _PeerRows._grads(ctx, dy)
        if grads is not None and len(batch) and batch.writable:
            layer.trainer.step(batch, grads)  # a read-only pool's rows never change
        batch.release()
        return None, dx, dgates, None, None, None

    @staticmethod
    def _grads(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """dx, dgates and the rows' summed gradients (None: no rows, the PyTorch path)."""
        x, gates, h = ctx.saved_tensors
        layer, rows, batch, uses = ctx.layer, ctx.rows, ctx.batch, ctx.uses
        if rows is None:  # the native forward: the same loop backward
            dx, dgates, grads = _kernels.peer_backward(
                batch.table,
                batch.index,
                batch.offsets,
                batch.order,
                uses.token,
                x.contiguous(),
                gates.contiguous(),
                h,
                dy,
                layer.activation,
                layer.d_in,
            )
        else:
            if rows._version != ctx.version:
                raise RuntimeError(
                    "a PoolLayer's gathered rows were reused by a later forward before this "
                    "backward ran: a graph kept with retain_graph=True can be run backward "
                    "again only until the layer's next forward"
                )
            u, v = rows[:, : layer.d_in], rows[:, layer.d_in :]
            with torch.enable_grad():
                hh = h.detach().requires_grad_()
                act = _ACTIVATIONS[layer.activation](hh)
            if uses.k is not None:
                t, k = x.shape[0], uses.k
                dw = torch.matmul(v.view(t, k, layer.d_out), dy[:, :, None]).reshape(-1)  # (M,)
            else:
                dw = (v * dy[uses.token]).sum(dim=1)  # (M,): dL/dw
            dgates = dw * act.detach()
            (dh,) = torch.autograd.grad(act, hh, dw * gates)
            if uses.k is not None:
                dx = torch.matmul(dh.view(t, 1, k), u.view(t, k, layer.d_in))[:, 0]  # (T, I)
            else:
                dx = torch.zeros_like(x)
                dx.index_add_(0, uses.token, dh[:, None] * u)  # (T, I)
            layer._release_rows(ctx)  # u and v are read: the buffer may be reused
            grads = None
            if len(batch):
                du = sum_by_row(batch, dh, x, uses.token)  # (n, I)
                dv = sum_by_row(batch, gates * act.detach(), dy, uses.token)  # (n, O)
                grads = torch.cat([du, dv], dim=1)
        return dx, dgates, grads


class _FusedDeltas(torch.autograd.Function):
    """The deltas of every use, ``[M, D]``, as a function whose backward sums each row's
    gradient and applies the row step: the ``train_generator=True`` path, where autograd must
    also reach the generator through the base rows (``row = base(ids) + delta``).

    ``anchor`` is a scalar that requires grad, so autograd calls the backward even though the
    deltas themselves are not leaves that an optimizer would see.
    """

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, batch: RowBatch, layer: PoolLayer) -> torch.Tensor:
        ctx.batch, ctx.layer = batch, layer
        return torch.index_select(batch.deltas(), 0, batch.inverse)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, ...]:
        batch = ctx.batch
        if batch.writable:  # a read-only pool's rows never change
            summed = torch.zeros((len(batch), grad.shape[-1]), device=grad.device)
            summed.index_add_(0, batch.inverse, grad.float())
            ctx.layer.trainer.step(batch, summed)
        batch.release()
        return None, None, None


class PoolLayer(nn.Module):
    """A routed, sparse feed-forward block whose neurons are rows of a dpsn pool.

    Args:
        pool: an open pool (``mode="r+"`` to train the rows; on a read-only pool only the
            router trains) with ``dim == d_in + d_out``.
        d_in, d_out: input and output widths.
        router: a ``dpsn.index`` router over ``pool.rows`` rows; default a product-key router
            with ``k`` rows per token, ``heads`` heads and batch norm on the query (without it
            the routing collapsed onto a few percent of the rows in bench/quality.py, as the
            PKM paper reports).
        k: rows per token (the router's ``k_max``).
        activation: ``"gelu"`` (default), ``"relu"``, ``"silu"`` or ``"tanh"``.
        row_optimizer: ``"adam"`` (partial row-wise, default), ``"adagrad"``, ``"sgd"`` or a
            :class:`RowOptimizer`; ``row_lr`` its learning rate. Memory values train best with
            their own, higher learning rate than the dense part (Lample et al., 2019).
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss, if any: row gradients
            are unscaled by it, and a step whose row gradients are not finite is skipped.
        row_clip: clip each row's gradient to this norm (``clip_grad_norm_`` cannot see rows).
        train_generator: also train the generator's shared weights (see the module docstring).
        row_selection: which rows each row step updates: a ``dpsn.RowSelection`` such as
            ``dpsn.SparseFinetune(top=...)``, or a callable ``(pool, batch, grads) -> mask``;
            None (default) updates every used row. Protected rows (``pool.protect``) never
            train, whatever it selects.

    The rules of the fused row step (once per graph, scaler, ``accumulate()``, clipping,
    nothing under ``no_grad``) are documented in the README ("Training rules").
    """

    def __init__(
        self,
        pool: Pool,
        d_in: int,
        d_out: int,
        *,
        router: nn.Module | None = None,
        k: int = 16,
        heads: int = 1,
        activation: str = "gelu",
        row_optimizer: str | RowOptimizer = "adam",
        row_lr: float | None = None,
        grad_scaler: Any = None,
        row_clip: float | None = None,
        train_generator: bool = False,
        row_selection: Any = None,
    ) -> None:
        super().__init__()
        if pool.dim != d_in + d_out:
            raise ValueError(
                f"a PoolLayer row holds u (d_in={d_in}) and v (d_out={d_out}): the pool's dim "
                f"must be {d_in + d_out}, not {pool.dim}"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}")
        self.pool = pool
        self.d_in, self.d_out, self.k = d_in, d_out, k
        self.activation = activation
        if router is None:
            from dpsn.index import ProductKeyRouter

            if ROUTER in pool.routers():
                warnings.warn(
                    f"{pool.path} holds a trained router, but this PoolLayer builds a new, "
                    "random one: its outputs will not be the trained layer's. Reopen it with "
                    "dpsn.PoolLayer.from_store(pool), or pass router=pool.load_router('router')",
                    FreshRouterWarning,
                    stacklevel=2,
                )

            router = ProductKeyRouter(
                d_in=d_in, num_rows=pool.rows, k=k, heads=heads, query_batchnorm=True
            )
        self.router = router
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
        self.routing_frozen = False
        self.train_generator = train_generator
        if train_generator:
            self.generator = pool.generator  # registered: its weights join parameters()
            self.generator.requires_grad_(True)
        # The gathered rows of the last step, reused as the next gather's output while no
        # autograd graph still holds them: a fresh [T*K, D] tensor costs its page faults every
        # step (16 ms vs 3.4 ms for a 32 MiB gather on one thread, past glibc's mmap threshold).
        self._rows: torch.Tensor | None = None
        # the forward (its autograd node) whose backward still needs them
        self._rows_owner: weakref.ref[object] | None = None
        self._building_graph = False  # grad mode of the forward in progress
        self.last_route: Any = None  # the most recent RouteResult (for budget/usage figures)

    @classmethod
    def from_store(
        cls,
        source: str | Path | Pool,
        *,
        mode: str = "r",
        grad_scaler: Any = None,
        **open_kwargs: Any,
    ) -> PoolLayer:
        """The ``PoolLayer`` that :meth:`commit` saved in a store, rebuilt: its widths, ``k``,
        activation, row optimizer and the trained router (digest-checked). ``source`` is a
        store path (opened in ``mode``, with ``open_kwargs`` such as ``cache_rows``) or an open
        pool. On a read-only pool the layer is returned in ``eval()`` mode, where its outputs
        are bit-equal to the trained layer's in ``eval()`` (in ``train()`` the router's query
        batch norm uses each batch's own statistics and updates its running ones)."""
        pool = open_source(source, mode, open_kwargs)
        config = saved_config(pool, "PoolLayer")
        clip = config.get("row_clip")
        layer = cls(
            pool,
            field(config, "d_in", int),
            field(config, "d_out", int),
            router=pool.load_router(field(config, "router", str)),
            k=field(config, "k", int),
            activation=field(config, "activation", str),
            row_optimizer=optimizer_from(config.get("row_optimizer")),
            grad_scaler=grad_scaler,
            row_clip=None if clip is None else float(field(config, "row_clip", (int, float))),
            train_generator=field(config, "train_generator", bool),
        )
        return layer if pool.writable else layer.eval()

    def config(self) -> dict[str, Any]:
        """The JSON configuration :meth:`commit` saves and :meth:`from_store` reads (the
        router's own kind, configuration and weights are saved beside it, as ``"router"``)."""
        return {
            "kind": "PoolLayer",
            "format": CONFIG_FORMAT,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "k": self.k,
            "activation": self.activation,
            "row_optimizer": optimizer_config(self.row_optimizer),
            "row_clip": self.row_clip,
            "train_generator": self.train_generator,
            "router": ROUTER,
        }

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, k={self.k}, rows={self.pool.rows}, "
            f"row_optimizer={self.row_optimizer.name}, train_generator={self.train_generator}"
        )

    def freeze_routing(self, frozen: bool = True) -> PoolLayer:
        """Freeze the router (``frozen=False`` thaws it): its parameters stop requiring grad
        (a torch optimizer then leaves them alone) and it stays in eval mode, also across
        ``layer.train()``, so batch-norm statistics stop moving too. Which rows an input
        reaches then stays what it was: with ``pool.protect`` this keeps earlier tasks' rows
        both unchanged and reached (no forgetting). Returns the layer."""
        self.routing_frozen = bool(frozen)
        self.router.requires_grad_(not self.routing_frozen)
        self.router.train(self.training and not self.routing_frozen)
        return self

    def train(self, mode: bool = True) -> PoolLayer:
        super().train(mode)
        if self.routing_frozen:
            self.router.eval()  # frozen routing: batch-norm statistics stay as they were
        return self

    def accumulate(self) -> AbstractContextManager[None]:
        """``with layer.accumulate():`` sums the rows' gradients over the backward passes in the
        block and applies one row step when it exits (gradient accumulation for rows, which have
        no ``.grad`` for ``optimizer.step`` to read)."""
        return self.trainer.accumulate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"expected inputs [..., {self.d_in}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_in)  # (T, I)
        with scope(ROUTE):
            route = self.router(x2)
            uses = Uses(route)
        self.last_route = route
        with scope(PAGE_IN):
            batch = self.pool.page_in(uses.ids)
        self._building_graph = torch.is_grad_enabled()  # (a Function's forward runs without)
        xf = x2.float()
        if not self.train_generator:
            # autocast off: the executor's matmuls and its backward work in float32
            with torch.autocast(x.device.type, enabled=False), scope(EXECUTOR_FORWARD):
                y = _PeerRows.apply(batch.anchor, xf, uses.gates.float(), batch, uses, self)
        else:
            delta = _FusedDeltas.apply(batch.anchor, batch, self)  # (M, D)
            base = self.pool.generator(batch.ids)[batch.inverse]  # (M, D), trains the weights
            u, v = (base + delta).split([self.d_in, self.d_out], dim=-1)
            act = _ACTIVATIONS[self.activation]((u * xf[uses.token]).sum(dim=1))
            y = torch.zeros((xf.shape[0], self.d_out), device=xf.device, dtype=u.dtype)
            y = y.index_add(0, uses.token, (uses.gates * act)[:, None] * v)
        if not y.requires_grad:
            batch.release()  # no backward will come for these rows (no_grad, inference_mode)
        return y.to(x.dtype).reshape(*lead, self.d_out)

    def _row_buffer(self, n: int, table: torch.Tensor, owner: object) -> torch.Tensor | None:
        """A float32 ``[n, D]`` output for the gather, or None (allocate one) while the last is
        held by a forward whose backward has not run, or if the table is not float32."""
        holder = self._rows_owner() if self._rows_owner is not None else None
        if table.dtype != torch.float32 or holder is not None:
            return None
        if self._rows is None or self._rows.shape[0] < n or self._rows.device != table.device:
            self._rows = torch.empty((n, table.shape[1]), dtype=table.dtype, device=table.device)
        # Held until that backward runs, or until its graph is dropped without one (a weak
        # reference: the autograd node dies with its graph, and no backward can read the rows).
        self._rows_owner = weakref.ref(owner) if self._building_graph else None
        return self._rows[:n]

    def _release_rows(self, owner: object) -> None:
        if self._rows_owner is not None and self._rows_owner() is owner:
            self._rows_owner = None

    def commit(self, message: str = "") -> Any:
        """Write back dirty rows and their optimizer state, the router and (when trained) the
        generator, in one atomic commit of the pool's store, with the layer's configuration
        (:meth:`from_store` rebuilds the layer from it)."""
        self.pool.save_router(ROUTER, self.router)
        self.pool.save_module(MODULE, self.config())
        return self.pool.commit(message)

    def get_extra_state(self) -> dict[str, Any]:
        # The store reference, never the rows: reopen the store to get them back.
        return {"store": str(self.pool.path), "commit": self.pool.head, "uuid": self.pool.uuid}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        uuid = self.pool.uuid
        if state.get("uuid") not in (None, uuid):
            raise ValueError(
                f"this state_dict belongs to the store at {state.get('store')} "
                f"(uuid {state.get('uuid')}), not to {self.pool.path} (uuid {uuid})"
            )
