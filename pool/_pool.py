"""The pool as users see it: ``dpsn.create``, ``dpsn.open`` and ``Pool``.

A row's value is ``base(i) + delta(i)``: the base is regenerated from the pool seed by the
store's generator, the delta exists only for rows that were written. A writable pool stages
writes in memory; ``commit()`` makes them durable in one atomic step. A read-only pool (or a
snapshot view) sees exactly one commit for its whole life, whatever writers do meanwhile;
``refresh()`` moves it to the newest commit.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dpsn.errors import ReadOnlyError
from dpsn.hypernet import GENERATORS, Generator, make_generator
from dpsn.tiers import COMPRESSORS, Commit, Manifest, PersistedStore, RowIndex, VerifyReport

from ._staging import Staging
from ._validate import DTYPES, MAX_ROWS, as_deltas, as_ids, parse_dtype

CHUNK_BYTES = 256 << 10  # ~256 KiB chunks: big enough to stream, small enough for random reads


def _to_storage(values: torch.Tensor) -> np.ndarray:
    if values.dtype == torch.bfloat16:
        return values.contiguous().view(torch.int16).numpy().view(np.uint16)
    return values.contiguous().numpy()


def _from_storage(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def _default_chunk_rows(dim: int, itemsize: int) -> int:
    rows = max(1, CHUNK_BYTES // (dim * itemsize))
    return 1 << (rows.bit_length() - 1)


def _build_generator(generator: Any, *, dim: int, seed: int) -> Generator:
    if isinstance(generator, Generator):
        if generator.dim != dim or generator.seed != seed:
            raise ValueError(
                f"generator was built for dim={generator.dim}, seed={generator.seed}; "
                f"the pool has dim={dim}, seed={seed}"
            )
        return generator
    if isinstance(generator, str):
        return make_generator(generator, dim=dim, seed=seed)
    if isinstance(generator, dict):
        config = dict(generator)
        kind = config.pop("kind", None)
        if not isinstance(kind, str):
            raise ValueError(f"a generator spec needs a 'kind' (one of {sorted(GENERATORS)})")
        return make_generator(kind, dim=dim, seed=seed, **config)
    raise TypeError(
        f"generator= takes a kind name, a dict with 'kind', or a Generator; got {generator!r}"
    )


def create(
    path: str | os.PathLike[str],
    rows: int,
    dim: int,
    *,
    seed: int = 0,
    generator: str | dict[str, Any] | Generator = "hashed_slices",
    dtype: str | torch.dtype = torch.float32,
    chunk_rows: int | None = None,
    compressor: Literal["lz4", "zstd", "none"] = "lz4",
    device: str | torch.device | None = None,
    map_size: int | None = None,
) -> Pool:
    """Create a store at ``path`` and return it open for writing (``mode="r+"``).

    ``rows`` may be up to 2**63-1; rows are virtual until written, so a 10**12-row pool costs
    the generator's weights and nothing else. ``seed`` fixes every base row. The store's first
    commit (id 1, message "create") records the spec and generator weights.
    """
    for name, value in (("rows", rows), ("dim", dim), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"rows must be in 1..2**63-1, got {rows}")
    if not 1 <= dim <= 1 << 20:
        raise ValueError(f"dim must be in 1..2**20, got {dim}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in 0..2**64-1, got {seed}")
    if compressor not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {COMPRESSORS}, got {compressor!r}")
    dtype_name = parse_dtype(dtype)
    itemsize = DTYPES[dtype_name].itemsize
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(dim, itemsize)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    gen = _build_generator(generator, dim=dim, seed=seed)
    manifest = Manifest(
        rows=rows,
        dim=dim,
        dtype=dtype_name,
        seed=seed,
        generator={"kind": gen.kind, "config": gen.config()},
        chunk_rows=chunk_rows,
        compressor=compressor,
        created=time.time(),
        uuid=uuid.uuid4().hex,
    )
    state = {k: v.detach().cpu().float().numpy() for k, v in gen.state_dict().items()}
    kwargs = {} if map_size is None else {"map_size": map_size}
    store = PersistedStore.create(Path(path), manifest, state, **kwargs)
    return Pool(store, commit=1, index=RowIndex.empty(), device=device)


def open(
    path: str | os.PathLike[str],
    mode: Literal["r", "r+"] = "r",
    *,
    at: str | int | None = None,
    device: str | torch.device | None = None,
) -> Pool:
    """Open a store. ``mode="r"`` reads the newest commit (or ``at=``, a snapshot name or a
    commit id); ``mode="r+"`` also takes the store's single writer lock."""
    if mode not in ("r", "r+"):
        raise ValueError(f'mode must be "r" or "r+", got {mode!r}')
    if at is not None and mode != "r":
        raise ValueError('a past commit (at=...) can only be opened read-only: use mode="r"')
    store = PersistedStore.open(Path(path), writable=mode == "r+")
    try:
        if at is None:
            commit, index = store.load_head()
        else:
            commit = store.resolve(at)
            index = store.load_index(commit)
        return Pool(store, commit=commit, index=index, device=device)
    except BaseException:
        store.close()
        raise


class Pool:
    """A pool of rows backed by a store. Obtain one with :func:`dpsn.create` or :func:`dpsn.open`.

    Not thread-safe for writers: one thread stages and commits. Usable as a context manager;
    ``close()`` releases the writer lock. Uncommitted writes are discarded on close.
    """

    def __init__(
        self,
        store: PersistedStore,
        *,
        commit: int,
        index: RowIndex,
        device: str | torch.device | None = None,
    ) -> None:
        self._store = store
        self._commit = commit
        self._index = index
        m = store.manifest
        self._dtype = DTYPES[m.dtype]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._generator = self._load_generator(store.commit_record(commit).generator)
        self._staging = Staging(m.dim, self._dtype)

    def _load_generator(self, version: int) -> Generator:
        m = self._store.manifest
        # Built on the meta device: its initialisation would be thrown away by the stored weights.
        with torch.device("meta"):
            gen = make_generator(
                m.generator["kind"], dim=m.dim, seed=m.seed, **m.generator["config"]
            )
        state = self._store.read_generator(version)
        expected = set(gen.state_dict())
        if set(state) != expected:
            from dpsn.errors import CorruptStoreError

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
        return self._generator

    @property
    def head(self) -> int:
        """The commit this pool reads (and, when writable, commits on top of)."""
        return self._commit

    @property
    def writable(self) -> bool:
        return self._store.writable

    @property
    def staged_rows(self) -> int:
        return len(self._staging)

    def __repr__(self) -> str:
        mode = "r+" if self.writable else "r"
        return (
            f"Pool({str(self.path)!r}, mode={mode!r}, rows={self.rows}, dim={self.dim}, "
            f"dtype={self._dtype}, commit={self._commit}, persisted={len(self._index)})"
        )

    # -- reading -------------------------------------------------------------------------------

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

    @torch.no_grad()
    def base(self, ids: Any) -> torch.Tensor:
        """Procedural rows only (no deltas): what an untrained row looks like."""
        self._check_open()
        flat = as_ids(ids, self.rows)
        out = self._generator(flat.reshape(-1).to(self.device)).to(self._dtype)
        return out.reshape(*flat.shape, self.dim)

    def _lookup_deltas(self, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Sparse deltas of ``ids`` (any order, repeats allowed): the positions in ``ids`` that
        have a delta, staged or committed, and those deltas (pool dtype, CPU). Rows without one
        cost nothing here, so a read of procedural rows allocates no zeros."""
        staged, staged_values, dropped = self._staging.lookup(ids)
        from_disk = ~(staged | dropped)
        disk_pos = np.flatnonzero(from_disk)
        found, values = self._store.read_deltas(self._index, ids[disk_pos])
        disk_pos = disk_pos[found]
        disk_values = _from_storage(values, self._dtype)
        if not staged.any():
            return disk_pos, disk_values
        pos = np.concatenate([disk_pos, np.flatnonzero(staged)])
        return pos, torch.cat([disk_values, staged_values])

    @torch.no_grad()
    def delta(self, ids: Any) -> torch.Tensor:
        """The learned part of rows: committed delta, or the staged one when there is one."""
        self._check_open()
        flat = as_ids(ids, self.rows)
        pos, values = self._lookup_deltas(flat.reshape(-1).numpy())
        out = torch.zeros((flat.numel(), self.dim), dtype=self._dtype)
        out[torch.from_numpy(pos)] = values
        return out.reshape(*flat.shape, self.dim).to(self.device)

    @torch.no_grad()
    def read(self, ids: Any) -> torch.Tensor:
        """Rows ``base + delta`` for ids of any shape: returns ``[*ids.shape, dim]`` in the
        pool's dtype on the pool's device. Disk chunks are read once per call, however many
        ids share them; bases are regenerated per id (cheaper than deduplicating)."""
        self._check_open()
        full = as_ids(ids, self.rows)
        flat = full.reshape(-1)
        pos, values = self._lookup_deltas(flat.numpy())
        rows = self._generator(flat.to(self.device))
        if len(pos):
            sel = torch.from_numpy(pos).to(self.device)
            rows.index_add_(0, sel, values.to(self.device, rows.dtype))
        return rows.to(self._dtype).reshape(*full.shape, self.dim)

    # -- writing -------------------------------------------------------------------------------

    def write(self, ids: Any, deltas: Any, *, add: bool = False) -> None:
        """Stage deltas for rows. ``add=False`` replaces a row's delta, ``add=True`` adds to it
        (a gradient step). Repeated ids in one call: the last wins when replacing, all are
        summed when adding. Invalid input raises before anything is staged."""
        self._require_writable()
        flat = as_ids(ids, self.rows)
        values = as_deltas(deltas, flat.shape, self.dim, self._dtype)
        if values.shape[0] == 0:
            return
        uniq, inverse = np.unique(flat.reshape(-1).numpy(), return_inverse=True)
        inv = torch.from_numpy(inverse)
        if add:
            summed = torch.zeros((len(uniq), self.dim), dtype=torch.float32)
            summed.index_add_(0, inv, values.float())
            current = torch.zeros((len(uniq), self.dim), dtype=torch.float32)
            pos, values = self._lookup_deltas(uniq)
            current[torch.from_numpy(pos)] = values.float()
            new = (current + summed).to(self._dtype)
            if not torch.isfinite(new).all():
                from dpsn.errors import InvalidDeltaError

                raise InvalidDeltaError(f"adding these deltas overflows {self._dtype}")
        else:
            last = torch.full((len(uniq),), -1, dtype=torch.int64)
            last.scatter_reduce_(0, inv, torch.arange(len(inv)), reduce="amax")
            new = values[last]
        self._staging.put(uniq, new.contiguous())

    def drop(self, ids: Any) -> None:
        """Return rows to procedural at the next commit: their deltas are deleted."""
        self._require_writable()
        flat = as_ids(ids, self.rows)
        self._staging.drop(np.unique(flat.reshape(-1).numpy()))

    def discard(self) -> None:
        """Forget every staged write and drop."""
        self._staging.clear()

    def commit(self, message: str = "") -> Commit:
        """Make staged changes durable in one atomic step and return the new commit.

        On failure (full disk, crash) the store keeps its previous commit and the staged changes
        stay staged, so the commit can simply be retried.
        """
        self._require_writable()
        if not isinstance(message, str):
            raise TypeError("commit message must be a str")
        st = self._staging
        record, index = self._store.commit(
            self._index,
            self._commit,
            st.ids,
            _to_storage(st.values),
            st.drops,
            message=message,
        )
        self._index, self._commit = index, record.id
        st.clear()
        return record

    # -- history -------------------------------------------------------------------------------

    def log(self) -> list[Commit]:
        """Every commit, oldest first (including ones after this view's, if any)."""
        self._check_open()
        return self._store.log()

    def snapshot(self, name: str) -> Commit:
        """Pin this pool's current commit under ``name`` (staged changes are not included:
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
        commit, index = self._store.load_head()
        version = self._store.commit_record(commit).generator
        if version != self._store.commit_record(self._commit).generator:
            self._generator = self._load_generator(version)
        self._commit, self._index = commit, index
        return commit

    # -- health --------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """A summary: spec, virtual size, what is persisted and what it costs on disk."""
        self._check_open()
        m = self._store.manifest
        records = self._store.segment_records()
        live = [records[s] for s in self._index.segments().tolist() if s in records]
        raw = sum(r.raw_bytes for r in live)
        stored = sum(r.stored_bytes for r in live)
        itemsize = self._dtype.itemsize
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
            "delta_bytes_raw": len(self._index) * m.dim * itemsize,
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
        return self._store.verify(progress)

    def gc(self, *, dry_run: bool = False) -> dict[str, Any]:
        """Delete what no commit at HEAD and no snapshot needs. Needs ``mode="r+"``."""
        self._require_writable()
        return self._store.gc(dry_run=dry_run)

    def segments_total(self) -> int:
        return len(self._store.segment_records())

    def row_commits(self, ids: Any) -> np.ndarray:
        """For each id, the commit that last wrote its persisted delta, or 0 if it has none."""
        self._check_open()
        flat = as_ids(ids, self.rows).reshape(-1).numpy()
        pos, found = self._index.find(flat)
        return np.where(found, self._index.commit[pos] if len(self._index) else 0, 0)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the store (and the writer lock). Staged, uncommitted changes are dropped."""
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


__all__ = ["Pool", "create", "open"]
