"""The operations maintenance writes a store with (``PersistedStore.begin_maintenance``).

Compaction (``_compact.py``), retention and gc (``_retention.py``) change a store beside the
commit protocol: they write segments and snapshot index copies, run their own LMDB write
transactions and remove what no kept commit needs. They do it through this object, never
through the store's private members, so that the store's internals can change without them.
The rules they keep are the commit protocol's: a file is written and fsynced (through the
store's file seam, ``dpsn.store.fs``) before the transaction that references it, and a file is
removed only after the transaction that stopped referencing it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np

from ._format import GENERATOR_GROUP, ROUTERS_GROUP, SNAPSHOTS_GROUP, ZARR_DIR, generator_name
from ._protected import protected_dirs

__all__ = ["Maintenance"]

T = TypeVar("T")


class Maintenance:
    """A writer's maintenance operations on one store (see the module docstring)."""

    def __init__(self, store: Any) -> None:
        # ``store``: the PersistedStore that owns this part (typed loosely: that module
        # imports this one, never the other way round)
        self._store = store  # what changes the store needs its writer lock (``ReadOnlyError``)

    @property
    def dbs(self) -> dict[bytes, Any]:
        """The store's LMDB databases by name, for :meth:`write`'s transaction."""
        return self._store.env.dbs

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one LMDB write transaction of the store's index (atomic and durable;
        re-run whole if the map has to grow, so ``fn`` must be safe to re-run)."""
        self._store.require_writer()
        return self._store.env.write(fn)

    def next_segment(self) -> int:
        """The id the next segment takes (checked above every recorded one)."""
        return self._store.next_segment()

    def snapshot_dir(self, commit: int) -> Path:
        """Where the pinned index copy of ``commit`` lives."""
        return self._store.pins.dir(commit)

    def snapshot_arrays_ok(self, path: Path, rows: int, sums: dict[str, int]) -> bool:
        """Whether the index copy at ``path`` holds ``rows`` rows matching checksums ``sums``."""
        return self._store.pins.arrays_ok(path, rows, sums)

    def write_snapshot_arrays(self, final: Path, columns: dict[str, np.ndarray]) -> None:
        """Write an index copy durably at ``final`` (temporary name, fsync, rename)."""
        self._store.require_writer()
        self._store.pins.write_arrays(final, columns)

    def unreferenced_versions(
        self, keep_commits: set[int] | None = None, *, checkpoint: int | None = None
    ) -> list[Path]:
        """Generator and router versions that no kept commit (default: HEAD and snapshots)
        uses (older ones, and leftovers of crashed commits), indexes that neither a snapshot
        nor the history ``checkpoint`` names, and temporaries."""
        snaps = self._store.snapshots().values()
        if keep_commits is None:
            keep_commits = {self._store.head(), *(r["commit"] for r in snaps)}
        records = [self._store.commit_record(c) for c in keep_commits]
        keep = {
            self._store.root / ZARR_DIR / GENERATOR_GROUP / generator_name(r.generator)
            for r in records
        }
        for r in records:
            for name, meta in (r.routers or {}).items():
                keep.add(
                    self._store.root / ZARR_DIR / ROUTERS_GROUP / name / f"{meta['version']:016x}"
                )
        keep_protected, found_protected = protected_dirs(self._store.root, records)
        keep |= keep_protected
        keep |= {self._store.pins.dir(r["commit"]) for r in snaps}
        if checkpoint is not None:
            keep.add(self._store.pins.dir(checkpoint))
        found = list(found_protected)
        gen_dir = self._store.root / ZARR_DIR / GENERATOR_GROUP
        if gen_dir.is_dir():
            found += [p for p in gen_dir.iterdir() if p.is_dir()]
        router_dir = self._store.root / ZARR_DIR / ROUTERS_GROUP
        if router_dir.is_dir():
            found += [
                v for n in router_dir.iterdir() if n.is_dir() for v in n.iterdir() if v.is_dir()
            ]
        snap_dir = self._store.root / ZARR_DIR / SNAPSHOTS_GROUP
        if snap_dir.is_dir():
            found += [p for p in snap_dir.iterdir() if p.is_dir()]
        return sorted(p for p in found if p not in keep)
