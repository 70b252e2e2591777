"""Usage statistics of trained rows: what the ``usage`` column holds, and how a use, an update,
a load and a consolidation change it. Vectorized over a batch of rows; the policy that reads
the statistics (screening scores, thresholds, pruning, budgets) is the pool's lifecycle
(``dpsn.Lifecycle`` and ``pool.consolidate()``), which hands the stack the few numbers it needs as
:class:`UsageRules`.

Two clocks, kept by the stack in :class:`UsageClock` and saved with every commit:

- ``step`` counts executor steps (``page_in`` calls). Recent use is measured in steps, so a row
  that nothing competes with (the pool is idle) keeps its statistics however much time passes;
- ``epoch`` counts consolidations. FREE deltas decay per consolidation, and the idle clock of
  pruning counts consolidations.

Lazy decay. A FREE row decays at every consolidation in whose window (since the previous one)
it was neither used nor written. Its stored delta carries ``EPOCH``, the first consolidation
that may decay it (one past the epoch of its last use or write); at epoch ``C`` its value is
``stored * q ** max(0, C - EPOCH)`` (``q = 1 - decay``). Rows in the store and in host staging
decay this way, so a consolidation rewrites nothing for them; the value is materialized when a
row is loaded (:func:`materialize`), and a consolidation sends cached FREE rows back to staging
rather than decaying them in place. So the same history gives the same bits whether or not,
and for how long, a row was cached.

The fields of the ``usage`` column are in ``usage_fields.py`` (torch-free), re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpsn.store.usage_fields import (  # noqa: F401 (re-exported: the fields are part of this module's API)
    BORN,
    EPOCH,
    FIELDS,
    FREE,
    HISTORY,
    HISTORY_BITS,
    HISTORY_MASK,
    LAST,
    NORM,
    PHASE,
    RECENT,
    SCREENED,
    SINCE,
    UPDATE,
    USES,
    WIDTH,
)

from ._sorted import sorted_find


@dataclass(frozen=True, slots=True)
class UsageRules:
    """The numbers the stack needs from a lifecycle policy.

    - ``use_decay``: RECENT's factor per step (a half-life of ``h`` steps: ``0.5 ** (1 / h)``);
    - ``update_decay``: UPDATE's factor per update;
    - ``delta_decay``: what remains of a FREE delta after one consolidation (``q``);
    - ``inertia``: a SCREENED row's update is scaled by ``1 / (1 + inertia * log1p(uses))``;
    - ``warmup``: a FREE row with fewer uses that was never committed stays staged (in memory)
      at a commit instead of being written;
    - ``track``: count uses and steps (False for a read-only pool: its statistics are never
      saved, so it only applies the decay its store's rows have pending).
    """

    use_decay: float
    update_decay: float
    delta_decay: float
    inertia: float
    warmup: int
    track: bool = True


@dataclass(slots=True)
class UsageClock:
    """The step and consolidation counters usage statistics are kept against."""

    step: int = 0
    epoch: int = 0


def missing(u: torch.Tensor) -> torch.Tensor:
    """Rows without statistics (NaN): procedural rows, or rows written before the lifecycle."""
    return torch.isnan(u[:, PHASE])


def aligned(u: torch.Tensor, step: int, use_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(RECENT, HISTORY)`` of rows as of ``step``: the average decays and the history shifts
    by the steps since each row's last use. HISTORY as int64."""
    shift = (step - u[:, LAST]).clamp(min=0)
    recent = u[:, RECENT] * torch.pow(torch.as_tensor(use_decay, dtype=u.dtype), shift)
    sh = shift.clamp(max=HISTORY_BITS).long()
    keep = torch.bitwise_left_shift(torch.ones_like(sh), HISTORY_BITS - sh) - 1
    hist = torch.bitwise_left_shift(u[:, HISTORY].long() & keep, sh)
    return recent, hist


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of int64 values below 2**32 (SWAR; torch has no popcount)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def start(n: int, counts: torch.Tensor, clock: UsageClock, rules: UsageRules) -> torch.Tensor:
    """Statistics of rows getting their first delta, used ``counts`` times in this step."""
    u = torch.zeros((n, WIDTH), dtype=torch.float64, device=counts.device)
    u[:, PHASE] = FREE
    u[:, USES] = counts.to(torch.float64)
    u[:, LAST] = clock.step
    u[:, RECENT] = 1.0 - rules.use_decay
    u[:, HISTORY] = 1.0
    u[:, EPOCH] = clock.epoch + 1
    u[:, SINCE] = clock.epoch
    u[:, BORN] = clock.epoch
    return u


def touch(u: torch.Tensor, counts: torch.Tensor, clock: UsageClock, rules: UsageRules) -> None:
    """Record a use (``counts`` times) of rows in this step, in place. A row used twice in one
    step (a write, then a page-in) counts once in RECENT and HISTORY. The caller holds the rows'
    values as of now (materialized): the next consolidation does not decay them."""
    recent, hist = aligned(u, clock.step, rules.use_decay)
    fresh_step = (hist & 1) == 0
    u[:, RECENT] = recent + (1.0 - rules.use_decay) * fresh_step.to(u.dtype)
    u[:, HISTORY] = (hist | 1).to(u.dtype)
    u[:, LAST] = clock.step
    u[:, USES] += counts.to(u.dtype)
    u[:, SINCE] = clock.epoch
    u[:, EPOCH] = clock.epoch + 1


def damping(u: torch.Tensor, inertia: float) -> torch.Tensor:
    """``[n]`` factor on each row's update: ``1 / (1 + inertia * log1p(uses))`` for SCREENED
    rows (their inertia grows with use), 1 for FREE rows."""
    screened = u[:, PHASE] == SCREENED
    damp = 1.0 / (1.0 + inertia * torch.log1p(u[:, USES]))
    return torch.where(screened, damp, torch.ones_like(damp))


def updated(
    u: torch.Tensor, grad_norm: torch.Tensor | None, clock: UsageClock, rules: UsageRules
) -> None:
    """After rows' deltas changed, in place: the first epoch that may decay them, and (for a
    row step) the average of their gradients' norms ``grad_norm`` ``[n]``. NORM is left to
    :func:`set_norm`, called where a delta leaves the cache (a row step stays cheap)."""
    if grad_norm is not None:
        g = grad_norm.to(u.dtype)
        u[:, UPDATE] = rules.update_decay * u[:, UPDATE] + (1.0 - rules.update_decay) * g
    u[:, EPOCH] = clock.epoch + 1


def set_norm(u: torch.Tensor, delta: torch.Tensor) -> None:
    """NORM of rows whose deltas are ``delta`` ``[n, dim]`` (any float dtype), in place."""
    if len(u):
        u[:, NORM] = torch.linalg.vector_norm(delta.float(), dim=1).to(u.dtype)


def legacy(delta: torch.Tensor) -> torch.Tensor:
    """Statistics for rows written before the store had a lifecycle: FREE, never used, valid
    (and idle) since epoch 0, their norm from their delta. Every path that meets such a row
    makes the same ones, so its lazy decay agrees everywhere."""
    u = torch.zeros((len(delta), WIDTH), dtype=torch.float64, device=delta.device)
    u[:, NORM] = torch.linalg.vector_norm(delta.float(), dim=1).to(torch.float64)
    return u


def pending_decay(u: torch.Tensor, epoch: int, q: float) -> torch.Tensor:
    """``[n]`` float64: what multiplies each stored delta to give its value at ``epoch``
    (``q ** max(0, epoch - EPOCH)`` for FREE rows, 1 for SCREENED ones)."""
    k = (epoch - u[:, EPOCH]).clamp(min=0)
    f = torch.pow(torch.as_tensor(q, dtype=torch.float64, device=u.device), k)
    return torch.where(u[:, PHASE] == FREE, f, torch.ones_like(f))


def materialize(
    delta: torch.Tensor, u: torch.Tensor, epoch: int, q: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored deltas (any float dtype) and their statistics as of ``epoch``: FREE deltas
    decayed by their pending factor, NORM with them, EPOCH moved to ``epoch``. Rows with
    nothing pending are returned bit for bit."""
    f = pending_decay(u, epoch, q)
    due = f != 1.0
    if not bool(due.any()):
        return delta, u
    delta, u = delta.clone(), u.clone()
    delta[due] = (delta[due].double() * f[due, None]).to(delta.dtype)
    u[due, NORM] *= f[due]
    u[due, EPOCH] = float(epoch)
    return delta, u


def leaving_epoch(u: torch.Tensor, epoch: int) -> torch.Tensor:
    """EPOCH of SCREENED rows that turn FREE at the consolidation ``epoch -> epoch + 1``: their
    delta is exact (nothing pending), and decays from this consolidation on unless they were
    used in its window."""
    used = u[:, SINCE] >= epoch
    return epoch + used.to(u.dtype)


class UsageIndex:
    """The statistics of every committed row at HEAD, in memory as a sorted id column and a
    ``[n, WIDTH]`` float64 array: a consolidation decides about rows that are neither cached
    nor staged (the lazily decaying majority) without reading segments. Loaded on the first
    consolidation, then kept in step with each commit (a merge, O(rows))."""

    def __init__(self, ids: np.ndarray, usage: np.ndarray) -> None:
        self.ids = ids
        self.usage = usage

    def __len__(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        return self.ids.nbytes + self.usage.nbytes

    def apply(self, ids: np.ndarray, usage: np.ndarray, drops: np.ndarray) -> UsageIndex:
        """The index after a commit wrote sorted unique ``ids`` with ``usage`` and dropped
        ``drops``."""
        all_ids, all_usage = self.ids, self.usage
        if len(drops) and len(all_ids):
            _, gone = sorted_find(np.sort(drops), all_ids)
            all_ids, all_usage = all_ids[~gone], all_usage[~gone]
        if len(ids):
            pos, present = sorted_find(all_ids, ids)
            if present.any():
                all_usage = all_usage.copy()
                all_usage[pos[present]] = usage[present]
            new = ~present
            if new.any():
                at = np.searchsorted(all_ids, ids[new])
                all_ids = np.insert(all_ids, at, ids[new])
                all_usage = np.insert(all_usage, at, usage[new], axis=0)
        return UsageIndex(all_ids, all_usage)
