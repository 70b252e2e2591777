"""Levels: deltas stacked by speed of change, in one levelled store.

A levelled store is a root directory holding one ordinary single-level dpsn store per persisted
level (``levels/<name>/``; every level has the pool's rows, width, generator and seed), a root
file ``dpsn-levels.json`` (the spec, checksummed) and a root commit log
``dpsn-levels-log.json`` (written whole to a temporary file, fsynced and renamed over the old
one), whose every entry names each level's commit: one root commit pins every level. The
format is in docs/format.md ("Levelled stores").

A row reads ``base + sum of its level deltas``. The base and the train level's delta come from
the train level's pool (its cache serves executors); every other level contributes its delta
(one gather per level, skipped for a level that holds nothing). Only the fastest persisted
level gets the device cache (``cache_rows``); the other levels read without one (a level made
the train level later trains through the uncached path). A context level
(``persist=False``) lives in memory: an uncommitted pool over a scratch store in a temporary
directory (on ``/dev/shm`` where there is one), removed at close and never committed.

Crash safety: a root commit commits each level (each atomically) and then replaces the root log.
A crash in between leaves level commits that no root commit names; opening the root reads each
level at its named commit, and a writable open first rewrites the rows those orphan commits
changed back to their named values, in one new commit per level, so that a migration's
``fast - part`` can never survive without its ``slow + part``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpsn.errors import (
    CorruptStoreError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    ReadOnlyError,
    SnapshotNotFoundError,
    StoreExistsError,
    StoreVersionError,
)
from dpsn.store import PersistedStore, VerifyReport
from dpsn.store import levels as levels_format
from dpsn.tiers import ProceduralTier, RowBatch

from . import _migration as mig
from ._lifecycle import Lifecycle
from ._pool import Pool
from ._validate import as_deltas, as_ids

FORMAT_NAME = levels_format.FORMAT_NAME
FORMAT_VERSION = levels_format.FORMAT_VERSION
LEVELS_DIR = levels_format.LEVELS_DIR
LEVELS_FILE = levels_format.LEVELS_FILE
LOG_FILE = levels_format.LOG_FILE
canonical = levels_format.canonical
is_levelled = levels_format.is_levelled
provenance = levels_format.provenance
read_sealed = levels_format.read_sealed
spec_of = levels_format.spec_of
verify_root = levels_format.verify_root
write_atomic = levels_format.write_atomic

HEALTH_KEYS = (
    "screening_rate",
    "entropy_ratio",
    "migration_backlog",
    "conflict_rate",
    "effective_inertia",
    "persisted_rows",
)
SNAPSHOT_PREFIX = "levels."  # level stores pin a root snapshot's commits under this prefix
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Level:
    """One level of a levelled pool (``dpsn.create(..., levels=[...])``, slowest first).

    ``persist=False`` makes a context level: in memory only, never committed. ``lr_scale``
    scales the level's row updates; ``inertia`` is its base inertia ``a_base`` in [0, 1) and
    ``inertia_k`` the density scale ``k`` of ``a_eff = a_base + (1 - a_base) tanh(density/k)``.
    ``lifecycle`` gives the level its own row lifecycle (FREE/SCREENED, decay, prune).
    """

    name: str
    persist: bool = True
    lr_scale: float = 1.0
    inertia: float = 0.0
    inertia_k: float = 1.0
    lifecycle: Lifecycle | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidArgumentError(
                f"a level name is 1-32 of a-z, 0-9, '_', '-' starting with a letter; "
                f"got {self.name!r}"
            )
        if not isinstance(self.persist, bool):
            raise InvalidArgumentTypeError("Level.persist must be a bool")
        if not (isinstance(self.lr_scale, int | float) and 0 <= self.lr_scale < float("inf")):
            raise InvalidArgumentError(f"Level.lr_scale must be >= 0, got {self.lr_scale!r}")
        if not (isinstance(self.inertia, int | float) and 0 <= self.inertia < 1):
            raise InvalidArgumentError(f"Level.inertia must be in [0, 1), got {self.inertia!r}")
        if not (isinstance(self.inertia_k, int | float) and 0 < self.inertia_k < float("inf")):
            raise InvalidArgumentError(f"Level.inertia_k must be > 0, got {self.inertia_k!r}")
        if self.lifecycle is not None and not isinstance(self.lifecycle, Lifecycle):
            raise InvalidArgumentTypeError("Level.lifecycle takes a dpsn.Lifecycle")

    def to_json(self) -> dict[str, Any]:
        """This level's settings as plain JSON (as the levels file records them)."""
        return {
            "name": self.name,
            "persist": self.persist,
            "lr_scale": float(self.lr_scale),
            "inertia": float(self.inertia),
            "inertia_k": float(self.inertia_k),
            "lifecycle": self.lifecycle is not None,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Level:
        """The level that :meth:`to_json` wrote; a damaged entry is a ``CorruptStoreError``."""
        try:
            return cls(
                name=raw["name"],
                persist=raw["persist"],
                lr_scale=raw["lr_scale"],
                inertia=raw["inertia"],
                inertia_k=raw["inertia_k"],
            )
        except (KeyError, TypeError, InvalidArgumentError, InvalidArgumentTypeError) as e:
            raise CorruptStoreError(f"a level entry of {LEVELS_FILE} is invalid: {e}") from None


def parse_levels(levels: Any) -> list[Level]:
    """Check ``levels=``: names or :class:`Level` objects, slowest first, distinct names, at
    least one persisted."""
    if isinstance(levels, str | bytes) or not hasattr(levels, "__iter__"):
        raise InvalidArgumentTypeError(
            f"levels= takes a list of level names or dpsn.Level objects, got {levels!r}"
        )
    out: list[Level] = []
    for item in levels:
        if isinstance(item, str):
            item = Level(item)
        if not isinstance(item, Level):
            raise InvalidArgumentTypeError(
                f"levels= entries must be names or dpsn.Level, got {type(item).__name__}"
            )
        out.append(item)
    names = [lv.name for lv in out]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"level names must be distinct, got {names}")
    if not any(lv.persist for lv in out):
        raise InvalidArgumentError("a levelled store needs at least one persisted level")
    return out


# -- create and open ---------------------------------------------------------------------------


def create_levelled(
    path: str | os.PathLike[str],
    rows: int,
    dim: int,
    *,
    levels: Any,
    model_id: str | None = None,
    config: dict[str, Any] | None = None,
    migration: mig.Migration | None = None,
    create: Any,
    **kwargs: Any,
) -> LevelledPool:
    """Create a levelled store (called by ``dpsn.create(..., levels=...)``, which passes its
    own ``create`` for the level stores and its other arguments in ``kwargs``)."""
    parsed = parse_levels(levels)
    if model_id is not None and not isinstance(model_id, str):
        raise InvalidArgumentTypeError(f"model_id must be a str, got {type(model_id).__name__}")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise InvalidArgumentTypeError(f"config must be a JSON-able dict, got {config!r}")
    try:
        canonical(config)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"config must be JSON-able: {e}") from None
    if migration is None:
        migration = mig.Migration()
    if not isinstance(migration, mig.Migration):
        raise InvalidArgumentTypeError("migration= takes a dpsn.Migration")
    root = Path(path)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StoreExistsError(f"{root} exists and is not an empty directory")
    made = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    pools: dict[str, Pool] = {}
    try:
        (root / LEVELS_DIR).mkdir()
        fastest = [lv.name for lv in parsed if lv.persist][-1]
        for lv in parsed:
            if lv.persist:
                kw = kwargs if lv.name == fastest else {**kwargs, "cache_rows": 0}
                pools[lv.name] = create(
                    root / LEVELS_DIR / lv.name, rows, dim, lifecycle=lv.lifecycle, **kw
                )
        first = pools[next(lv.name for lv in parsed if lv.persist)]
        spec = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "rows": rows,
            "dim": dim,
            "seed": first.seed,
            "dtype": str(first.dtype).removeprefix("torch."),
            "uuid": uuid.uuid4().hex,
            "created": time.time(),
            "model_id": model_id,
            "config": config,
            "levels": [lv.to_json() for lv in parsed],
            "migration": migration.to_json(),
        }
        write_atomic(root / LEVELS_FILE, spec)
        level_prov = {n: p.log()[-1].provenance for n, p in pools.items()}
        record = {
            "id": 1,
            "parent": None,
            "time": time.time(),
            "message": "create",
            "levels": {n: p.head for n, p in pools.items()},
            "migrations": [],
            "provenance": provenance("", spec_of(spec), level_prov, []),
        }
        write_atomic(root / LOG_FILE, {"commits": [record], "snapshots": {}})
        ctx_kwargs = {**kwargs, "cache_rows": 0}
        context = {
            lv.name: _context_pool(rows, dim, create, ctx_kwargs) for lv in parsed if not lv.persist
        }
        return LevelledPool(root, spec, parsed, {**pools, **context}, head=1, writable=True)
    except BaseException:
        for p in pools.values():
            p.close()
        if made:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _context_pool(rows: int, dim: int, create: Any, kwargs: dict[str, Any]) -> Pool:
    """An in-memory level: a pool over a scratch store that is never committed."""
    shm = Path("/dev/shm")
    scratch = Path(tempfile.mkdtemp(prefix="dpsn-context-", dir=shm if shm.is_dir() else None))
    kw = {k: v for k, v in kwargs.items() if k not in ("keep_last", "keep_within")}
    kw["compact_above"] = None
    try:
        pool = create(scratch / "level", rows, dim, **kw)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    pool._dpsn_scratch = scratch  # type: ignore[attr-defined]  # removed at close
    return pool


def open_levelled(
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    at: str | int | None = None,
    open: Any,
    create: Any,
    **kwargs: Any,
) -> LevelledPool:
    """Open a levelled store (called by ``dpsn.open``, which passes its own ``open`` and
    ``create`` and the cache arguments in ``kwargs``)."""
    root = Path(path)
    spec = read_sealed(root / LEVELS_FILE)
    if spec.get("format") != FORMAT_NAME:
        raise CorruptStoreError(f"{root / LEVELS_FILE} is not a dpsn levels file")
    if spec.get("version") != FORMAT_VERSION:
        raise StoreVersionError(
            f"{root} is a levelled store of version {spec.get('version')}; this dpsn reads "
            f"version {FORMAT_VERSION}: upgrade dpsn"
        )
    parsed = [Level.from_json(raw) for raw in spec["levels"]]
    log = read_sealed(root / LOG_FILE)
    commits = log["commits"]
    if at is None:
        record = commits[-1]
    elif isinstance(at, str):
        if at not in log["snapshots"]:
            raise SnapshotNotFoundError(
                f"{root} has no snapshot {at!r}; it has {sorted(log['snapshots'])}"
            )
        record = commits[log["snapshots"][at] - 1]
    else:
        at = int(at)
        if not 1 <= at <= len(commits):
            raise SnapshotNotFoundError(f"{root} has root commits 1..{len(commits)}, not {at}")
        record = commits[at - 1]
    writable = mode == "r+"
    if writable and at is not None:
        raise InvalidArgumentError('a past root commit can only be opened with mode="r"')
    pools: dict[str, Pool] = {}
    fastest = [lv.name for lv in parsed if lv.persist][-1]
    try:
        for lv in parsed:
            if not lv.persist:
                continue
            level_path = root / LEVELS_DIR / lv.name
            named = int(record["levels"][lv.name])
            # The cache serves executors from the train level; the others are read by delta.
            kw = kwargs if lv.name == fastest else {**kwargs, "cache_rows": 0}
            if writable:
                _roll_back(level_path, named, open)
                pools[lv.name] = open(level_path, "r+", **kw)
            else:
                pools[lv.name] = open(level_path, "r", at=named, **kw)
        ctx_kwargs = {k: v for k, v in kwargs.items() if k in ("device", "policy")}
        ctx_kwargs["cache_rows"] = 0
        first = pools[next(lv.name for lv in parsed if lv.persist)]
        ctx_kwargs["seed"] = first.seed
        ctx_kwargs["generator"] = first.generator
        ctx_kwargs["dtype"] = first.dtype
        for lv in parsed:
            if not lv.persist:
                pools[lv.name] = _context_pool(spec["rows"], spec["dim"], create, ctx_kwargs)
        pool = LevelledPool(root, spec, parsed, pools, head=int(record["id"]), writable=writable)
        pool._reopen = (open, kwargs)
        if writable:  # a reader never consolidates: only a writer needs the migration state
            try:
                pool._restore_state(record)
            except BaseException:
                pool.close()
                raise
        if writable and any(pools[n].head != c for n, c in record["levels"].items()):
            pool.commit("recover: level commits no root commit named were rolled back")
        return pool
    except BaseException:
        for p in pools.values():
            _close_level(p)
        raise


def _roll_back(level_path: Path, named: int, open: Any) -> None:
    """Undo a level's commits after ``named`` (a root commit that did not finish) by writing
    the rows they changed back to their values at ``named``, in one new commit."""
    store = PersistedStore.open(level_path, writable=False)
    try:
        head, head_index = store.load_head()
        if head == named:
            return
        if head < named:
            raise CorruptStoreError(
                f"{level_path}: the root log names commit {named} but the level's newest is "
                f"{head}; the level store lost commits"
            )
        old = store.load_index(named)
        new_ids, new_commits = head_index.ids, head_index.commit
        changed = np.union1d(new_ids[new_commits > named], np.setdiff1d(old.ids, new_ids))
    finally:
        store.close()
    if not len(changed):
        return
    ids = torch.from_numpy(changed.astype(np.int64))
    present = torch.from_numpy(old.contains(changed))
    with open(level_path, "r", at=named, cache_rows=0) as past:
        values = past.delta(ids)
    with open(level_path, "r+", cache_rows=0) as pool:
        if bool(present.any()):
            pool.write(ids[present], values[present])
        if bool((~present).any()):
            pool.drop(ids[~present])
        pool.commit(f"roll back to {named}: a root commit did not finish")


def _close_level(pool: Pool) -> None:
    pool.close()
    scratch = getattr(pool, "_dpsn_scratch", None)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


# -- the train level's base: generator + the other levels ---------------------------------------


class _LevelledBase(ProceduralTier):
    """The train level's procedural tier, with the other levels' summed deltas added to every
    base row it makes: the train level's cache then holds ``base + other levels + its own
    delta`` in each row, so a hot read of a levelled pool is the train level's one find-and-
    gather, whatever the number of levels (issue 23's cost aim).

    Why a procedural tier: the row stack already re-materializes every cached row from fresh
    bases when the generator's stamp changes; :meth:`invalidate` (a write, migration or
    rollback on another level) bumps a version in the stamp, so the next read re-materializes
    the cache once. The stamp's version part is not a weight change: a commit saves no
    generator for it (:meth:`changed_since_commit`). Deltas (the only thing a level stores)
    never include the other levels."""

    def __init__(self, inner: ProceduralTier, others: Any) -> None:
        self.__dict__.update(inner.__dict__)  # the same generator, weights and counters
        self.inner, self._others_of, self.version = inner, others, 1
        self.seen = (*inner.seen, 0)  # != stamp(): the cached rows get the levels at once
        self.saved = (*inner.saved, 0)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().__call__(ids)
        others = self._others_of(ids)
        return out if others is None else out.add_(others.to(out.device, out.dtype))

    def generate_into(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        super().generate_into(ids, out)
        others = self._others_of(ids)
        if others is not None:
            out.add_(others.to(out.device, out.dtype))

    def stamp(self) -> tuple[int, ...]:
        return (*super().stamp(), self.version)

    def changed_since_commit(self) -> bool:
        return self.stamp()[:-1] != tuple(self.saved)[:-1]

    def invalidate(self) -> None:
        """The other levels changed: re-materialize the cached rows at the next read."""
        self.version += 1


# -- the executor contract over levels ---------------------------------------------------------


class LevelBatch:
    """A :class:`dpsn.tiers.RowBatch` of the train level: what ``LevelledPool.page_in`` hands
    executors. Its rows are ``base + sum of levels`` (the train level's cached rows hold the
    other levels already, so ``table`` and ``index`` are the train level's own and nothing is
    copied; ``others``, when given, is added instead); its row step trains the train level
    only, damped by that level's inertia, scaled by its ``lr_scale``, and each row's update
    times ``held`` (``1 - hold`` of the slower levels that hold the row; None: no row held)."""

    def __init__(
        self,
        owner: LevelledPool,
        inner: RowBatch,
        others: torch.Tensor | None,
        held: torch.Tensor | None,
    ) -> None:
        self._owner, self._inner, self._others, self._held = owner, inner, others, held
        self.ids, self.counts, self.inverse = inner.ids, inner.counts, inner.inverse
        self.order, self.anchor, self.spilled = inner.order, inner.anchor, inner.spilled
        self.applied = False
        if others is None:  # the train level's rows hold the other levels already
            self.table, self.index = inner.table, inner.index
        else:
            self.table = (inner.rows().float() + others).to(inner.table.dtype)
            self.index = torch.arange(len(inner.ids), device=inner.ids.device)
        self._use_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def offsets(self) -> torch.Tensor:
        return self._inner.offsets

    @property
    def use_index(self) -> torch.Tensor:
        if self._others is None:
            return self._inner.use_index
        if self._use_index is None:
            self._use_index = self.index[self.inverse]
        return self._use_index

    def rows(self) -> torch.Tensor:
        return torch.index_select(self.table, 0, self.index)

    def deltas(self) -> torch.Tensor:
        """``[n, dim]`` float32: the sum of the rows' level deltas."""
        out = self._inner.deltas()
        others = self._others if self._others is not None else self._owner._others(self.ids)
        return out if others is None else out + others

    def apply_grads(
        self, grads: torch.Tensor, optimizer: Any, *, rows: torch.Tensor | None = None
    ) -> None:
        """The train level's row step (see :meth:`dpsn.tiers.RowBatch.apply_grads`; ``rows``
        restricts it to the rows it marks)."""
        if self.applied:
            from dpsn.tiers import SECOND_BACKWARD

            raise RuntimeError(SECOND_BACKWARD)
        self._owner._train_step(self._inner, grads, optimizer, self._held, rows)
        self.applied = True

    @property
    def writable(self) -> bool:
        """Whether the train level's rows may train (see ``RowBatch.writable``)."""
        return self._owner.writable

    def skip_step(self) -> None:
        """Count a row step the executor skipped (see ``RowBatch.skip_step``)."""
        self._owner.count_skipped_row_step()

    def regroup(self, ids: torch.Tensor) -> LevelBatch:
        """A new batch of ``ids`` over the same levels (see ``RowBatch.regroup``)."""
        return self._owner.page_in(ids)

    def release(self) -> None:
        self._inner.release()

    def __enter__(self) -> LevelBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- the levelled pool -------------------------------------------------------------------------


class LevelledPool:
    """Rows ``base + sum of level deltas`` over a levelled store (``dpsn.create(...,
    levels=[...])`` / ``dpsn.open``). Quacks like a :class:`Pool` for executors (``page_in``,
    ``set_state_width``, ``generator``, ``commit``, ``save_router``...): they train
    :attr:`train_level`. One thread drives it; usable as a context manager."""

    def __init__(
        self,
        root: Path,
        spec: dict[str, Any],
        levels: list[Level],
        pools: dict[str, Pool],
        *,
        head: int,
        writable: bool,
    ) -> None:
        self._root, self._spec, self._levels, self._pools = root, spec, levels, pools
        self._head, self._writable, self._closed = head, writable, False
        self._migration = mig.Migration.from_json(spec["migration"])
        persisted = [lv.name for lv in levels if lv.persist]
        self._persisted = persisted
        self._train = persisted[-1]
        self._state_width = 0
        regions = self._migration.regions
        self._windows = {lv.name: mig.Window(spec["dim"]) for lv in levels}
        self._trackers = {lv.name: mig.Tracker(regions, lv.inertia) for lv in levels}
        self._inflight: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending_migrations: list[dict[str, Any]] = []
        self._proj = mig.projection(spec["dim"], self._migration.bits, spec["seed"])
        self._memo_empty: bool | None = None  # see _others
        self._memo_ids = torch.zeros(0, dtype=torch.int64)
        self._memo_vals = torch.zeros((0, spec["dim"]))
        cache = pools[self._train].cache
        self._memo_keep = torch.zeros(0)
        # per level: (the tracker's inertia, lr_scale * (1 - inertia) per region), see _train_step
        self._region_keep: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._memo_table: mig.IdTable | None = None  # see _memo_find
        self._memo_limit = max(1 << 12, cache.capacity if cache is not None else 0)
        self._reopen: tuple[Any, dict[str, Any]] | None = None  # dpsn.open and its kwargs
        self._base: _LevelledBase | None = None  # installed on the train level (_install_base)
        self._install_base()

    # -- spec ----------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The levelled root's directory."""
        return self._root

    @property
    def rows(self) -> int:
        """Rows of the pool (every level has the same rows)."""
        return int(self._spec["rows"])

    @property
    def dim(self) -> int:
        """Width of a row (every level's)."""
        return int(self._spec["dim"])

    @property
    def seed(self) -> int:
        """The seed every level's base rows come from."""
        return int(self._spec["seed"])

    @property
    def uuid(self) -> str:
        """The root's uuid (its levels file records it)."""
        return str(self._spec["uuid"])

    @property
    def model_id(self) -> str | None:
        """The caller's model id, covered by the provenance hash (None when not given)."""
        return self._spec["model_id"]

    @property
    def config(self) -> dict[str, Any]:
        """The caller's config, covered by the provenance hash."""
        return dict(self._spec["config"])

    @property
    def migration_policy(self) -> mig.Migration:
        """The migration settings (caps, thresholds, hand-off) of this hierarchy."""
        return self._migration

    @property
    def levels(self) -> list[str]:
        """Level names, slowest first."""
        return [lv.name for lv in self._levels]

    def level_spec(self, name: str) -> Level:
        """The :class:`Level` settings of level ``name``."""
        return self._levels[self._index(name)]

    def level(self, name: str) -> Pool:
        """The single-level pool that holds level ``name``'s deltas (its base is the pool's)."""
        return self._pools[self.levels[self._index(name)]]

    @property
    def train_level(self) -> str:
        """The level executors train (default: the fastest persisted one). Settable to any
        level, a context level included."""
        return self._train

    @train_level.setter
    def train_level(self, name: str) -> None:
        self._check_open()
        self._uninstall_base()
        self._train = self.levels[self._index(name)]
        self._pools[self._train].set_state_width(self._state_width)
        self._install_base()
        self._changed()

    @property
    def _tp(self) -> Pool:
        return self._pools[self._train]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows are stored in."""
        return self._tp.dtype

    @property
    def device(self) -> torch.device:
        """The device the train level's cache lives on."""
        return self._tp.device

    @property
    def generator(self) -> Any:
        """The generator of the base rows (shared by all levels)."""
        return self._tp.generator

    @property
    def cache(self) -> Any:
        """The train level's device cache (None without one)."""
        return self._tp.cache

    @property
    def head(self) -> int:
        """The root commit this pool reads (and commits on top of)."""
        return self._head

    @property
    def writable(self) -> bool:
        """Whether this pool was opened for writing."""
        return self._writable

    @property
    def state_width(self) -> int:
        """Optimizer state values kept per row by the train level."""
        return self._tp.state_width

    @property
    def staged_rows(self) -> int:
        """Rows staged for the next commit, summed over the levels."""
        return sum(self._pools[n].staged_rows for n in self._persisted)

    @property
    def provenance(self) -> str:
        """The provenance hash of this pool's root commit: it covers the model id, the config
        and every persisted level's commit; use it as a cache key for results computed from
        this snapshot."""
        return str(self._record(self._head)["provenance"])

    def __repr__(self) -> str:
        return (
            f"LevelledPool({str(self._root)!r}, mode={'r+' if self._writable else 'r'}, "
            f"rows={self.rows}, dim={self.dim}, levels={self.levels}, "
            f"train_level={self._train!r}, commit={self._head})"
        )

    def _index(self, name: str) -> int:
        for i, lv in enumerate(self._levels):
            if lv.name == name:
                return i
        raise InvalidArgumentError(f"{self._root} has no level {name!r}; it has {self.levels}")

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._root}: this pool is closed")

    def _require_writable(self) -> None:
        self._check_open()
        if not self._writable:
            raise ReadOnlyError(
                f'{self._root} is open read-only; open it with dpsn.open(path, mode="r+")'
            )

    def _ids(self, ids: Any) -> torch.Tensor:
        self._check_open()
        return as_ids(ids, self.rows)

    # -- reading -------------------------------------------------------------------------------

    def _sum_levels(self, ids: torch.Tensor, skip: str) -> torch.Tensor | None:
        """Sum of the deltas of every level but ``skip`` (None: all of them are empty)."""
        return self._sum_and_hold(ids, skip)[0]

    def _sum_and_hold(
        self, ids: torch.Tensor, skip: str
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The sum of the deltas of every level but ``skip``, and each row's *hold*: the
        largest effective inertia among the levels slower than the train level that hold a
        delta for it (0: none). A row consolidated into a slow level resists the train level's
        updates as that level resists change: its row gradients are scaled by ``1 - hold``."""
        out = None
        hold = torch.zeros(len(ids))
        train = self._index(self._train)
        regions = None
        for i, name in enumerate(self.levels):
            if name == skip or not _has_deltas(self._pools[name]):
                continue
            d = self._pools[name].delta(ids).float()
            out = d if out is None else out + d
            if i < train:
                if regions is None:
                    regions = mig.regions_of(ids.cpu(), self.rows, self._migration.regions)
                has = (d != 0).any(dim=1).cpu()
                a = self._trackers[name].inertia[regions]
                hold = torch.maximum(hold, torch.where(has, a, torch.zeros_like(a)))
        return out, hold

    def _changed(self, level: str | None = None, ids: torch.Tensor | None = None) -> None:
        """A level other than the train level changed (None: any may have): the memo of the
        other levels' sum, and the train level's cached rows that include it, are stale. With
        ``ids`` only those rows changed: only they leave the memo and only their cached rows
        are re-made (the rest of the cache is not re-read); without, all of them."""
        if level == self._train:
            return
        if ids is None or self._base is None:
            self._memo_empty = None
            if self._base is not None:
                self._base.invalidate()
            return
        ids = torch.unique(ids.reshape(-1).cpu())
        if self._memo_empty is True:
            self._memo_empty = None  # the level may hold deltas now: the memo starts afresh
        elif self._memo_empty is False and len(self._memo_ids):
            stale = torch.isin(self._memo_ids, ids)
            if bool(stale.any()):  # the memo keeps its other rows (it stays sorted)
                fresh = ~stale
                dev = fresh.to(self.device)
                self._memo_ids = self._memo_ids[fresh]
                self._memo_vals = self._memo_vals[dev]
                self._memo_keep = self._memo_keep[dev]
        self._tp._stack.refresh_cached_bases(ids)

    def _install_base(self) -> None:
        """Make the train level's base rows ``generator + the other levels`` (see
        :class:`_LevelledBase`), where there are other levels."""
        if len(self._levels) < 2:
            return
        stack = self._tp._stack
        base = _LevelledBase(stack.procedural, self._sum_for_base)
        stack.procedural = base
        self._base = base

    def _uninstall_base(self) -> None:
        """Give the train level back its own procedural tier (its cached rows re-made from
        the generator alone at the next read)."""
        if self._base is None:
            return
        stack = self._tp._stack
        inner = self._base.inner
        inner.rows_generated = self._base.rows_generated
        inner.seen = ()  # != stamp(): re-materialize
        stack.procedural = inner
        self._base = None

    def _sum_for_base(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The other levels' summed deltas for base rows the train level makes."""
        if self._closed:
            return None
        flat = ids.reshape(-1).cpu()
        return self._sum_levels(flat, self._train) if len(flat) else None

    def _memo_positions(self, flat: torch.Tensor) -> torch.Tensor | None:
        """Positions of ``flat``'s ids in the memo of the other levels' summed deltas and
        holds (None: the other levels are all empty), filling it with the missing ids first.
        The memo keeps the rows asked for since the other levels last changed (they change
        only through this pool: writes, migrations, commits), so that a hot read costs one
        more gather, not one read per level."""
        if self._memo_empty is None:
            others = (n for n in self.levels if n != self._train)
            self._memo_empty = not any(_has_deltas(self._pools[n]) for n in others)
            self._memo_ids = torch.zeros(0, dtype=torch.int64)
            self._memo_vals = torch.zeros((0, self.dim), device=self.device)
            self._memo_keep = torch.zeros(0, device=self.device)
        if self._memo_empty:
            return None
        ids = flat.cpu()
        pos, hit = self._memo_find(ids)
        if not bool(hit.all()):
            miss = torch.unique(ids[~hit])
            vals, hold = self._sum_and_hold(miss, self._train)
            assert vals is not None  # some other level holds deltas (_memo_empty is False)
            keep = (self._memo_ids, self._memo_vals, self._memo_keep)
            if len(keep[0]) + len(miss) > self._memo_limit:
                keep = (keep[0][:0], keep[1][:0], keep[2][:0])
            merged = torch.cat([keep[0], miss])
            order = torch.argsort(merged)
            dev_order = order.to(self.device)
            self._memo_ids = merged[order]
            self._memo_vals = torch.cat([keep[1], vals.to(self.device)])[dev_order]
            # a row's update factor, 1 - hold (1 where the hold is below _HOLD_MIN)
            factor = torch.where(hold > _HOLD_MIN, 1.0 - hold, torch.ones_like(hold))
            self._memo_keep = torch.cat([keep[2], factor.to(self.device)])[dev_order]
            pos, hit = self._memo_find(ids)
        return pos.to(self.device)

    def _memo_find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mig.lookup(self._memo_ids, ids)`` through a hash table built once per memo (the
        memo changes only when rows are added to it or leave it)."""
        table = self._memo_table
        if table is None or table.ids is not self._memo_ids:
            table = self._memo_table = mig.IdTable(self._memo_ids)
        return table.find(ids)

    def _others(self, flat: torch.Tensor) -> torch.Tensor | None:
        """``[len(flat), dim]``: the sum of every level's delta but the train level's (None:
        they are all empty), on the pool's device."""
        pos = self._memo_positions(flat)
        return None if pos is None else torch.index_select(self._memo_vals, 0, pos)

    @torch.no_grad()
    def base(self, ids: Any) -> torch.Tensor:
        """The base rows of ``ids`` (the generator's, below every level's delta)."""
        if self._base is None:
            return self._tp.base(ids)
        other = next(n for n in self.levels if n != self._train)
        return self._pools[other].base(ids)  # a level whose base is the generator's alone

    @torch.no_grad()
    def delta(self, ids: Any, level: str | None = None) -> torch.Tensor:
        """One level's deltas (``level=``), or the sum of every level's (None)."""
        full = self._ids(ids)
        if level is not None:
            return self.level(level).delta(full)
        flat = full.reshape(-1)
        out = torch.zeros((len(flat), self.dim), device=self.device)
        for name in self.levels:
            if _has_deltas(self._pools[name]):
                out += self._pools[name].delta(flat).float()
        return out.to(self.dtype).reshape(*full.shape, self.dim)

    @torch.no_grad()
    def read(self, ids: Any) -> torch.Tensor:
        """Rows ``base + sum of level deltas``, ``[*ids.shape, dim]``: the train level's rows,
        whose base includes the other levels (one find-and-gather when cached)."""
        full = self._ids(ids)
        flat = full.reshape(-1)
        out = self._tp.read(flat)  # the train level's rows hold the other levels (_LevelledBase)
        return out.reshape(*full.shape, self.dim)

    # -- the executor contract -----------------------------------------------------------------

    def page_in(self, ids: Any) -> LevelBatch:
        """The executor contract (``Pool.page_in``) over levels: see :class:`LevelBatch`."""
        self._check_open()
        inner = self._tp.page_in(ids)  # which checks the ids (as Pool.page_in)
        if not self._may_hold():
            return LevelBatch(self, inner, None, None)
        try:
            pos = self._memo_positions(inner.ids)
        except BaseException:
            inner.release()
            raise
        if pos is None:
            return LevelBatch(self, inner, None, None)
        held = torch.index_select(self._memo_keep, 0, pos)
        return LevelBatch(self, inner, None, held if bool((held < 1).any()) else None)

    def _may_hold(self) -> bool:
        """Whether some level slower than the train level resists change (its effective
        inertia is above 0 somewhere): only then does a batch need its rows' holds."""
        train = self._index(self._train)
        slower = self._levels[:train]
        return any(self._trackers[lv.name].max_inertia > _HOLD_MIN for lv in slower)

    def set_state_width(self, width: int) -> None:
        """Per-row optimizer state beside the train level's deltas (and any level trained
        later)."""
        self._check_open()
        self._state_width = width
        self._tp.set_state_width(width)

    enable_row_state = set_state_width

    def count_skipped_row_step(self) -> None:
        """Count a row step the executor skipped (non-finite gradients) on the train level."""
        self._tp.count_skipped_row_step()

    def _train_step(
        self,
        inner: RowBatch,
        grads: torch.Tensor,
        optimizer: Any,
        held: torch.Tensor | None,
        rows: Any = None,
    ) -> None:
        """The row step of one batch on the train level. Each row's *update* is scaled by
        ``lr_scale * (1 - a_eff)`` of its region times ``1 - hold`` (the inertia of the slower
        levels that hold the row, see :meth:`_sum_and_hold`): ``RowBatch.apply_grads(scale=)``,
        inside the step (the native loops' per-row learning rate), so it damps Adagrad's and
        Adam's steps too (they normalise a gradient by its size, so a scaled *gradient* would
        not damp them at all) and costs no gather or write. The optimizer state is updated as
        if the row were free (it sees the whole gradient); only the delta's change is damped.
        The window records minus the gradients times that scale as the rows' update direction:
        no extra read of the deltas (a step's cost stays the optimizer's). ``held``: each row's
        ``1 - hold`` (see :meth:`page_in`; None: no row is held)."""
        name = self._train
        lv = self._levels[self._index(name)]
        tracker = self._trackers[name]
        keep = None  # each row's update scale (None: every row takes the whole step)
        if lv.lr_scale != 1.0 or tracker.any_inertia:
            per_region = self._region_keep.get(name)
            if per_region is None or per_region[0] is not tracker.inertia:
                per_region = (tracker.inertia, lv.lr_scale * (1.0 - tracker.inertia))
                self._region_keep[name] = per_region
            region = mig.regions_of(inner.ids.cpu(), self.rows, self._migration.regions)
            keep = per_region[1][region]
        if held is not None:  # rows consolidated into slower levels resist as those levels do
            h = held.to("cpu", torch.float32)
            keep = h if keep is None else keep * h
        counters = self._tp._stack.counters
        skipped = counters["skipped_row_steps"]
        inner.apply_grads(grads, optimizer, rows=rows, scale=keep)
        if counters["skipped_row_steps"] != skipped:
            return  # not finite: skipped (and counted), nothing moved, the window records none
        self._windows[name].add(inner.ids, grads, inner.counts, sign=-1.0, scale=keep, rows=rows)

    # -- writing -------------------------------------------------------------------------------

    def _level_for_write(self, level: str | None) -> str:
        self._require_writable()
        return self._train if level is None else self.levels[self._index(level)]

    @torch.no_grad()
    def write(self, ids: Any, deltas: Any, *, level: str | None = None, add: bool = False) -> None:
        """Stage deltas on one level (default: the train level), as ``Pool.write``; the change
        joins that level's migration window."""
        name = self._level_for_write(level)
        pool = self._pools[name]
        full = as_ids(ids, self.rows)
        values = as_deltas(deltas, full.shape, self.dim, self.dtype)
        flat = full.reshape(-1)
        if values.shape[0] == 0:
            return
        uniq, inv = torch.unique(flat, return_inverse=True)
        before = pool.delta(uniq).float()
        pool.write(flat, values, add=add)
        self._changed(name, uniq)
        uses = torch.bincount(inv, minlength=len(uniq))
        self._windows[name].add(uniq, pool.delta(uniq).float() - before, uses)

    def drop(self, ids: Any, *, level: str | None = None) -> None:
        """Return rows of one level (default: the train level) to zero delta at the commit."""
        name = self._level_for_write(level)
        full = as_ids(ids, self.rows)
        self._pools[name].drop(full)
        self._changed(name, full)

    def clear_level(self, name: str) -> None:
        """Empty a level. A context level forgets everything at once; a persisted level forgets
        its uncommitted changes and drops every persisted row at the next commit."""
        self._require_writable()
        name = self.levels[self._index(name)]
        pool = self._pools[name]
        self._windows[name].clear()
        self._changed(name)
        pool.discard()
        if self.level_spec(name).persist:
            ids = pool.persisted_ids()
            if len(ids):
                pool.drop(torch.from_numpy(ids))

    def discard(self) -> None:
        """Forget every uncommitted change on every level, and go back to the migration state
        of the head root commit (windows, signatures, hand-offs)."""
        for pool in self._pools.values():
            pool.discard()
        self._changed()
        if self._writable:
            self._restore_state(self._record(self._head))
        else:
            for w in self._windows.values():
                w.clear()
            self._pending_migrations.clear()

    # -- consolidation and migration -----------------------------------------------------------

    def consolidate(self) -> dict[str, Any]:
        """Fold each level's window into its inertia and signatures, and migrate what is stable
        one level down, within each channel's cap (see :class:`dpsn.Migration`). Changes are
        staged; the next commit makes them durable and records the migrations. Returns what
        each channel did."""
        self._require_writable()
        policy = self._migration
        reduced: dict[str, tuple[Any, Any, int]] = {}
        for lv in self._levels:
            w = self._windows[lv.name]
            upd, uses = w.updates(), w.uses()
            reduced[lv.name] = (upd, uses, w.steps)
            tr = self._trackers[lv.name]
            tr.advance(upd[0], upd[1], self._proj, policy.tau_stable)
            dens = mig.density(upd[0], upd[1], uses[0], uses[1], w.steps, self.rows, policy.regions)
            tr.inertia = mig.effective_inertia(lv.inertia, dens, lv.inertia_k)
            tr.health["entropy_ratio"] = mig.entropy_ratio(
                upd[0], upd[1], self.rows, policy.regions, policy.entropy_target
            )
            w.clear()
        self._memo_empty = None  # the memo's holds follow the inertia just folded in
        out: dict[str, Any] = {"channels": []}
        persisted = self._persisted
        for ch in range(len(persisted) - 1):
            fast, slow = persisted[-1 - ch], persisted[-2 - ch]
            out["channels"].append(self._channel(ch, fast, slow, reduced))
        return out

    def _channel(
        self, ch: int, fast: str, slow: str, reduced: dict[str, tuple[Any, Any, int]]
    ) -> dict[str, Any]:
        policy = self._migration
        (f_upd, f_uses, steps), (s_upd, _, _) = reduced[fast], reduced[slow]
        busy_ids, busy_left = self._inflight.get(
            ch, (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        )
        plan = mig.plan_channel(
            policy, ch, self.rows, self._trackers[fast], f_upd, f_uses, steps, s_upd, busy_ids
        )
        fp, sp = self._pools[fast], self._pools[slow]
        if len(plan.conflicts):  # damp the fast level where it opposes the slower one
            fp.write(plan.conflicts, -policy.conflict_damp * plan.conflict_updates, add=True)
            self._changed(fast, plan.conflicts)
        started = torch.cat([plan.normal, plan.bypassed])
        ids = torch.cat([busy_ids, started])
        left = torch.cat([busy_left, torch.full((len(started),), policy.handoff)])
        order = torch.argsort(ids)
        ids, left = ids[order], left[order]
        moved_done = 0
        if len(ids):
            part = mig.handoff_part(fp.delta(ids).float(), left)
            done = left <= 1
            keep = ~done
            if bool(keep.any()):
                fp.write(ids[keep], -part[keep], add=True)
            if bool(done.any()):
                fp.drop(ids[done])
            sp.write(ids, part, add=True)
            self._changed(fast, ids)
            self._changed(slow, ids)
            # arrivals are the slower level's updates: a row that keeps arriving the same way
            # becomes stable there too and moves on down, a little at a time
            upos, uhit = mig.lookup(f_uses[0], ids)
            used = torch.where(uhit, f_uses[1][upos] if len(f_uses[0]) else 0.0, 0.0)
            self._windows[slow].add(ids, part, used)
            moved_done = int(done.sum())
            self._inflight[ch] = (ids[keep], left[keep] - 1)
        tracker = self._trackers[fast]
        tracker.health["migration_backlog"] = plan.backlog
        tracker.health["conflict_rate"] = len(plan.conflicts) / max(1, plan.compared)
        record = {
            "from": fast,
            "to": slow,
            "rows": len(started),
            "bypasses": len(plan.bypassed),
            "completed": moved_done,
            "in_flight": len(self._inflight.get(ch, (ids,))[0]),
            "conflicts": len(plan.conflicts),
            "backlog": plan.backlog,
            "cap": policy.cap_rows(ch, self.rows),
            "bypass_cap": policy.bypass_rows(ch, self.rows),
            "pressure": [float(plan.pressure.min()), float(plan.pressure.max())]
            if len(plan.pressure)
            else None,
        }
        if record["rows"] or record["completed"] or record["conflicts"] or record["backlog"]:
            self._pending_migrations.append(record)  # the log keeps what did something
        return record

    def migrations(self) -> list[dict[str, Any]]:
        """Every recorded migration, oldest first: commit, from, to, rows (started), bypasses,
        pressure range [min, max], completed hand-offs, conflicts, backlog, the caps."""
        self._check_open()
        out = []
        for rec in self._log()["commits"]:
            for m in rec.get("migrations", []):
                out.append({"commit": rec["id"], **m})
        return out

    # -- history -------------------------------------------------------------------------------

    def _log(self) -> dict[str, Any]:
        return read_sealed(self._root / LOG_FILE)

    def _record(self, commit: int) -> dict[str, Any]:
        return self._log()["commits"][commit - 1]

    def commit(self, message: str = "") -> dict[str, Any]:
        """Commit every persisted level, then name their commits in one new root commit
        (written atomically): one root commit pins every level. Context levels are never
        committed. A consolidation runs first when ``Migration.consolidate_every`` says so and
        some level was updated since the last one.
        Returns the root commit record."""
        self._require_writable()
        if not isinstance(message, str):
            raise TypeError("commit message must be a str")
        every = self._migration.consolidate_every
        idle = all(w.empty for w in self._windows.values())
        if every and (self._head + 1) % every == 0 and not idle:
            self.consolidate()  # an idle commit (a crash's "recover") would break every streak
        log = self._log()
        parent = log["commits"][-1]
        if parent["id"] != self._head:
            raise CorruptStoreError(f"{self._root}: the root log moved under the writer")
        level_commits, level_prov = {}, {}
        others = (self._pools[n] for n in self._persisted if n != self._train)
        if any(p.lifecycle is not None for p in others):
            self._changed()  # a level's own lifecycle may decay or prune at its commit
        for name in self._persisted:
            rec = self._pools[name].commit(message)
            level_commits[name], level_prov[name] = rec.id, rec.provenance
        migrations, self._pending_migrations = self._pending_migrations, []
        state = self._save_state(parent["id"] + 1)
        health = {
            name: {k: v for k, v in figures.items() if k in HEALTH_KEYS}
            for name, figures in self.stats()["levels"].items()
        }
        record = {
            "id": parent["id"] + 1,
            "parent": parent["id"],
            "time": time.time(),
            "message": message,
            "levels": level_commits,
            "migrations": migrations,
            "health": health,  # as of this commit; informational (not in the provenance)
            "state": state,  # the migration state to go on from (see _save_state)
            "provenance": provenance(
                parent["provenance"], spec_of(self._spec), level_prov, migrations
            ),
        }
        log["commits"].append(record)
        write_atomic(self._root / LOG_FILE, log)
        self._head = record["id"]
        levels_format.prune_states(self._root, self._head)
        return record

    def _save_state(self, commit: int) -> dict[str, Any]:
        """Write the migration state (each persisted level's window and tracker, the hand-offs
        in flight) for root commit ``commit`` and return the record the root commit keeps: a
        writer that reopens this commit goes on exactly as one that never stopped. Context
        levels start afresh at every open and are not saved."""
        parts: dict[str, np.ndarray] = {}
        for name in self._persisted:
            parts.update(mig.window_to_parts(self._windows[name], f"w/{name}/"))
            parts.update(mig.tracker_to_parts(self._trackers[name], f"t/{name}/"))
        channels = len(self._persisted) - 1
        for ch in range(channels):
            ids, left = self._inflight.get(ch, (torch.zeros(0, dtype=torch.int64),) * 2)
            parts[f"h/{ch}/ids"] = ids.numpy()
            parts[f"h/{ch}/left"] = left.numpy().astype(np.int64)
        record = levels_format.write_state(self._root, commit, parts)
        record["levels"] = list(self._persisted)
        record["health"] = {n: dict(self._trackers[n].health) for n in self._persisted}
        return record

    def _restore_state(self, record: dict[str, Any]) -> None:
        """Load the migration state root commit ``record`` saved (a store written before
        states were saved has none: it starts afresh), checked as untrusted input: a damaged or
        inconsistent state is a ``CorruptStoreError`` naming what is wrong."""
        for w in self._windows.values():
            w.clear()
        regions, policy = self._migration.regions, self._migration
        self._trackers = {lv.name: mig.Tracker(regions, lv.inertia) for lv in self._levels}
        self._inflight = {}
        self._pending_migrations = []
        self._changed()
        state = record.get("state")
        if state is None:
            return
        parts = levels_format.read_state(self._root, state)
        if state.get("levels") != self._persisted or not isinstance(state.get("health"), dict):
            raise CorruptStoreError(
                f"{self._root}: the migration state of root commit {record['id']} names levels "
                f"{state.get('levels')!r:.200}, not the spec's persisted {self._persisted}"
            )
        for lv in self._levels:
            if not lv.persist:
                continue
            self._windows[lv.name] = mig.window_from_parts(
                parts, f"w/{lv.name}/", self.dim, self.rows
            )
            self._trackers[lv.name] = mig.tracker_from_parts(
                parts,
                f"t/{lv.name}/",
                state["health"].get(lv.name),
                rows=self.rows,
                bits=policy.bits,
                regions=regions,
                a_base=lv.inertia,
            )
        for ch in range(len(self._persisted) - 1):
            ids, left = mig.inflight_from_parts(parts, f"h/{ch}/", self.rows, policy.handoff)
            if len(ids):
                self._inflight[ch] = (ids, left)

    def refresh(self) -> int:
        """Move a read-only pool to the newest root commit; returns it (a writer's head is
        already the newest). Each level is reopened at the commit that root commit names (a
        level store's own newest commit may be one no root commit names yet), so the train
        level's cache starts cold."""
        self._check_open()
        if self._writable:
            return self._head
        record = self._log()["commits"][-1]
        if int(record["id"]) == self._head:
            return self._head
        assert self._reopen is not None  # a read-only pool comes from open_levelled
        open_, kwargs = self._reopen
        fresh: dict[str, Pool] = {}
        try:
            for name in self._persisted:
                kw = kwargs if name == self._persisted[-1] else {**kwargs, "cache_rows": 0}
                level_path = self._root / LEVELS_DIR / name
                fresh[name] = open_(level_path, "r", at=int(record["levels"][name]), **kw)
        except BaseException:
            for p in fresh.values():
                p.close()
            raise
        self._uninstall_base()
        for name, p in fresh.items():
            self._pools[name].close()
            self._pools[name] = p
        self._pools[self._train].set_state_width(self._state_width)
        self._install_base()
        self._head = int(record["id"])
        self._changed()
        for w in self._windows.values():
            w.clear()
        return self._head

    def persisted_ids(self) -> np.ndarray:
        """Sorted ids of the rows some persisted level holds a delta for at this pool's root
        commit (what ``dpsn export --rows persisted`` exports)."""
        self._check_open()
        ids = [self._pools[n].persisted_ids() for n in self._persisted]
        return np.unique(np.concatenate(ids)).astype(np.int64) if ids else np.zeros(0, np.int64)

    def log(self) -> list[dict[str, Any]]:
        """Every root commit, oldest first: id, parent, time, message, levels (name -> the
        level store's commit), migrations, provenance."""
        self._check_open()
        return self._log()["commits"]

    def snapshot(self, name: str) -> dict[str, Any]:
        """Pin this root commit under ``name``: every level's commit is pinned in its store
        (``levels.<name>``, so gc keeps it) and the root log names it."""
        self._require_writable()
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"a snapshot name is a non-empty str, got {name!r}")
        record = self._record(self._head)
        for level, commit in record["levels"].items():
            if self._pools[level].head != commit:
                raise CorruptStoreError(f"level {level!r} moved past root commit {self._head}")
            self._pools[level].snapshot(SNAPSHOT_PREFIX + name)
        log = self._log()
        log["snapshots"][name] = self._head
        write_atomic(self._root / LOG_FILE, log)
        return record

    def snapshots(self) -> dict[str, int]:
        """Snapshots of the hierarchy: name -> root commit."""
        self._check_open()
        return dict(self._log()["snapshots"])

    # -- health --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The train level's counters (as ``Pool.stats``), and under ``"levels"`` per level:
        ``screening_rate`` (its lifecycle's; None without one), ``entropy_ratio``,
        ``migration_backlog``, ``conflict_rate``, ``effective_inertia`` (mean over regions,
        with ``inertia_range``), ``persisted_rows``, ``staged_rows`` and its lifecycle's health
        where it has one."""
        self._check_open()
        out = self._tp.stats()
        out["train_level"] = self._train
        levels: dict[str, Any] = {}
        for lv in self._levels:
            pool, tr = self._pools[lv.name], self._trackers[lv.name]
            lc = pool.stats().get("lifecycle") if pool.lifecycle is not None else None
            levels[lv.name] = {
                "persist": lv.persist,
                "screening_rate": None if lc is None else lc.get("screening_rate"),
                "entropy_ratio": tr.health["entropy_ratio"],
                "migration_backlog": tr.health["migration_backlog"],
                "conflict_rate": tr.health["conflict_rate"],
                "effective_inertia": float(tr.inertia.mean()),
                "inertia_range": [float(tr.inertia.min()), float(tr.inertia.max())],
                "persisted_rows": len(pool.persisted_ids()),
                "staged_rows": pool.staged_rows,
                "lifecycle": lc,
            }
        out["levels"] = levels
        return out

    def info(self) -> dict[str, Any]:
        """The root's spec and commit, and each persisted level's ``Pool.info()``."""
        self._check_open()
        return {
            "path": str(self._root),
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "rows": self.rows,
            "dim": self.dim,
            "seed": self.seed,
            "model_id": self.model_id,
            "config": self.config,
            "levels": [lv.to_json() for lv in self._levels],
            "train_level": self._train,
            "commit": self._head,
            "provenance": self.provenance,
            "level_info": {n: self._pools[n].info() for n in self._persisted},
        }

    def verify(self, progress: Any = None) -> VerifyReport:
        """Verify every persisted level's store, and recompute the root provenance chain: each
        root commit's hash from its parent's, the model id and config, the provenance of every
        level commit it names (read from the level store) and its migration records. Problems
        are reported, never raised."""
        self._check_open()
        report: VerifyReport | None = None
        for name in self._persisted:
            r = self._pools[name].verify(progress)
            r.problems[:] = [f"level {name!r}: {p}" for p in r.problems]
            if report is None:
                report = r
            else:
                report.problems.extend(r.problems)
        assert report is not None
        report.problems.extend(verify_root(self._root))
        return report

    # -- maintenance ---------------------------------------------------------------------------

    def gc(self, **kwargs: Any) -> dict[str, Any]:
        """``Pool.gc`` on every persisted level (named root snapshots are pinned there)."""
        self._require_writable()
        return {n: self._pools[n].gc(**kwargs) for n in self._persisted}

    def compact(self, **kwargs: Any) -> dict[str, Any]:
        """``Pool.compact`` on every persisted level, then a root commit naming the results."""
        self._require_writable()
        out = {n: self._pools[n].compact(**kwargs) for n in self._persisted}
        self.commit("compact")
        return out

    # -- routers (kept with the slowest persisted level) ----------------------------------------

    def save_router(self, name: str, router: torch.nn.Module) -> None:
        """Save a router with the hierarchy (in the slowest persisted level's commit)."""
        self._require_writable()
        self._pools[self._persisted[0]].save_router(name, router)

    def routers(self) -> dict[str, dict[str, Any]]:
        """Routers saved with the hierarchy: name -> record."""
        return self._pools[self._persisted[0]].routers()

    def load_router(self, name: str) -> torch.nn.Module:
        """The router saved as ``name`` (see :meth:`dpsn.Pool.load_router`)."""
        return self._pools[self._persisted[0]].load_router(name)

    def save_module(self, name: str, config: dict[str, Any]) -> None:
        """Keep a module's configuration with the hierarchy (in the slowest level's commit,
        beside the routers): see :meth:`dpsn.Pool.save_module`."""
        self._require_writable()
        self._pools[self._persisted[0]].save_module(name, config)

    def modules(self) -> dict[str, dict[str, Any]]:
        """Module configurations saved with the hierarchy's commit: name -> config."""
        return self._pools[self._persisted[0]].modules()

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every level (uncommitted changes are discarded; context levels vanish)."""
        if self._closed:
            return
        self._closed = True
        self._base = None
        for pool in self._pools.values():
            _close_level(pool)

    def __enter__(self) -> LevelledPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# A hold below this (less than 1% damping) is not applied: a batch whose holds are all below
# it steps without an update scale, for a change below what a step's noise moves.
_HOLD_MIN = 0.01


def _has_deltas(pool: Pool) -> bool:
    """Whether a level pool may hold a non-zero delta: persisted rows or staged changes."""
    return pool.staged_rows > 0 or pool.persisted_rows > 0
