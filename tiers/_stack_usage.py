"""The usage-statistics half of the tier stack (``RowStack`` inherits it): the hooks the row
path calls when a lifecycle is on, and the mechanics of a consolidation.

- hooks: a batch's uses of cached trained rows are counted once (``_touch``): at its page-in
  on the PyTorch path; with the native loops by its row step, in the same pass as the update,
  or when it is released without one (``RowStack.count_uses``); a row step or write records
  the update (``_usage_touch``, ``_usage_after``; ``apply_grads`` also damps SCREENED rows'
  updates); rows read from staging or disk come decayed to the current epoch
  (``_current_epoch``); a commit leaves rows in their warm-up staged (``_warming_up``);
- consolidation: ``usage_view`` lists every row with a delta and its statistics (from the cache,
  staging, and ``UsageIndex``, the committed rows' statistics in memory); ``consolidate_rows``
  applies the phases and drops the pool's lifecycle decided, and advances the epoch.

What the statistics mean and how they change is in ``_usage.py``; which rows to screen, decay,
keep or drop is the pool's lifecycle policy (``dpsn.Lifecycle``, ``pool.consolidate()``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dpsn import _kernels
from dpsn._dtypes import from_storage

from . import _usage
from ._sorted import sorted_find
from ._usage import UsageClock, UsageIndex, UsageRules

if TYPE_CHECKING:
    from collections.abc import Callable

    from dpsn.store import PersistedStore, RowLookup

    from ._cache import DeviceCache
    from ._columns import RowLayout
    from ._staging import Staging

# Where a row with a delta lives, for a consolidation (the first tier that has it).
WHERE_CACHE, WHERE_STAGED, WHERE_STORE = 0, 1, 2


class UsageStatistics:
    """Mixin of :class:`RowStack`; see the module docstring. Off until ``set_usage_rules``."""

    # provided by RowStack
    count_uses: Callable[..., None]
    _step_columns: Callable[[], tuple[torch.Tensor, ...]]
    store: PersistedStore
    index: RowLookup
    layout: RowLayout
    staging: Staging
    cache: DeviceCache | None
    trained: torch.Tensor | None
    lock: threading.RLock
    device: torch.device
    dtype: torch.dtype
    dtype_name: str

    def _init_usage(self) -> None:
        self.usage_rules: UsageRules | None = None
        self.clock = UsageClock()
        self.usage_index: UsageIndex | None = None  # every committed row's, loaded on demand

    # -- hooks of the row path -----------------------------------------------------------------

    def _current_epoch(
        self, delta: torch.Tensor, usage: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Host rows as of the current epoch: statistics for rows stored without them, and
        FREE deltas decayed by what is pending (see ``_usage.py``)."""
        rules = self.usage_rules
        assert rules is not None
        gap = _usage.missing(usage)
        if bool(gap.any()):
            usage = usage.clone()
            usage[gap] = _usage.legacy(delta[gap])
        return _usage.materialize(delta, usage, self.clock.epoch, rules.delta_decay)

    def _cached_usage(self, slots: torch.Tensor) -> torch.Tensor:
        """Usage statistics of cached ``slots`` (NaN rows: untrained, no statistics)."""
        assert self.cache is not None and self.trained is not None
        usage = torch.index_select(self.cache.column(self.layout.usage), 0, slots)
        if not self.layout.usage_width:
            return usage
        return usage.masked_fill_(~self.trained[slots, None], float("nan"))

    def _touch(self, slots: torch.Tensor, counts: torch.Tensor) -> None:
        """Count this step's uses of the trained rows among cached ``slots``; their statistics
        changed, so they are dirty (committed with their row)."""
        cache, trained, rules = self.cache, self.trained, self.usage_rules
        assert cache is not None and trained is not None and rules is not None
        if self._native_usage(slots):
            _kernels.usage_touch(
                cache.column(self.layout.usage),
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
        col = cache.column(self.layout.usage)
        u = col[s]
        _usage.touch(u, counts[t], self.clock, rules)
        col[s] = u
        cache.mark_dirty(s)

    def _usage_touch(self, usage: torch.Tensor, counts: torch.Tensor) -> None:
        """Record this step's uses in ``usage`` (rows with statistics; in place)."""
        rules = self.usage_rules
        assert rules is not None
        known = ~_usage.missing(usage)
        u = usage[known]
        _usage.touch(u, counts[known], self.clock, rules)
        usage[known] = u

    def _damped(self, usage: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``new`` deltas with SCREENED rows' change from ``old`` scaled by their inertia (in
        place where any; float32)."""
        rules = self.usage_rules
        assert rules is not None
        screened = usage[:, _usage.PHASE] == _usage.SCREENED
        if not bool(screened.any()):
            return new
        at = torch.nonzero(screened).flatten()
        damp = _usage.damping(usage[at], rules.inertia).to(old.dtype)[:, None]
        new[at] = old[at] + (new[at] - old[at]) * damp
        return new

    def _apply_fused_tracked(
        self,
        batch: Any,
        slots: torch.Tensor,
        grads: torch.Tensor,
        optimizer: Any,
        uncounted: bool = False,
        scale: torch.Tensor | None = None,
    ) -> None:
        """The native fused step on resident ``slots`` (each row's update times ``scale``),
        then what a lifecycle adds: SCREENED rows' change damped and the rows' statistics
        recorded (``uncounted``: the batch's uses are counted here too, first)."""
        cache, layout = self.cache, self.layout
        assert cache is not None
        if (batch.touched or uncounted) and self._native_usage(slots):
            self._apply_fused_tracked_native(batch, slots, grads, optimizer, uncounted, scale)
            return
        usage = self._cached_usage(slots)
        if not batch.touched:
            self._usage_touch(usage, batch.counts)
        screened = torch.nonzero(usage[:, _usage.PHASE] == _usage.SCREENED).flatten()
        s = slots[screened]
        old = self._cached_delta(s) if len(s) else None
        self._apply_fused(slots, grads, optimizer, scale)
        if old is not None:
            new = torch.index_select(cache.column(layout.delta), 0, s).float()
            d = self._damped(usage[screened], old, new)
            cache.column(layout.delta)[s] = d.to(self.dtype)
            row = torch.index_select(cache.column(layout.base), 0, s).add_(d)
            cache.column(layout.row)[s] = row.to(self.dtype)
        usage = self._usage_after(usage, batch.counts, torch.linalg.vector_norm(grads, dim=1))
        cache.column(layout.usage)[slots] = usage

    def _native_usage(self, slots: torch.Tensor) -> bool:
        """Whether the usage loops of ``dpsn._native`` may update the cached ``slots``."""
        return _kernels.usable(slots) and _kernels.has_usage_loops()

    def _apply_fused_tracked_native(
        self,
        batch: Any,
        slots: torch.Tensor,
        grads: torch.Tensor,
        optimizer: Any,
        uncounted: bool,
        scale: torch.Tensor | None = None,
    ) -> None:
        """``_apply_fused_tracked`` as one native pass over the rows
        (``_kernels.apply_rows_tracked``): the batch's uses (``uncounted``: not counted at its
        page-in), the step, SCREENED rows' damping and the statistics, instead of a count at
        page-in, a phase scan, the step, a damping pass and a statistics pass that each visited
        every row. The same math; the bits may differ from the PyTorch path's in the last
        place (libm's ``pow``, the gradient norm's summation order, an FMA in the damping)."""
        cache, layout, trained, rules = self.cache, self.layout, self.trained, self.usage_rules
        assert cache is not None and trained is not None and rules is not None
        kind = _kernels.native_kind(optimizer, self.dim)
        assert kind is not None  # _fused said so
        _kernels.apply_rows_tracked(
            kind,
            optimizer.native_hyper(),
            *self._step_columns(),
            slots,
            grads.contiguous(),
            cache.column(layout.usage),
            trained,
            batch.counts,
            self._usage_step(touch=uncounted),
            scale,
        )
        trained[slots] = True
        cache.mark_dirty(slots)

    def _usage_step(self, touch: bool) -> _kernels.UsageStep:
        """The clock and rates a native tracked row step records with."""
        rules = self.usage_rules
        assert rules is not None
        clock = self.clock
        return _kernels.UsageStep(
            clock.step, clock.epoch, rules.use_decay, rules.update_decay, rules.inertia, touch
        )

    def _step_spilled_tracked(
        self,
        batch: Any,
        delta: torch.Tensor,
        state: torch.Tensor,
        usage: torch.Tensor,
        grads: torch.Tensor,
        optimizer: Any,
        scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The row step of rows not stepped in the cache (a spilled batch; compact float32
        copies) by the native loop the cache's rows take (``_kernels.step_rows_tracked``): new
        ``(delta, state, usage)``, the same bits as if the rows had been cached. None where that
        loop cannot run (no native loop for this optimizer, CUDA, ``DPSN_NATIVE=0``): the
        PyTorch path then computes the same math."""
        kind = _kernels.native_kind(optimizer, self.dim)
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
            self._usage_step(touch=not batch.touched),
            scale,
        )
        return delta, state, usage

    def _usage_after(
        self, usage: torch.Tensor, counts: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> torch.Tensor:
        """Statistics of rows whose deltas changed in this step (their use is counted already):
        rows getting their first delta start theirs (used ``counts`` times); ``grad_norm``: the
        row step's gradient norms (None for a write)."""
        rules = self.usage_rules
        assert rules is not None
        fresh = _usage.missing(usage)
        if bool(fresh.any()):
            usage[fresh] = _usage.start(int(fresh.sum()), counts[fresh], self.clock, rules)
        _usage.updated(usage, grad_norm, self.clock, rules)
        return usage

    def set_usage_rules(self, rules: UsageRules | None, clock: UsageClock) -> None:
        """Keep usage statistics (a lifecycle's) with ``rules`` against ``clock``, or stop
        (None). Turning them on or off changes the layout: dirty rows are staged first, the
        cache is emptied, and staged rows get statistics as if written before the lifecycle."""
        with self.lock:
            self.usage_rules, self.clock = rules, clock
            width = 0 if rules is None else _usage.WIDTH
            if width == self.layout.usage_width:
                return
            self.flush()
            self.layout = self.layout.with_usage(width)
            self.staging.set_layout(self.layout)
            if width and len(self.staging.ids):
                staged = self.staging.values[self.layout.delta.name]
                self.staging.set_column(self.layout.usage.name, _usage.legacy(staged))
            self.usage_index = None
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

    def _warming_up(self) -> np.ndarray:
        """A mask over the staged ids: rows a commit keeps in memory (see ``commit``)."""
        st, rules = self.staging, self.usage_rules
        if rules is None or rules.warmup <= 0 or not len(st.ids):
            return np.zeros(len(st.ids), dtype=bool)
        u = st.values[self.layout.usage.name]
        young = (u[:, _usage.PHASE] == _usage.FREE) & (u[:, _usage.USES] < rules.warmup)
        committed = self.index.contains(st.ids)
        return young.numpy() & ~committed

    # -- consolidation -------------------------------------------------------------------------

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
            mirror = self._usage_index()
            parts.append((mirror.ids, torch.from_numpy(mirror.usage), WHERE_STORE))
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
            if len(st.drops):
                _, dropped = sorted_find(st.drops, ids)
                alive = ~(dropped & (where == WHERE_STORE))
                ids, where, usage = ids[alive], where[alive], usage[torch.from_numpy(alive)]
            return ids, usage, where

    def _usage_index(self) -> UsageIndex:
        if self.usage_index is None:
            index, width = self.index, self.layout.usage_width
            _, usage = self.store.read_usage(index, index.ids, width)
            gap = np.flatnonzero(np.isnan(usage[:, _usage.PHASE]))
            if len(gap):  # rows written before the store had a lifecycle
                _, values, _, _ = self.store.read_deltas(index, index.ids[gap])
                deltas = from_storage(values, self.dtype_name)
                usage[gap] = _usage.legacy(deltas).numpy()
            self.usage_index = UsageIndex(index.ids.copy(), usage)
        return self.usage_index

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
        rules, clock = self.usage_rules, self.clock
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
        changed = u[:, _usage.PHASE] != ph
        free = ph == _usage.FREE
        # leaving SCREENED: its exact delta starts decaying; entering it: the value as of now
        # (cached FREE rows are materialized), with nothing pending
        leaving = changed & free
        u[leaving, _usage.EPOCH] = _usage.leaving_epoch(u[leaving], old)
        u[changed & ~free, _usage.EPOCH] = new
        u[:, _usage.PHASE] = ph
        u[changed, _usage.SINCE] = new
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
        """Phase changes of rows that are not cached, written to staging: a row entering
        SCREENED is materialized as of now (SCREENED rows carry no pending decay); a row
        leaving it starts its lazy decay from now (decayed once by this consolidation)."""
        st, layout = self.staging, self.layout
        name = layout.usage.name
        if from_store:
            current = torch.from_numpy(self._usage_index_rows(ids))
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
        entering = ph == _usage.SCREENED
        usage[:, _usage.EPOCH] = torch.where(entering, float(new), _usage.leaving_epoch(usage, old))
        usage[:, _usage.PHASE] = ph
        usage[:, _usage.SINCE] = new
        st.put(ids, {layout.delta.name: delta, layout.state.name: state, name: usage})

    def _usage_index_rows(self, ids: np.ndarray) -> np.ndarray:
        mirror = self._usage_index()
        pos, _ = sorted_find(mirror.ids, ids)
        return mirror.usage[pos]
