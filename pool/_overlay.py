"""Overlay stores: a writable store whose rows read another store's rows at a pinned commit,
plus its own deltas. The base is never written; many overlays (tasks, users, agents) share one
read-only foundation, as many LoRA adapters share one base model (S-LoRA, LoRAX).

Layout: an overlay is an ordinary store whose manifest (format 3, ``docs/format.md``) carries
``"base": {"path", "uuid", "commit", "snapshot"}``. It has the base's generator spec, but
stores zeros for the weights (no chunks): ``Pool.generator`` and ``Pool.base(ids)`` come from
the base at the pinned commit.

Pinning: the base's gc must keep the commit an overlay reads. ``base_at=`` a snapshot name of
the base relies on that snapshot (the base may then be a read-only directory, or busy with a
writer); otherwise creating the overlay pins the commit in the base as a snapshot named
``overlay-<uuid>`` (which needs the base's writer lock for that moment), so ``dpsn info BASE``
and ``Pool.snapshots()`` list every overlay that pinned it.

Sharing: every overlay of one base commit in a process reads the base through one read-only
pool (one cache of the base's rows); switching the overlay a request uses reloads nothing.
Opening an overlay checks its base: a missing commit is ``BaseCommitNotFoundError``, another
store at the path (uuid) ``BaseMismatchError``. Chains nest: a base may be an overlay itself.
"""

from __future__ import annotations

import os
import threading
import time
import uuid as uuid_mod
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpsn.errors import (
    BaseCommitNotFoundError,
    BaseMismatchError,
    InvalidArgumentError,
    SnapshotNotFoundError,
    SnapshotUnavailableError,
    StoreLockedError,
    StoreNotFoundError,
)
from dpsn.store import (
    FORMAT_OVERLAY,
    OVERLAY_PIN_PREFIX,
    Manifest,
    PersistedStore,
    base_chain,
    read_manifest,
)
from dpsn.tiers import OverlayBase

__all__ = ["base_chain", "create_overlay_store", "overlay_tier"]  # base_chain: from tiers

_SHARED: weakref.WeakValueDictionary[tuple[str, str, int], Any] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.RLock()  # re-entered: a base may be an overlay


def shared_base(base: dict[str, Any], device: torch.device) -> Any:
    """The read-only pool of ``base`` (a manifest's base record) shared in this process."""
    from ._api import open as open_pool

    path = str(base["path"])
    key = (path, str(device), int(base["commit"]))
    with _SHARED_LOCK:
        pool = _SHARED.get(key)
        if pool is not None and not pool._store.closed:
            return pool
        try:
            pool = open_pool(path, at=int(base["commit"]), device=device)
        except StoreNotFoundError as e:
            raise StoreNotFoundError(f"the overlay's base store is gone: {e}") from e
        except (SnapshotNotFoundError, SnapshotUnavailableError) as e:
            raise BaseCommitNotFoundError(
                f"the overlay's base {path} no longer has commit {base['commit']} "
                f"(snapshot {base.get('snapshot')!r}): {e}"
            ) from e
        if pool.uuid != base["uuid"]:
            found = pool.uuid
            pool.close()
            raise BaseMismatchError(
                f"the store at {path} (uuid {found}) is not the overlay's base "
                f"(uuid {base['uuid']}); it was replaced or moved"
            )
        _SHARED[key] = pool
        return pool


def overlay_tier(manifest: Manifest, device: torch.device) -> OverlayBase:
    """The base tier of an overlay (see :class:`dpsn.tiers._overlay.OverlayBase`), with the
    base's generator (the overlay keeps none of its own)."""
    assert manifest.base is not None
    base = shared_base(manifest.base, device)
    for name in ("rows", "dim", "seed"):
        if getattr(base, name) != getattr(manifest, name):
            raise BaseMismatchError(f"the overlay's base has another {name} than the overlay")
    tier = OverlayBase(base.generator, base.read)
    tier.base_pool = base  # type: ignore[attr-defined]  # keeps the shared base alive
    return tier


def _resolve_pin(base_path: Path, base_at: str | int | None, overlay_uuid: str) -> dict[str, Any]:
    """The base commit an overlay reads and the snapshot that pins it (made when needed)."""
    with PersistedStore.open(base_path, writable=False) as store:
        snaps = {k: v["commit"] for k, v in store.snapshots().items()}
        if isinstance(base_at, str) and base_at in snaps:
            return {"commit": snaps[base_at], "snapshot": base_at, "uuid": store.manifest.uuid}
        try:
            commit = store.resolve(base_at) if base_at is not None else store.head()
        except SnapshotNotFoundError as e:
            raise BaseCommitNotFoundError(f"base_at={base_at!r}: {e}") from e
        uuid = store.manifest.uuid
    name = f"{OVERLAY_PIN_PREFIX}{overlay_uuid}"
    try:
        with PersistedStore.open(base_path, writable=True) as store:
            store.pin(name, commit)
    except (StoreLockedError, PermissionError, OSError) as e:
        raise InvalidArgumentError(
            f"cannot pin commit {commit} in the base {base_path} for the overlay ({e}); snapshot "
            "it in the base first and pass base_at=<snapshot name>"
        ) from e
    return {"commit": commit, "snapshot": name, "uuid": uuid}


def create_overlay_store(
    path: Path, base: str | os.PathLike[str], base_at: str | int | None, **create_kwargs: Any
) -> PersistedStore:
    """Make the overlay store at ``path`` over ``base`` (pinning the base commit first)."""
    base_path = Path(base).resolve()
    bm = read_manifest(base_path)
    if Path(path).resolve() == base_path:
        raise InvalidArgumentError("an overlay cannot be created at its base's own path")
    overlay_uuid = uuid_mod.uuid4().hex
    pin = _resolve_pin(base_path, base_at, overlay_uuid)
    with PersistedStore.open(base_path, writable=False) as store:
        state = store.read_generator(store.commit_record(pin["commit"]).generator)
    # The overlay reads its base's generator; its own weights are zeros, which Zarr stores as
    # no chunks at all, so an overlay costs its deltas and a few KiB of metadata.
    state = {k: np.zeros_like(v) for k, v in state.items()}
    manifest = Manifest(
        rows=bm.rows,
        dim=bm.dim,
        dtype=bm.dtype,
        seed=bm.seed,
        generator=bm.generator,
        chunk_rows=bm.chunk_rows,
        compressor=bm.compressor,
        created=time.time(),
        uuid=overlay_uuid,
        format_version=FORMAT_OVERLAY,
        base={"path": str(base_path), **pin},
    )
    return PersistedStore.create(Path(path), manifest, state, **create_kwargs)
