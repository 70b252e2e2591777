"""``NgramMemory``: an Engram-style hashed N-gram memory on a pool (DeepSeek's Engram, 2026:
conditional memory looked up by hashed N-grams of the input, gated by the hidden state).

Each position ``t`` looks at its trailing N-grams ``tokens[t-n+1 .. t]`` for every order ``n``
in ``orders``; each N-gram is hashed by ``heads`` independent XXH64 streams (multi-head hashing:
two N-grams that collide in one head rarely collide in all) to pool ids. The ``O * K`` rows of
a position (O orders, K heads) are concatenated into ``e`` and read into the residual stream
through a gate computed from the hidden state and the memory itself (Engram's context-aware
gating)::

    k, v  = W_k e, W_v e                                   # (B, T, d_model) each
    alpha = sigmoid(<rms(h), rms(k)> / sqrt(d_model))     # (B, T, 1)
    out   = alpha * v                                      # what the caller adds to h

Why a pool: an N-gram never seen costs nothing (its row is the procedural base), rows train by
the pool's fused row optimizers through the executor contract (``page_in`` -> ``RowBatch`` ->
``apply_grads``) like ``PoolEmbedding``'s, and with a ``dpsn.Lifecycle`` on the pool rare
N-grams fade and are pruned (their storage returns). And since ids depend only on tokens, the
next batch's rows can be paged in before its forward: :meth:`NgramMemory.prefetch`.

Positions before the start (``t - j < 0``) read a padding token (``PAD = -1``, never a real
token), so the first ``n - 1`` positions of a sequence have N-grams of their own, the same
wherever the sequence appears. Hashing is vectorized (``O * K * n`` tensor passes, no loop per
token). Engram's short causal convolution after the gate is left out (the caller's model has
its own mixing).

Axes: B batch, T positions, O orders, K heads, H = O * K rows per position, D = pool.dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dpsn.errors import InvalidArgumentError, InvalidArgumentTypeError, InvalidIdsError
from dpsn.hypernet import derive_seed, xxh64_ids
from dpsn.tiers import Prefetch, RowBatch, RowOptimizer, make_row_optimizer

from ._pool import Pool
from ._training import RowTrainer

PAD = -1  # the token before a sequence's start
_STREAM = 0x6E6772616D  # "ngram": derive_seed stream base of the hash heads (never renumber)
_MASK63 = (1 << 63) - 1
_MAX_ORDER = 16

B = TypeVar("B")


class _Rows(torch.autograd.Function):
    """The rows of each requested position; backward: one fused row step."""

    @staticmethod
    def forward(
        ctx: Any, anchor: torch.Tensor, batch: RowBatch, module: NgramMemory
    ) -> torch.Tensor:
        out = torch.index_select(batch.table, 0, batch.use_index.reshape(-1))
        ctx.batch, ctx.module = batch, module
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[None, None, None]:
        batch, module = ctx.batch, ctx.module
        if len(batch) and batch.writable:
            grads = torch.zeros(
                (len(batch), dout.shape[1]), dtype=torch.float32, device=dout.device
            )
            grads.index_add_(0, batch.inverse.reshape(-1).to(dout.device), dout.float())
            module.trainer.step(batch, grads)
        batch.release()
        return None, None, None


def _check_orders(orders: Any) -> tuple[int, ...]:
    if isinstance(orders, int) and not isinstance(orders, bool):
        orders = (orders,)
    if not isinstance(orders, Sequence) or not orders:
        raise InvalidArgumentTypeError("orders must be a non-empty sequence of ints, e.g. (2, 3)")
    out = []
    for n in orders:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_ORDER:
            raise InvalidArgumentError(
                f"every order must be an int in [1, {_MAX_ORDER}], got {n!r}"
            )
        out.append(n)
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"orders must be distinct, got {tuple(orders)}")
    return tuple(out)


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    return value


class NgramMemory(nn.Module):
    """Hashed N-gram memory on ``pool`` for a model of width ``d_model`` (see the module
    docstring): ``memory(hidden, tokens)`` with ``hidden`` ``[B, T, d_model]`` and token ids
    ``tokens`` ``[B, T]`` returns ``[B, T, d_model]`` for the caller to add to the residual
    stream.

    - ``orders``: N-gram lengths (default bigrams and trigrams); ``heads``: hash heads per order;
    - ``seed``: of the hash heads (default: the pool's seed), so two memories on one pool can
      hash apart;
    - ``row_optimizer``/``row_lr``/``grad_scaler``/``row_clip``: the rows' training, as in
      :class:`PoolEmbedding` (default row-wise AdaGrad);
    - ``couse``: record which rows each token uses together in the pool's co-use statistics
      (``pool.track_couse()`` turns them on; see ``Pool.circuits``); ``couse_every``: record
      every that-many-th position only (statistics need a sample, and recording all of a
      step's ``H(H-1)/2`` pairs per token costs ~10-20% of a small model's step).
    """

    def __init__(
        self,
        pool: Pool,
        d_model: int,
        orders: Sequence[int] = (2, 3),
        heads: int = 4,
        *,
        seed: int | None = None,
        row_optimizer: str | RowOptimizer = "adagrad",
        row_lr: float | None = None,
        grad_scaler: Any = None,
        row_clip: float | None = None,
        couse: bool = True,
        couse_every: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(pool, Pool):
            raise InvalidArgumentTypeError(
                f"pool must be a dpsn.Pool (dpsn.create or dpsn.open), got {type(pool).__name__}"
            )
        self.pool = pool
        self.d_model = _check_positive("d_model", d_model)
        self.orders = _check_orders(orders)
        self.heads = _check_positive("heads", heads)
        base = pool.seed if seed is None else seed
        self.seeds = [
            [derive_seed(base, _STREAM + 64 * n + k) for k in range(self.heads)]
            for n in self.orders
        ]
        self.couse = bool(couse)
        self.couse_every = _check_positive("couse_every", couse_every)
        width = len(self.orders) * self.heads * pool.dim
        self.key = nn.Linear(width, d_model, bias=False)
        self.value = nn.Linear(width, d_model, bias=False)
        kwargs = {} if row_lr is None else {"lr": row_lr}
        self.row_optimizer = make_row_optimizer(row_optimizer, **kwargs)
        self.trainer = RowTrainer(
            pool, self.row_optimizer, grad_scaler=grad_scaler, row_clip=row_clip
        )
        pool.set_state_width(self.row_optimizer.state_width(pool.dim))
        # prefetched batches (tokens, ids, handle) and queued ones (tokens, ids): the forward
        # that meets the same tokens reuses their ids instead of hashing again
        self._ahead: list[tuple[torch.Tensor, torch.Tensor, Prefetch]] = []
        self._queued: list[tuple[torch.Tensor, torch.Tensor]] = []
        # the cache counters of the last forward's page-in (hits, misses, ...)
        self.last_page_in: dict[str, int] = {}

    @property
    def rows_per_token(self) -> int:
        """H = len(orders) * heads: the pool rows each position reads."""
        return len(self.orders) * self.heads

    def extra_repr(self) -> str:
        return (
            f"rows={self.pool.rows}, dim={self.pool.dim}, d_model={self.d_model}, "
            f"orders={self.orders}, heads={self.heads}, "
            f"row_optimizer={self.row_optimizer.name}"
        )

    def accumulate(self) -> AbstractContextManager[None]:
        """``with memory.accumulate():`` one row step for the backward passes in the block."""
        return self.trainer.accumulate()

    # -- addresses -----------------------------------------------------------------------------

    def _tokens(self, tokens: Any) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise InvalidIdsError(
                f"tokens must be a [B, T] integer tensor, got {type(tokens).__name__}"
            )
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise InvalidIdsError(f"tokens must be integers, got {tokens.dtype}; use .long()")
        if tokens.dim() != 2:
            raise InvalidIdsError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        tokens = tokens.detach().to(torch.int64)
        if tokens.numel() and int(tokens.min()) < 0:
            raise InvalidIdsError("tokens must be non-negative (-1 is the padding before a start)")
        return tokens

    @torch.no_grad()
    def ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` pool ids of each position's N-grams (order-major, then head): a pure
        function of the trailing ``n`` tokens (padding before the start), the heads' seeds and
        the pool's size."""
        tokens = self._tokens(tokens)
        b, t = tokens.shape
        longest = max(self.orders)
        padded = F.pad(tokens, (longest - 1, 0), value=PAD)  # (B, T + longest - 1)
        # shifted[j][:, t] = tokens[t - j] (PAD before the start)
        shifted = [padded[:, longest - 1 - j : longest - 1 - j + t] for j in range(longest)]
        out = torch.empty((b, t, self.rows_per_token), dtype=torch.int64, device=tokens.device)
        col = 0
        for n, seeds in zip(self.orders, self.seeds, strict=True):
            for s in seeds:
                h = xxh64_ids(shifted[n - 1], s)
                for j in range(n - 2, -1, -1):  # oldest token first
                    h = xxh64_ids(h ^ shifted[j], s)
                out[:, :, col] = torch.remainder(h & _MASK63, self.pool.rows)
                col += 1
        return out

    # -- forward -------------------------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise InvalidArgumentTypeError("hidden must be a floating-point [B, T, d_model] tensor")
        if hidden.dim() != 3 or hidden.shape[2] != self.d_model:
            raise InvalidArgumentError(
                f"hidden must be [B, T, d_model={self.d_model}], got {tuple(hidden.shape)}"
            )
        tokens = self._tokens(tokens)
        match = self._take_ahead(tokens)
        ids = match[0] if match is not None else self.ids(tokens)
        if tuple(ids.shape[:2]) != tuple(hidden.shape[:2]):
            raise InvalidArgumentError(
                f"tokens {tuple(ids.shape[:2])} and hidden {tuple(hidden.shape[:2])} must agree "
                "on [B, T]"
            )
        b, t, h = ids.shape
        batch = self._page_in(ids, match[1] if match is not None else None)
        if self.couse and self.training and torch.is_grad_enabled():
            groups = batch.inverse.reshape(-1, h)[:: self.couse_every]
            self.pool.record_couse(batch.ids[groups])
        rows = _Rows.apply(batch.anchor, batch, self)  # (B * T * H, D)
        if not rows.requires_grad:
            batch.release()  # no backward will come (no_grad, inference_mode)
        e = rows.to(hidden.dtype).reshape(b, t, h * self.pool.dim)  # (B, T, H * D)
        key = self.key(e)
        value = self.value(e)
        score = (F.rms_norm(hidden, (self.d_model,)) * F.rms_norm(key, (self.d_model,))).sum(-1)
        alpha = torch.sigmoid(score / math.sqrt(self.d_model)).unsqueeze(-1)  # (B, T, 1)
        return alpha * value

    # -- ahead-of-time paging ------------------------------------------------------------------

    def prefetch(self, next_tokens: torch.Tensor) -> Prefetch:
        """Page the rows of a coming batch's ``next_tokens`` ``[B, T]`` in now, on the pool's
        helper thread (and a CUDA stream on GPU), while the current step computes: call it after
        the current forward (during its backward, say). The rows stay pinned until the forward
        that uses these tokens has paged them in (or :meth:`cancel_prefetch`)."""
        tokens = self._tokens(next_tokens)
        ids = self.ids(tokens)
        handle = self.pool.prefetch(ids)
        self._ahead.append((tokens, ids, handle))
        while len(self._ahead) > _MAX_AHEAD:  # prefetched, never used: let the oldest go
            self._ahead.pop(0)[2].release()
        return handle

    def prefetch_after_forward(self, next_tokens: torch.Tensor) -> None:
        """Start :meth:`prefetch` of ``next_tokens`` right after the next forward has paged its
        own rows in, so the two never queue for the pool's lock: the rows of batch ``i + 1``
        then come in while batch ``i`` computes its forward and backward."""
        tokens = self._tokens(next_tokens)
        self._queued.append((tokens, self.ids(tokens)))

    def cancel_prefetch(self) -> None:
        """Unpin every prefetched batch not used yet and forget queued ones."""
        ahead, self._ahead, self._queued = self._ahead, [], []
        for _, _, handle in ahead:
            handle.release()

    def _take_ahead(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Prefetch] | None:
        """The (ids, prefetch) of a prefetched batch of exactly these tokens, taken off the
        list, or None."""
        for i, (want, _, _) in enumerate(self._ahead):
            if want.shape == tokens.shape and torch.equal(want, tokens):
                _, ids, handle = self._ahead.pop(i)
                return ids, handle
        return None

    def _page_in(self, ids: torch.Tensor, prefetched: Prefetch | None) -> RowBatch:
        """Page ``ids`` in (after their prefetch, if any, has finished), note what it missed,
        drop the prefetch's pin and start the queued prefetches."""
        if prefetched is not None:
            prefetched.wait()
        batch = self.pool.page_in(ids)
        cache = self.pool.cache
        self.last_page_in = dict(cache.stats.last) if cache is not None else {}
        if prefetched is not None:
            prefetched.release()
        queued, self._queued = self._queued, []
        for tokens, q in queued:
            self._ahead.append((tokens, q, self.pool.prefetch(q)))
        return batch


_MAX_AHEAD = 4


def prefetching(
    batches: Iterable[B],
    memory: NgramMemory | Sequence[NgramMemory],
    tokens: Callable[[B], torch.Tensor] = lambda batch: batch[0],  # type: ignore[index]
) -> Iterator[B]:
    """Yield ``batches`` unchanged while paging each next batch's N-gram rows in ahead: the
    first batch's rows are prefetched at once, and batch ``i + 1``'s from the moment batch
    ``i``'s forward has paged its own rows in (:meth:`NgramMemory.prefetch_after_forward`),
    so they come in while batch ``i`` computes. ``tokens(batch)`` picks the ``[B, T]`` token
    ids (default: the first item of a tuple ``(x, y)``)::

        for x, y in dpsn.pool.prefetching(loader, memory):
            loss = model(x, y); loss.backward(); opt.step()
    """
    memories = [memory] if isinstance(memory, NgramMemory) else list(memory)
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for m in memories:
        m.prefetch(tokens(current))
    try:
        for following in it:
            for m in memories:
                m.prefetch_after_forward(tokens(following))
            yield current
            current = following
        yield current
    finally:
        for m in memories:
            m.cancel_prefetch()
