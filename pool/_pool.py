"""``Pool``: rows as users see them, ``base(i) + delta(i)``, through the tier stack.

Where a row's delta lives, newest first: a dirty slot of the device cache, the host staging
area (uncommitted writes and rows evicted dirty), the persisted store (committed), else nowhere
(the row is procedural). ``commit()`` writes dirty cache rows back into staging and makes
staging durable in one atomic step.

The cache holds two columns per slot: the row's ``delta`` and its materialized value ``row``
(``base + delta`` in the pool dtype), so a hot read is a single gather. Bases come from the
generator and go stale if its weights change:

- frozen generator (the default): materialized rows are kept, and every read checks the
  weights' version counters; after an in-place change (an optimizer step, ``load_state_dict``)
  all cached rows are re-materialized once, from their cached deltas;
- trainable generator (any parameter with ``requires_grad``): bases are regenerated on every
  read from the current weights and only the cached deltas are used.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpsn.errors import (
    CorruptStoreError,
    DpsnError,
    InvalidDeltaError,
    ReadOnlyError,
    SnapshotNotFoundError,
)
from dpsn.hypernet import Generator, make_generator
from dpsn.tiers import Commit, DeviceCache, PersistedStore, RowIndex, VerifyReport, check_policy

from ._dtypes import DTYPES, from_storage, to_storage
from ._staging import Staging
from ._validate import as_deltas, as_ids

_ROUTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CACHE_BYTES = 64 << 20  # default cache size when cache_rows is not given
_REMATERIALIZE_BATCH = 1 << 16
_READ = ("read", 0)  # the pin holder of the rows of the last plain read


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
        index: RowIndex,
        device: str | torch.device | None = None,
        cache_rows: int | None = None,
        policy: str = "lru",
    ) -> None:
        self._store = store
        self._commit = commit
        self._index = index
        m = store.manifest
        self._dtype = DTYPES[m.dtype]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._generator = self._load_generator(store.commit_record(commit).generator)
        self._state_width = 0
        self._staging = Staging(m.dim, self._dtype)
        self._io = dict.fromkeys(("rows_from_disk", "bytes_from_disk", "rows_generated"), 0)
        check_policy(policy)  # a typo is an error even where no cache is built
        if cache_rows is None:
            cache_rows = max(1024, CACHE_BYTES // (2 * m.dim * self._dtype.itemsize))
        if isinstance(cache_rows, bool) or not isinstance(cache_rows, int) or cache_rows < 0:
            raise ValueError(f"cache_rows must be a non-negative int, got {cache_rows!r}")
        self._cache: DeviceCache | None = None
        if cache_rows:
            self._cache = self._make_cache(cache_rows, policy)
        self._lock = self._cache.mutex if self._cache else threading.RLock()
        self._stamp = self._generator_stamp()
        self._saved_stamp = self._stamp  # the weights as last committed
        self._routers: dict[str, torch.nn.Module] = {}
        self._owners: set[tuple[str, int]] = set()  # pin holders of layers' steps in flight
        self._prefetches = itertools.count()
        self._prefetcher: ThreadPoolExecutor | None = None

    def _load_generator(self, version: int) -> Generator:
        m = self._store.manifest
        kind, config = m.generator["kind"], m.generator["config"]
        # Built on the meta device: its initialisation would be thrown away by the stored weights.
        # A generator with (non-persisted, derived) buffers needs them computed: build it for real.
        with torch.device("meta"):
            gen = make_generator(kind, dim=m.dim, seed=m.seed, **config)
        if any(True for _ in gen.buffers()):
            gen = make_generator(kind, dim=m.dim, seed=m.seed, **config)
        state = self._store.read_generator(version)
        expected = set(gen.state_dict())
        if set(state) != expected:
            raise CorruptStoreError(
                f"generator weights in the store ({sorted(state)}) do not match the "
                f"{m.generator['kind']} generator ({sorted(expected)})"
            )
        gen.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, assign=True)
        gen.requires_grad_(False)
        return gen.to(self.device).eval()

    # -- spec ----------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._store.root

    @property
    def rows(self) -> int:
        return self._store.manifest.rows

    @property
    def dim(self) -> int:
        return self._store.manifest.dim

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def seed(self) -> int:
        return self._store.manifest.seed

    @property
    def generator(self) -> Generator:
        """The generator module. Frozen by default; see the module docstring before training it."""
        return self._generator

    @property
    def head(self) -> int:
        """The commit this pool reads (and, when writable, commits on top of)."""
        return self._commit

    @property
    def writable(self) -> bool:
        return self._store.writable

    @property
    def cache(self) -> DeviceCache | None:
        return self._cache

    @property
    def staged_rows(self) -> int:
        """Rows changed since the last commit (staged on the host or dirty in the cache)."""
        dirty = int(self._cache.dirty.sum()) if self._cache else 0
        return len(self._staging) + dirty

    def __repr__(self) -> str:
        mode = "r+" if self.writable else "r"
        cache = self._cache.capacity if self._cache else 0
        return (
            f"Pool({str(self.path)!r}, mode={mode!r}, rows={self.rows}, dim={self.dim}, "
            f"dtype={self._dtype}, commit={self._commit}, persisted={len(self._index)}, "
            f"device={self.device}, cache_rows={cache})"
        )

    def _check_open(self) -> None:
        if self._store.closed:
            raise ValueError(f"{self.path}: this pool is closed")

    def _require_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise ReadOnlyError(
                f'{self.path} is open read-only (mode="r" or a snapshot view); '
                'open it with dpsn.open(path, mode="r+") to change it'
            )

    # -- where deltas come from ----------------------------------------------------------------

    def _host_deltas(self, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Deltas of ``ids`` (any order, repeats allowed) from staging or disk: the positions in
        ``ids`` that have one, their values (pool dtype, CPU) and their row state. Rows without
        a delta cost nothing, so a read of procedural rows allocates no zeros."""
        staged, staged_values, staged_state, dropped = self._staging.lookup(ids)
        disk_pos = np.flatnonzero(~(staged | dropped))
        found, values, state = self._store.read_deltas(
            self._index, ids[disk_pos], state_width=self._state_width
        )
        disk_pos = disk_pos[found]
        self._io["rows_from_disk"] += len(disk_pos)
        self._io["bytes_from_disk"] += values.nbytes + state.nbytes
        disk_values, disk_state = from_storage(values, self._dtype), torch.from_numpy(state)
        if not staged.any():
            return disk_pos, disk_values, disk_state
        return (
            np.concatenate([disk_pos, np.flatnonzero(staged)]),
            torch.cat([disk_values, staged_values]),
            torch.cat([disk_state, staged_state]),
        )

    def _dense_host_deltas(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        delta = torch.zeros((len(ids), self.dim), dtype=self._dtype)
        state = torch.zeros((len(ids), self._state_width), dtype=torch.float32)
        pos, values, row_state = self._host_deltas(ids)
        at = torch.from_numpy(pos)
        delta[at] = values
        state[at] = row_state
        return delta, state

    def _materialize(self, ids: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """``base + delta`` in float32, cast once to the pool dtype (the one formula for rows)."""
        self._io["rows_generated"] += len(ids)
        base = self._generator(ids.to(self.device))
        return (base + deltas.to(self.device, torch.float32)).to(self._dtype)

    def _fill(self, missing: torch.Tensor) -> dict[str, torch.Tensor]:
        delta, state = self._dense_host_deltas(missing.numpy())
        out = {"delta": delta, "row": self._materialize(missing, delta)}
        if self._state_width:
            out["state"] = state
        return out

    def _write_back(self, ids: torch.Tensor, columns: dict[str, torch.Tensor]) -> None:
        """A dirty row leaves the cache: its delta (and state) is staged, never lost."""
        order = torch.argsort(ids)
        state = columns["state"][order] if "state" in columns else None
        self._staging.put(ids[order].numpy(), columns["delta"][order], state)

    def _make_cache(self, capacity: int, policy: str) -> DeviceCache:
        columns = {"delta": (self.dim, self._dtype), "row": (self.dim, self._dtype)}
        if self._state_width:
            columns["state"] = (self._state_width, torch.float32)
        return DeviceCache(capacity, columns, device=self.device, policy=policy)

    @property
    def state_width(self) -> int:
        return self._state_width

    def enable_row_state(self, width: int) -> None:
        """Keep ``width`` float32 values of state beside each row's delta (a row optimizer's):
        cached on the device, staged, evicted and committed with the delta, and read back from
        the store when a row's segment holds state of the same width (else zeros).

        Changes since the last commit are kept; cached rows are written back and re-read."""
        if isinstance(width, bool) or not isinstance(width, int) or width < 0:
            raise ValueError(f"state width must be a non-negative int, got {width!r}")
        with self._lock:
            if width == self._state_width:
                return
            old = self._cache
            if old is not None:
                self._release_steps()
                ids, columns = old.dirty_rows()
                if len(ids):
                    self._write_back(ids, columns)
            self._state_width = width
            self._staging.set_state_width(width)
            if old is not None:
                self._cache = self._make_cache(old.capacity, old.policy.name)
                self._cache.stats = old.stats
                self._lock = self._cache.mutex

    # -- generator staleness -------------------------------------------------------------------

    def _generator_stamp(self) -> tuple[int, ...]:
        return tuple(v for p in self._generator.parameters() for v in (id(p), p._version))

    def _trains_generator(self) -> bool:
        return any(p.requires_grad for p in self._generator.parameters())

    def _rematerialize_if_stale(self) -> None:
        stamp = self._generator_stamp()
        if stamp == self._stamp or self._cache is None:
            return
        keys, slots = self._cache.occupied_ids()
        delta, row = self._cache.columns["delta"], self._cache.columns["row"]
        for a in range(0, len(keys), _REMATERIALIZE_BATCH):
            s = slots[a : a + _REMATERIALIZE_BATCH]
            row[s] = self._materialize(keys[a : a + _REMATERIALIZE_BATCH], delta[s])
        self._stamp = stamp

    # -- reading -------------------------------------------------------------------------------

    @torch.no_grad()
    def base(self, ids: Any) -> torch.Tensor:
        """Procedural rows only (no deltas): what an untrained row looks like."""
        self._check_open()
        full = as_ids(ids, self.rows)
        out = self._generator(full.reshape(-1).to(self.device)).to(self._dtype)
        return out.reshape(*full.shape, self.dim)

    @torch.no_grad()
    def delta(self, ids: Any) -> torch.Tensor:
        """The learned part of rows (zeros for procedural rows), wherever it currently lives."""
        self._check_open()
        full = as_ids(ids, self.rows)
        flat = full.reshape(-1)
        with self._lock:
            out = self._dense_host_deltas(flat.numpy())[0].to(self.device)
            if self._cache is not None:
                slots, hit = self._cache.find(flat.to(self.device))
                out[hit] = self._cache.columns["delta"][slots[hit]]
        return out.reshape(*full.shape, self.dim)

    @torch.no_grad()
    def read(self, ids: Any) -> torch.Tensor:
        """Rows ``base + delta`` for ids of any shape: ``[*ids.shape, dim]`` in the pool dtype on
        the pool's device.

        With a cache, the batch's rows are paged in (misses filled in one batch, each distinct
        id once) and stay pinned against eviction until the next ``read`` (the step in flight).
        Raises :class:`~dpsn.errors.CacheCapacityError` when a batch has more distinct ids than
        the cache can hold.
        """
        self._check_open()
        full = as_ids(ids, self.rows)
        flat = full.reshape(-1)
        with self._lock:
            if self._cache is None:
                pos, values, _ = self._host_deltas(flat.numpy())
                rows = self._generator(flat.to(self.device))
                if len(pos):
                    sel = torch.from_numpy(pos).to(self.device)
                    rows.index_add_(0, sel, values.to(self.device, rows.dtype))
                out = rows.to(self._dtype)
            else:
                out = self._read_cached(flat)
        return out.reshape(*full.shape, self.dim)

    def _read_cached(self, flat: torch.Tensor) -> torch.Tensor:
        cache = self._cache
        assert cache is not None
        self._rematerialize_if_stale()
        # A new read means the previous step is over: its rows may be evicted again.
        cache.unpin(_READ)
        slots = cache.lookup(flat, self._fill, self._write_back)
        cache.pin(_READ, slots)
        if self._trains_generator():
            return self._materialize(flat, cache.columns["delta"][slots])
        # index_select, not advanced indexing: about twice as fast for a gather of rows
        return torch.index_select(cache.columns["row"], 0, slots)

    # -- the layer's path: paging in by owner, fused row updates -------------------------------

    def _page_in(self, ids: torch.Tensor, owner: object) -> torch.Tensor:
        """Slots of ``ids`` (1-D, validated), pinned for ``owner``'s step in flight until that
        owner pages in again. Several layers can share one pool without evicting each other's
        rows between their forward and backward."""
        cache = self._cache
        if cache is None:
            raise ValueError("a PoolLayer needs a pool with a cache (cache_rows > 0)")
        with self._lock:
            self._rematerialize_if_stale()
            key = ("layer", id(owner))
            cache.unpin(key)
            slots = cache.lookup(ids, self._fill, self._write_back)
            cache.pin(key, slots)
            self._owners.add(key)
            return slots

    @torch.no_grad()
    def _apply_row_grads(self, ids: torch.Tensor, grads: torch.Tensor, optimizer: Any) -> None:
        """One optimizer step on the deltas (and state) of unique ``ids`` with summed ``grads``.

        Rows still cached are updated in place and become dirty; a row evicted between forward
        and backward (possible only if its owner paged in again in between) is updated on the
        host and staged, so no update is ever lost or applied to the wrong row."""
        self._require_writable()
        cache = self._cache
        assert cache is not None
        with self._lock:
            slots, hit = cache.find(ids)
            grads = grads.float()
            if bool(hit.any()):
                s = slots[hit]
                delta = cache.columns["delta"][s].float()
                state = (
                    cache.columns["state"][s]
                    if self._state_width
                    else torch.empty((len(s), 0), device=self.device)
                )
                new_delta, new_state = optimizer.step(delta, grads[hit], state)
                cache.columns["delta"][s] = new_delta.to(self._dtype)
                if self._state_width:
                    cache.columns["state"][s] = new_state
                cache.columns["row"][s] = self._materialize(ids[hit], cache.columns["delta"][s])
                cache.mark_dirty(s)
            if not bool(hit.all()):
                miss = ~hit
                host_ids = ids[miss].cpu()
                order = torch.argsort(host_ids)
                host_ids = host_ids[order]
                delta, state = self._dense_host_deltas(host_ids.numpy())
                new_delta, new_state = optimizer.step(
                    delta.float(), grads[miss].cpu()[order], state
                )
                self._staging.put(
                    host_ids.numpy(),
                    new_delta.to(self._dtype),
                    new_state if self._state_width else None,
                )

    def prefetch(self, ids: Any) -> Prefetch:
        """Page rows in ahead of the ``read`` that needs them, on a helper thread, while the
        current step computes. The rows stay pinned against eviction until the handle is
        released (``release()``, or leave its ``with`` block)."""
        self._check_open()
        flat = as_ids(ids, self.rows).reshape(-1)
        if self._cache is None:
            return Prefetch(self, None)
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="dpsn-prefetch")
        key = ("prefetch", next(self._prefetches))
        return Prefetch(self, self._prefetcher.submit(self._prefetch_job, flat, key), key)

    def _prefetch_job(self, flat: torch.Tensor, key: tuple[str, int]) -> tuple[torch.Tensor, Any]:
        cache = self._cache
        assert cache is not None
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with self._lock, torch.no_grad():
            if stream is not None:
                with torch.cuda.stream(stream):
                    slots = cache.lookup(flat, self._fill, self._write_back)
                event = torch.cuda.Event()
                event.record(stream)
            else:
                slots, event = cache.lookup(flat, self._fill, self._write_back), None
            cache.pin(key, slots)
        return slots, event

    # -- writing -------------------------------------------------------------------------------

    @torch.no_grad()
    def write(self, ids: Any, deltas: Any, *, add: bool = False) -> None:
        """Stage deltas for rows. ``add=False`` replaces a row's delta, ``add=True`` adds to it
        (a gradient step). Repeated ids in one call: the last wins when replacing, all are
        summed when adding. Rows in the cache are updated there (and become dirty); others are
        staged on the host. Invalid input raises before anything changes."""
        self._require_writable()
        full = as_ids(ids, self.rows)
        values = as_deltas(deltas, full.shape, self.dim, self._dtype)
        if values.shape[0] == 0:
            return
        uniq, inverse = np.unique(full.reshape(-1).numpy(), return_inverse=True)
        inv = torch.from_numpy(inverse)
        with self._lock:
            cache = self._cache
            if cache is not None:
                slots, hit = cache.find(torch.from_numpy(uniq).to(self.device))
                hit_cpu = hit.cpu()
            else:
                hit_cpu = torch.zeros(len(uniq), dtype=torch.bool)
            if add:
                summed = torch.zeros((len(uniq), self.dim), dtype=torch.float32)
                summed.index_add_(0, inv, values.float())
                current = self._dense_host_deltas(uniq)[0].float()
                if cache is not None and bool(hit_cpu.any()):
                    current[hit_cpu] = cache.columns["delta"][slots[hit]].cpu().float()
                new = (current + summed).to(self._dtype)
                if not torch.isfinite(new).all():
                    raise InvalidDeltaError(f"adding these deltas overflows {self._dtype}")
            else:
                last = torch.full((len(uniq),), -1, dtype=torch.int64)
                last.scatter_reduce_(0, inv, torch.arange(len(inv)), reduce="amax")
                new = values[last]
            if cache is not None and bool(hit_cpu.any()):
                s = slots[hit]
                cache.columns["delta"][s] = new[hit_cpu].to(self.device)
                cache.columns["row"][s] = self._materialize(
                    torch.from_numpy(uniq)[hit_cpu], new[hit_cpu]
                )
                cache.mark_dirty(s)
            if not bool(hit_cpu.all()):
                miss = ~hit_cpu.numpy()
                state = self._dense_host_deltas(uniq[miss])[1] if self._state_width else None
                self._staging.put(uniq[miss], new[~hit_cpu].contiguous(), state)

    def drop(self, ids: Any) -> None:
        """Return rows to procedural at the next commit: their deltas are deleted."""
        self._require_writable()
        uniq = np.unique(as_ids(ids, self.rows).reshape(-1).numpy())
        with self._lock:
            self._staging.drop(uniq)
            if self._cache is not None:
                self._cache.invalidate(torch.from_numpy(uniq))

    def discard(self) -> None:
        """Forget every change since the last commit (staged, dropped, dirty in the cache)."""
        with self._lock:
            self._staging.clear()
            if self._cache is not None:
                self._release_steps()
                self._cache.clear()

    def commit(self, message: str = "") -> Commit:
        """Make every change since the last commit durable in one atomic step.

        Dirty cache rows are written back first. On failure (a full disk, a crash) the store
        keeps its previous commit and the changes stay staged, so the commit can be retried.
        """
        self._require_writable()
        if not isinstance(message, str):
            raise TypeError("commit message must be a str")
        with self._lock:
            if self._cache is not None:
                ids, columns = self._cache.dirty_rows()
                if len(ids):
                    self._write_back(ids, columns)
                self._cache.clean()
            st = self._staging
            generator_state = None
            if self._generator_stamp() != self._saved_stamp:  # trained since the last commit
                generator_state = {
                    k: v.detach().cpu().float().numpy()
                    for k, v in self._generator.state_dict().items()
                }
            routers = self._save_routers(self._commit + 1)
            record, index = self._store.commit(
                self._index,
                self._commit,
                st.ids,
                to_storage(st.values),
                st.drops,
                state=st.state.numpy() if self._state_width else None,
                message=message,
                stats=self.stats(),
                generator_state=generator_state,
                routers=routers,
            )
            self._index, self._commit = index, record.id
            self._saved_stamp = self._generator_stamp()
            st.clear()
        return record

    # -- routers -------------------------------------------------------------------------------

    def save_router(self, name: str, router: torch.nn.Module) -> None:
        """Keep ``router`` with the store: its state is saved at every commit (when it changed)
        and joins the provenance hash. Reopen it with :meth:`load_router`."""
        self._require_writable()
        from dpsn.index import Router

        if not isinstance(router, Router):
            raise TypeError(f"save_router takes a dpsn.index Router, not {type(router).__name__}")
        if not _ROUTER_NAME.fullmatch(name):
            raise ValueError(f"router name {name!r} is invalid: use 1-64 of [A-Za-z0-9_.-]")
        self._routers[name] = router

    def _save_routers(self, version: int) -> dict[str, str]:
        if not self._routers:
            return {}
        from dpsn.index import router_digest, save_router

        known = self._store.commit_record(self._commit).routers or {}
        saved = {}
        for name, router in self._routers.items():
            digest = router_digest(router)
            if known.get(name, {}).get("digest") == digest:
                continue  # unchanged since it was last saved
            group = self._store.router_group(name, version, write=True)
            saved[name] = save_router(router, group)
            self._store.sync_router(name, version)
        return saved

    def routers(self) -> dict[str, dict[str, Any]]:
        """Routers saved with this pool's commit: name -> {"version", "digest"}."""
        self._check_open()
        return dict(self._store.commit_record(self._commit).routers or {})

    def load_router(self, name: str) -> torch.nn.Module:
        """The router ``name`` as saved with this pool's commit, checked against its digest."""
        self._check_open()
        from dpsn.index import load_router, router_digest

        record = self.routers().get(name)
        if record is None:
            raise SnapshotNotFoundError(
                f"no router named {name!r} at commit {self._commit}; "
                f"saved: {sorted(self.routers())}"
            )
        router = load_router(self._store.router_group(name, record["version"], write=False))
        if router_digest(router) != record["digest"]:
            raise CorruptStoreError(
                f"router {name!r} does not match the digest its commit recorded; "
                "the store is damaged"
            )
        return router

    # -- history -------------------------------------------------------------------------------

    def log(self) -> list[Commit]:
        """Every commit, oldest first (including ones after this view's, if any)."""
        self._check_open()
        return self._store.log()

    def snapshot(self, name: str) -> Commit:
        """Pin this pool's current commit under ``name`` (uncommitted changes are not included:
        commit first). A pinned commit survives gc; open it with ``dpsn.open(path, at=name)``."""
        self._require_writable()
        self._store.pin(name, self._commit)
        return self._store.commit_record(self._commit)

    def snapshots(self) -> dict[str, int]:
        self._check_open()
        return {k: v["commit"] for k, v in self._store.snapshots().items()}

    def refresh(self) -> int:
        """Move a read-only pool to the newest commit; returns it."""
        self._check_open()
        if self.writable:
            return self._commit
        with self._lock:
            commit, index = self._store.load_head()
            version = self._store.commit_record(commit).generator
            if version != self._store.commit_record(self._commit).generator:
                self._generator = self._load_generator(version)
                self._stamp = self._generator_stamp()
            self._commit, self._index = commit, index
            if self._cache is not None:
                self._release_steps()
                self._cache.clear()
        return commit

    # -- health --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Cache and tier counters, in total and for the last read (``"last_step"``)."""
        out: dict[str, Any] = dict(self._io)
        cache = self._cache
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

    def info(self) -> dict[str, Any]:
        """A summary: spec, virtual size, what is persisted and what it costs on disk."""
        self._check_open()
        m = self._store.manifest
        records = self._store.segment_records()
        live = [records[s] for s in self._index.segments().tolist() if s in records]
        raw = sum(r.raw_bytes for r in live)
        stored = sum(r.stored_bytes for r in live)
        return {
            "path": str(self.path),
            "format_version": m.format_version,
            "rows": m.rows,
            "dim": m.dim,
            "dtype": m.dtype,
            "seed": m.seed,
            "generator": {
                "kind": m.generator["kind"],
                "config": m.generator["config"],
                "parameters": sum(p.numel() for p in self._generator.parameters()),
            },
            "virtual_parameters": m.rows * m.dim,
            "commit": self._commit,
            "commits": len(self._store.log()),
            "snapshots": len(self._store.snapshots()),
            "persisted_rows": len(self._index),
            "staged_rows": self.staged_rows,
            "delta_bytes_raw": len(self._index) * m.dim * self._dtype.itemsize,
            "segment_bytes_raw": raw,
            "segment_bytes_stored": stored,
            "compression_ratio": (raw / stored) if stored else None,
            "bytes_on_disk": self._store.disk_bytes(),
            "segments": len(records),
        }

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
        self, *, dry_run: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Delete what no commit at HEAD and no snapshot needs. Needs ``mode="r+"``."""
        self._require_writable()
        return self._store.gc(dry_run=dry_run, progress=progress)

    def segments_total(self) -> int:
        return len(self._store.segment_records())

    def row_commits(self, ids: Any) -> np.ndarray:
        """For each id, the commit that last wrote its persisted delta, or 0 if it has none."""
        self._check_open()
        flat = as_ids(ids, self.rows).reshape(-1).numpy()
        pos, found = self._index.find(flat)
        return np.where(found, self._index.commit[pos] if len(self._index) else 0, 0)

    # -- lifecycle -----------------------------------------------------------------------------

    def _release_steps(self) -> None:
        """Unpin the rows of the read and of every layer's step in flight (the cache is reset)."""
        if self._cache is not None:
            for key in (_READ, *self._owners):
                self._cache.unpin(key)
        self._owners.clear()

    def close(self) -> None:
        """Release the store (and the writer lock). Uncommitted changes are discarded."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None
        if not self._store.closed:
            self._staging.clear()
            self._store.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class Prefetch:
    """A handle on rows being paged in ahead of use; see :meth:`Pool.prefetch`."""

    def __init__(
        self,
        pool: Pool,
        future: Future[tuple[torch.Tensor, Any]] | None,
        key: tuple[str, int] | None = None,
    ) -> None:
        self._pool = pool
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
        return self._future is None or self._future.done()

    def release(self) -> None:
        """Unpin the prefetched rows (they become evictable again)."""
        if self._released:
            return
        self._released = True
        assert self._future is not None
        self._future.result()  # the job pins when it ends: let it end first
        cache = self._pool.cache
        if cache is not None:
            cache.unpin(self._key)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
