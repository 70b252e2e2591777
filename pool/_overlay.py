"""Overlay stores: a writable store whose rows read another store's rows at a pinned commit,
plus its own deltas. The base is never written; many overlays (tasks, users, agents) share one
read-only foundation, as many LoRA adapters share one base model (S-LoRA, LoRAX).

Layout: an overlay is an ordinary store whose manifest (format 3, ``docs/format.md``) carries
``"base": {"path", "uuid", "commit", "snapshot"}``. It has the base's generator spec, but
stores zeros for the weights (no chunks): ``Pool.generator`` and ``Pool.base(ids)`` come from
the base at the pinned commit.

Pinning: the base's gc must keep the commit an overlay reads. Creating the overlay pins that
commit in the base as a snapshot named ``overlay-<uuid>`` (also when ``base_at=`` names a
snapshot the user made, which the user may delete later), which needs the base's writer lock
for that moment, so ``dpsn info BASE`` and ``Pool.snapshots()`` list every overlay that pinned
it. Only a base that cannot be written (a read-only directory, a busy writer) makes an overlay
on a user snapshot rely on that snapshot (``OverlayPinWarning``).

Sharing: every overlay of one base commit in a process reads the base through one read-only
pool (one cache of the base's rows); switching the overlay a request uses reloads nothing.
Opening an overlay checks its base: a missing commit is ``BaseCommitNotFoundError``, another
store at the path (uuid) ``BaseMismatchError``. Chains nest: a base may be an overlay itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid as uuid_mod
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpsn.errors import (
    BaseCommitNotFoundError,
    BaseMismatchError,
    DpsnError,
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

__all__ = [  # base_chain: from tiers
    "base_chain",
    "check_overlay_spec",
    "create_overlay_store",
    "overlay_tier",
]

# What an overlay takes from its base (``StoreSpec``'s fields but ``map_size``, which is the
# overlay's own LMDB map).
SPEC_FIELDS = ("rows", "dim", "seed", "generator", "dtype", "chunk_rows", "compressor")

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


def check_overlay_spec(base: Manifest, given: dict[str, Any], build_generator: Any) -> None:
    """Refuse settings that differ from the base's: an overlay reads its base's rows, so its
    shape, seed, generator and storage are the base's. ``given`` holds the settings the caller
    gave (a ``spec=``'s fields, or keywords other than their defaults; None: not given);
    ``build_generator(generator, dim=, seed=, rows=)`` builds a given generator to compare its
    configuration. Raises ``InvalidArgumentError`` naming every difference."""
    from dpsn._dtypes import parse_pool_dtype

    diffs = []
    for name in SPEC_FIELDS:
        value = given.get(name)
        if value is None:
            continue
        theirs: Any = getattr(base, name)
        if name == "dtype":
            value = parse_pool_dtype(value)
        elif name == "generator":
            value, theirs = _generator_record(value, base, build_generator), base.generator
        if _canonical(value) != _canonical(theirs):
            diffs.append(f"{name}={_short(value)} (the base's: {_short(theirs)})")
    if diffs:
        raise InvalidArgumentError(
            "an overlay has its base's spec, and what was given differs from the base: "
            + "; ".join(diffs)
            + ". Leave these settings out (the overlay takes them from its base), or create "
            "an ordinary store instead of an overlay"
        )


def _generator_record(generator: Any, base: Manifest, build: Any) -> dict[str, Any]:
    """``{"kind", "config"}`` of ``generator`` built for the base's shape and seed, as a
    manifest records it."""
    try:
        gen = build(generator, dim=base.dim, seed=base.seed, rows=base.rows)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"an overlay's generator= must be its base's: {e}") from e
    return {"kind": gen.kind, "config": gen.config()}


def _canonical(value: Any) -> str:
    """JSON text with sorted keys: a config compares equal to its manifest round trip."""
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = _canonical(value) if isinstance(value, dict) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


PIN_WAIT_S = 3.0  # how long creating an overlay waits for a busy base's writer lock


def _resolve_pin(base_path: Path, base_at: str | int | None, overlay_uuid: str) -> dict[str, Any]:
    """The base commit an overlay reads and the snapshot that pins it.

    The overlay always writes its own pin record in the base (a snapshot named
    ``overlay-<uuid>``, also when ``base_at`` names a snapshot the user made), so the base's gc
    keeps the commit whatever becomes of the user's snapshots, and ``dpsn info BASE`` lists the
    overlay. Pinning needs the base's writer lock for a moment (waited for up to
    ``PIN_WAIT_S``: agents creating overlays of one base at once take turns). Where the base
    cannot be written (a read-only directory, a writer holding it), an overlay on a snapshot
    the user made relies on that snapshot instead, with a warning; at a commit id or HEAD it
    is refused, since nothing would keep the commit."""
    name = f"{OVERLAY_PIN_PREFIX}{overlay_uuid}"
    deadline = time.monotonic() + PIN_WAIT_S
    while True:
        try:
            with PersistedStore.open(base_path, writable=True) as store:
                commit, _ = _resolve_at(store, base_at)
                store.pin(name, commit)
                return {"commit": commit, "snapshot": name, "uuid": store.manifest.uuid}
        except StoreLockedError as e:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            problem: Exception = e
        except (PermissionError, OSError) as e:  # ReadOnlyError is a PermissionError
            if isinstance(e, StoreNotFoundError):
                raise
            problem = e
        break
    with PersistedStore.open(base_path, writable=False) as store:
        commit, snapshot = _resolve_at(store, base_at)
        uuid = store.manifest.uuid
    if snapshot is None:
        raise InvalidArgumentError(
            f"cannot pin commit {commit} in the base {base_path} for the overlay ({problem}); "
            "snapshot it in the base first and pass base_at=<snapshot name>"
        )
    warnings.warn(
        f"could not write the overlay's pin record in its base {base_path} ({problem}); the "
        f"overlay relies on the base's snapshot {snapshot!r}: deleting it lets the base's gc "
        f"remove commit {commit}, which the overlay reads",
        OverlayPinWarning,
        stacklevel=5,  # the caller of dpsn.create
    )
    return {"commit": commit, "snapshot": snapshot, "uuid": uuid}


class OverlayPinWarning(UserWarning):
    """An overlay could not write its own pin record in its base (a read-only or busy base)
    and relies on a snapshot the user made there."""


def _resolve_at(store: PersistedStore, base_at: str | int | None) -> tuple[int, str | None]:
    """The commit ``base_at`` names in ``store`` and the user snapshot it names (or None)."""
    snaps = {k: v["commit"] for k, v in store.snapshots().items()}
    if isinstance(base_at, str) and base_at in snaps:
        return int(snaps[base_at]), base_at
    try:
        return (store.resolve(base_at) if base_at is not None else store.head()), None
    except SnapshotNotFoundError as e:
        raise BaseCommitNotFoundError(f"base_at={base_at!r}: {e}") from e


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
    try:
        with PersistedStore.open(base_path, writable=False) as store:
            state = store.read_generator(store.commit_record(pin["commit"]).generator)
        # The overlay reads its base's generator; its own weights are zeros, which Zarr stores
        # as no chunks at all, so an overlay costs its deltas and a few KiB of metadata.
        state = {k: np.zeros_like(v) for k, v in state.items()}
        return _create_pinned(path, bm, base_path, pin, overlay_uuid, state, create_kwargs)
    except BaseException:
        _unpin(base_path, pin["snapshot"], overlay_uuid)  # no overlay: no pin left behind
        raise


def _create_pinned(
    path: str | os.PathLike[str],
    bm: Manifest,
    base_path: Path,
    pin: dict[str, Any],
    overlay_uuid: str,
    state: dict[str, np.ndarray],
    create_kwargs: dict[str, Any],
) -> PersistedStore:
    """The overlay store itself, over a base commit already pinned."""
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


def _unpin(base_path: Path, snapshot: str, overlay_uuid: str) -> None:
    """Remove the pin record a failed create wrote (best effort: gc of the base otherwise
    keeps that commit until someone deletes the ``overlay-<uuid>`` snapshot)."""
    if snapshot != f"{OVERLAY_PIN_PREFIX}{overlay_uuid}":
        return  # the user's own snapshot: never ours to remove
    try:
        with PersistedStore.open(base_path, writable=True) as store:
            store.unpin(snapshot)
    except (OSError, DpsnError):
        pass
