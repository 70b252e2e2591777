"""``PoolLayer``: a pool as a feed-forward block of single-neuron experts.

Each row is one neuron: an input vector ``u`` (``d_in``) and an output vector ``v``
(``d_out``), so the pool's ``dim`` is ``d_in + d_out``. For every token the router picks rows,
and the layer computes, as PEER does (He, "Mixture of A Million Experts", 2024)::

    y = sum_j g_j * act(x . u_j) * v_j        g = softmax(router scores over the chosen rows)

Axes: T tokens, K rows per token (k_max; padding masked), I = d_in, O = d_out, D = I + O.

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._optim import RowOptimizer, make_row_optimizer
from ._pool import Pool

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


class _FusedRows(torch.autograd.Function):
    """Gathers rows by slot as their two halves ``u [T, K, I]`` and ``v [T, K, O]``; its
    backward updates those rows in place.

    Two outputs, not one ``[T, K, D]`` split afterwards: split's backward concatenates the two
    gradients into a fresh ``[T, K, D]`` tensor (measured 20 ms a layer at T*K = 32,768 rows of
    256 on one CPU thread); here each half's gradient is summed straight into its columns.
    ``anchor`` is a scalar that requires grad, so autograd calls the backward even though the
    rows themselves are not leaves that an optimizer would see.
    """

    @staticmethod
    def forward(
        ctx: Any,
        anchor: torch.Tensor,
        table: torch.Tensor,
        slots: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        layer: PoolLayer,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.layer, ctx.ids, ctx.mask = layer, ids, mask
        rows = torch.index_select(table, 0, slots.reshape(-1)).float()
        rows = rows.reshape(*slots.shape, table.shape[1])
        return rows[..., : layer.d_in], rows[..., layer.d_in :]

    @staticmethod
    def backward(ctx: Any, grad_u: torch.Tensor, grad_v: torch.Tensor) -> tuple[None, ...]:
        ids, mask = ctx.ids.reshape(-1), ctx.mask.reshape(-1)
        grad_u = grad_u.reshape(len(ids), -1)
        grad_v = grad_v.reshape(len(ids), -1)
        if not bool(mask.all()):  # a fixed budget has no padding: skip the copies
            ids, grad_u, grad_v = ids[mask], grad_u[mask], grad_v[mask]
        ctx.layer._update_rows(ids, grad_u, grad_v)
        return None, None, None, None, None, None


class PoolLayer(nn.Module):
    """A routed, sparse feed-forward block whose neurons are rows of a dpsn pool.

    Args:
        pool: an open pool (``mode="r+"`` to train) with ``dim == d_in + d_out`` and a cache.
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
        train_generator: also train the generator's shared weights (see the module docstring).
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
        train_generator: bool = False,
    ) -> None:
        super().__init__()
        if pool.dim != d_in + d_out:
            raise ValueError(
                f"a PoolLayer row holds u (d_in={d_in}) and v (d_out={d_out}): the pool's dim "
                f"must be {d_in + d_out}, not {pool.dim}"
            )
        if pool.cache is None:
            raise ValueError("a PoolLayer needs a pool opened with a cache (cache_rows > 0)")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}")
        self.pool = pool
        self.d_in, self.d_out, self.k = d_in, d_out, k
        self.activation = activation
        if router is None:
            from dpsn.index import ProductKeyRouter

            router = ProductKeyRouter(
                d_in=d_in, num_rows=pool.rows, k=k, heads=heads, query_batchnorm=True
            )
        self.router = router
        kwargs = {} if row_lr is None else {"lr": row_lr}
        self.row_optimizer = make_row_optimizer(row_optimizer, **kwargs)
        pool.enable_row_state(self.row_optimizer.state_width(pool.dim))
        self.train_generator = train_generator
        if train_generator:
            self.generator = pool.generator  # registered: its weights join parameters()
            self.generator.requires_grad_(True)
        self._anchor = torch.zeros((), requires_grad=True)
        self.last_route: Any = None  # the most recent RouteResult (for budget/usage figures)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, k={self.k}, rows={self.pool.rows}, "
            f"row_optimizer={self.row_optimizer.name}, train_generator={self.train_generator}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"expected inputs [..., {self.d_in}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_in)  # (T, I)
        route = self.router(x2)
        self.last_route = route
        mask = route.mask  # (T, K)
        ids = torch.where(mask, route.ids, route.ids[:, :1])  # padding -> a row already paged
        slots = self.pool._page_in(ids.reshape(-1), owner=self).reshape(ids.shape)
        cache = self.pool.cache
        assert cache is not None
        if self.train_generator:
            du, dv = _FusedRows.apply(self._anchor, cache.columns["delta"], slots, ids, mask, self)
            base = self.pool.generator(ids.reshape(-1)).reshape(*ids.shape, -1)
            bu, bv = base.split([self.d_in, self.d_out], dim=-1)
            u, v = bu + du, bv + dv
        else:
            u, v = _FusedRows.apply(self._anchor, cache.columns["row"], slots, ids, mask, self)
        # u: (T, K, I), v: (T, K, O)
        gates = torch.softmax(route.scores, dim=-1)  # padding: -inf -> exactly 0
        # Batched matmuls laid out so that their backward writes the rows' gradients
        # [T, K, I] and [T, K, O] contiguous (einsum's came out transposed: a copy each).
        act = _ACTIVATIONS[self.activation](torch.matmul(u, x2.float()[:, :, None])[..., 0])
        y = torch.matmul((gates * act)[:, None, :], v)[:, 0]
        return y.to(x.dtype).reshape(*lead, self.d_out)

    def _update_rows(self, ids: torch.Tensor, grad_u: torch.Tensor, grad_v: torch.Tensor) -> None:
        """Sum each row's gradient over its uses in the batch and take one optimizer step."""
        if ids.numel() == 0:
            return
        uniq, inverse = torch.unique(ids, return_inverse=True)
        halves = []
        for grad in (
            grad_u,
            grad_v,
        ):  # contiguous sums (index_add_ into a column slice is 3x slower)
            half = torch.zeros((len(uniq), grad.shape[1]), dtype=torch.float32, device=ids.device)
            halves.append(half.index_add_(0, inverse, grad.float()))
        self.pool._apply_row_grads(uniq, torch.cat(halves, dim=1), self.row_optimizer)

    def commit(self, message: str = "") -> Any:
        """Write back dirty rows and their optimizer state, the router and (when trained) the
        generator, in one atomic commit of the pool's store."""
        self.pool.save_router("router", self.router)
        return self.pool.commit(message)

    def get_extra_state(self) -> dict[str, Any]:
        # The store reference, never the rows: reopen the store to get them back.
        return {
            "store": str(self.pool.path),
            "commit": self.pool.head,
            "uuid": self.pool._store.manifest.uuid,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        uuid = self.pool._store.manifest.uuid
        if state.get("uuid") not in (None, uuid):
            raise ValueError(
                f"this state_dict belongs to the store at {state.get('store')} "
                f"(uuid {state.get('uuid')}), not to {self.pool.path} (uuid {uuid})"
            )
