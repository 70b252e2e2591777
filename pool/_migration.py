"""Migration between levels: what stays stable in a fast level moves to the next slower one.

The pieces are pure functions of tensors, so that each rule can be tested on its own; the
levelled pool (``_levels.py``) feeds them and writes their results through the level pools.

- **Window.** Between two consolidations a level accumulates, per row, the sum of its updates
  and its uses (:class:`Window`): for ``write``, the change of the delta; for training, minus
  the (damped) row gradients, the direction of the row steps (exact for SGD up to the learning
  rate), which costs no extra read of the deltas.
- **Signature.** A window's update of a row is reduced to the signs of a fixed random
  projection (``bits`` of them, from the pool's seed: the same for every run); its
  autocorrelation with the previous window's signature is ``2 * agree - 1`` in [-1, 1]. A row is
  *stable* once that stays above ``tau_stable`` for ``stable_windows`` consecutive windows.
- **Vertical alignment.** The cosine between a row's window updates at the fast level and at the
  next slower one (0 where the slower one had none). High alignment (above ``fast_track``) lets a
  row qualify one window earlier; negative alignment is a *conflict*: the move is blocked and the
  fast level's window update of that row is damped by ``conflict_damp``.
- **Pressure** = autocorrelation x use (uses per step in the window) x (1 + alignment) orders a
  queue per channel (fast -> next slower persisted level).
- **Caps.** A channel starts at most ``floor(cap * rows)`` migrations per consolidation (the
  design's defaults 0.01, 0.005, 0.001 from the fastest channel to the slowest), plus at most
  ``floor(bypass * cap * rows)`` more whose pressure is above ``criticality`` (the emergency
  bypass, itself bounded). The rest wait (``migration_backlog``).
- **Hand-off.** A started migration moves ``1/remaining`` of the row's fast-level delta to the
  slower level at each of ``handoff`` consolidations (the last moves all that is left and drops
  the row from the fast level). ``fast - part`` and ``slow + part`` are written together, so the
  row's value ``base + sum of levels`` is unchanged within float32 rounding.
- **Inertia.** ``a_eff = a_base + (1 - a_base) * tanh(density / k)`` per region (an id range,
  as the lifecycle's), density = writers (the region's share of the rows written in the window)
  x use (uses of its rows per step) x update size (mean norm of its rows' window updates); a
  level's row updates are scaled by ``lr_scale * (1 - a_eff)`` until the next consolidation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from dpsn.errors import CorruptStoreError, InvalidArgumentError

_PROJECTION_SALT = 0x6C65_7665_6C73  # "levels": the projection differs from other seeded draws


@dataclass(frozen=True)
class Migration:
    """How levels consolidate (one policy for the whole hierarchy, saved in the root file).

    ``consolidate_every``: a consolidation runs at every N-th root commit that follows some
    update (an idle commit, such as a crash recovery's, breaks no streak) (0: only
    ``pool.consolidate()``). ``caps``: per channel, fastest channel first, the fraction of the
    target level's rows that may start migrating per consolidation (the last value repeats for
    deeper channels); ``caps=None`` turns the caps off (every stable row moves: for measuring
    what the caps prevent). ``bypass``: the emergency bypass's bound, a fraction of a channel's
    cap; ``criticality``: the pressure above which a row may use it.
    """

    bits: int = 64
    tau_stable: float = 0.5
    stable_windows: int = 3
    fast_track: float = 0.9
    conflict_damp: float = 0.5
    caps: tuple[float, ...] | None = (0.01, 0.005, 0.001)
    bypass: float = 0.5
    criticality: float = 1.5
    handoff: int = 4
    consolidate_every: int = 1
    regions: int = 64
    entropy_target: float = 1.0

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"dpsn.Migration: {msg}")

        if not (isinstance(self.bits, int) and 1 <= self.bits <= 4096):
            raise bad(f"bits must be an int in 1..4096, got {self.bits!r}")
        if not -1.0 <= float(self.tau_stable) <= 1.0:
            raise bad(f"tau_stable must be in [-1, 1], got {self.tau_stable!r}")
        for name in ("stable_windows", "handoff", "regions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"{name} must be a positive int, got {value!r}")
        every = self.consolidate_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise bad(f"consolidate_every must be an int >= 0, got {every!r}")
        if self.caps is not None:
            caps = tuple(float(c) for c in self.caps)
            if not caps or any(not 0.0 <= c <= 1.0 for c in caps):
                raise bad(f"caps must be fractions in [0, 1] (or None: off), got {self.caps!r}")
            object.__setattr__(self, "caps", caps)
        for name in ("bypass", "conflict_damp"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise bad(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("fast_track", "criticality", "entropy_target"):
            if not math.isfinite(float(getattr(self, name))):
                raise bad(f"{name} must be finite")
        if self.entropy_target <= 0:
            raise bad("entropy_target must be > 0")

    def to_json(self) -> dict[str, Any]:
        """These settings as plain JSON (as the levels file records them)."""
        out = asdict(self)
        out["caps"] = None if self.caps is None else list(self.caps)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Migration:
        """The settings :meth:`to_json` wrote; unknown or bad values are refused."""
        known = {f.name for f in fields(cls)}
        args = {k: v for k, v in raw.items() if k in known}
        if args.get("caps") is not None:
            args["caps"] = tuple(args["caps"])
        return cls(**args)

    def cap_rows(self, channel: int, rows: int) -> int | None:
        """Migrations channel ``channel`` may start per consolidation (None: caps off)."""
        if self.caps is None:
            return None
        cap = self.caps[min(channel, len(self.caps) - 1)]
        return math.floor(cap * rows)

    def bypass_rows(self, channel: int, rows: int) -> int | None:
        """Extra migrations the emergency bypass may start per consolidation (None: caps off)."""
        cap = self.cap_rows(channel, rows)
        return None if cap is None else math.floor(self.bypass * cap)


def projection(dim: int, bits: int, seed: int) -> torch.Tensor:
    """The fixed random projection ``[dim, bits]`` whose signs make a row's signature."""
    g = torch.Generator().manual_seed((seed ^ _PROJECTION_SALT) % (1 << 63))
    return torch.randn((dim, bits), generator=g)


def signatures(updates: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``[n, bits]`` bool: the signs of ``updates @ proj``."""
    return (updates.float() @ proj.to(updates.device)) > 0


def autocorrelation(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``[n]`` in [-1, 1]: ``2 * (share of equal signature bits) - 1``."""
    return 2.0 * (new == old).float().mean(dim=1) - 1.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of ``a`` and ``b`` ``[n, dim]``; 0 where either row is zero."""
    na = torch.linalg.vector_norm(a, dim=1)
    nb = torch.linalg.vector_norm(b, dim=1)
    dot = (a * b).sum(dim=1)
    ok = (na > 0) & (nb > 0)
    return torch.where(ok, dot / (na * nb).clamp_min(1e-30), torch.zeros_like(dot))


def effective_inertia(a_base: float, density: torch.Tensor, k: float) -> torch.Tensor:
    """``a_base + (1 - a_base) * tanh(density / k)``."""
    return a_base + (1.0 - a_base) * torch.tanh(density / k)


def regions_of(ids: torch.Tensor, rows: int, regions: int) -> torch.Tensor:
    """The region (an id range, as the lifecycle's) of each id."""
    width = -(-rows // regions)
    return torch.div(ids, width, rounding_mode="floor").clamp_(max=regions - 1)


def select(
    pressure: torch.Tensor, cap: int | None, bypass: int | None, criticality: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidates start migrating: ``(normal, bypassed)`` index tensors into ``pressure``.

    The ``cap`` highest pressures move normally; of the rest, at most ``bypass`` whose pressure
    is above ``criticality`` (highest first) use the bypass. ``cap=None``: all move, no bypass.
    Never more than ``cap`` normal and ``bypass`` bypassed (tested exactly)."""
    order = torch.argsort(pressure, descending=True, stable=True)
    if cap is None:
        return order, order[:0]
    normal = order[:cap]
    rest = order[cap:]
    critical = rest[pressure[rest] > criticality]
    return normal, critical[: max(bypass or 0, 0)]


def handoff_part(fast: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """The share of each row's fast-level delta ``[n, dim]`` to move now: ``1/remaining`` of it
    (all of it at the last step, ``remaining == 1``)."""
    return fast / remaining.to(fast.device, fast.dtype).clamp_min(1)[:, None]


class Sums:
    """Distinct ids with a running sum of values per id (``[n, width]``, or ``[n]``), read
    back sorted by id (:meth:`items`).

    Why this shape: a training step adds ~k x batch rows, and a window must cost less than the
    step. A step's rows are written into a pending buffer (:meth:`reserve`: the caller makes its
    values there, no copy), and the buffer is folded in once it is full or read: one lookup of
    all its ids and one ``index_add_``, instead of one of each per step. The ids map to rows of
    a growing table through the device cache's cuckoo hash table (:class:`SlotTable`: one C
    probe per id, where a sorted column paid a binary search); a new id takes the next row
    (zeros) and the table doubles when full.

    Every id's sum is its values added in the order they came, starting from zero, however the
    buffer was folded or the table grew, saved and restored: a sum restored from :meth:`items`
    goes on bit for bit as one that was never saved."""

    _BUFFER_ROWS = (1 << 12, 1 << 15)  # the pending buffer's least and largest rows
    _BUFFER_BYTES = 16 << 20  # and its largest size (but one call's rows always fit)

    def __init__(self, width: int | None) -> None:
        self.width = width
        self._n = 0
        self._grow(0)
        self._p_ids = torch.zeros(0, dtype=torch.int64)
        self._p_vals = self._zeros(0)
        self._pend = 0

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n) if self.width is None else torch.zeros((n, self.width))

    def _grow(self, need: int) -> None:
        """Make room for ``need`` rows (at least 64; capacity doubles), keeping the rows held."""
        from dpsn.tiers import SlotTable

        cap = 64
        while cap < need:
            cap *= 2
        n = self._n
        ids = torch.full((cap + 1,), -1, dtype=torch.int64)
        vals = self._zeros(cap)
        if n:
            ids[:n] = self._ids[:n]
            vals[:n] = self._vals[:n]
        table = SlotTable(cap, ids)
        if n:
            table.insert(ids[:n], torch.arange(n))
        self._ids, self._vals, self._table = ids, vals, table

    def reserve(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for one call's ``n`` rows: ``(ids [n], values [n, width])`` views the caller
        fills (ids >= 0; an id repeated adds each value, in order) before any other call."""
        if self._pend + n > len(self._p_ids):
            self.fold()
            if n > len(self._p_ids):
                low, high = self._BUFFER_ROWS
                high = min(high, self._BUFFER_BYTES // (4 * (self.width or 1)))  # wide rows
                rows = max(n, min(high, max(low, 8 * n)))
                self._p_ids = torch.empty(rows, dtype=torch.int64)
                self._p_vals = torch.empty((rows,) if self.width is None else (rows, self.width))
        a, b = self._pend, self._pend + n
        self._pend = b
        return self._p_ids[a:b], self._p_vals[a:b]

    def add(self, ids: torch.Tensor, vals: torch.Tensor) -> None:
        """Add ``vals`` at ``ids`` (CPU, float32; an id repeated adds each value, in order)."""
        i, v = self.reserve(len(ids))
        i.copy_(ids)
        v.copy_(vals)

    def fold(self) -> None:
        """Add the pending rows into the sums (in place)."""
        if not self._pend:
            return
        ids, vals = self._p_ids[: self._pend], self._p_vals[: self._pend]
        self._pend = 0
        pos, hit = self._table.find(ids)
        if not bool(hit.all()):
            miss = torch.nonzero(~hit).flatten()
            new, inv = torch.unique(ids[miss], return_inverse=True)
            n, m = self._n, len(new)
            if n + m > len(self._vals):
                self._grow(n + m)
            at = torch.arange(n, n + m)
            self._ids[n : n + m] = new
            self._table.insert(new, at)
            self._n = n + m
            pos = pos.clone()
            pos[miss] = at[inv]
        self._vals.index_add_(0, pos, vals)

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted distinct ids and their sums (folded first; copies)."""
        self.fold()
        ids = self._ids[: self._n]
        order = torch.argsort(ids)
        return ids[order], self._vals[: self._n][order]

    def restore(self, ids: torch.Tensor, vals: torch.Tensor) -> None:
        """Take distinct ``ids`` and their sums (what :meth:`items` gave)."""
        self._n, self._pend = 0, 0
        self._grow(len(ids))
        self.add(ids.to(torch.int64), vals)
        self.fold()

    def __bool__(self) -> bool:
        return self._n > 0 or self._pend > 0


class Window:
    """One level's updates and uses since its last consolidation: one :class:`Sums` of
    ``[update (dim), uses (1)]`` per row (the two always come for the same rows, so a step is
    one lookup and one ``index_add_``)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._sums = Sums(dim + 1)
        self.steps = 0

    def add(
        self,
        ids: torch.Tensor,
        update: torch.Tensor,
        uses: torch.Tensor,
        *,
        sign: float = 1.0,
        scale: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        """One step: the rows' updates ``sign * update`` ``[n, dim]`` and uses ``[n]``; each
        row's update times ``scale[i]`` (float ``[n]``) and zero where ``rows`` (bool ``[n]``)
        is False (a row the step left out moved nothing), in one multiplication."""
        ids = ids.detach().reshape(-1)
        n = len(ids)
        u = update.detach().reshape(-1, self.dim).cpu()
        count = uses.detach().reshape(-1)
        f = None  # each row's factor (None: sign alone)
        if scale is not None or rows is not None:
            f = torch.full((n,), float(sign))
            if scale is not None:
                f.mul_(scale.detach().to("cpu", torch.float32).reshape(-1))
            if rows is not None:
                f.mul_(torch.as_tensor(rows).cpu().reshape(-1).to(torch.float32))
        if len(u) != n or len(count) != n:
            raise ValueError(f"{n} ids for {len(u)} updates and {len(count)} uses")
        # checked: now made in place in the sums' pending buffer (nothing below can fail)
        at, both = self._sums.reserve(n)
        at.copy_(ids)
        if f is None:
            torch.mul(u, sign, out=both[:, : self.dim])
        else:
            torch.mul(u, f[:, None], out=both[:, : self.dim])
        both[:, self.dim] = count
        self.steps += 1

    def add_update(self, ids: torch.Tensor, update: torch.Tensor) -> None:
        """Updates without uses (not a step)."""
        ids = ids.detach().cpu().reshape(-1)
        both = torch.zeros((len(ids), self.dim + 1))
        both[:, : self.dim] = update.detach().reshape(-1, self.dim)
        self._sums.add(ids, both)

    def add_uses(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """Uses without updates (a step)."""
        ids = ids.detach().cpu().reshape(-1)
        both = torch.zeros((len(ids), self.dim + 1))
        both[:, self.dim] = counts.detach().reshape(-1)
        self._sums.add(ids, both)
        self.steps += 1

    def updates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted distinct ids and their summed updates ``[n, dim]``."""
        ids, vals = self._sums.items()
        return ids, vals[:, : self.dim]

    def uses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted distinct ids and their summed uses."""
        ids, vals = self._sums.items()
        return ids, vals[:, self.dim]

    @property
    def empty(self) -> bool:
        """Whether nothing was recorded since the window was cleared."""
        return not (self.steps or self._sums)

    def clear(self) -> None:
        self._sums = Sums(self.dim + 1)
        self.steps = 0


class IdTable:
    """:func:`lookup` for a set of distinct ids asked about many times: the positions of ids
    in ``ids`` through the device cache's cuckoo hash table (one C probe per id, not a binary
    search), built once (a hot training step asks the same memo every step)."""

    def __init__(self, ids: torch.Tensor) -> None:
        from dpsn.tiers import SlotTable

        self.ids = ids
        self._table = None
        if len(ids):
            slot_ids = torch.cat([ids.cpu(), torch.full((1,), -1, dtype=torch.int64)])
            self._table = SlotTable(len(ids), slot_ids)
            self._table.insert(slot_ids[:-1], torch.arange(len(ids)))

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of ``ids`` and whether each is there (as :func:`lookup`)."""
        if self._table is None:
            return torch.zeros_like(ids), torch.zeros(len(ids), dtype=torch.bool)
        return self._table.find(ids)


def lookup(sorted_ids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``ids`` in ``sorted_ids`` and whether each is there."""
    if len(sorted_ids) == 0:
        return torch.zeros_like(ids), torch.zeros(len(ids), dtype=torch.bool)
    pos = torch.searchsorted(sorted_ids, ids).clamp_(max=len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == ids


class Tracker:
    """Per level: the previous window's signatures, each row's stable streak and last
    autocorrelation, the region inertia and the health figures of the last consolidation."""

    def __init__(self, regions: int, a_base: float) -> None:
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.sig = torch.zeros((0, 0), dtype=torch.bool)
        self.streak = torch.zeros(0, dtype=torch.int64)
        self.autocorr = torch.zeros(0)
        self.inertia = torch.full((regions,), float(a_base))
        self.health: dict[str, Any] = {
            "migration_backlog": 0,
            "conflict_rate": 0.0,
            "entropy_ratio": 0.0,
        }

    @property
    def inertia(self) -> torch.Tensor:
        """The effective inertia ``a_eff`` of each region (``[regions]`` float32)."""
        return self._inertia

    @inertia.setter
    def inertia(self, value: torch.Tensor) -> None:
        # its maximum is kept beside it: a training step asks whether any region resists
        # without a reduction (and a tensor-to-Python sync) per step
        self._inertia = value
        self.max_inertia = float(value.max()) if len(value) else 0.0
        self.any_inertia = self.max_inertia > 0

    def advance(
        self, ids: torch.Tensor, updates: torch.Tensor, proj: torch.Tensor, tau: float
    ) -> None:
        """Fold one window in: rows updated in it get a new signature, autocorrelation and
        streak; rows not updated drop out (their streak is broken)."""
        sig = signatures(updates, proj)
        pos, hit = lookup(self.ids, ids)
        ac = torch.zeros(len(ids))
        streak = torch.zeros(len(ids), dtype=torch.int64)
        if bool(hit.any()):
            p = pos[hit]
            ac[hit] = autocorrelation(sig[hit], self.sig[p])
            streak[hit] = torch.where(ac[hit] > tau, self.streak[p] + 1, torch.zeros_like(p))
        self.ids, self.sig, self.streak, self.autocorr = ids, sig, streak, ac


def density(
    ids: torch.Tensor,
    updates: torch.Tensor,
    use_ids: torch.Tensor,
    uses: torch.Tensor,
    steps: int,
    rows: int,
    regions: int,
) -> torch.Tensor:
    """``[regions]``: writers x use x update size of one window (see the module docstring)."""
    written = torch.zeros(regions)
    size = torch.zeros(regions)
    used = torch.zeros(regions)
    if len(ids):
        r = regions_of(ids, rows, regions)
        written.index_add_(0, r, torch.ones(len(ids)))
        size.index_add_(0, r, torch.linalg.vector_norm(updates, dim=1))
    if len(use_ids):
        used.index_add_(0, regions_of(use_ids, rows, regions), uses)
    share = written / max(1.0, float(written.sum()))
    mean_size = size / written.clamp_min(1)
    return share * (used / max(1, steps)) * mean_size


def entropy_ratio(
    ids: torch.Tensor, updates: torch.Tensor, rows: int, regions: int, target: float
) -> float:
    """The design's sum over regions of dispersion x variance of a window's updates, against
    ``target``: dispersion = std / mean of the region's row update norms, variance = the
    variance of its update values. 0 for a window without updates."""
    if len(ids) < 2:
        return 0.0
    r = regions_of(ids, rows, regions)
    norms = torch.linalg.vector_norm(updates, dim=1)
    n = torch.zeros(regions).index_add_(0, r, torch.ones(len(ids)))
    s1 = torch.zeros(regions).index_add_(0, r, norms)
    s2 = torch.zeros(regions).index_add_(0, r, norms * norms)
    mean = s1 / n.clamp_min(1)
    std = (s2 / n.clamp_min(1) - mean * mean).clamp_min(0).sqrt()
    dispersion = torch.where(mean > 0, std / mean.clamp_min(1e-30), torch.zeros_like(mean))
    v1 = torch.zeros(regions).index_add_(0, r, updates.sum(dim=1))
    v2 = torch.zeros(regions).index_add_(0, r, (updates * updates).sum(dim=1))
    cells = (n * updates.shape[1]).clamp_min(1)
    variance = (v2 / cells - (v1 / cells) ** 2).clamp_min(0)
    return float((dispersion * variance).sum()) / target


@dataclass
class Plan:
    """One channel's decision at a consolidation."""

    normal: torch.Tensor  # ids that start migrating within the cap
    bypassed: torch.Tensor  # ids that start through the emergency bypass
    pressure: torch.Tensor  # pressures of normal then bypassed
    conflicts: torch.Tensor  # fast-level ids whose window update opposes the slower level's
    conflict_updates: torch.Tensor  # their fast-level window updates [c, dim]
    compared: int  # rows whose updates at both levels were compared
    backlog: int  # stable candidates left waiting


def plan_channel(
    policy: Migration,
    channel: int,
    rows: int,
    fast: Tracker,
    fast_window: tuple[torch.Tensor, torch.Tensor],
    fast_uses: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    slow_window: tuple[torch.Tensor, torch.Tensor],
    busy: torch.Tensor,
) -> Plan:
    """Decide which rows of the fast level start moving to the slower one (``fast`` has already
    folded this window in: ``fast.ids`` are ``fast_window``'s ids)."""
    ids, upd = fast_window
    pos, hit = lookup(slow_window[0], ids)
    slow_upd = torch.zeros_like(upd)
    if bool(hit.any()):
        slow_upd[hit] = slow_window[1][pos[hit]]
    align = cosine(upd, slow_upd)
    conflict = hit & (align < 0)
    upos, uhit = lookup(fast_uses[0], ids)
    use = torch.where(uhit, fast_uses[1][upos] if len(fast_uses[0]) else 0.0, 0.0) / max(1, steps)
    n = policy.stable_windows
    stable = fast.streak >= n
    if n > 1:
        stable |= (fast.streak >= n - 1) & (align > policy.fast_track)
    _, moving = lookup(busy, ids)
    cand = stable & ~conflict & ~moving
    pressure = (fast.autocorr * use * (1.0 + align))[cand]
    cand_ids = ids[cand]
    normal, bypassed = select(
        pressure,
        policy.cap_rows(channel, rows),
        policy.bypass_rows(channel, rows),
        policy.criticality,
    )
    return Plan(
        normal=cand_ids[normal],
        bypassed=cand_ids[bypassed],
        pressure=torch.cat([pressure[normal], pressure[bypassed]]),
        conflicts=ids[conflict],
        conflict_updates=upd[conflict],
        compared=int(hit.sum()),
        backlog=int(cand.sum()) - len(normal) - len(bypassed),
    )


# -- persisted state ---------------------------------------------------------------------------


def _bad_state(what: str) -> CorruptStoreError:
    return CorruptStoreError(f"the levelled store's migration state {what}; the store is damaged")


def _ids_part(arr: np.ndarray, rows: int, name: str) -> torch.Tensor:
    """Sorted unique int64 ids below ``rows`` (what every id part must be)."""
    if arr.dtype != np.int64 or arr.ndim != 1:
        raise _bad_state(f"part {name!r} is not a 1-D int64 array")
    if len(arr) and (arr[0] < 0 or arr[-1] >= rows or bool((np.diff(arr) <= 0).any())):
        raise _bad_state(f"part {name!r} is not sorted, unique ids below {rows}")
    return torch.from_numpy(arr.copy())


def _float_part(arr: np.ndarray, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if arr.dtype != np.float32 or tuple(arr.shape) != shape:
        raise _bad_state(f"part {name!r} is not float32 of shape {list(shape)}")
    if not bool(np.isfinite(arr).all()):
        raise _bad_state(f"part {name!r} holds non-finite values")
    return torch.from_numpy(arr.copy())


def _part(parts: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in parts:
        raise _bad_state(f"has no part {name!r}")
    return parts[name]


def window_to_parts(w: Window, prefix: str) -> dict[str, np.ndarray]:
    """A window's state as arrays (it is folded first, in place, so that a window restored from
    them sums later updates in the same order as one that was never saved: bit for bit)."""
    ids, vals = w._sums.items()
    return {
        prefix + "ids": ids.numpy(),
        prefix + "sums": vals.numpy().astype(np.float32),  # [n, dim + 1]: update, uses
        prefix + "steps": np.array([w.steps], dtype=np.int64),
    }


def window_from_parts(parts: dict[str, np.ndarray], prefix: str, dim: int, rows: int) -> Window:
    """The window :func:`window_to_parts` saved, checked (``CorruptStoreError``)."""
    w = Window(dim)
    ids = _ids_part(_part(parts, prefix + "ids"), rows, prefix + "ids")
    vals = _float_part(_part(parts, prefix + "sums"), (len(ids), dim + 1), prefix + "sums")
    steps = _part(parts, prefix + "steps")
    if steps.dtype != np.int64 or steps.shape != (1,) or not 0 <= int(steps[0]) < 1 << 62:
        raise _bad_state(f"part {prefix + 'steps'!r} is not one count >= 0")
    if bool((vals[:, dim] < 0).any()):
        raise _bad_state(f"part {prefix + 'sums'!r} holds negative uses")
    w._sums.restore(ids, vals)
    w.steps = int(steps[0])
    return w


def tracker_to_parts(t: Tracker, prefix: str) -> dict[str, np.ndarray]:
    """A tracker's arrays (its health figures go to JSON beside them)."""
    sig = t.sig.numpy().astype(np.uint8) if t.sig.numel() else np.zeros((len(t.ids), 0), np.uint8)
    return {
        prefix + "ids": t.ids.numpy(),
        prefix + "sig": sig,
        prefix + "streak": t.streak.numpy().astype(np.int64),
        prefix + "autocorr": t.autocorr.numpy().astype(np.float32),
        prefix + "inertia": t.inertia.numpy().astype(np.float32),
    }


def tracker_from_parts(
    parts: dict[str, np.ndarray],
    prefix: str,
    health: Any,
    *,
    rows: int,
    bits: int,
    regions: int,
    a_base: float,
) -> Tracker:
    """The tracker :func:`tracker_to_parts` saved, checked (``CorruptStoreError``)."""
    t = Tracker(regions, a_base)
    ids = _ids_part(_part(parts, prefix + "ids"), rows, prefix + "ids")
    sig = _part(parts, prefix + "sig")
    if sig.dtype != np.uint8 or sig.ndim != 2 or sig.shape[0] != len(ids):
        raise _bad_state(f"part {prefix + 'sig'!r} is not uint8 [{len(ids)}, bits]")
    if len(ids) and (sig.shape[1] != bits or bool((sig > 1).any())):
        raise _bad_state(f"part {prefix + 'sig'!r} is not {bits} bits (0 or 1) per row")
    streak = _part(parts, prefix + "streak")
    if streak.dtype != np.int64 or streak.shape != (len(ids),) or bool((streak < 0).any()):
        raise _bad_state(f"part {prefix + 'streak'!r} is not [{len(ids)}] counts >= 0")
    ac = _float_part(_part(parts, prefix + "autocorr"), (len(ids),), prefix + "autocorr")
    if bool(((ac < -1) | (ac > 1)).any()):
        raise _bad_state(f"part {prefix + 'autocorr'!r} leaves [-1, 1]")
    inertia = _float_part(_part(parts, prefix + "inertia"), (regions,), prefix + "inertia")
    if bool(((inertia < 0) | (inertia > 1)).any()):
        raise _bad_state(f"part {prefix + 'inertia'!r} leaves [0, 1]")
    want = {"migration_backlog": int, "conflict_rate": float, "entropy_ratio": float}
    if not isinstance(health, dict) or set(health) != set(want):
        raise _bad_state(f"has malformed health figures {health!r:.200}")
    for key, kind in want.items():
        v = health[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise _bad_state(f"health figure {key!r} is not a finite number >= 0")
        t.health[key] = kind(v)
    t.ids = ids
    t.sig = (
        torch.from_numpy(sig.astype(bool)) if len(ids) else torch.zeros((0, 0), dtype=torch.bool)
    )
    t.streak, t.autocorr = torch.from_numpy(streak.copy()), ac
    t.inertia = inertia
    return t


def inflight_from_parts(
    parts: dict[str, np.ndarray], prefix: str, rows: int, handoff: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One channel's hand-offs in flight (ids and consolidations left), checked."""
    ids = _ids_part(_part(parts, prefix + "ids"), rows, prefix + "ids")
    left = _part(parts, prefix + "left")
    if left.dtype != np.int64 or left.shape != (len(ids),):
        raise _bad_state(f"part {prefix + 'left'!r} is not int64 [{len(ids)}]")
    if bool(((left < 1) | (left > handoff)).any()):
        raise _bad_state(f"part {prefix + 'left'!r} leaves 1..{handoff} (the hand-off length)")
    return ids, torch.from_numpy(left.copy())
