"""The usage statistics of the tier stack: a component ``RowStack`` owns (``stack.usage_stats``)
and calls through a few hooks when a lifecycle is on. It never calls the stack back: each hook
is handed what it reads (the cache, its ``trained`` mask, the staged rows, the row index).

- the clock: ``on_page_in`` moves it one step per tracked page-in;
- uses: a batch's uses of cached trained rows are counted once (``touch``): at its page-in on
  the PyTorch path; with the native loops by its row step, in the same pass as the update, or
  when it is released without one (``RowStack.count_uses``); ``record_uses`` counts them in
  host-side statistics (a spilled batch, a write);
- updates: ``after_update`` records a row step or write, ``damped`` damps SCREENED rows'
  change, ``step_params`` is what the native tracked loops record with, ``step_spilled`` runs
  that loop on rows stepped outside the cache;
- reads: rows read from staging or disk come decayed to the current epoch (``current_epoch``);
  ``cached`` gathers cached rows' statistics;
- commits: ``warming_up`` says which staged rows stay staged, ``on_commit`` keeps the committed
  rows' statistics (``UsageIndex``, loaded once by ``committed``) in step, ``forget_committed``
  drops them when the commit under the stack changes;
- consolidation: ``view`` merges the tiers' rows into one listing, ``rephase_cached`` and
  ``restaged`` write the phases decided (``RowStack.consolidate_rows`` moves the rows).

What the statistics mean and how they change is in ``_usage.py``; which rows to screen, decay,
keep or drop is the pool's lifecycle policy (``dpsn.Lifecycle``, ``pool.consolidate()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dpsn import _kernels
from dpsn._dtypes import from_storage

from . import _usage
from ._sorted import sorted_find
from ._usage import UsageClock, UsageIndex, UsageRules

if TYPE_CHECKING:
    from dpsn.store import PersistedStore, RowLookup

    from ._cache import DeviceCache
    from ._columns import RowLayout
    from ._staging import Staging

# Where a row with a delta lives, for a consolidation (the first tier that has it).
WHERE_CACHE, WHERE_STAGED, WHERE_STORE = 0, 1, 2


class UsageStatistics:
    """A lifecycle's usage statistics, owned by :class:`RowStack`; see the module docstring.
    Off (``rules`` None) until the stack's ``set_usage_rules``."""

    def __init__(self) -> None:
        self.rules: UsageRules | None = None
        self.clock = UsageClock()
        self.index: UsageIndex | None = None  # every committed row's, loaded on demand

    @property
    def tracking(self) -> bool:
        """Whether row steps record uses (a writable pool's lifecycle)."""
        return self.rules is not None and self.rules.track

    # -- hooks of the row path -----------------------------------------------------------------

    def on_page_in(self) -> bool:
        """A page-in: the clock moves one step if uses are tracked. Returns whether they are."""
        if not self.tracking:
            return False
        self.clock.step += 1
        return True

    def current_epoch(
        self, delta: torch.Tensor, usage: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Host rows as of the current epoch: statistics for rows stored without them, and
        FREE deltas decayed by what is pending (see ``_usage.py``)."""
        rules = self.rules
        assert rules is not None
        gap = _usage.missing(usage)
        if bool(gap.any()):
            usage = usage.clone()
            usage[gap] = _usage.legacy(delta[gap])
        return _usage.materialize(delta, usage, self.clock.epoch, rules.delta_decay)

    @staticmethod
    def cached(column: torch.Tensor, trained: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Usage statistics of cached ``slots`` from the cache's usage ``column`` (NaN rows:
        untrained, no statistics)."""
        usage = torch.index_select(column, 0, slots)
        if not column.shape[1]:
            return usage
        return usage.masked_fill_(~trained[slots, None], float("nan"))

    def touch(
        self,
        cache: DeviceCache,
        column: torch.Tensor,
        trained: torch.Tensor,
        slots: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        """Count this step's uses of the trained rows among cached ``slots`` in the cache's
        usage ``column``; their statistics changed, so they are dirty (committed with their
        row)."""
        rules = self.rules
        assert rules is not None
        if self.native(slots):
            _kernels.usage_touch(
                column,
                slots,
                counts,
                trained,
                cache.dirty,
                self.clock.step,
                self.clock.epoch,
                rules.use_decay,
            )
            return
        t = trained[slots]
        if not bool(t.any()):
            return
        s = slots[t]
        u = column[s]
        _usage.touch(u, counts[t], self.clock, rules)
        column[s] = u
        cache.mark_dirty(s)

    def record_uses(self, usage: torch.Tensor, counts: torch.Tensor) -> None:
        """Record this step's uses in ``usage`` (rows with statistics; in place)."""
        rules = self.rules
        assert rules is not None
        known = ~_usage.missing(usage)
        u = usage[known]
        _usage.touch(u, counts[known], self.clock, rules)
        usage[known] = u

    def damped(self, usage: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``new`` deltas with SCREENED rows' change from ``old`` scaled by their inertia (in
        place where any; float32)."""
        rules = self.rules
        assert rules is not None
        screened = usage[:, _usage.PHASE] == _usage.SCREENED
        if not bool(screened.any()):
            return new
        at = torch.nonzero(screened).flatten()
        damp = _usage.damping(usage[at], rules.inertia).to(old.dtype)[:, None]
        new[at] = old[at] + (new[at] - old[at]) * damp
        return new

    @staticmethod
    def native(slots: torch.Tensor) -> bool:
        """Whether the usage loops of ``dpsn._native`` may update the cached ``slots``."""
        return _kernels.usable(slots) and _kernels.has_usage_loops()

    def step_params(self, touch: bool) -> _kernels.UsageStep:
        """The clock and rates a native tracked row step records with (``touch``: it counts
        the batch's uses too)."""
        rules = self.rules
        assert rules is not None
        clock = self.clock
        return _kernels.UsageStep(
            clock.step, clock.epoch, rules.use_decay, rules.update_decay, rules.inertia, touch
        )

    def step_spilled(
        self,
        batch: Any,
        delta: torch.Tensor,
        state: torch.Tensor,
        usage: torch.Tensor,
        grads: torch.Tensor,
        optimizer: Any,
        dim: int,
        scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The row step of rows not stepped in the cache (a spilled batch; compact float32
        copies; each row's update times ``scale``) by the native loop the cache's rows take
        (``_kernels.step_rows_tracked``): new
        ``(delta, state, usage)``, the same bits as if the rows had been cached. None where that
        loop cannot run (no native loop for this optimizer, CUDA, ``DPSN_NATIVE=0``): the
        PyTorch path then computes the same math."""
        # the state's width is the optimizer's state_width(dim): the row step checked it
        kind = _kernels.native_kind(getattr(optimizer, "native", None), state.shape[1], dim)
        if (
            kind is None
            or not _kernels.usable(delta, grads)
            or not _kernels.has_usage_loops()
            or delta.dtype != torch.float32
        ):
            return None
        delta, state = delta.contiguous().clone(), state.contiguous().clone()
        usage = usage.contiguous().clone()
        _kernels.step_rows_tracked(
            kind,
            optimizer.native_hyper(),
            delta,
            state,
            grads.contiguous(),
            usage,
            batch.counts,
            self.step_params(touch=not batch.touched),
            scale,
        )
        return delta, state, usage

    def after_update(
        self, usage: torch.Tensor, counts: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> torch.Tensor:
        """Statistics of rows whose deltas changed in this step (their use is counted already):
        rows getting their first delta start theirs (used ``counts`` times); ``grad_norm``: the
        row step's gradient norms (None for a write)."""
        rules = self.rules
        assert rules is not None
        fresh = _usage.missing(usage)
        if bool(fresh.any()):
            usage[fresh] = _usage.start(int(fresh.sum()), counts[fresh], self.clock, rules)
        _usage.updated(usage, grad_norm, self.clock, rules)
        return usage

    # -- commits -------------------------------------------------------------------------------

    def warming_up(self, staging: Staging, layout: RowLayout, index: RowLookup) -> np.ndarray:
        """A mask over the staged ids (``layout``: the staged columns'): rows a commit keeps in
        memory (FREE, fewer uses than ``UsageRules.warmup``, never committed)."""
        rules = self.rules
        if rules is None or rules.warmup <= 0 or not len(staging.ids):
            return np.zeros(len(staging.ids), dtype=bool)
        u = staging.values[layout.usage.name]
        young = (u[:, _usage.PHASE] == _usage.FREE) & (u[:, _usage.USES] < rules.warmup)
        committed = index.contains(staging.ids)
        return young.numpy() & ~committed

    def on_commit(self, ids: np.ndarray, usage: np.ndarray, drops: np.ndarray) -> None:
        """Rows committed with ``usage`` and ``drops``: the committed rows' statistics, where
        loaded, follow."""
        if self.index is not None:
            self.index = self.index.apply(ids, usage, drops)

    def forget_committed(self) -> None:
        """The commit under the stack (or the layout) changed: reload the committed rows'
        statistics when next asked."""
        self.index = None

    def committed(
        self, store: PersistedStore, index: RowLookup, width: int, dtype_name: str
    ) -> UsageIndex:
        """Every committed row's statistics (``index``'s rows in ``store``), loaded once."""
        if self.index is None:
            _, usage = store.read_usage(index, index.ids, width)
            gap = np.flatnonzero(np.isnan(usage[:, _usage.PHASE]))
            if len(gap):  # rows written before the store had a lifecycle
                _, values, _, _ = store.read_deltas(index, index.ids[gap])
                deltas = from_storage(values, dtype_name)
                usage[gap] = _usage.legacy(deltas).numpy()
            self.index = UsageIndex(index.ids.copy(), usage)
        return self.index

    # -- consolidation -------------------------------------------------------------------------

    @staticmethod
    def view(
        parts: list[tuple[np.ndarray, torch.Tensor, int]], drops: np.ndarray
    ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """One listing of the rows in ``parts`` (ids, statistics, where: one per tier, fastest
        first): sorted ids, their statistics and where each lives (the first tier that has it
        wins); rows only in the store and in ``drops`` are left out."""
        ids = np.concatenate([p[0] for p in parts])
        usage = torch.cat([p[1] for p in parts])
        where = np.concatenate([np.full(len(p[0]), p[2], dtype=np.int8) for p in parts])
        # the first tier wins: a stable sort keeps the parts' order among equal ids
        order = np.argsort(ids, kind="stable")
        ids, where = ids[order], where[order]
        first = np.ones(len(ids), dtype=bool)
        first[1:] = ids[1:] != ids[:-1]
        keep = order[first]
        ids, where = ids[first], where[first]
        usage = usage[torch.from_numpy(keep)]
        if len(drops):
            _, dropped = sorted_find(drops, ids)
            alive = ~(dropped & (where == WHERE_STORE))
            ids, where, usage = ids[alive], where[alive], usage[torch.from_numpy(alive)]
        return ids, usage, where

    @staticmethod
    def rephase_cached(u: torch.Tensor, ph: torch.Tensor, old: int, new: int) -> torch.Tensor:
        """Write the new phases ``ph`` into cached rows' statistics ``u`` (in place) for a
        consolidation from epoch ``old`` to ``new``; returns which rows changed phase. Leaving
        SCREENED, a row's exact delta starts decaying; entering it, the value as of now (cached
        FREE rows are materialized), with nothing pending."""
        changed = u[:, _usage.PHASE] != ph
        free = ph == _usage.FREE
        leaving = changed & free
        u[leaving, _usage.EPOCH] = _usage.leaving_epoch(u[leaving], old)
        u[changed & ~free, _usage.EPOCH] = new
        u[:, _usage.PHASE] = ph
        u[changed, _usage.SINCE] = new
        return changed

    @staticmethod
    def restaged(usage: torch.Tensor, ph: torch.Tensor, old: int, new: int) -> None:
        """Statistics of uncached rows changing phase to ``ph`` (in place; ``usage`` as of epoch
        ``old``): a row entering SCREENED is materialized as of now (SCREENED rows carry no
        pending decay); a row leaving it starts its lazy decay from now."""
        entering = ph == _usage.SCREENED
        usage[:, _usage.EPOCH] = torch.where(entering, float(new), _usage.leaving_epoch(usage, old))
        usage[:, _usage.PHASE] = ph
        usage[:, _usage.SINCE] = new

    def committed_rows(
        self, ids: np.ndarray, store: PersistedStore, index: RowLookup, width: int, dtype_name: str
    ) -> np.ndarray:
        """The committed statistics of ``ids`` (each committed)."""
        mirror = self.committed(store, index, width, dtype_name)
        pos, _ = sorted_find(mirror.ids, ids)
        return mirror.usage[pos]
