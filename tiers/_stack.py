"""The tier stack: the whole path between a row id and its value, and back.

Tiers, fastest first: the device cache (``_cache.py``), the host staging area of uncommitted
rows (``_staging.py``), the persisted store (``_persisted.py``), the procedural generator
(``_procedural.py``). A row's delta lives in the first of the first three that has it, else the
row is procedural. Everything runs under one lock, a batch is looked up once, and a base row is
generated at most once while its row stays cached.

Two ways in:

- reads (``read``, ``delta``, ``write``, ``drop``): what ``Pool`` exposes to users;
- the executor contract (``page_in`` -> :class:`RowBatch` -> ``apply_grads`` -> ``release``):
  how an executor (``PoolLayer``, ``PoolEmbedding``, a user's own) computes with rows and trains
  them. See ``docs/row-path.md`` for the walk of one id from a forward pass to a commit.

A batch with more distinct rows than the cache can make room for is still served: it is paged in
*spilled* (a private tensor of its rows, assembled from the cache where rows are resident and
from the lower tiers where not), and its updates go wherever each row lives at that moment.

With a row lifecycle the stack owns its usage statistics (``usage_stats``, a
``UsageStatistics`` in ``_stack_usage.py``) and calls them through hooks, handing each what it
reads; they never call the stack back.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from dpsn import _kernels
from dpsn._dtypes import to_storage
from dpsn.errors import CacheCapacityError, InvalidArgumentError, InvalidDeltaError
from dpsn.store import Commit, CommitRequest, PersistedStore, RowLookup

from . import _usage
from ._cache import DeviceCache
from ._columns import RowLayout
from ._optimizer import RowOptimizer
from ._procedural import ProceduralTier
from ._sorted import sorted_find
from ._stack_usage import WHERE_CACHE, WHERE_STAGED, WHERE_STORE, UsageStatistics
from ._staging import Staging
from ._tier import PersistedTier, Tier
from ._usage import UsageClock, UsageIndex, UsageRules

SECOND_BACKWARD = (
    "these rows were already updated by this graph's backward: a second backward through the "
    "same graph would apply the row step twice, so it is refused (sum the losses before one "
    "backward, run a new forward, or use accumulate() for micro-batches)"
)
_READ = ("read", 0)  # the pin holder of the rows of the last plain read
_REMATERIALIZE_BATCH = 1 << 16
_SPILL_CHUNK = 1 << 16  # rows generated at once on the spilled path: bounded device memory
_SCRATCH_BYTES = 64 << 20  # the reused buffer a fill generates scattered rows into
# Why a batch cannot be made resident: more distinct rows than the cache can free, or the
# device ran out of memory while filling (the spilled path then works in bounded chunks).
_CANNOT_CACHE = (CacheCapacityError, torch.OutOfMemoryError)
_COUNTERS = (
    "rows_from_disk",
    "bytes_from_disk",
    "spilled_batches",
    "spilled_rows",
    "row_steps",
    "rows_updated",
    "skipped_row_steps",
    "rows_held",  # rows a row step left out (protected, or not selected)
)


def check_row_mask(rows: Any, ids: torch.Tensor) -> torch.Tensor:
    """``rows`` as a bool tensor aligned with ``ids`` (one flag per distinct row of a batch) on
    their device, or ``ValueError`` naming what is wrong; shared by every batch's row step so
    that a sharded one refuses the same input before its collective starts."""
    rows = torch.as_tensor(rows, device=ids.device)
    if rows.dtype != torch.bool or rows.shape != ids.shape:
        raise ValueError(
            f"rows= must be a bool tensor of shape {tuple(ids.shape)} (one flag per distinct "
            f"row of the batch), got {rows.dtype} {tuple(rows.shape)}"
        )
    return rows


def check_update_scale(scale: Any, n: int) -> torch.Tensor:
    """``scale`` as a contiguous CPU float32 ``[n]`` tensor of finite values >= 0, or a typed
    error naming what is wrong (a negative scale would turn the step around; a NaN would put
    NaN into the rows, which the fused loops update in place)."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise InvalidArgumentError(f"scale= must be a float tensor of shape [{n}], got {got}")
    if tuple(scale.shape) != (n,):
        raise InvalidArgumentError(
            f"scale= must have shape [{n}] (one per distinct row of the batch), got "
            f"{tuple(scale.shape)}"
        )
    out = scale.detach().to("cpu", torch.float32).contiguous()
    if n and not (bool(torch.isfinite(out).all()) and bool((out >= 0).all())):
        raise InvalidArgumentError("scale= must be finite and >= 0 (NaN, Inf or < 0 found)")
    return out


def _checked_step(
    optimizer: RowOptimizer, delta: torch.Tensor, grads: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``optimizer.step`` on rows outside the native loops, refused with a typed error (nothing
    stored) when its step does not fit the state width it declared: a torch shape error inside
    the step, or a new delta or state of another shape than the inputs."""
    name = type(optimizer).__name__
    try:
        new_delta, new_state = optimizer.step(delta, grads, state)
    except RuntimeError as e:
        raise InvalidArgumentError(
            f"row optimizer {name} failed on delta {tuple(delta.shape)} and state "
            f"{tuple(state.shape)} (its state_width): {e}"
        ) from e
    for what, got, want in (("delta", new_delta, delta), ("state", new_state, state)):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise InvalidArgumentError(
                f"row optimizer {name} returned a {what} of shape {shape} for "
                f"{tuple(want.shape)}: its step does not fit its state_width"
            )
    return new_delta, new_state


class RowBatch:
    """The rows of one executor step: paged in once, pinned until released.

    - ``ids`` ``[n]``: the distinct row ids, sorted (on the pool's device);
    - ``counts`` ``[n]``: how often each was asked for; ``inverse`` ``[*shape]``: for each
      requested position, its row in ``ids``; ``order`` ``[m]``: the requested positions
      grouped by row (a CSR column order: row ``i``'s uses are
      ``order[offsets[i]:offsets[i + 1]]``);
    - ``table`` and ``index``: row ``ids[i]``'s value is ``table[index[i]]`` (``[dim]`` in the
      pool dtype), and ``use_index`` is ``index[inverse]``, one entry per requested position,
      ready for ``index_select``/``embedding_bag``. ``table`` is the cache's row column (or a
      private tensor for a spilled batch): read it, never write it. The values stay those of
      the page-in until ``apply_grads``: should the stack change these rows first (another
      step's update of shared rows, a cache reset), the batch is given a private copy of its
      rows beforehand (``table`` and ``index`` then point there), as autograd would need.

    ``apply_grads(grads, optimizer)`` updates the rows once (a second call raises);
    ``skip_step()`` counts a row step the executor skipped instead; ``writable`` says whether
    the rows may train at all (a read-only pool's never do); ``regroup(ids)`` pages other ids
    in from the same rows (``accumulate()`` regroups its micro-batches with it): what an
    executor and its row trainer need, so neither calls back into the pool;
    ``release()`` unpins them; the rows of a batch garbage-collected without ``release()`` are
    let go at the stack's next operation. ``anchor`` is a scalar that requires grad: pass it into
    the executor's autograd function, so that its backward (where the rows train) runs even when
    no other input requires grad.
    """

    def __init__(
        self,
        stack: RowStack,
        ids: torch.Tensor,
        counts: torch.Tensor,
        inverse: torch.Tensor,
        order: torch.Tensor,
        table: torch.Tensor,
        index: torch.Tensor,
        key: tuple[str, int] | None,
    ) -> None:
        self.ids, self.counts, self.inverse, self.order = ids, counts, inverse, order
        self.table, self.index = table, index
        # the cache slots the rows were paged into (pinned): None for a spilled batch
        self.slots: torch.Tensor | None = index if key is not None else None
        self.spilled = key is None
        self.applied = False
        # its uses are counted in the rows' statistics (at page-in; else by its row step, or
        # when it is released: RowStack._uncounted)
        self.touched = False
        self.key = key
        self.anchor = torch.zeros((), requires_grad=True)
        self._stack = stack
        self._use_index: torch.Tensor | None = None
        self._offsets: torch.Tensor | None = None
        self._private = table.data_ptr() if key is None else 0  # rows already its own
        self._release = (
            weakref.finalize(self, _unpin, weakref.ref(stack), key) if key is not None else None
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def offsets(self) -> torch.Tensor:
        """``[n + 1]`` CSR row pointers into ``order``."""
        if self._offsets is None:
            out = torch.zeros(len(self.ids) + 1, dtype=torch.int64, device=self.ids.device)
            torch.cumsum(self.counts, 0, out=out[1:])
            self._offsets = out
        return self._offsets

    @property
    def use_index(self) -> torch.Tensor:
        """Each requested position's slot in ``table`` (``index[inverse]``)."""
        if self._use_index is None:
            self._use_index = self.index[self.inverse]
        return self._use_index

    def rows(self) -> torch.Tensor:
        """``[n, dim]``: the distinct rows (a gather; executors usually gather per use)."""
        return torch.index_select(self.table, 0, self.index)

    def deltas(self) -> torch.Tensor:
        """``[n, dim]`` float32: the rows' current deltas (zeros for procedural rows)."""
        return self._stack.deltas_of(self)

    @property
    def writable(self) -> bool:
        """Whether these rows may train: False on a read-only pool, whose executors skip the
        row step (the rows never change)."""
        return self._stack.writable

    def skip_step(self) -> None:
        """The executor skipped this batch's row step (non-finite gradients): counted in
        ``stats()["skipped_row_steps"]``. The batch is not marked applied."""
        self._stack.count_skipped_step()

    def regroup(self, ids: torch.Tensor) -> RowBatch:
        """A new batch of ``ids`` (int64, in range: e.g. the ids of several batches of this
        pool, concatenated) paged in from the same rows, pinned until released."""
        return self._stack.page_in(ids)

    def apply_grads(
        self,
        grads: torch.Tensor,
        optimizer: RowOptimizer,
        *,
        rows: torch.Tensor | None = None,
        strict: bool = False,
        scale: torch.Tensor | None = None,
    ) -> None:
        """One ``optimizer`` step on the rows from ``grads`` ``[n, dim]`` (float, summed over
        each row's uses, aligned with ``ids``). Raises ``RuntimeError`` if this batch's rows were
        already updated: a graph's row step applies once.

        ``scale`` (float ``[n]``, finite and >= 0, aligned with ``ids``) scales each row's
        *update*: its new delta is ``old + scale[i] * (what the step alone would move it)``.
        The optimizer state is updated as without it (it sees the whole gradient): a row
        held back by a slower level (``dpsn.pool``'s levels) keeps its adaptive statistics
        honest and moves a fraction of its step. Unlike scaling ``grads``, this damps
        Adagrad's and Adam's steps too (they cancel a constant gradient factor). The native
        loops apply it as a per-row learning rate in the same pass; the PyTorch path
        interpolates the optimizer's result (the same to float32 rounding).

        ``rows`` (bool ``[n]``, aligned with ``ids``) restricts the step to the rows it marks:
        the others keep delta and optimizer state untouched (their uses are still counted).
        Protected rows (``Pool.protect``) are left out whatever ``rows`` says.

        No non-finite value enters the rows: a step whose ``grads`` hold NaN or Inf, or whose
        results would (a row optimizer of your own that overflows), is skipped for every row
        of the batch and counted in ``stats()["skipped_row_steps"]``, as ``GradScaler`` skips
        a dense step; with ``strict=True`` it raises ``InvalidDeltaError`` instead (nothing
        changed either way)."""
        if self.applied:
            raise RuntimeError(SECOND_BACKWARD)
        if rows is not None:
            rows = check_row_mask(rows, self.ids)
        if scale is not None:
            scale = check_update_scale(scale, len(self.ids))
        if not isinstance(grads, torch.Tensor):
            raise InvalidArgumentError(
                f"row gradients must be a tensor, got {type(grads).__name__}"
            )
        if not all_finite(grads):
            self._stack.refuse_step("the row gradients are not finite (NaN or Inf)", strict)
        else:
            self._stack.apply_grads(self, grads, optimizer, rows, strict=strict, scale=scale)
        self.applied = True

    def _subset(self, keep: torch.Tensor) -> RowBatch:
        """The rows ``keep`` (bool ``[n]``) of this batch as a batch that only takes a row step:
        it shares this batch's pin (no release of its own), and its uses count as counted."""
        sub = RowBatch.__new__(RowBatch)
        ids = self.ids[keep]
        sub.ids, sub.counts = ids, self.counts[keep]
        sub.inverse = sub.order = torch.arange(len(ids), device=ids.device)
        sub.table, sub.index = self.table, self.index[keep]
        sub.slots = self.slots[keep] if self.slots is not None else None
        sub.spilled, sub.applied, sub.touched = self.spilled, False, self.touched
        sub.key = None
        sub.anchor = self.anchor
        sub._stack = self._stack
        sub._use_index = sub._offsets = None
        sub._private = self._private
        sub._release = None
        return sub

    def release(self) -> None:
        """Let the rows be evicted again (idempotent)."""
        self._stack.forget(self)
        if self._release is not None and self._release.detach() is not None:
            self._stack.unpin(self.key)

    def keep_rows(self) -> None:
        """Copy the batch's rows out of the cache before the stack changes them there."""
        if self.table.data_ptr() != self._private:
            self.table = torch.index_select(self.table, 0, self.index)
            self.index = torch.arange(len(self.ids), device=self.ids.device)
            self._use_index = None
            self._private = self.table.data_ptr()

    def __enter__(self) -> RowBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def all_finite(t: torch.Tensor | None) -> bool:
    """Whether every value of ``t`` is finite: one sum in the usual case (inf and NaN carry
    through it), element by element only when the sum itself overflows."""
    if t is None or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _gather_rows(table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``table[slots]`` as a new tensor. A cold batch of distinct ids fills a run of fresh slots
    in batch order (``DeviceCache.lookup``): its rows are then one block copy, measurably faster
    than a gather row by row; else ``index_select`` (not advanced indexing: about twice as fast
    for a gather of rows)."""
    n = len(slots)
    if n > 1 and slots.device.type == "cpu":  # on CUDA the checks would sync with the device
        start = int(slots[0])
        if int(slots[-1]) - start == n - 1 and bool((torch.diff(slots) == 1).all()):
            return table[start : start + n].clone()
    return torch.index_select(table, 0, slots)


def _unpin(stack_ref: weakref.ref[RowStack], key: tuple[str, int]) -> None:
    """A batch was collected without ``release()``: its rows are let go at the stack's next
    operation. A finalizer can run anywhere, even inside one of the stack's own operations (a
    garbage collection), so it only queues (a list append is atomic)."""
    stack = stack_ref()
    if stack is not None:
        stack.collected.append(key)


class RowStack:
    """Device cache <- host staging <- persisted store <- procedural generator, behind one lock.

    ``Pool`` is a thin facade over this. All ids handed in are validated int64 tensors (1-D,
    in range); deltas are validated ``[n, dim]`` tensors in the pool dtype.
    """

    def __init__(
        self,
        store: PersistedStore,
        *,
        commit: int,
        index: RowLookup,
        procedural: ProceduralTier,
        dtype_name: str,
        device: torch.device,
        cache_rows: int,
        policy: str,
    ) -> None:
        self.store = store
        self.head = commit
        self.procedural = procedural
        self.dtype_name = dtype_name
        self.dtype: torch.dtype = getattr(torch, dtype_name)
        self.device = device
        self.layout = RowLayout(store.manifest.dim, self.dtype, 0)
        self.staging = Staging(self.layout)
        # the lower tiers, in the order a row's delta is looked for (see _tier.py); the
        # procedural generator gives every row its base beside them
        self._persisted = PersistedTier(store, index, dtype_name)
        self.tiers: tuple[Tier, ...] = (self.staging, self._persisted)
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.cache: DeviceCache | None = None
        self.trained: torch.Tensor | None = None  # per slot: has a delta/base/state
        if cache_rows:
            self.cache = DeviceCache(
                cache_rows, self.layout.columns(), device=device, policy=policy
            )
            self.trained = torch.zeros(cache_rows, dtype=torch.bool, device=device)
        self.lock = self.cache.mutex if self.cache is not None else threading.RLock()
        self._keys = itertools.count(1)
        self._fill_buffer: torch.Tensor | None = None
        # resident batches whose step is in flight: their rows must keep their values
        self._pending: weakref.WeakSet[RowBatch] = weakref.WeakSet()
        # pin key -> (slots, counts) of cached batches whose uses are not counted yet: their
        # row step counts them in the same pass as the update (one visit per row, not two)
        self._uncounted: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.collected: list[tuple[str, int]] = []  # pin keys of batches collected unreleased
        self._prefetcher: ThreadPoolExecutor | None = None
        # miss_advice(missed ids) -> more ids to page in after a step's misses (co-use
        # partners: tiers/_couse.py, set by Pool.prefetch_partners_on_miss); advice, never pinned
        self.miss_advice: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._missed: list[torch.Tensor] = []
        self._advising = False  # set while paging in advice or an explicit prefetch (planned)
        self.advised_rows = 0  # rows paged in on that advice
        # usage statistics (a lifecycle's): off until set_usage_rules; called through hooks
        self.usage_stats = UsageStatistics()
        # sorted ids no row step may change (Pool.protect), and its copy on the device
        self.protected = torch.empty(0, dtype=torch.int64)
        self._protected_device: torch.Tensor | None = None
        self.protected_changed = False  # since the last commit

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def usage_rules(self) -> UsageRules | None:
        """The lifecycle's usage rules (None: no usage statistics are kept)."""
        return self.usage_stats.rules

    @property
    def clock(self) -> UsageClock:
        """The lifecycle's clock (steps and epochs) the statistics are kept against."""
        return self.usage_stats.clock

    @property
    def usage_index(self) -> UsageIndex | None:
        """The committed rows' statistics, where loaded (None: not yet)."""
        return self.usage_stats.index

    @property
    def index(self) -> RowLookup:
        """The row index of the commit the persisted tier reads."""
        return self._persisted.index

    @index.setter
    def index(self, index: RowLookup) -> None:
        self._persisted.index = index

    @property
    def writable(self) -> bool:
        """Whether the store under the stack takes commits (the pool holds the writer lock)."""
        return bool(self.store.writable)

    # -- the lower tiers -----------------------------------------------------------------------

    def _host_rows(
        self, ids: np.ndarray
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deltas, state and usage statistics of ``ids`` (any order, repeats allowed) from the
        lower tiers (``self.tiers``, in order: staging, then the persisted store; each asked
        for the ids the ones above left open): the positions in ``ids`` that have one, their
        deltas (pool dtype), states and usage (CPU; usage ``[n, 0]`` without a lifecycle).
        With a lifecycle, FREE deltas come decayed to the current epoch
        (``_usage.materialize``). Rows without a delta cost nothing, so a read of procedural
        rows allocates no zeros."""
        layout = self.layout
        open_pos = np.arange(len(ids))
        pos, delta, state, usage = [], [], [], []
        for tier in self.tiers:
            got = tier.read(ids[open_pos], layout)
            pos.append(open_pos[got.found])
            delta.append(got.delta)
            state.append(got.state)
            usage.append(got.usage)
            if tier is self._persisted:
                self.counters["rows_from_disk"] += len(got.found)
                self.counters["bytes_from_disk"] += got.nbytes
            if len(got.found) or len(got.ended):
                left = np.ones(len(open_pos), dtype=bool)
                left[got.found] = False
                left[got.ended] = False
                open_pos = open_pos[left]
        at = np.concatenate(pos)
        row_delta, row_state, row_usage = torch.cat(delta), torch.cat(state), torch.cat(usage)
        if self.usage_stats.rules is not None and len(at):
            row_delta, row_usage = self.usage_stats.current_epoch(row_delta, row_usage)
        return at, row_delta, row_state, row_usage

    def _host_dense(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deltas (float32), states and usage of ``ids`` from the host tiers: zeros where no
        delta (usage: NaN, "no statistics")."""
        pos, delta, state, usage = self._host_rows(ids)
        out = torch.zeros((len(ids), self.dim), dtype=torch.float32)
        out_state = self.layout.state.zeros(len(ids))
        out_usage = self.layout.usage.empty(len(ids)).fill_(float("nan"))
        at = torch.from_numpy(pos)
        out[at] = delta.float()
        out_state[at] = state
        out_usage[at] = usage
        return out, out_state, out_usage

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and t.device.type == "cpu":
            # Pinned staging makes the copy truly asynchronous, so a prefetch on a side stream
            # overlaps the step computing on the main one.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _uncached_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``base + delta`` from the lower tiers only, float32 on the device."""
        dev = ids.to(self.device)
        if len(ids) <= _SPILL_CHUNK:
            rows = self.procedural(dev)
        else:
            rows = torch.empty((len(ids), self.dim), dtype=torch.float32, device=self.device)
            for a in range(0, len(ids), _SPILL_CHUNK):
                rows[a : a + _SPILL_CHUNK] = self.procedural(dev[a : a + _SPILL_CHUNK])
        pos, delta, _, _ = self._host_rows(ids.cpu().numpy())
        if len(pos):
            at = self._to_device(torch.from_numpy(pos))
            rows.index_add_(0, at, self._to_device(delta).to(rows.dtype))
        return rows

    # -- moving rows into and out of the cache -------------------------------------------------

    def _fill(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Write the columns of distinct missing ``ids`` (CPU; in batch order when none
        repeats, see ``_cache.Admission``) into ``slots``: the row always; delta, base and state
        only for rows that have a delta (``RowLayout``).

        While the cache warms up its victims are a run of fresh slots: a float32 pool's
        generator then writes the rows straight into the row column, with no intermediate, and
        a read copies them out as one block (``_gather_rows``)."""
        cache, layout, trained = self.cache, self.layout, self.trained
        assert cache is not None and trained is not None
        pos, delta, state, usage = self._host_rows(ids.numpy())
        dev_ids = ids.to(self.device)
        rows = cache.column(layout.row)
        start = int(slots[0]) if len(slots) else 0
        in_place = (
            self.dtype == torch.float32
            and len(slots) > 0
            and int(slots[-1]) - start == len(slots) - 1
            and bool((torch.diff(slots) == 1).all())
        )
        # scattered victims: generate into a reused buffer, then scatter into the cache
        base = rows[start : start + len(slots)] if in_place else self._scratch(len(ids))
        self.procedural.generate_into(dev_ids, base)
        moved = len(ids) * layout.dim * self.dtype.itemsize
        if len(pos) == 0:
            if not in_place:
                rows.index_copy_(0, slots, base.to(self.dtype))
            trained.index_fill_(0, slots, False)
        else:
            at = self._to_device(torch.from_numpy(pos))
            tslots = slots[at]
            delta = self._to_device(delta)
            cache.column(layout.delta).index_copy_(0, tslots, delta)
            cache.column(layout.state).index_copy_(0, tslots, self._to_device(state))
            if layout.usage_width:
                cache.column(layout.usage).index_copy_(0, tslots, self._to_device(usage))
            tbase = base[at]  # a copy: base may be the row column itself
            cache.column(layout.base).index_copy_(0, tslots, tbase)
            if in_place:
                rows.index_copy_(0, tslots, tbase + delta.float())
            else:
                base.index_copy_(0, at, tbase + delta.float())
                rows.index_copy_(0, slots, base.to(self.dtype))
            flags = torch.zeros(len(ids), dtype=torch.bool, device=self.device)
            flags[at] = True
            trained.index_copy_(0, slots, flags)
            moved += len(pos) * (layout.row_bytes() - layout.dim * self.dtype.itemsize)
        cache.stats.add(bytes_to_device=moved)

    def _scratch(self, n: int) -> torch.Tensor:
        """A float32 ``[n, dim]`` buffer for one fill, reused across fills (up to 64 MiB) so that
        a fill does not pay for fresh pages every time."""
        if n * self.dim * 4 > _SCRATCH_BYTES:
            return torch.empty((n, self.dim), dtype=torch.float32, device=self.device)
        if self._fill_buffer is None or len(self._fill_buffer) < n:
            self._fill_buffer = torch.empty((n, self.dim), dtype=torch.float32, device=self.device)
        return self._fill_buffer[:n]

    def _evict(self, slots: torch.Tensor) -> None:
        """Dirty rows leave the cache: their persisted columns are staged, never lost."""
        cache = self.cache
        assert cache is not None
        ids = cache.slot_ids[slots]
        ids, order = torch.sort(ids)
        slots = slots[order]
        layout = self.layout
        values = {c.name: cache.column(c)[slots].cpu() for c in layout.persisted_columns()}
        if layout.usage_width:
            _usage.set_norm(values[layout.usage.name], values[layout.delta.name])
        self.staging.put(ids.cpu().numpy(), values)
        cache.stats.add(bytes_written_back=len(slots) * cache.row_bytes())

    def _lookup(
        self, ids: torch.Tensor, counts: torch.Tensor | None = None, *, cold: bool = False
    ) -> torch.Tensor:
        """Slots of ``ids`` in the cache, the misses paged in: the stack drives the cache's
        admission (no callbacks): dirty victims are staged first, then the missing rows are
        read from the lower tiers into the victims' slots. ``cold``: rows paged in on advice,
        admitted as unused (``DeviceCache.admit``)."""
        cache = self.cache
        assert cache is not None
        self._unpin_collected()  # (every lookup: pins of collected batches must not hold rows)
        admission = cache.admit(ids, counts=counts, cold=cold)
        if isinstance(admission, torch.Tensor):  # all cached
            return admission
        if len(admission.dirty):
            self._evict(admission.dirty)  # their columns still hold the rows: staged, not lost
        cache.place(admission)
        try:
            self._fill(admission.missing.cpu(), admission.victims)
        except BaseException:
            cache.abandon(admission)
            raise
        slots = cache.finish(admission)
        if self.miss_advice is not None and not self._advising:
            # Only rows that were paged in ask for their partners (a failed fill asks nothing).
            self._missed.append(admission.missing.cpu())
            self._advise_misses()
        return slots

    # -- staleness of cached bases -------------------------------------------------------------

    def _refresh_bases_if_stale(self) -> None:
        """After an in-place change of the (frozen) generator's weights, re-materialize every
        cached row once from the new bases and its cached delta."""
        stamp = self.procedural.stamp()
        if stamp == self.procedural.seen:
            return
        self.procedural.seen = stamp
        cache, layout, trained = self.cache, self.layout, self.trained
        if cache is None or trained is None or self.procedural.trainable():
            return
        self._rows_change()
        _, slots = cache.occupied_ids()
        for a in range(0, len(slots), _REMATERIALIZE_BATCH):
            s = slots[a : a + _REMATERIALIZE_BATCH]
            base = self.procedural(cache.slot_ids[s])
            t = trained[s]
            cache.column(layout.base)[s[t]] = base[t]
            base[t] += cache.column(layout.delta)[s[t]].float()
            cache.column(layout.row)[s] = base.to(self.dtype)

    def refresh_cached_bases(self, ids: torch.Tensor) -> int:
        """Re-materialize the cached rows of ``ids`` (1-D, distinct) from fresh bases and their
        cached deltas, and no other row: the procedural tier's rows changed for these ids only
        (a levelled pool's other level was written). Returns how many were cached. Nothing to
        do when a whole refresh is pending anyway (the stamp changed) or rows are not cached."""
        with self.lock:
            cache, layout, trained = self.cache, self.layout, self.trained
            if cache is None or trained is None or self.procedural.trainable():
                return 0
            if self.procedural.stamp() != self.procedural.seen:
                return 0  # the next read re-materializes every cached row
            slots, hit = cache.find(ids.to(self.device))
            s = slots[hit]
            if not len(s):
                return 0
            self._rows_change()
            base = self.procedural(cache.slot_ids[s])
            t = trained[s]
            cache.column(layout.base)[s[t]] = base[t]
            base[t] += cache.column(layout.delta)[s[t]].float()
            cache.column(layout.row)[s] = base.to(self.dtype)
            return len(s)

    def _cached_delta(self, slots: torch.Tensor) -> torch.Tensor:
        """Float32 deltas of cached ``slots`` (zeros for untrained rows)."""
        assert self.cache is not None and self.trained is not None
        delta = torch.index_select(self.cache.column(self.layout.delta), 0, slots).float()
        return delta.mul_(self.trained[slots, None])

    # -- reads ---------------------------------------------------------------------------------

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``base + delta`` of 1-D ``ids`` (repeats allowed), pool dtype, on the device.

        Cached rows stay pinned until the next ``read`` (the step in flight)."""
        if torch.is_grad_enabled():  # (Pool.read turned it off already: a hot read saves ~3 us)
            with torch.no_grad():
                return self._read(ids)
        return self._read(ids)

    def _read(self, ids: torch.Tensor) -> torch.Tensor:
        with self.lock:
            cache = self.cache
            if cache is None:
                return self._uncached_rows(ids).to(self.dtype)
            self._refresh_bases_if_stale()
            cache.unpin(_READ)
            trainable = self.procedural.trainable()
            if not trainable:  # all cached (the usual hot read): find and gather in one pass
                hot = cache.read_hits(ids, self.layout.row)
                if hot is not None:
                    cache.pin(_READ, hot[0])
                    return hot[1]
            try:
                slots = self._lookup(ids.to(self.device))
            except _CANNOT_CACHE:
                return self._spilled_rows(ids)
            cache.pin(_READ, slots)
            if trainable:
                base = self.procedural(ids.to(self.device))
                return (base + self._cached_delta(slots)).to(self.dtype)
            return _gather_rows(cache.column(self.layout.row), slots)

    def _spilled_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of a batch too big for the cache: from the lower tiers, with the cached copy
        (possibly newer, if dirty) wherever a row is resident."""
        cache = self.cache
        assert cache is not None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # after an out-of-memory fill, give the spill a chance
        self.counters["spilled_batches"] += 1
        self.counters["spilled_rows"] += len(ids)
        dev = ids.to(self.device)
        rows = self._uncached_rows(ids).to(self.dtype)
        slots, hit = cache.find(dev)
        if bool(hit.any()):
            if self.procedural.trainable():
                fresh = self.procedural(dev[hit]) + self._cached_delta(slots[hit])
                rows[hit] = fresh.to(self.dtype)
            else:
                rows[hit] = cache.column(self.layout.row)[slots[hit]]
        return rows

    @torch.no_grad()
    def delta(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 deltas of 1-D ``ids`` wherever they currently live (zeros: procedural)."""
        with self.lock:
            out = self._host_dense(ids.numpy())[0].to(self.device)
            if self.cache is not None:
                slots, hit = self.cache.find(ids.to(self.device))
                out[hit] = self._cached_delta(slots[hit])
        return out

    @torch.no_grad()
    def base(self, ids: torch.Tensor) -> torch.Tensor:
        return self.procedural(ids.to(self.device))

    # -- updates -------------------------------------------------------------------------------

    def _current(
        self, ids: torch.Tensor, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where sorted unique ``ids`` (device) live and their current deltas (float32),
        states and usage statistics: ``(slots, hit, delta, state, usage)`` on the device
        (usage NaN where a row has no delta; ``[n, 0]`` without a lifecycle). ``slots``: known
        cache slots of every id (a pinned batch), skipping the lookup."""
        n, cache = len(ids), self.cache
        if cache is None:
            slots = torch.zeros_like(ids)
            hit = torch.zeros(n, dtype=torch.bool, device=self.device)
        elif slots is None:
            slots, hit = cache.find(ids)
        else:
            hit = torch.ones(n, dtype=torch.bool, device=self.device)
        if bool(hit.all()):
            delta = self._cached_delta(slots)
            state = torch.index_select(cache.column(self.layout.state), 0, slots)  # type: ignore[union-attr]
            state = state * self.trained[slots, None]  # type: ignore[index]
            return slots, hit, delta, state, self._cached_usage(slots)
        delta = torch.zeros((n, self.dim), dtype=torch.float32, device=self.device)
        state = self.layout.state.zeros(n, self.device)
        usage = self.layout.usage.empty(n, self.device)
        miss = ~hit
        host_delta, host_state, host_usage = self._host_dense(ids[miss].cpu().numpy())
        delta[miss] = host_delta.to(self.device)
        state[miss] = host_state.to(self.device)
        usage[miss] = host_usage.to(self.device)
        if bool(hit.any()):
            s = slots[hit]
            delta[hit] = self._cached_delta(s)
            state[hit] = cache.column(self.layout.state)[s] * self.trained[s, None]  # type: ignore[union-attr, index]
            usage[hit] = self._cached_usage(s)
        return slots, hit, delta, state, usage

    def _store(
        self,
        ids: torch.Tensor,
        slots: torch.Tensor,
        hit: torch.Tensor,
        delta: torch.Tensor,
        state: torch.Tensor | None,
        batch: RowBatch | None = None,
        usage: torch.Tensor | None = None,
    ) -> None:
        """Write new deltas (pool dtype), states (None: keep) and usage statistics (None: the
        pool has none) of sorted unique ``ids``: into the cache where resident (rows
        re-materialized, slots dirty), else into staging. ``batch``: the step whose update this
        is (it needs its rows no longer)."""
        cache, layout = self.cache, self.layout
        if cache is not None and bool(hit.any()):
            self._rows_change(exclude=batch)
            assert self.trained is not None
            all_hit = bool(hit.all())
            s = slots if all_hit else slots[hit]
            d = delta if all_hit else delta[hit]
            fresh = ~self.trained[s]
            if bool(fresh.any()):  # first update of a row read procedural: keep its base
                fs = s[fresh]
                if self.dtype == torch.float32 and not self.procedural.trainable():
                    base = cache.column(layout.row)[fs]  # row == base, exactly, for these
                else:
                    base = self.procedural(cache.slot_ids[fs])
                cache.column(layout.base)[fs] = base
                cache.column(layout.state)[fs] = 0.0
                self.trained[fs] = True
            cache.column(layout.delta)[s] = d
            if state is not None:
                cache.column(layout.state)[s] = state if all_hit else state[hit]
            if usage is not None:
                cache.column(layout.usage)[s] = usage if all_hit else usage[hit]
            row = torch.index_select(cache.column(layout.base), 0, s).add_(d.float())
            cache.column(layout.row)[s] = row.to(self.dtype)
            cache.mark_dirty(s)
        if not bool(hit.all()):
            miss = ~hit
            values = {layout.delta.name: delta[miss].cpu()}
            if state is not None:
                values[layout.state.name] = state[miss].cpu()
            else:
                values[layout.state.name] = self._host_dense(ids[miss].cpu().numpy())[1]
            if usage is not None:
                values[layout.usage.name] = usage[miss].cpu()
                _usage.set_norm(values[layout.usage.name], values[layout.delta.name])
            self.staging.put(ids[miss].cpu().numpy(), values)

    @torch.no_grad()
    def write(self, ids: torch.Tensor, values: torch.Tensor, *, add: bool) -> None:
        """Stage ``values`` (pool dtype, ``[len(ids), dim]``) as deltas of 1-D ``ids``: replace
        (repeats: the last wins) or add (repeats: all summed). Nothing changes if the result
        would not be finite."""
        uniq, inverse = torch.unique(ids, return_inverse=True)
        with self.lock:
            self.count_uses()  # before the rows' statistics are read and written back
            dev = uniq.to(self.device)
            inv = inverse.to(self.device)
            slots, hit, current, _, usage = self._current(dev)
            if add:
                summed = torch.zeros((len(uniq), self.dim), dtype=torch.float32, device=self.device)
                summed.index_add_(0, inv, values.to(self.device, torch.float32))
                new = (current + summed).to(self.dtype)
                if not bool(torch.isfinite(new).all()):
                    raise InvalidDeltaError(f"adding these deltas overflows {self.dtype}")
            else:
                last = torch.full((len(uniq),), -1, dtype=torch.int64, device=self.device)
                positions = torch.arange(len(inv), device=self.device)
                last.scatter_reduce_(0, inv, positions, reduce="amax")
                new = values.to(self.device)[last]
            stats = self.usage_stats
            if stats.rules is None:
                self._store(dev, slots, hit, new, None)
                return
            ones = torch.ones(len(uniq), dtype=torch.int64, device=self.device)
            stats.record_uses(usage, ones)
            usage = stats.after_update(usage, ones, None)
            # an explicit write is deliberate: it counts as warmed up (see UsageRules.warmup)
            usage[:, _usage.USES].clamp_(min=float(stats.rules.warmup))
            self._store(dev, slots, hit, new, None, usage=usage)

    def drop(self, ids: torch.Tensor) -> None:
        """Return sorted unique ``ids`` to procedural at the next commit."""
        with self.lock:
            self.staging.drop(ids.numpy())
            if self.cache is not None:
                self._rows_change()
                self.cache.invalidate(ids.to(self.device))

    def discard(self) -> None:
        """Forget every change since the last commit."""
        with self.lock:
            self.staging.clear()
            if self.cache is not None:
                self._rows_change()
                self.cache.unpin_all()
                self.cache.clear()

    # -- the executor contract -----------------------------------------------------------------

    @torch.no_grad()
    def page_in(self, ids: torch.Tensor) -> RowBatch:
        """Page ``ids`` (int64, any shape, validated) in for one executor step; see
        :class:`RowBatch`. One sort finds the distinct rows, their use counts and the grouping
        the backward pass needs; one cache lookup pages them in."""
        flat = ids.reshape(-1).to(self.device)
        if _kernels.usable(flat):  # one radix sort for all four
            uniq, counts, inverse, order = _kernels.group_ids(flat)
        else:
            ordered, order = torch.sort(flat, stable=True)
            uniq, counts = torch.unique_consecutive(ordered, return_counts=True)
            inverse = torch.empty_like(flat)
            inverse[order] = torch.repeat_interleave(
                torch.arange(len(uniq), device=flat.device), counts
            )
        inverse = inverse.reshape(ids.shape)
        with self.lock:
            # uses still uncounted are counted at their own step, before the clock moves: in
            # the usual loop (page-in, row step, release) there are none, and the row step
            # counts its batch's uses in its own pass
            self.count_uses()
            cache = self.cache
            stats = self.usage_stats
            tracking = stats.rules is not None and stats.on_page_in()
            if cache is not None:
                self._refresh_bases_if_stale()
                try:
                    slots = self._lookup(uniq, counts)
                except _CANNOT_CACHE:
                    pass
                else:
                    key = ("batch", next(self._keys))
                    cache.pin(key, slots)
                    table = cache.column(self.layout.row)
                    batch = RowBatch(self, uniq, counts, inverse, order, table, slots, key)
                    self._pending.add(batch)
                    if tracking:
                        if stats.native(slots):
                            self._uncounted[key] = (slots, counts)
                        else:
                            self._touch(slots, counts)
                            batch.touched = True
                    return batch
            table = self._spilled_rows(uniq) if cache is not None else self.read(uniq)
            index = torch.arange(len(uniq), device=self.device)
            return RowBatch(self, uniq, counts, inverse, order, table, index, None)

    @torch.no_grad()
    def set_protected(self, ids: torch.Tensor) -> None:
        """Rows no row step may change from now on: sorted unique int64 ``ids`` (validated by
        the caller), replacing the set. Persisted with the next commit."""
        with self.lock:
            self.protected = ids.to("cpu", torch.int64).contiguous()
            self._protected_device = None
            self.protected_changed = True

    def protected_mask(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Bool ``[n]``: which of sorted ``ids`` are protected; None when none is (one binary
        search per id, on the ids' device)."""
        if not len(self.protected) or not len(ids):
            return None
        p = self._protected_device
        if p is None or p.device != ids.device:
            p = self._protected_device = self.protected.to(ids.device)
        at = torch.searchsorted(p, ids).clamp_(max=len(p) - 1)
        hit = p[at] == ids
        return hit if bool(hit.any()) else None

    def refuse_step(self, why: str, strict: bool) -> None:
        """A row step that would put non-finite values in the rows: skipped and counted, or
        (``strict``) ``InvalidDeltaError``."""
        if strict:
            raise InvalidDeltaError(f"{why}: the row step was not applied (no row changed)")
        self.count_skipped_step()

    def apply_grads(
        self,
        batch: RowBatch,
        grads: torch.Tensor,
        optimizer: RowOptimizer,
        rows: torch.Tensor | None = None,
        *,
        strict: bool = False,
        scale: torch.Tensor | None = None,
    ) -> None:
        """One optimizer step on ``batch``'s rows (see :meth:`RowBatch.apply_grads`): those
        ``rows`` marks (all when None), less the protected ones, each row's update scaled by
        ``scale`` (checked float32 ``[n]`` on the CPU, or None); the caller has checked
        ``grads`` finite. Every step's results are checked before they are stored, but the
        native loop's on resident float32 rows, which it updates in place (a second pass over
        the rows would cost about what the step does): with finite gradients and settings that
        passed the optimizer's checks, only an overflow past float32's range (``|lr * grad|``
        near 3e38) could make those non-finite, and ``verify`` reports such rows."""
        width = optimizer.state_width(self.dim)
        if width != self.layout.state_width:
            raise ValueError(
                f"this row optimizer keeps {width} values of state per row but the pool was "
                f"set up for {self.layout.state_width}: call set_state_width({width}) first"
            )
        if not isinstance(grads, torch.Tensor) or tuple(grads.shape) != (len(batch), self.dim):
            got = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise InvalidArgumentError(
                f"row gradients must be a [{len(batch)}, {self.dim}] tensor (one per row of the "
                f"batch), got {got}"
            )
        if len(batch) == 0:
            return
        if self.procedural.observes_uses:
            with self.lock:  # every use counts for the generator, held rows' included
                self.procedural.observe_uses(batch.ids, batch.counts)
        held = self.protected_mask(batch.ids)
        keep = rows
        if held is not None:
            keep = ~held if keep is None else keep & ~held
        if keep is not None and not bool(keep.all()):
            self.counters["rows_held"] += int((~keep).sum())
            with self.lock:
                if batch.key is not None:  # every use counts, held rows' included
                    if batch.key in self._uncounted:
                        self.count_uses(batch.key)
                    batch.touched = True
            if not bool(keep.any()):
                return
            batch, grads = batch._subset(keep), grads[keep]
            if scale is not None:
                scale = scale[keep.cpu()]
        with self.lock:
            resident = self._resident_slots(batch)
            grads = grads.to(self.device, torch.float32)
            stats = self.usage_stats
            rules = stats.rules
            # a cached batch's uses not counted yet are counted by this step (no page-in came
            # since, so the clock is its page-in's); the entry goes once the step ran
            uncounted = batch.key in self._uncounted
            if batch.key is not None and not uncounted:
                batch.touched = True  # counted at its page-in, or since (count_uses)
            kind = None if resident is None else self._fused(optimizer, width, grads)
            if resident is not None and kind is not None:
                self._rows_change(exclude=batch)
                if rules is None:
                    self._apply_fused(resident, grads, optimizer, kind, scale)
                else:
                    self._apply_fused_tracked(
                        batch, resident, grads, optimizer, kind, uncounted, scale
                    )
            else:
                slots, hit, delta, state, usage = self._current(batch.ids, resident)
                updated = None
                stepped = None
                if rules is not None:  # the cached rows' native loop, where it can run
                    stepped = stats.step_spilled(
                        batch, delta, state, usage, grads, optimizer, self.dim, scale
                    )
                if stepped is not None:
                    new_delta, new_state, updated = stepped
                else:
                    new_delta, new_state = _checked_step(optimizer, delta, grads, state)
                    if scale is not None:  # the update scaled, the state as stepped
                        s = scale.to(new_delta.device, new_delta.dtype)[:, None]
                        new_delta = delta + s * (new_delta - delta)
                    if rules is not None:
                        if not batch.touched:  # (a spilled batch) its uses count now
                            stats.record_uses(usage, batch.counts)
                        new_delta = stats.damped(usage, delta, new_delta)
                        norms = torch.linalg.vector_norm(grads, dim=1)
                        updated = stats.after_update(usage, batch.counts, norms)
                new_delta = new_delta.to(self.dtype)
                if not (all_finite(new_delta) and all_finite(new_state)):
                    self.refuse_step(
                        f"the row step's results are not finite in {self.dtype} (the row "
                        f"optimizer {type(optimizer).__name__} overflowed or divided by zero)",
                        strict,
                    )
                    return
                self._store(batch.ids, slots, hit, new_delta, new_state, batch, updated)
            if uncounted:
                del self._uncounted[batch.key]
            self.counters["row_steps"] += 1
            self.counters["rows_updated"] += len(batch)

    def _fused(self, optimizer: RowOptimizer, width: int, grads: torch.Tensor) -> int | None:
        """The kind of the optimizer's native loop when it can update resident rows in place
        (float32 columns on the CPU, bases kept: a frozen generator), else None; ``width`` is
        its state width (the row step asked it). Resolved once a step and handed to the loop
        that runs it."""
        if self.dtype != torch.float32 or not _kernels.usable(grads) or self.procedural.trainable():
            return None
        return _kernels.native_kind(getattr(optimizer, "native", None), width, self.dim)

    def _apply_fused(
        self,
        slots: torch.Tensor,
        grads: torch.Tensor,
        optimizer: RowOptimizer,
        kind: int,
        scale: torch.Tensor | None = None,
    ) -> None:
        """One pass over the rows at ``slots`` by the native loop ``kind`` (``_fused``): start
        untrained rows at zero (their base is their row), step delta and state (each row's
        update times ``scale``), re-materialize ``row = base + delta``."""
        cache, trained = self.cache, self.trained
        assert cache is not None and trained is not None
        _kernels.apply_rows(
            kind,
            optimizer.native_hyper(),
            *self._step_columns(),
            slots,
            ~trained[slots],
            grads.contiguous(),
            scale,
        )
        trained[slots] = True
        cache.mark_dirty(slots)

    def _step_columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cache's delta, state, base and row columns, as the fused row steps take them."""
        cache, layout = self.cache, self.layout
        assert cache is not None
        return tuple(cache.column(c) for c in (layout.delta, layout.state, layout.base, layout.row))  # type: ignore[return-value]

    @torch.no_grad()
    def deltas_of(self, batch: RowBatch) -> torch.Tensor:
        """Float32 ``[n, dim]`` current deltas of ``batch.ids`` (for an executor that computes
        ``base + delta`` itself, e.g. while the generator trains)."""
        with self.lock:
            return self._current(batch.ids, self._resident_slots(batch))[2]

    def _resident_slots(self, batch: RowBatch) -> torch.Tensor | None:
        """``batch``'s slots if all its rows are still where it paged them in (they are pinned,
        so they should be: checked with one gather), else None (look them up)."""
        cache, slots = self.cache, batch.slots
        if slots is None or cache is None:
            return None
        return slots if bool((cache.slot_ids[slots] == batch.ids).all()) else None

    def forget(self, batch: RowBatch) -> None:
        """``batch`` no longer needs its rows to keep their values (released)."""
        self._pending.discard(batch)

    def unpin(self, key: tuple[str, int]) -> None:
        """Let the rows of the batch pinned under ``key`` go, its uses counted first if no row
        step counted them."""
        with self.lock:
            self.count_uses(key)
            if self.cache is not None:
                self.cache.unpin(key)

    def _unpin_collected(self) -> None:
        """Let go of the rows of batches collected without ``release()`` (see ``_unpin``)."""
        while self.collected:
            self.unpin(self.collected.pop())

    def count_uses(self, key: tuple[str, int] | None = None) -> None:
        """Count the uses of the cached batch pinned under ``key`` (None: of every batch in
        flight) that no row step has counted: a batch released without one, or before the
        statistics are read or the cache is emptied."""
        with self.lock:
            if key is None:
                self._unpin_collected()
            keys = list(self._uncounted) if key is None else [key]
            for k in keys:
                uses = self._uncounted.pop(k, None)
                tracked = self.usage_stats.rules is not None
                if uses is not None and tracked and self.cache is not None:
                    self._touch(*uses)

    def _rows_change(self, exclude: RowBatch | None = None) -> None:
        """Cached rows are about to change: every other step in flight keeps its own copy.
        Without ``exclude`` they may leave the cache, so in-flight uses are counted first."""
        if exclude is None:
            self.count_uses()
        for batch in list(self._pending):
            if batch is not exclude:
                batch.keep_rows()
                self._pending.discard(batch)

    def count_skipped_step(self) -> None:
        """An executor skipped a row step (non-finite gradients): counted in ``stats()``."""
        self.counters["skipped_row_steps"] += 1

    def set_state_width(self, width: int) -> None:
        """Keep ``width`` float32 values of per-row state beside each delta (a row optimizer's):
        cached, staged, evicted and committed with it, and read back from the store when a
        segment holds state of that width (else zeros). Changing the width resets the state of
        uncommitted rows; their deltas are kept."""
        if isinstance(width, bool) or not isinstance(width, int) or width < 0:
            raise ValueError(f"state width must be a non-negative int, got {width!r}")
        with self.lock:
            if width == self.layout.state_width:
                return
            self.flush()
            self.layout = self.layout.with_state(width)
            self.staging.set_layout(self.layout)
            if self.cache is not None:
                self._rows_change()
                self.cache.unpin_all()
                self.cache.clear()  # rows are re-read with the state of the new width
                self.cache.set_column(self.layout.state)

    # -- prefetch ------------------------------------------------------------------------------

    def prefetch(self, ids: torch.Tensor) -> Prefetch:
        """Page ``ids`` in on a helper thread; see :class:`Prefetch`."""
        if self.cache is None:
            return Prefetch(self, None)
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="dpsn-prefetch")
        key = ("prefetch", next(self._keys))
        return Prefetch(self, self._prefetcher.submit(self._prefetch_job, ids, key), key)

    def _advise_misses(self) -> None:
        """Page in what ``miss_advice`` says goes with this step's misses, on the prefetch
        thread (under the lock, after this step's page-in)."""
        missed = torch.cat(self._missed)
        self._missed.clear()
        if self.miss_advice is None:
            return
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="dpsn-prefetch")
        self._prefetcher.submit(self._advice_job, self.miss_advice, missed)

    def _advice_job(
        self, advice: Callable[[torch.Tensor], torch.Tensor], missed: torch.Tensor
    ) -> None:
        extra = advice(missed)  # outside the lock: the step goes on meanwhile
        cache = self.cache
        if cache is None or not len(extra):
            return
        with self.lock, torch.no_grad():
            extra = extra.to(self.device)
            extra = extra[~cache.find(extra)[1]]  # only rows not cached
            if not len(extra):
                return
            last = dict(cache.stats.last)
            self._advising = True
            try:
                # admitted cold: no lookup, hit, miss or policy access is counted (a guess is
                # not a use); the bytes and evictions it costs count in the totals
                self._lookup(extra, cold=True)
                self.advised_rows += len(extra)
            except _CANNOT_CACHE:
                pass  # advice: no room now
            finally:
                self._advising = False
                cache.stats.last = last  # the last step's counters stay the step's

    def _prefetch_job(self, ids: torch.Tensor, key: tuple[str, int]) -> tuple[torch.Tensor, Any]:
        cache = self.cache
        assert cache is not None
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with self.lock, torch.no_grad():
            self._refresh_bases_if_stale()
            self._advising = True  # its misses were planned: no advice follows them
            try:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        slots = self._lookup(ids.to(self.device))
                    event = torch.cuda.Event()
                    event.record(stream)
                else:
                    slots, event = self._lookup(ids.to(self.device)), None
            except _CANNOT_CACHE:
                # Prefetching is advice: rows that cannot all be made resident now are paged
                # in (spilled) by the step that reads them.
                return torch.empty(0, dtype=torch.int64, device=self.device), None
            finally:
                self._advising = False
            cache.pin(key, slots)
        return slots, event

    # -- commit --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Move every dirty cached row into staging (the cache keeps a clean copy), with the
        uses of steps in flight counted."""
        with self.lock:
            self.count_uses()
            cache = self.cache
            if cache is None:
                return
            dirty = cache.dirty_slots()
            if len(dirty):
                self._evict(dirty)
            cache.clean()

    def staged_rows(self) -> int:
        dirty = int(self.cache.dirty.sum()) if self.cache is not None else 0
        return len(self.staging) + dirty

    def commit(
        self,
        message: str,
        *,
        stats: dict[str, Any] | None,
        routers: dict[str, str] | None = None,
        lifecycle: dict[str, Any] | None = None,
        modules: dict[str, dict[str, Any]] | None = None,
    ) -> Commit:
        """Make every change since the last commit durable in one atomic step: dirty rows,
        staged rows and drops, changed generator weights, and the routers the caller has
        already written as version ``head + 1`` (``routers``: name -> digest; the commit
        record names them, nothing here calls back up to write them). On failure the store
        keeps its previous commit and the changes stay staged (routers written for a commit
        that failed are rewritten by the next).

        With usage statistics, rows still in their warm-up (FREE, fewer uses than
        ``UsageRules.warmup``, never committed) stay staged instead of being written, and
        ``lifecycle`` (JSON) goes into the commit record."""
        with self.lock:
            self.flush()
            st, layout = self.staging, self.layout
            generator_state = None
            if self.procedural.observes_uses:  # the committed weights hold the uses so far
                self.procedural.refresh_from_uses()
            if self.procedural.changed_since_commit():
                generator_state = self.procedural.state_arrays()
            held = self.usage_stats.warming_up(st, layout, self.index)
            ids, values = st.ids, st.values
            if held.any():
                at = torch.from_numpy(~held)
                ids, values = ids[~held], {name: v[at] for name, v in values.items()}
            usage = values[layout.usage.name].numpy() if layout.usage_width else None
            record, index = self.store.commit(
                self.index,
                self.head,
                CommitRequest(
                    ids,
                    to_storage(values[layout.delta.name]),
                    st.drops,
                    state=values[layout.state.name].numpy() if layout.state_width else None,
                    usage=usage,
                    lifecycle=lifecycle,
                    modules=modules,
                    message=message,
                    stats=stats,
                    generator_state=generator_state,
                    routers=routers,
                    protected=self.protected.numpy() if self.protected_changed else None,
                ),
            )
            self.index, self.head = index, record.id
            self.protected_changed = False
            self.procedural.saved = self.procedural.stamp()
            if usage is not None:
                self.usage_stats.on_commit(ids, usage, st.drops)
            if held.any():
                st.keep(held)
            else:
                st.clear()
        return record

    def move_to(self, commit: int, index: RowLookup) -> None:
        """A reader adopts another commit: its rows replace everything cached."""
        with self.lock:
            self.head, self.index = commit, index
            self.usage_stats.forget_committed()
            if self.cache is not None:
                self._rows_change()
                self.cache.unpin_all()
                self.cache.clear()

    # -- usage statistics (a lifecycle's): what the stack does with its component ------------

    def _cached_usage(self, slots: torch.Tensor) -> torch.Tensor:
        """Usage statistics of cached ``slots`` (NaN rows: untrained, no statistics)."""
        assert self.cache is not None and self.trained is not None
        column = self.cache.column(self.layout.usage)
        if not column.shape[1]:  # no lifecycle: ``[n, 0]``, nothing for the component to mask
            return torch.index_select(column, 0, slots)
        return self.usage_stats.cached(column, self.trained, slots)

    def _touch(self, slots: torch.Tensor, counts: torch.Tensor) -> None:
        """Count this step's uses of the trained rows among cached ``slots`` (see
        ``UsageStatistics.touch``)."""
        cache, trained = self.cache, self.trained
        assert cache is not None and trained is not None
        self.usage_stats.touch(cache, cache.column(self.layout.usage), trained, slots, counts)

    def _apply_fused_tracked(
        self,
        batch: RowBatch,
        slots: torch.Tensor,
        grads: torch.Tensor,
        optimizer: RowOptimizer,
        kind: int,
        uncounted: bool = False,
        scale: torch.Tensor | None = None,
    ) -> None:
        """The native fused step on resident ``slots`` (each row's update times ``scale``),
        then what a lifecycle adds: SCREENED rows' change damped and the rows' statistics
        recorded (``uncounted``: the batch's uses are counted here too, first)."""
        cache, layout, stats = self.cache, self.layout, self.usage_stats
        assert cache is not None
        if (batch.touched or uncounted) and stats.native(slots):
            self._apply_fused_tracked_native(batch, slots, grads, optimizer, kind, uncounted, scale)
            return
        usage = self._cached_usage(slots)
        if not batch.touched:
            stats.record_uses(usage, batch.counts)
        screened = torch.nonzero(usage[:, _usage.PHASE] == _usage.SCREENED).flatten()
        s = slots[screened]
        old = self._cached_delta(s) if len(s) else None
        self._apply_fused(slots, grads, optimizer, kind, scale)
        if old is not None:
            new = torch.index_select(cache.column(layout.delta), 0, s).float()
            d = stats.damped(usage[screened], old, new)
            cache.column(layout.delta)[s] = d.to(self.dtype)
            row = torch.index_select(cache.column(layout.base), 0, s).add_(d)
            cache.column(layout.row)[s] = row.to(self.dtype)
        usage = stats.after_update(usage, batch.counts, torch.linalg.vector_norm(grads, dim=1))
        cache.column(layout.usage)[slots] = usage

    def _apply_fused_tracked_native(
        self,
        batch: RowBatch,
        slots: torch.Tensor,
        grads: torch.Tensor,
        optimizer: RowOptimizer,
        kind: int,
        uncounted: bool,
        scale: torch.Tensor | None = None,
    ) -> None:
        """``_apply_fused_tracked`` as one native pass over the rows
        (``_kernels.apply_rows_tracked``): the batch's uses (``uncounted``: not counted at its
        page-in), the step, SCREENED rows' damping and the statistics, instead of a count at
        page-in, a phase scan, the step, a damping pass and a statistics pass that each visited
        every row. The same math; the bits may differ from the PyTorch path's in the last
        place (libm's ``pow``, the gradient norm's summation order, an FMA in the damping)."""
        cache, layout, trained = self.cache, self.layout, self.trained
        assert cache is not None and trained is not None
        _kernels.apply_rows_tracked(
            kind,
            optimizer.native_hyper(),
            *self._step_columns(),
            slots,
            grads.contiguous(),
            cache.column(layout.usage),
            trained,
            batch.counts,
            self.usage_stats.step_params(touch=uncounted),
            scale,
        )
        trained[slots] = True
        cache.mark_dirty(slots)

    def set_usage_rules(self, rules: UsageRules | None, clock: UsageClock) -> None:
        """Keep usage statistics (a lifecycle's) with ``rules`` against ``clock``, or stop
        (None). Turning them on or off changes the layout: dirty rows are staged first, the
        cache is emptied, and staged rows get statistics as if written before the lifecycle."""
        with self.lock:
            self.usage_stats.rules, self.usage_stats.clock = rules, clock
            width = 0 if rules is None else _usage.WIDTH
            if width == self.layout.usage_width:
                return
            self.flush()
            self.layout = self.layout.with_usage(width)
            self.staging.set_layout(self.layout)
            if width and len(self.staging.ids):
                staged = self.staging.values[self.layout.delta.name]
                self.staging.set_column(self.layout.usage.name, _usage.legacy(staged))
            self.usage_stats.forget_committed()
            if self.cache is not None:
                self._rows_change()
                self.cache.unpin_all()
                self.cache.clear()
                self.cache.set_column(self.layout.usage)

    @torch.no_grad()
    def usage(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n, WIDTH]`` float64 statistics of 1-D ``ids`` as of now, wherever they live (NaN
        rows: no delta)."""
        with self.lock:
            self.count_uses()  # steps in flight have used their rows
            out = self._host_dense(ids.numpy())[2].to(self.device)
            if self.cache is not None:
                slots, hit = self.cache.find(ids.to(self.device))
                s = slots[hit]
                cached = self._cached_usage(s)
                _usage.set_norm(cached, self.cache.column(self.layout.delta)[s])
                out[hit] = cached.masked_fill_(~self.trained[s, None], float("nan"))  # type: ignore[index]
        return out

    def _committed_usage(self) -> UsageIndex:
        """Every committed row's statistics (loaded once by the usage component)."""
        return self.usage_stats.committed(
            self.store, self.index, self.layout.usage_width, self.dtype_name
        )

    def usage_view(self) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """Every row that has a delta now, for a consolidation: sorted ids, their statistics as
        stored (``[n, WIDTH]`` float64, CPU; a FREE row's NORM is as of its EPOCH) and where
        each lives (``WHERE_CACHE``, ``WHERE_STAGED``, ``WHERE_STORE``: the first tier that has
        it). Loads the committed rows' statistics once (``UsageIndex``)."""
        with self.lock:
            self.count_uses()
            parts: list[tuple[np.ndarray, torch.Tensor, int]] = []
            if self.cache is not None and self.trained is not None:
                cids, cslots = self.cache.occupied_ids()
                t = self.trained[cslots]
                ts = cslots[t]
                cached = self.cache.column(self.layout.usage)[ts].cpu()
                _usage.set_norm(cached, self.cache.column(self.layout.delta)[ts])
                parts.append((cids[t].cpu().numpy(), cached, WHERE_CACHE))
            st = self.staging
            parts.append((st.ids, st.values[self.layout.usage.name], WHERE_STAGED))
            mirror = self._committed_usage()
            parts.append((mirror.ids, torch.from_numpy(mirror.usage), WHERE_STORE))
            return self.usage_stats.view(parts, st.drops)

    @torch.no_grad()
    def consolidate_rows(
        self, ids: np.ndarray, where: np.ndarray, phase: np.ndarray, drop: np.ndarray
    ) -> int:
        """Apply one consolidation decided over ``usage_view()``'s rows (``ids``, ``where``):
        their new ``phase`` (uint8), and ``drop`` (bool) for rows that return to procedural.
        Then the epoch advances. Returns how many FREE rows left the cache. Decay itself is lazy
        everywhere (``_usage.py``): nothing is rewritten for a FREE row that stays FREE.

        - cached rows: a phase change is written to their statistics; FREE rows are staged (if
          dirty or re-phased) and leave the cache;
        - staged rows: only a phase change is written;
        - rows only in the store: a phase change re-stages the row (read once, as of now);
        - SCREENED rows whose phase stays are not touched at all.
        """
        rules, clock = self.usage_stats.rules, self.usage_stats.clock
        assert rules is not None
        with self.lock:
            old, new = clock.epoch, clock.epoch + 1
            decayed = 0
            live = ~drop
            cached = live & (where == WHERE_CACHE)
            if cached.any():
                decayed = self._consolidate_cached(ids[cached], phase[cached], old, new)
            for tier in (WHERE_STAGED, WHERE_STORE):
                sel = live & (where == tier)
                if sel.any():
                    self._restage(ids[sel], phase[sel], old, new, tier == WHERE_STORE)
            if drop.any():
                self.drop(torch.from_numpy(ids[drop]))
            clock.epoch = new
            return decayed

    def _consolidate_cached(self, ids: np.ndarray, phase: np.ndarray, old: int, new: int) -> int:
        """Cached rows: phases written to their statistics. FREE rows leave the cache (dirty ones
        and phase changes staged first), so that their decay stays lazy and their value is the
        same whether or not they were cached (``stored * q ** k`` on every path). Returns how
        many left."""
        cache, layout = self.cache, self.layout
        assert cache is not None
        slots, _ = cache.find(torch.from_numpy(ids).to(self.device))
        col = cache.column(layout.usage)
        u = col[slots]
        ph = torch.from_numpy(phase).to(self.device, torch.float64)
        changed = self.usage_stats.rephase_cached(u, ph, old, new)
        free = ph == _usage.FREE
        col[slots[changed]] = u[changed]
        stage = free & (cache.dirty[slots] | changed)
        if bool(stage.any()):
            self._evict(slots[stage])
        if bool(free.any()):
            self._rows_change()  # steps in flight keep their rows' values
            cache.invalidate(torch.from_numpy(ids).to(self.device)[free])
        cache.mark_dirty(slots[changed & ~free])
        return int(free.sum())

    def _restage(
        self, ids: np.ndarray, phase: np.ndarray, old: int, new: int, from_store: bool
    ) -> None:
        """Phase changes of rows that are not cached, written to staging (the statistics by
        ``UsageStatistics.restaged``)."""
        st, layout = self.staging, self.layout
        name = layout.usage.name
        if from_store:
            current = torch.from_numpy(
                self.usage_stats.committed_rows(
                    ids, self.store, self.index, layout.usage_width, self.dtype_name
                )
            )
        else:
            pos, _ = sorted_find(st.ids, ids)
            current = st.values[name][torch.from_numpy(pos)]
        ph = torch.from_numpy(phase).to(torch.float64)
        changed = (current[:, _usage.PHASE] != ph).numpy()
        if not changed.any():
            return
        ids, ph = ids[changed], ph[torch.from_numpy(changed)]
        # as of the epoch before this consolidation: FREE deltas decayed by what is pending
        pos, delta, state, usage = self._host_rows(ids)
        order = np.argsort(pos)
        at = torch.from_numpy(order)
        delta, state, usage = delta[at], state[at], usage[at].clone()
        self.usage_stats.restaged(usage, ph, old, new)
        st.put(ids, {layout.delta.name: delta, layout.state.name: state, name: usage})

    # -- figures and lifecycle -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self.lock:
            self._unpin_collected()
        out: dict[str, Any] = dict(self.counters)
        out["rows_generated"] = self.procedural.rows_generated
        out["advised_rows"] = self.advised_rows
        cache = self.cache
        if cache is None:
            out.update(hits=0, misses=0, evictions=0, hit_rate=None, capacity=0, cached_rows=0)
            return out
        out.update(cache.stats.total)
        out.update(
            hit_rate=cache.stats.hit_rate,
            capacity=cache.capacity,
            cached_rows=len(cache),
            dirty_rows=int(cache.dirty.sum()),
            locked_rows=int(cache.pinned().sum()),
            policy=cache.policy.name,
            device=str(self.device),
            last_step=dict(cache.stats.last),
        )
        return out

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None
        self.staging.clear()


class Prefetch:
    """A handle on rows being paged in ahead of use; see ``Pool.prefetch``."""

    def __init__(
        self,
        stack: RowStack,
        future: Future[tuple[torch.Tensor, Any]] | None,
        key: tuple[str, int] | None = None,
    ) -> None:
        self._stack = stack
        self._future = future
        self._key = key
        self._released = future is None

    def wait(self) -> None:
        """Block until the rows are in the cache (and, on CUDA, make the current stream wait)."""
        if self._future is None:
            return
        _, event = self._future.result()
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def done(self) -> bool:
        """Whether the prefetch has finished paging its rows in."""
        return self._future is None or self._future.done()

    def release(self) -> None:
        """Unpin the prefetched rows (they become evictable again)."""
        if self._released:
            return
        self._released = True
        assert self._future is not None
        self._future.result()  # the job pins when it ends: let it end first
        if self._stack.cache is not None:
            self._stack.cache.unpin(self._key)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
