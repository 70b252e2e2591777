"""``Pool``: rows as users see them, ``base(i) + delta(i)``, over the tier stack.

The pool validates what users hand it and delegates: rows to the tier stack
(``dpsn.tiers.RowStack``: device cache, host staging, persisted store, procedural generator),
history to the persisted store, routers to a small shelf. It holds no storage logic of its own.

Generator staleness (the cache keeps each trained row's base beside its delta):

- frozen generator (the default): every read checks the weights' version counters; after an
  in-place change (an optimizer step, ``load_state_dict``) all cached rows are re-materialized
  once, from fresh bases and their cached deltas;
- trainable generator (any parameter with ``requires_grad``): bases are regenerated on every
  read from the current weights and only the cached deltas are used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpsn.errors import (
    BatchTooLargeError,
    DpsnError,
    InvalidArgumentError,
    LifecycleError,
    ReadOnlyError,
    SnapshotExistsError,
)
from dpsn.hypernet import Generator
from dpsn.store import Commit, PersistedStore, RowLookup, VerifyReport
from dpsn.tiers import (
    CoUse,
    DeviceCache,
    Prefetch,
    ProceduralTier,
    RowBatch,
    RowStack,
    check_policy,
    load_generator,
)

from . import _couse_files
from ._lifecycle import Lifecycle, LifecycleRunner
from ._routers import RouterShelf
from ._validate import as_deltas, as_ids

CACHE_BYTES = 64 << 20  # default cache size when cache_rows is not given
MISS_PARTNERS = 2  # co-use partners a cache miss pages in (prefetch_partners_on_miss)
_UNSET: Any = object()


def default_cache_rows(dim: int, dtype: torch.dtype) -> int:
    """Rows of a ~64 MiB cache: each holds its row and, once trained, its delta and base."""
    row = dim * (2 * dtype.itemsize + 4)
    return max(1024, CACHE_BYTES // row)


class Pool:
    """A pool of rows backed by a store. Obtain one with :func:`dpsn.create` or :func:`dpsn.open`.

    One thread drives a pool (reads, writes, commits); a prefetch runs on a helper thread and is
    serialised with it. Usable as a context manager; ``close()`` releases the writer lock and
    discards uncommitted changes.
    """

    def __init__(
        self,
        store: PersistedStore,
        *,
        commit: int,
        index: RowLookup,
        device: str | torch.device | None = None,
        cache_rows: int | None = None,
        policy: str = "lru",
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self._store = store
        # the pool's own flag, set by close(): a step checks it without a call into the store
        self._closed = store.closed
        m = store.manifest
        device = torch.device(device) if device is not None else torch.device("cpu")
        check_policy(policy)  # a typo is an error even where no cache is built
        if cache_rows is None:
            cache_rows = default_cache_rows(m.dim, getattr(torch, m.dtype))
        if isinstance(cache_rows, bool) or not isinstance(cache_rows, int) or cache_rows < 0:
            raise ValueError(f"cache_rows must be a non-negative int, got {cache_rows!r}")
        if lifecycle is not None and not isinstance(lifecycle, Lifecycle):
            raise TypeError(f"lifecycle= takes a dpsn.Lifecycle, got {type(lifecycle).__name__}")
        record = store.commit_record(commit)
        procedural: ProceduralTier
        if m.base is not None:  # an overlay: base rows (and generator) are its base store's
            from ._overlay import overlay_tier

            procedural = overlay_tier(m, device)
        else:
            procedural = ProceduralTier(load_generator(store, record.generator, device))
        self._stack = RowStack(
            store,
            commit=commit,
            index=index,
            procedural=procedural,
            dtype_name=m.dtype,
            device=device,
            cache_rows=cache_rows,
            policy=policy,
        )
        self._routers = RouterShelf(store)
        # co-activation statistics: on once saved with a commit, or turned on by track_couse()
        self._couse: CoUse | None = _couse_files.load(store.root, commit, m.rows)
        self._miss_partners: tuple[int, int | None] = (MISS_PARTNERS, None)  # (k, limit)
        self._wire_miss_advice()
        self._load_protected(record)
        self._modules: dict[str, dict[str, Any]] = {}  # configurations to save at commit
        self._lifecycle: LifecycleRunner | None = None
        self._lifecycle_given = lifecycle is not None  # else the store's policy is followed
        if lifecycle is not None or record.lifecycle is not None:
            self._lifecycle = LifecycleRunner(
                self._stack,
                rows=m.rows,
                policy=lifecycle,
                saved=record.lifecycle,
                writable=store.writable,
            )

    # -- spec ----------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The store's directory."""
        return self._store.root

    @property
    def rows(self) -> int:
        """Virtual rows of the pool (ids run from 0 to ``rows - 1``)."""
        return self._store.manifest.rows

    @property
    def dim(self) -> int:
        """Width of a row."""
        return self._store.manifest.dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows are stored and served in."""
        return self._stack.dtype

    @property
    def seed(self) -> int:
        """The pool seed every base row is derived from."""
        return self._store.manifest.seed

    @property
    def uuid(self) -> str:
        """The store's identity (fixed at create): tells two stores at one path apart."""
        return self._store.manifest.uuid

    @property
    def device(self) -> torch.device:
        """Where the cache lives and rows are served."""
        return self._stack.device

    @property
    def base_store(self) -> dict[str, Any] | None:
        """For an overlay, its base: ``{"path", "uuid", "commit", "snapshot"}``; else None."""
        base = self._store.manifest.base
        return dict(base) if base is not None else None

    def delta_ids(self) -> torch.Tensor:
        """Sorted int64 ids of every row with a persisted delta at this pool's commit
        (uncommitted changes are not included)."""
        self._check_open()
        return torch.from_numpy(self._stack.index.ids.astype("int64", copy=True))

    @property
    def generator(self) -> Generator:
        """The generator module. Frozen by default; see the module docstring before training it."""
        return self._stack.procedural.generator

    @property
    def head(self) -> int:
        """The commit this pool reads (and, when writable, commits on top of)."""
        return self._stack.head

    @property
    def writable(self) -> bool:
        """Whether this pool holds the writer lock (``mode="r+"``)."""
        return self._store.writable

    @property
    def cache(self) -> DeviceCache | None:
        """The device cache (None with ``cache_rows=0``)."""
        return self._stack.cache

    @property
    def staged_rows(self) -> int:
        """Rows changed since the last commit (staged on the host or dirty in the cache)."""
        return self._stack.staged_rows()

    @property
    def state_width(self) -> int:
        """Float32 values of per-row state kept beside each delta (a row optimizer's)."""
        return self._stack.layout.state_width

    def __repr__(self) -> str:
        mode = "r+" if self.writable else "r"
        cache = self.cache.capacity if self.cache is not None else 0
        return (
            f"Pool({str(self.path)!r}, mode={mode!r}, rows={self.rows}, dim={self.dim}, "
            f"dtype={self.dtype}, commit={self.head}, persisted={len(self._stack.index)}, "
            f"device={self.device}, cache_rows={cache})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: this pool is closed")

    def _require_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise ReadOnlyError(
                f'{self.path} is open read-only (mode="r" or a snapshot view); '
                'open it with dpsn.open(path, mode="r+") to change it'
            )

    def _ids(self, ids: Any) -> torch.Tensor:
        self._check_open()
        return as_ids(ids, self.rows)

    # -- reading -------------------------------------------------------------------------------

    @torch.no_grad()
    def base(self, ids: Any) -> torch.Tensor:
        """Procedural rows only (no deltas): what an untrained row looks like."""
        full = self._ids(ids)
        out = self._stack.base(full.reshape(-1)).to(self.dtype)
        return out.reshape(*full.shape, self.dim)

    @torch.no_grad()
    def delta(self, ids: Any) -> torch.Tensor:
        """The learned part of rows (zeros for procedural rows), wherever it currently lives."""
        full = self._ids(ids)
        out = self._stack.delta(full.reshape(-1)).to(self.dtype)
        return out.reshape(*full.shape, self.dim)

    @torch.no_grad()
    def read(self, ids: Any) -> torch.Tensor:
        """Rows ``base + delta`` for ids of any shape: ``[*ids.shape, dim]`` in the pool dtype on
        the pool's device.

        With a cache, the batch's rows are paged in (misses filled in one batch, each distinct
        id once) and stay pinned against eviction until the next ``read`` (the step in flight).
        A batch with more distinct ids than the cache can hold is still served, from the lower
        tiers (``stats()["spilled_batches"]`` counts them).
        """
        full = self._ids(ids)
        _check_batch_memory(full.numel(), self.dim, self.dtype)
        try:
            out = self._stack.read(full.reshape(-1))
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
                raise
            raise BatchTooLargeError(
                f"reading {full.numel()} rows of width {self.dim} at once ran out of memory "
                f"({str(e)[:200]}); read them in smaller batches"
            ) from e
        return out.reshape(*full.shape, self.dim)

    def prefetch(self, ids: Any, *, partners: int = 0) -> Prefetch:
        """Page rows in ahead of the ``read`` that needs them, on a helper thread, while the
        current step computes. The rows stay pinned against eviction until the handle is
        released (``release()``, or leave its ``with`` block). ``partners=k`` also pages in each
        row's ``k`` most frequent co-used rows (see :meth:`track_couse`)."""
        flat = self._ids(ids).reshape(-1)
        if partners and self._couse is not None:
            _, extra, _ = self._couse.partners(flat, partners)
            flat = torch.cat([flat, extra])
        return self._stack.prefetch(flat)

    # -- the executor contract -----------------------------------------------------------------

    def page_in(self, ids: Any) -> RowBatch:
        """Page the rows of one executor step in and pin them: a :class:`dpsn.tiers.RowBatch`
        with the distinct ids, where each requested position's row is (``table``,
        ``use_index``), and ``apply_grads(grads, optimizer)`` / ``release()``. The contract
        every executor (``PoolLayer``, ``PoolEmbedding``, your own) uses; see
        ``docs/row-path.md``. Batches larger than the cache are served spilled."""
        return self._stack.page_in(self._ids(ids))

    def set_state_width(self, width: int) -> None:
        """Keep ``width`` float32 values of state beside each row's delta (a row optimizer's):
        cached, staged, evicted and committed with it, and read back from the store when a
        row's segment holds state of the same width (else zeros). Uncommitted deltas are kept;
        changing the width resets their state."""
        self._check_open()
        self._stack.set_state_width(width)

    enable_row_state = set_state_width  # the name of 0.1.0

    def count_skipped_row_step(self) -> None:
        """Record that an executor skipped a row step (non-finite gradients); see ``stats()``."""
        self._stack.count_skipped_step()

    # -- co-activation statistics ---------------------------------------------------------------

    def track_couse(self, slots: int = 1 << 18) -> CoUse:
        """Keep co-activation statistics: which rows the same token or bag uses together (a
        bounded sketch of ``slots`` pairs, ``dpsn.tiers.CoUse``), fed by executors through
        :meth:`record_couse` and saved with every commit from now on (in ``STORE/couse/``).
        Already on: returns the sketch in use."""
        self._check_open()
        if self._couse is None:
            self._couse = CoUse(slots)
            self._wire_miss_advice()
        return self._couse

    def prefetch_partners_on_miss(
        self, k: int = MISS_PARTNERS, *, limit: int | None = None
    ) -> None:
        """When a step misses rows in the cache, page in each missed row's ``k`` most frequent
        co-used rows (pairs seen twice or more) on the prefetch thread, at most ``limit`` rows a
        step (default: an eighth of the cache), so that the steps after it find them resident.
        On by default (``k=2``) whenever co-use statistics are kept; ``k=0`` turns it off.
        Advice only: nothing is pinned, and the rows are admitted cold: no lookup, hit or miss
        is counted for them and the eviction policy counts no access (a guess is not a use:
        a frequency policy would otherwise keep unused partners over rows really read); the
        bytes they move and the evictions they cause count in the cache's totals
        (``stats()["advised_rows"]``: rows paged in this way)."""
        self._check_open()
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidArgumentError(f"k must be a non-negative int, got {k!r}")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise InvalidArgumentError(f"limit must be a positive int or None, got {limit!r}")
        self._miss_partners = (k, limit)
        self._wire_miss_advice()

    def _wire_miss_advice(self) -> None:
        stack, sketch = self._stack, self._couse
        k, limit = self._miss_partners
        if sketch is None or k == 0 or stack.cache is None:
            stack.miss_advice = None
            return
        stack.miss_advice = functools.partial(
            sketch.miss_partners,
            k=k,
            limit=limit if limit is not None else max(1, stack.cache.capacity // 8),
            rows=self.rows,
        )

    @property
    def couse(self) -> CoUse | None:
        """The co-activation statistics, or None when they are not kept."""
        return self._couse

    def record_couse(self, groups: torch.Tensor) -> None:
        """Count the rows used together: ``groups`` ``[G, H]`` row ids, one row of ids per token
        or bag (``-1``: none). Nothing happens when the statistics are off."""
        # No stack lock: only the thread driving the pool touches the sketch (a prefetch job
        # never does), and taking the lock would wait for a prefetch's disk reads.
        if self._couse is not None:
            self._couse.record(groups)

    def partners(self, ids: Any, k: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's up to ``k`` most frequent co-used rows: ``(row, partner, count)``."""
        flat = self._ids(ids).reshape(-1)
        if self._couse is None:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty, torch.empty(0)
        return self._couse.partners(flat, k)

    def circuits(self, min_support: float = 2.0) -> list[tuple[torch.Tensor, float]]:
        """Groups of rows that fire together: ``[(rows, support), ...]``, each group the rows
        joined by pairs used together at least ``min_support`` times, ``support`` the mean
        count of its pairs; largest groups first. Empty when no statistics are kept."""
        self._check_open()
        if isinstance(min_support, bool) or not isinstance(min_support, int | float):
            raise TypeError(f"min_support must be a number, got {type(min_support).__name__}")
        if not min_support > 0:
            raise ValueError(f"min_support must be positive, got {min_support}")
        if self._couse is None:
            return []
        return self._couse.circuits(float(min_support))

    # -- writing -------------------------------------------------------------------------------

    @torch.no_grad()
    def write(self, ids: Any, deltas: Any, *, add: bool = False) -> None:
        """Stage deltas for rows. ``add=False`` replaces a row's delta, ``add=True`` adds to it
        (a gradient step). Repeated ids in one call: the last wins when replacing, all are
        summed when adding. Rows in the cache are updated there (and become dirty); others are
        staged on the host. Invalid input raises before anything changes."""
        self._require_writable()
        full = as_ids(ids, self.rows)
        values = as_deltas(deltas, full.shape, self.dim, self.dtype)
        if values.shape[0] == 0:
            return
        self._stack.write(full.reshape(-1), values, add=add)

    def drop(self, ids: Any) -> None:
        """Return rows to procedural at the next commit: their deltas are deleted."""
        self._require_writable()
        self._stack.drop(torch.unique(as_ids(ids, self.rows).reshape(-1)))

    def discard(self) -> None:
        """Forget every change since the last commit (staged, dropped, dirty in the cache), and
        the lifecycle's consolidations since then."""
        self._stack.discard()
        self._load_protected(self._store.commit_record(self.head))
        if self._lifecycle is not None:
            saved = self._store.commit_record(self.head).lifecycle
            self._lifecycle.load(saved, self._lifecycle.policy)

    def commit(self, message: str = "") -> Commit:
        """Make every change since the last commit durable in one atomic step.

        Dirty cache rows are written back first. On failure (a full disk, a crash) the store
        keeps its previous commit and the changes stay staged, so the commit can be retried.
        """
        self._require_writable()
        if not isinstance(message, str):
            raise TypeError("commit message must be a str")
        head = self.head
        lc = self._lifecycle
        if lc is not None and lc.due(head + 1):
            lc.consolidate()
        _couse_files.discard(self.path, head + 1)  # a leftover of a commit that failed
        if self._couse is not None:
            _couse_files.save(self.path, head + 1, self._couse, keep={head})
        # the changed routers are written first, as the commit's version: the commit request
        # then names what they wrote (the row path never calls back up to write them)
        written = self._routers.write_changed(head, head + 1)
        record = self._stack.commit(
            message,
            stats=self.stats(),
            routers=written,
            lifecycle=lc.to_json() if lc is not None else None,
            modules=self._changed_modules(head),
        )
        self._auto_compact()
        return record

    # -- the row lifecycle ---------------------------------------------------------------------

    @property
    def lifecycle(self) -> Lifecycle | None:
        """The row lifecycle policy in force (saved with every commit), or None."""
        return self._lifecycle.policy if self._lifecycle is not None else None

    def _require_lifecycle(self) -> LifecycleRunner:
        self._check_open()
        if self._lifecycle is None:
            raise LifecycleError(
                f"{self.path} has no row lifecycle; open it with "
                "dpsn.open(path, mode='r+', lifecycle=dpsn.Lifecycle()) to give it one"
            )
        return self._lifecycle

    def consolidate(self) -> dict[str, Any]:
        """Run one consolidation of the row lifecycle now (commits run one every
        ``Lifecycle.consolidate_every`` commits): usage decay, phase update, FREE delta decay,
        pruning, budgets, homeostasis. Its changes are staged like any other and become durable
        at the next commit. Returns what it did: rows per phase, entered/exited, decayed,
        pruned (by floor, idleness, budget), the thresholds and the seconds it took."""
        self._require_writable()
        return self._require_lifecycle().consolidate()

    @torch.no_grad()
    def phase(self, ids: Any) -> torch.Tensor:
        """The lifecycle phase of rows, a ``torch.uint8`` tensor shaped like ``ids``: 0 FREE,
        1 SCREENED (rows without a delta, and pools without a lifecycle: 0)."""
        full = self._ids(ids)
        flat = full.reshape(-1)
        if self._lifecycle is None:
            return torch.zeros(full.shape, dtype=torch.uint8)
        return self._lifecycle.row_usage(flat)["phase"].reshape(full.shape)

    def region_usage(self) -> dict[str, torch.Tensor | None]:
        """Usage per region (``Lifecycle.regions`` id ranges), as of this session's last
        consolidation, before its budget pruning: ``rows`` with a delta, ``screened`` rows,
        raw ``bytes`` (delta, optimizer state, statistics), ``freq`` (the summed recent-use
        averages: rows of the region used per step), ``novelty`` (rows born in the last
        ``novelty_window`` consolidations) and ``budget`` (None without budgets); one entry per
        region."""
        return self._require_lifecycle().region_usage()

    @torch.no_grad()
    def usage(self, ids: Any) -> dict[str, torch.Tensor]:
        """Usage statistics of 1-D-able ``ids`` as of now, one CPU tensor per figure (flattened
        ``ids`` order): ``phase``, ``uses``, ``last`` (step), ``recent`` (use average),
        ``history`` (bit i: used i steps ago), ``update`` (recent update size), ``norm`` (of the
        delta), ``epoch``, ``since``, ``born`` (consolidations), ``score`` and ``has_delta``."""
        flat = self._ids(ids).reshape(-1)
        return self._require_lifecycle().row_usage(flat)

    # -- protection (no forgetting) --------------------------------------------------------------

    @property
    def protected(self) -> torch.Tensor:
        """Sorted int64 ids of the protected rows (a copy; see :meth:`protect`)."""
        self._check_open()
        return self._stack.protected.clone()

    def protect(self, ids: Any = None, *, phase: str | None = None) -> int:
        """Protect rows: from now on no executor's row step changes their delta or optimizer
        state (``PoolLayer``, ``PoolEmbedding``, and any executor on ``page_in`` /
        ``RowBatch.apply_grads``); their uses are still counted. Give ``ids`` (any shape), or
        ``phase="screened"`` for every row SCREENED by the lifecycle now (``"free"``: every
        FREE row with a delta), or both. The lifecycle holds protected rows SCREENED: they
        neither decay nor are pruned. ``write``/``drop`` still change them: protection guards
        against training, not against explicit edits.

        The set is persisted with the next commit (a checksummed array in the store, its
        record in the commit's), so reopening or a snapshot view brings it back; ``discard()``
        returns to the committed set. Returns how many rows are protected now."""
        self._require_writable()
        chosen = self._choose(ids, phase, "protect")
        self._stack.set_protected(torch.unique(torch.cat([self._stack.protected, chosen])))
        return len(self._stack.protected)

    def unprotect(self, ids: Any = None, *, phase: str | None = None) -> int:
        """Let rows train again: ``ids``, the rows in ``phase``, or (neither given) every
        protected row. Persisted with the next commit; returns how many stay protected."""
        self._require_writable()
        current = self._stack.protected
        if ids is None and phase is None:
            kept = current[:0]
        else:
            chosen = self._choose(ids, phase, "unprotect")
            kept = current[~torch.isin(current, chosen)]
        self._stack.set_protected(kept)
        return len(kept)

    def _choose(self, ids: Any, phase: str | None, what: str) -> torch.Tensor:
        if ids is None and phase is None:
            raise ValueError(f"{what}() needs ids, phase='screened' (or 'free'), or both")
        parts = [torch.empty(0, dtype=torch.int64)]
        if ids is not None:
            parts.append(as_ids(ids, self.rows).reshape(-1).cpu())
        if phase is not None:
            from dpsn.tiers import usage as U

            phases = {"screened": U.SCREENED, "free": U.FREE}
            if phase not in phases:
                raise ValueError(f"phase must be one of {sorted(phases)}, got {phase!r}")
            parts.append(self._require_lifecycle().rows_in_phase(phases[phase]))
        return torch.unique(torch.cat(parts))

    def _load_protected(self, record: Commit) -> None:
        """Adopt the protected set ``record`` names (checked in full: ``CorruptStoreError``)."""
        ids = torch.empty(0, dtype=torch.int64)
        if record.protected is not None:
            from dpsn.store import read_protected

            ids = torch.from_numpy(read_protected(self.path, record.protected, self.rows))
        self._stack.set_protected(ids)
        self._stack.protected_changed = False

    # -- routers -------------------------------------------------------------------------------

    def save_router(self, name: str, router: torch.nn.Module) -> None:
        """Keep ``router`` with the store: its state is saved at every commit (when it changed)
        and joins the provenance hash. Reopen it with :meth:`load_router`."""
        self._require_writable()
        self._routers.add(name, router)

    def routers(self) -> dict[str, dict[str, Any]]:
        """Routers saved with this pool's commit: name -> {"version", "digest"}."""
        self._check_open()
        return self._routers.saved(self.head)

    def load_router(self, name: str) -> torch.nn.Module:
        """The router ``name`` as saved with this pool's commit, checked against its digest."""
        self._check_open()
        return self._routers.load(name, self.head)

    # -- module configurations -----------------------------------------------------------------

    def save_module(self, name: str, config: dict[str, Any]) -> None:
        """Keep a module's configuration (a JSON object) with the store: it is written with the
        next commit (when it changed) and joins the provenance hash, so that
        ``PoolLayer.from_store`` / ``PoolEmbedding.from_store`` rebuild the module that
        trained these rows. Read it back with :meth:`modules`."""
        self._require_writable()
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ValueError(f"a module name is a non-empty str of at most 128 chars: {name!r}")
        try:
            text = json.dumps(config, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"module config {name!r} must be plain JSON: {e}") from e
        if not isinstance(config, dict) or len(text) > 1 << 16:
            raise ValueError(f"module config {name!r} must be a JSON object under 64 KiB")
        self._modules[name] = json.loads(text)

    def modules(self) -> dict[str, dict[str, Any]]:
        """Module configurations saved with this pool's commit: name -> config."""
        self._check_open()
        return dict(self._store.commit_record(self.head).modules or {})

    def _changed_modules(self, head: int) -> dict[str, dict[str, Any]] | None:
        saved = self._store.commit_record(head).modules or {}
        changed = {k: v for k, v in self._modules.items() if saved.get(k) != v}
        return changed or None

    # -- history -------------------------------------------------------------------------------

    def log(self) -> list[Commit]:
        """Every commit, oldest first (including ones after this view's, if any)."""
        self._check_open()
        return self._store.log()

    def snapshot(self, name: str) -> Commit:
        """Pin this pool's current commit under ``name`` (uncommitted changes are not included:
        commit first). A pinned commit survives gc; open it with ``dpsn.open(path, at=name)``."""
        self._require_writable()
        if isinstance(name, str) and name in self._store.snapshots():
            raise SnapshotExistsError(
                f"snapshot {name!r} exists already; choose another name, or delete it first "
                "with pool.delete_snapshot(name)"
            )
        self._store.pin(name, self.head)
        return self._store.commit_record(self.head)

    def delete_snapshot(self, name: str) -> None:
        """Delete the snapshot ``name`` (its commit stays in the log); the next ``gc`` frees
        what only it kept (``SnapshotNotFoundError`` if there is none of that name)."""
        self._require_writable()
        self._store.unpin(name)

    def snapshots(self) -> dict[str, int]:
        """Snapshot names and the commit each pins."""
        self._check_open()
        return {k: v["commit"] for k, v in self._store.snapshots().items()}

    def refresh(self) -> int:
        """Move a read-only pool to the newest commit; returns it."""
        self._check_open()
        if self.writable:
            return self.head
        stack = self._stack
        with stack.lock:
            self._store.hold(None)  # choosing: a gc meanwhile removes nothing
            commit, index = self._store.load_head()
            self._store.hold(commit, index)
            version = self._store.commit_record(commit).generator
            if version != self._store.commit_record(self.head).generator:
                stack.procedural.replace(load_generator(self._store, version, self.device))
            stack.move_to(commit, index)
            self._load_protected(self._store.commit_record(commit))
            saved = self._store.commit_record(commit).lifecycle
            if saved is not None:
                given = self._lifecycle_given and self._lifecycle is not None
                policy = self._lifecycle.policy if given else None  # type: ignore[union-attr]
                if self._lifecycle is None:
                    self._lifecycle = LifecycleRunner(
                        stack, rows=self.rows, policy=None, saved=saved, writable=False
                    )
                else:
                    self._lifecycle.load(saved, policy)
        return commit

    # -- health --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Cache and tier counters (in total, and for the last read in ``"last_step"``), the
        row-training counters (``row_steps``, ``rows_updated``, ``skipped_row_steps``), and with
        a lifecycle its health under ``"lifecycle"``: rows and bytes per phase, the screening
        rate against its target band, decays, prunes, regions, flags (see README)."""
        out = self._stack.stats()
        if self._lifecycle is not None:
            out["lifecycle"] = self._lifecycle.stats()
        return out

    def info(self) -> dict[str, Any]:
        """A summary: spec, virtual size, what is persisted and what it costs on disk. The same
        figures as ``dpsn info`` (``dpsn.tiers.StoreFacts``, which documents the size names),
        for this pool's commit, plus ``staged_rows`` and ``reader_lease`` (a reader: whether
        it holds a lease a writer's gc sees; ``None`` for a writer)."""
        self._check_open()
        from dpsn.store import StoreFacts

        with StoreFacts(self.path) as facts:
            out = facts.info(at=self.head)
        out["staged_rows"] = self.staged_rows
        # A reader without a lease (it warned, LeaseWarning): a writer's gc cannot see it.
        out["reader_lease"] = self._store.lease_held
        return out

    def publish(self, url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish the store's newest commit to object storage (``s3://bucket/prefix``) so
        that readers need only the bucket (``dpsn.open(url, storage_options=...)``). Staged
        changes are not published: commit first. Credentials come from ``storage_options`` or
        the environment and are never written into the bucket. See ``dpsn.tiers._remote``."""
        from dpsn.store import remote

        self._check_open()
        return remote.publish(self._store, url, storage_options)

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Re-read every segment, generator weight and index entry and check them. Problems are
        reported in the returned report, never raised."""
        self._check_open()
        report = self._store.verify(progress)
        for name in self.routers():
            try:
                self.load_router(name)
            except (DpsnError, ValueError) as e:
                report.problems.append(f"router {name!r}: {e}")
        return report

    def gc(
        self,
        *,
        dry_run: bool = False,
        progress: Callable[[int, int], None] | None = None,
        keep_last: int | None = _UNSET,
        keep_within: float | str | None = _UNSET,
    ) -> dict[str, Any]:
        """Delete what no kept commit needs. Kept: HEAD, every snapshot, the commits the
        store's retention policy keeps (``keep_last`` newest commits and/or those younger than
        ``keep_within``, e.g. ``"7d"``; either given here overrides the policy for this call),
        and every commit a live reader in any process holds. Needs ``mode="r+"``, except a
        ``dry_run`` (it changes nothing, so a reader may ask what gc would free)."""
        if not dry_run:
            self._require_writable()
        retention = {
            k: v
            for k, v in (("keep_last", keep_last), ("keep_within", keep_within))
            if v is not _UNSET
        }
        with self._stack.lock:
            return self._store.gc(dry_run=dry_run, progress=progress, **retention)

    def compact(
        self, *, progress: Callable[[int, int], None] | None = None, placement: bool = True
    ) -> dict[str, Any]:
        """Rewrite the live rows of sparsely live segments into dense new ones (one or more
        commits with message ``"compact"``; no row's value changes), then gc by the retention
        policy. Returns what it did and the space/write amplification before and after.
        Commits run this on their own when the policy's ``compact_above`` is exceeded.
        ``placement``: where the pool has co-use statistics (:meth:`track_couse`), write the
        rows that fire together next to each other (fewer chunk reads per cold batch; the
        store becomes format 4, docs/format.md); ``False`` keeps id order."""
        self._require_writable()
        stack = self._stack
        with stack.lock:
            result = self._store.compact(
                stack.index, stack.head, progress=progress, placement=self._placement(placement)
            )
            stack.index, stack.head = result.index, result.head
        return result.to_json()

    def policy(self) -> dict[str, Any]:
        """The store's retention and compaction policy (see :meth:`set_policy`)."""
        self._check_open()
        from dpsn.store import read_policy

        return read_policy(self._store).to_json()

    def set_policy(self, **settings: Any) -> dict[str, Any]:
        """Change the store's policy: ``keep_last`` (int or None), ``keep_within`` (seconds,
        ``"7d"``, or None), ``compact_above`` (stored/live bytes that trigger compaction after
        a commit, None: never), ``compact_min_bytes``. Returns the new policy."""
        self._require_writable()
        from dpsn.store import read_policy, write_policy

        policy = read_policy(self._store).with_(**settings)
        write_policy(self._store, policy)
        return policy.to_json()

    def _placement(self, on: bool) -> Callable[[np.ndarray], np.ndarray] | None:
        """The order compaction writes rows in: the co-use statistics' (when kept and ``on``)."""
        sketch = self._couse
        return sketch.placement if on and sketch is not None and len(sketch) else None

    def _auto_compact(self) -> None:
        """After a commit: compact if the policy's threshold is passed. The commit is durable
        already, so a failure here is a warning, never an error of the commit."""
        from dpsn.store import maybe_compact, read_policy

        stack = self._stack
        try:
            with stack.lock:
                result = maybe_compact(
                    self._store,
                    stack.index,
                    stack.head,
                    read_policy(self._store),
                    self._placement(True),
                )
                if result is not None and result.commits:
                    stack.index, stack.head = result.index, result.head
        except (DpsnError, OSError) as e:
            import warnings

            warnings.warn(f"automatic compaction after the commit failed: {e}", stacklevel=3)

    def segments_total(self) -> int:
        """How many delta segments the store records."""
        return len(self._store.segment_records())

    @property
    def persisted_rows(self) -> int:
        """Rows with a persisted delta at this pool's commit."""
        return len(self._stack.index)

    def persisted_ids(self) -> np.ndarray:
        """The sorted ids of the rows with a persisted delta at this pool's commit."""
        self._check_open()
        return np.asarray(self._stack.index.ids)

    def row_commits(self, ids: Any) -> np.ndarray:
        """For each id, the commit that last wrote its persisted delta, or 0 if it has none."""
        flat = self._ids(ids).reshape(-1).numpy()
        found, _, _, commit = self._stack.index.lookup(flat)
        return np.where(found, commit, 0)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the store (and the writer lock). Uncommitted changes are discarded."""
        stack = getattr(self, "_stack", None)
        try:
            if stack is not None:
                if self.writable and not self._store.closed:
                    # The next open then maps the runs and replays nothing.
                    self._store.settle_runs(stack.index, stack.head)
                stack.close()
            if not self._store.closed:
                self._store.close()
        finally:
            self._closed = self._store.closed

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


@functools.cache
def _physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say): asked once,
    as every read checks against it (two ``sysconf`` calls cost a hot read ~2 us)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _check_batch_memory(n: int, dim: int, dtype: torch.dtype) -> None:
    """Refuse at once a read whose result alone (``n`` rows of ``dim``, plus the float32 rows it
    is computed in) is larger than this machine's physical memory, rather than fail deep in an
    allocator (or swap for minutes)."""
    need = n * dim * (dtype.itemsize + 4)
    have = _physical_memory()
    if have is not None and need > have:
        raise BatchTooLargeError(
            f"reading {n} rows of width {dim} at once needs about {need >> 20} MiB, more than "
            f"this machine's memory ({have >> 20} MiB); read them in smaller batches"
        )
