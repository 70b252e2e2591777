"""The row lifecycle: which learned rows a pool keeps, protects, lets fade and forgets.

A row that training touched has a delta and usage statistics (the tier stack keeps them beside
the delta: ``dpsn.tiers._usage``). A *consolidation* (``pool.consolidate()``, or every
``consolidate_every`` commits) looks at every such row at once, vectorized:

1. **Screening score** ``s = w * recent + (1 - w) * history``: ``recent`` is a moving average of
   "used in this step" (half-life ``half_life`` steps) and ``history`` the fraction of the last
   32 steps in which the row was used (its rolling interaction history). Both are measured in
   the pool's own steps, so a row keeps its score while nothing else happens either.
2. **Phases with hysteresis.** A FREE row with at least ``min_uses`` uses enters SCREENED when
   ``s > enter``; a SCREENED row leaves when ``s < exit < enter``, so a score that wanders
   between the two thresholds never flips the phase. (The seeds' switch is a steep sigmoid of
   ``s - threshold``; its 0.5 crossing is the threshold itself, which is where dpsn switches.)
   ``enter`` is at most 0.5: a row used in most steps is always screened in the end.
3. **Decay.** Every FREE delta loses ``decay`` of itself per consolidation, toward 0 (its
   procedural base). SCREENED deltas do not decay, and their updates are damped by an inertia
   that grows with use (``1 / (1 + inertia * log1p(uses))``, in the stack's apply path).
   Protected rows (``pool.protect``) are held SCREENED: they neither decay nor are pruned.
4. **Pruning.** A FREE row is dropped (back to exactly its procedural bits, its storage
   released at the next commit) when its delta's RMS falls below ``prune_rms`` and it is cold
   (not used in the last 32 steps, or in the last 32 consolidations), or when it was not used,
   written or re-phased for ``max_idle`` consolidations. **Warm-up:** a FREE row with fewer
   than ``warmup`` uses that was never committed is not written at a commit; it stays in
   memory, decaying, until it screens in, gets more uses, or is pruned. An explicit
   ``pool.write`` counts as warmed up.
5. **Region budgets** (``budget=(a, b)``): region ``r`` (an id range: ``regions`` ranges cut the
   way a VQ/LSH router cuts them) may hold at most ``a * log(1 + freq_r) + b * novelty_r`` rows
   with a delta, ``freq_r`` being the summed ``recent`` of its rows (rows it uses per step) and
   ``novelty_r`` the rows it gained in the last ``novelty_window`` consolidations. Over budget,
   the weakest FREE rows go first, then the weakest SCREENED ones.
6. **Homeostasis** (``homeostasis=True``): when fewer than ``target[0]`` of the rows are
   SCREENED, both thresholds are multiplied by 0.9; when more than ``target[1]``, ``enter`` by
   1.1 (up to 0.5). The exit threshold only ever falls, so homeostasis alone never evicts a
   SCREENED row: consolidations without use leave SCREENED rows exactly as they are.

The policy (:class:`Lifecycle`) and the lifecycle's clocks, thresholds and totals are saved as
JSON in every commit record, so a reopen (or a snapshot) continues where the commit left off.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from dpsn.errors import CorruptStoreError, LifecycleError
from dpsn.store import (
    CLOCK_LIMIT,
    MAX_ENTER,
    MIN_ENTER,
    check_lifecycle_settings,
    check_stored_policy,
    lifecycle_health,
)
from dpsn.tiers import RowStack, UsageClock, UsageRules
from dpsn.tiers import usage as U

COLD_WINDOWS = 32  # consolidations without use after which a row is cold (as 32 idle steps)
_STATE_FORMAT = 1  # of the JSON in commit records; never renumber


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """A row lifecycle policy (see the module docstring for what each setting does).

    Pass it as ``lifecycle=`` to :func:`dpsn.create` or :func:`dpsn.open`; it is saved with
    every commit, and ``dpsn.open`` without ``lifecycle=`` keeps the saved one. ``regions`` may
    also be a VQ/LSH router: its number of regions is taken (the id ranges are the same).
    """

    enter: float = 0.2  # screening score above which a FREE row becomes SCREENED
    exit: float = 0.1  # ... below which a SCREENED row becomes FREE again (< enter)
    min_uses: int = 8  # uses a row needs before it can be screened
    recent_weight: float = 0.5  # w in s = w * recent + (1 - w) * history
    half_life: float = 200.0  # steps: half-life of the recent-use average
    decay: float = 0.1  # fraction of a FREE delta removed per consolidation
    prune_rms: float = 1e-3  # FREE deltas below this RMS (and unused lately) are dropped
    max_idle: int = 64  # consolidations without use after which a FREE row is dropped
    warmup: int = 2  # rows with fewer uses are not persisted until they have more
    inertia: float = 0.25  # SCREENED updates scaled by 1 / (1 + inertia * log1p(uses))
    update_half_life: float = 10.0  # updates: half-life of the update-size average
    regions: int = 1  # id ranges for budgets and health (or a VQ/LSH router)
    budget: tuple[float, float] | None = None  # (a, b): a*log(1+freq) + b*novelty rows
    novelty_window: int = 8  # consolidations in which a new row counts as novelty
    homeostasis: bool = True  # nudge the thresholds toward the target screening rate
    target: tuple[float, float] = (0.05, 0.5)  # band of the screened fraction of rows
    consolidate_every: int = 1  # commits between automatic consolidations; 0: never

    def __post_init__(self) -> None:
        regions = self.regions
        if not isinstance(regions, int) and hasattr(regions, "num_regions"):
            object.__setattr__(self, "regions", int(regions.num_regions))
        for name in ("budget", "target"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        check_lifecycle_settings(self)

    def to_json(self) -> dict[str, Any]:
        """The policy as the JSON object saved in each commit record."""
        out = asdict(self)
        for name in ("budget", "target"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_json(cls, raw: Any) -> Lifecycle:
        """A policy read from a store (untrusted): every setting checked (torch-free, as
        ``dpsn verify`` checks it: ``store/_lifecycle_policy.py``)."""
        return cls(**check_stored_policy(raw))

    def rules(self, *, track: bool = True) -> UsageRules:
        """The thresholds and clocks the row path applies at each step (``track``: count uses)."""
        return UsageRules(
            use_decay=0.5 ** (1.0 / self.half_life),
            update_decay=0.5 ** (1.0 / self.update_half_life),
            delta_decay=1.0 - self.decay,
            inertia=self.inertia,
            warmup=self.warmup,
            track=track,
        )


def region_of(ids: np.ndarray, rows: int, regions: int) -> np.ndarray:
    """Region of each id: ``regions`` contiguous id ranges whose sizes differ by at most one,
    cut exactly as ``dpsn.index``'s VQ and LSH routers cut theirs (``RegionRouter.region_of``),
    so a lifecycle with ``regions=router.num_regions`` sees the router's regions."""
    block, rem = divmod(rows, regions)
    small = rem + (ids - rem * (block + 1)) // block
    if rem == 0:
        return small
    edge = rem * (block + 1)
    return np.where(ids < edge, ids // (block + 1), small)


def next_phase(
    screened: np.ndarray,
    score: np.ndarray,
    uses: np.ndarray,
    *,
    enter: float,
    exit: float,
    min_uses: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The phase switch with hysteresis: ``(screened after, entered, left)`` bool masks. A FREE
    row with ``min_uses`` uses enters above ``enter``; a SCREENED row leaves below ``exit``;
    nothing else changes, so a score between the two thresholds keeps the phase it has."""
    entered = ~screened & (score > enter) & (uses >= min_uses)
    left = screened & (score < exit)
    return (screened | entered) & ~left, entered, left


@dataclass
class _Totals:
    consolidations: int = 0
    decayed: int = 0  # row decays: each FREE row decays once per consolidation
    pruned: int = 0
    entered: int = 0
    exited: int = 0

    @classmethod
    def from_json(cls, raw: Any) -> _Totals:
        if not isinstance(raw, dict):
            raise CorruptStoreError("the stored lifecycle totals are not a JSON object")
        out = cls()
        for f in fields(cls):
            v = raw.get(f.name, 0)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                raise CorruptStoreError(f"the stored lifecycle total {f.name!r} is {v!r}")
            setattr(out, f.name, v)
        return out


@dataclass
class _Saved:
    """The lifecycle part of a commit record, parsed and checked."""

    policy: Lifecycle
    step: int = 0
    epoch: int = 0
    enter: float = 0.0
    exit: float = 0.0
    totals: _Totals = field(default_factory=_Totals)
    health: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any) -> _Saved:
        if not isinstance(raw, dict):
            raise CorruptStoreError("the commit's lifecycle record is not a JSON object")
        if raw.get("format") != _STATE_FORMAT:
            raise CorruptStoreError(
                f"the commit's lifecycle record has format {raw.get('format')!r}; this dpsn "
                f"reads {_STATE_FORMAT}"
            )
        policy = Lifecycle.from_json(raw.get("policy"))
        out = cls(policy=policy, totals=_Totals.from_json(raw.get("totals", {})))
        for name in ("step", "epoch"):
            v = raw.get(name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**53:
                raise CorruptStoreError(f"the commit's lifecycle {name} is {v!r}")
            setattr(out, name, v)
        for name in ("enter", "exit"):
            v = raw.get(name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= MAX_ENTER:
                raise CorruptStoreError(f"the commit's lifecycle threshold {name} is {v!r}")
            setattr(out, name, float(v))
        health = raw.get("health", {})
        if not isinstance(health, dict):
            raise CorruptStoreError("the commit's lifecycle health is not a JSON object")
        out.health = health
        return out


def initial_record(policy: Lifecycle) -> dict[str, Any]:
    """The lifecycle record of a store's first commit (nothing counted yet)."""
    return {
        "format": _STATE_FORMAT,
        "policy": policy.to_json(),
        "step": 0,
        "epoch": 0,
        "enter": policy.enter,
        "exit": policy.exit,
        "totals": asdict(_Totals()),
        "health": {},
    }


class LifecycleRunner:
    """A policy bound to one pool's tier stack: its clocks, thresholds, totals and figures."""

    def __init__(
        self,
        stack: RowStack,
        *,
        rows: int,
        policy: Lifecycle | None,
        saved: dict[str, Any] | None,
        writable: bool,
    ) -> None:
        self.stack = stack
        self.rows = rows
        self.writable = writable
        self.load(saved, policy)

    def load(self, saved: dict[str, Any] | None, policy: Lifecycle | None = None) -> None:
        """Adopt a commit's lifecycle record (and ``policy``, if given, over the saved one)."""
        state = _Saved.from_json(saved) if saved is not None else None
        if policy is None:
            if state is None:
                raise LifecycleError("no lifecycle policy given and none saved in the store")
            policy = state.policy
        if policy.regions > self.rows:
            raise LifecycleError(
                f"Lifecycle.regions={policy.regions} exceeds the pool's {self.rows} rows"
            )
        self.policy = policy
        clock = UsageClock(state.step, state.epoch) if state is not None else UsageClock()
        if state is not None and state.policy == policy:
            self.enter, self.exit = state.enter, state.exit
        else:  # a new or changed policy starts from its own thresholds
            self.enter, self.exit = policy.enter, policy.exit
        self.totals = state.totals if state is not None else _Totals()
        self.health_saved = state.health if state is not None else {}
        self.last: dict[str, Any] | None = None
        self.region_figures: dict[str, Any] | None = None
        self.stack.set_usage_rules(policy.rules(track=self.writable), clock)

    # -- consolidation -------------------------------------------------------------------------

    def due(self, commit_id: int) -> bool:
        every = self.policy.consolidate_every
        return every > 0 and commit_id % every == 0

    def consolidate(self) -> dict[str, Any]:
        """One consolidation; returns what it did (also kept for ``stats()``)."""
        t0 = time.perf_counter()
        stack, pol = self.stack, self.policy
        rules = stack.usage_rules
        assert rules is not None
        with stack.lock:
            ids, u, where = stack.usage_view()
            clock = stack.clock
            new = clock.epoch + 1
            q = rules.delta_decay
            recent, hist = U.aligned(u, clock.step, rules.use_decay)
            score = pol.recent_weight * recent + (1.0 - pol.recent_weight) * (
                U.popcount(hist).double() / U.HISTORY_BITS
            )
            was_screened = (u[:, U.PHASE] == U.SCREENED).numpy()
            score_np, uses = score.numpy(), u[:, U.USES].numpy()
            screened, enter, leave = next_phase(
                was_screened,
                score_np,
                uses,
                enter=self.enter,
                exit=self.exit,
                min_uses=pol.min_uses,
            )
            # Protected rows (Pool.protect) are held SCREENED: they neither decay nor are pruned.
            held = stack.protected_mask(torch.from_numpy(ids))
            held_np = held.numpy() if held is not None else None
            if held_np is not None:
                enter = enter | (held_np & ~screened)
                screened = screened | held_np
                leave = leave & ~held_np
            free = ~screened
            # FREE rows decay from their EPOCH on (a row used or written in this window, or
            # leaving SCREENED, decays from the next consolidation); norms after this one
            start = u[:, U.EPOCH].numpy().copy()
            start[leave] = U.leaving_epoch(u[torch.from_numpy(leave)], clock.epoch).numpy()
            k = np.maximum(new - start, 0.0)
            norm = u[:, U.NORM].numpy() * np.where(free, q**k, 1.0)
            decays = free & (k >= 1)
            stay_free = free & ~leave
            floor = pol.prune_rms * math.sqrt(stack.dim)
            since = u[:, U.SINCE].numpy()
            cold = (hist == 0).numpy() | (new - since > COLD_WINDOWS)
            by_floor = free & cold & (norm < floor)
            by_idle = stay_free & (new - since >= pol.max_idle) & ~by_floor
            drop = by_floor | by_idle
            regions = region_of(ids, self.rows, pol.regions)
            born = u[:, U.BORN].numpy()
            by_budget, over = self._budget(regions, ~drop, screened, score_np, recent, born, new)
            if held_np is not None:
                by_budget = by_budget & ~held_np
            drop |= by_budget
            left_cache = stack.consolidate_rows(ids, where, screened.astype(np.uint8), drop)
            alive = ~drop
            n_alive = int(alive.sum())
            n_screened = int((screened & alive).sum())
            rate = n_screened / n_alive if n_alive else 0.0
            report = {
                "epoch": new,
                "step": clock.step,
                "rows": n_alive,
                "screened": n_screened,
                "free": n_alive - n_screened,
                "entered": int((enter & alive).sum()),
                "exited": int((leave & alive).sum()),
                "decayed": int((decays & alive).sum()),
                "free_left_cache": left_cache,
                "pruned": int(drop.sum()),
                "pruned_by_floor": int(by_floor.sum()),
                "pruned_idle": int(by_idle.sum()),
                "pruned_by_budget": int(by_budget.sum()),
                "regions_over_budget": over,
                "enter": self.enter,
                "exit": self.exit,
                "screening_rate": rate,
            }
            self._homeostasis(rate, n_alive)
            t = self.totals
            t.consolidations += 1
            t.decayed += report["decayed"]
            t.pruned += report["pruned"]
            t.entered += report["entered"]
            t.exited += report["exited"]
            held = self._held(ids, free, uses)
            self.health_saved = self._health(
                ids[alive], screened[alive], held[alive], regions[alive], report
            )
            report["seconds"] = time.perf_counter() - t0
            self.last = report
            return report

    def _budget(
        self,
        regions: np.ndarray,
        alive: np.ndarray,
        screened: np.ndarray,
        score: np.ndarray,
        recent: torch.Tensor,
        born: np.ndarray,
        epoch: int,
    ) -> tuple[np.ndarray, int]:
        """Rows to drop so that every region holds at most its budget, weakest first (FREE
        before SCREENED, lower score first); and how many regions were over budget. Keeps the
        per-region figures (before the budget's pruning) in ``self.region_figures``."""
        drop = np.zeros(len(regions), dtype=bool)
        pol = self.policy
        nreg = pol.regions
        r = regions[alive]
        count = np.bincount(r, minlength=nreg)
        freq = np.bincount(r, weights=recent.numpy()[alive], minlength=nreg)
        young = born[alive] >= epoch - pol.novelty_window
        novelty = np.bincount(r[young], minlength=nreg)
        self.region_figures = {
            "rows": count,
            "screened": np.bincount(r[screened[alive]], minlength=nreg),
            "freq": freq,
            "novelty": novelty,
            "budget": None,
        }
        if pol.budget is None or not alive.any():
            return drop, 0
        a, b = pol.budget
        cap = np.floor(a * np.log1p(freq) + b * novelty).astype(np.int64)
        self.region_figures["budget"] = cap
        excess = np.maximum(count - cap, 0)
        over = excess > 0
        if not over.any():
            return drop, 0
        idx = np.flatnonzero(alive & over[regions])
        order = np.lexsort((score[idx], screened[idx], regions[idx]))
        idx = idx[order]
        reg = regions[idx]
        rank = np.arange(len(idx)) - np.searchsorted(reg, reg, side="left")
        drop[idx[rank < excess[reg]]] = True
        return drop, int(over.sum())

    def _homeostasis(self, rate: float, rows: int) -> None:
        pol = self.policy
        if not pol.homeostasis or rows == 0:
            return
        low, high = pol.target
        if rate < low:
            self.enter = max(self.enter * 0.9, MIN_ENTER)
            self.exit = min(self.exit * 0.9, self.enter * 0.999)
        elif rate > high:
            self.enter = min(self.enter * 1.1, MAX_ENTER)

    def _held(self, ids: np.ndarray, free: np.ndarray, uses: np.ndarray) -> np.ndarray:
        """Rows in their warm-up: kept in memory, not committed."""
        committed = self.stack.index.contains(ids)
        return free & (uses < self.policy.warmup) & ~committed

    # -- health --------------------------------------------------------------------------------

    def row_bytes(self) -> int:
        """Raw bytes of one persisted row: delta, optimizer state, statistics."""
        layout = self.stack.layout
        return sum(c.width * c.dtype.itemsize for c in layout.persisted_columns())

    def _health(
        self,
        ids: np.ndarray,
        screened: np.ndarray,
        held: np.ndarray,
        regions: np.ndarray,
        report: dict[str, Any],
    ) -> dict[str, Any]:
        pol, rb = self.policy, self.row_bytes()
        kept = ~held
        n_screened = int(screened.sum())
        n_free = int((~screened & kept).sum())
        counts = np.bincount(regions[kept], minlength=pol.regions)
        nonzero = np.flatnonzero(counts)
        top = nonzero[np.argsort(-counts[nonzero], kind="stable")[:8]]
        flags = []
        low, high = pol.target
        rate = report["screening_rate"]
        if report["rows"] and not low <= rate <= high:
            flags.append(f"screening rate {rate:.3f} is outside the target band [{low}, {high}]")
        if report["regions_over_budget"]:
            flags.append(
                f"{report['regions_over_budget']} regions were over budget; "
                f"{report['pruned_by_budget']} rows pruned for it"
            )
        return {
            "rows": len(ids),
            "screened_rows": n_screened,
            "free_rows": n_free,
            "held_rows": int(held.sum()),
            "screened_bytes": n_screened * rb,
            "free_bytes": n_free * rb,
            "row_bytes": rb,
            "screening_rate": rate,
            "regions": {
                "count": pol.regions,
                "with_rows": len(nonzero),
                "rows_max": int(counts.max()) if len(counts) else 0,
                "bytes_mean": float(counts[nonzero].mean() * rb) if len(nonzero) else 0.0,
                "over_budget": report["regions_over_budget"],
                "top": [
                    {"region": int(r), "rows": int(counts[r]), "bytes": int(counts[r] * rb)}
                    for r in top
                ],
            },
            "flags": flags,
        }

    def stats(self) -> dict[str, Any]:
        """The figures for ``pool.stats()["lifecycle"]`` (``dpsn.tiers.lifecycle_health`` of
        what the next commit would record), and ``last``: the report of this session's last
        consolidation."""
        out = lifecycle_health(self.to_json())
        assert out is not None
        out["last"] = self.last
        return out

    def region_usage(self) -> dict[str, torch.Tensor | None]:
        """Per-region figures of the last consolidation in this session (see
        ``Pool.region_usage``)."""
        f = self.region_figures
        if f is None:
            raise LifecycleError(
                "no consolidation has run in this session yet: call pool.consolidate() first"
            )
        rb = self.row_bytes()
        out: dict[str, torch.Tensor | None] = {
            "rows": torch.from_numpy(f["rows"]),
            "screened": torch.from_numpy(f["screened"]),
            "bytes": torch.from_numpy(f["rows"] * rb),
            "freq": torch.from_numpy(f["freq"]),
            "novelty": torch.from_numpy(f["novelty"]),
            "budget": None if f["budget"] is None else torch.from_numpy(f["budget"]),
        }
        return out

    def to_json(self) -> dict[str, Any]:
        """The lifecycle part of the next commit record. A clock that reached the readers'
        bound (``CLOCK_LIMIT``, 2**53) is refused before anything is committed: a record
        past it would make every reader refuse the commit."""
        clock = self.stack.clock
        if not (0 <= clock.step < CLOCK_LIMIT and 0 <= clock.epoch < CLOCK_LIMIT):
            raise LifecycleError(
                f"the row lifecycle's clock (step {clock.step}, epoch {clock.epoch}) reached "
                "2**53, past what a store can hold exactly; nothing was committed (the store "
                "keeps its last commit, which every reader reads)"
            )
        return {
            "format": _STATE_FORMAT,
            "policy": self.policy.to_json(),
            "step": clock.step,
            "epoch": clock.epoch,
            "enter": self.enter,
            "exit": self.exit,
            "totals": asdict(self.totals),
            "health": self.health_saved,
        }

    def rows_in_phase(self, phase: int) -> torch.Tensor:
        """Sorted int64 ids of every row with a delta now in ``phase`` (``U.FREE``,
        ``U.SCREENED``), as the statistics say at this moment (no consolidation runs)."""
        with self.stack.lock:
            ids, u, _ = self.stack.usage_view()
            return torch.from_numpy(ids[(u[:, U.PHASE] == phase).numpy()].astype(np.int64))

    # -- per-row views -------------------------------------------------------------------------

    def row_usage(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Statistics of 1-D ``ids`` as of now (aligned to the current step), and the score."""
        stack, pol = self.stack, self.policy
        rules = stack.usage_rules
        assert rules is not None
        u = stack.usage(ids).cpu()
        none = U.missing(u)
        filled = torch.where(none[:, None], torch.zeros_like(u), u)
        recent, hist = U.aligned(filled, stack.clock.step, rules.use_decay)
        score = pol.recent_weight * recent + (1.0 - pol.recent_weight) * (
            U.popcount(hist).double() / U.HISTORY_BITS
        )
        out = {name: filled[:, i] for i, name in enumerate(U.FIELDS)}
        out.update(recent=recent, history=hist, score=score, has_delta=~none)
        out["phase"] = filled[:, U.PHASE].to(torch.uint8)
        return out
