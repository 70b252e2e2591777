"""Create and open sharded roots (``dpsn.distributed``; ``dpsn.create(..., shards=N)`` and
``dpsn.open(root, process_group=pg)`` land here)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from dpsn.errors import (
    DistributedError,
    InvalidArgumentError,
    StoreExistsError,
)
from dpsn.store import PersistedStore, rollback
from dpsn.store import shards as layout

from . import _api
from ._sharded import ShardedPool, owner_of


def _group(process_group: Any) -> Any:
    if process_group is not None:
        return process_group
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "a sharded pool needs torch.distributed: call torch.distributed.init_process_group "
            "first, or pass process_group="
        )
    return dist.group.WORLD


def create_root(
    root: str | os.PathLike[str], rows: int, dim: int, *, shards: int, **kwargs: Any
) -> layout.GlobalCommit:
    """Create a sharded root offline (one process): ``shards`` stores that share the spec and
    the generator's weights, and global commit 1 naming their first commits. ``kwargs`` are
    :func:`dpsn.create`'s. ``keep_last`` defaults to 3 for shards, so that a reader of the
    previous global commit finds it while a shard is ahead of it (phase 1 of a commit: the
    shard's commit and the compaction it may trigger), and a rollback finds it after a crash."""
    layout.check_shards(shards)
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StoreExistsError(f"{root} exists and is not an empty directory")
    if kwargs.get("keep_last") is None:  # dpsn.create passes None for "not given"
        kwargs["keep_last"] = 3
    for k in ("device", "cache_rows", "policy"):
        kwargs.pop(k, None)  # the cache of an offline create is never used
    gen = _api._build_generator(
        kwargs.pop("generator", "hashed_slices"), dim=dim, seed=kwargs.get("seed", 0), rows=rows
    )
    made = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        first = None
        for i in range(shards):
            with _api.create(
                root / layout.shard_dir_name(i), rows, dim, generator=gen, **kwargs
            ) as p:
                first = p.uuid if first is None else first
        record = layout.write_global(
            root, [(layout.shard_dir_name(i), 1) for i in range(shards)], "create"
        )
        # the manifest last: a root is a sharded root only once it is whole
        layout.write_root_manifest(
            root,
            layout.RootManifest(uuid=uuid.uuid4().hex, rows=rows, dim=dim, created=time.time()),
        )
        return record
    except BaseException:
        if made:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()
        raise


def create(
    root: str | os.PathLike[str],
    rows: int,
    dim: int,
    *,
    shards: int | None = None,
    process_group: Any = None,
    device: str | torch.device | None = None,
    cache_rows: int | None = None,
    policy: str = "lru",
    **kwargs: Any,
) -> ShardedPool | layout.GlobalCommit:
    """Create a sharded root. With a process group (given, or the default one when
    torch.distributed is initialized) this is a collective: rank 0 creates ``shards`` (default:
    the group's size) stores, then every rank opens its own for writing and gets a
    :class:`ShardedPool`. Without one, it creates the root offline and returns its first
    :class:`layout.GlobalCommit`. Other arguments are :func:`dpsn.create`'s."""
    distributed = process_group is not None or (dist.is_available() and dist.is_initialized())
    if not distributed:
        if shards is None:
            raise InvalidArgumentError("an offline create of a sharded root needs shards=N")
        return create_root(root, rows, dim, shards=shards, **kwargs)
    group = _group(process_group)
    world = dist.get_world_size(group)
    if shards is None:
        shards = world
    layout.check_shards(shards)
    if shards != world:
        raise InvalidArgumentError(
            f"shards={shards}, but the process group has {world} ranks: one shard per rank"
        )
    status = torch.zeros(1, dtype=torch.int64)
    problem = None
    if dist.get_rank(group) == 0:
        try:
            create_root(root, rows, dim, shards=shards, **kwargs)
        except BaseException as e:
            problem, status[0] = e, 1
    _broadcast(status, group)
    if problem is not None:
        raise problem
    if int(status):
        raise DistributedError(f"rank 0 could not create the sharded root {root}")
    return open(
        root, "r+", process_group=group, device=device, cache_rows=cache_rows, policy=policy
    )


def _broadcast(status: torch.Tensor, group: Any) -> None:
    backend = dist.get_backend(group)
    if backend == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
        t = status.to(dev)
        dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
        status.copy_(t.cpu())
    else:
        dist.broadcast(status, src=dist.get_global_rank(group, 0), group=group)


def open(  # mirrors dpsn.open
    root: str | os.PathLike[str],
    mode: Literal["r", "r+"] = "r",
    *,
    process_group: Any = None,
    at: int | None = None,
    device: str | torch.device | None = None,
    cache_rows: int | None = None,
    policy: str = "lru",
    lifecycle: Any = None,
    alone_ok: bool = False,
) -> ShardedPool:
    """Open this rank's shard of a sharded root at its newest global commit (or global commit
    ``at``, read-only). The group must have one rank per shard (``dpsn reshard`` changes the
    count). For writing, a shard that got ahead of the global commit (its rank died between
    the two phases of a commit) is first rolled back to it, so the run resumes from a
    consistent cut. Not a collective (no rank waits for another). ``alone_ok`` (a published
    root): read-only without torch.distributed opens a :class:`ShardedReader` instead."""
    root = Path(root)
    alone = process_group is None and not (dist.is_available() and dist.is_initialized())
    if alone_ok and mode == "r" and alone:
        return ShardedReader(  # type: ignore[return-value]
            root, at=at, device=device, cache_rows=cache_rows, policy=policy
        )
    group = _group(process_group)
    manifest = layout.read_root_manifest(root)
    record = layout.read_global(root, at)
    if at is not None and mode != "r":
        raise InvalidArgumentError('a past global commit (at=...) opens read-only: mode="r"')
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if record.count != world:
        raise InvalidArgumentError(
            f"{root} has {record.count} shards but the process group {world} ranks: run with "
            f"{record.count} ranks, or `dpsn reshard {root} --shards {world}` first"
        )
    shard_dir, commit = record.shards[rank]
    path = root / shard_dir
    if mode == "r+":
        store = PersistedStore.open(path, writable=True)
        try:
            if store.head() < commit:
                from dpsn.errors import CorruptStoreError

                raise CorruptStoreError(
                    f"{path}: HEAD {store.head()} is behind global commit {record.id}, which "
                    f"names its commit {commit}; the root is damaged"
                )
            rollback.roll_back(store, commit, message=f"roll back to global commit {record.id}")
        finally:
            store.close()
        local = _api.open(
            path, "r+", device=device, cache_rows=cache_rows, policy=policy, lifecycle=lifecycle
        )
    else:
        local = _api.open(path, "r", at=commit, device=device, cache_rows=cache_rows, policy=policy)
    if local.rows != manifest.rows or local.dim != manifest.dim:
        local.close()
        from dpsn.errors import CorruptStoreError

        raise CorruptStoreError(f"{path}: its rows/dim differ from the root's manifest")
    return ShardedPool(local, root=root, manifest=manifest, record=record, group=group)


class ShardedReader:
    """Every shard of a sharded root at one global commit, read-only in this one process (no
    process group): what ``dpsn.open("s3://...")`` of a published sharded root returns when
    torch.distributed is not initialized and no ``process_group=`` is given (with one, each
    rank gets its own shard as a :class:`ShardedPool`). ``shards[i]`` is shard i's pool."""

    writable = False

    def __init__(
        self,
        root: Path,
        *,
        at: int | None = None,
        device: str | torch.device | None = None,
        cache_rows: int | None = None,
        policy: str = "lru",
    ) -> None:
        self.root = Path(root)
        self.manifest = layout.read_root_manifest(self.root)
        self.global_commit = layout.read_global(self.root, at)
        self.shards: list[Any] = []
        try:
            for d, commit in self.global_commit.shards:
                self.shards.append(
                    _api.open(
                        self.root / d,
                        "r",
                        at=commit,
                        device=device,
                        cache_rows=cache_rows,
                        policy=policy,
                    )
                )
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        return self.root

    @property
    def head(self) -> int:
        """The global commit read."""
        return self.global_commit.id

    @property
    def rows(self) -> int:
        return self.manifest.rows

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def read(self, ids: Any) -> torch.Tensor:
        """Rows ``[*shape, dim]`` of ``ids``: each id read from the shard that owns it (one
        read per shard, never per row)."""
        ids_t = torch.as_tensor(ids, dtype=torch.int64)
        flat = ids_t.reshape(-1).cpu()
        owner = owner_of(flat, len(self.shards))
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=len(self.shards)).tolist()
        parts = [
            pool.read(part)
            for pool, part in zip(self.shards, torch.split(flat[order], counts), strict=True)
            if len(part)
        ]
        out = torch.empty((len(flat), self.dim), dtype=self.shards[0].dtype)
        if parts:
            out[order] = torch.cat([p.to(out.device) for p in parts])
        return out.reshape(*ids_t.shape, self.dim)

    def verify(self) -> list[Any]:
        """Each shard's :class:`VerifyReport`, in shard order."""
        return [pool.verify() for pool in self.shards]

    def close(self) -> None:
        for pool in self.shards:
            pool.close()
        self.shards = []

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ShardedReader({str(self.root)!r}, global commit {self.head}, "
            f"{len(self.shards)} shards, read-only)"
        )


def publish(
    root: str | os.PathLike[str], url: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Publish a sharded root's newest global commit to object storage, offline (``dpsn push
    ROOT URL``; a running job publishes with :meth:`ShardedPool.publish`): each shard's commit
    under ``URL/<shard dir>`` (each shard's writer lock held while it uploads), then the root
    manifest, the global record and the root's HEAD, last, so a reader of the bucket opens a
    consistent global commit or the previous one. A shard whose HEAD is not the commit the
    global record names (a rank died between the two phases of a commit) is refused."""
    from dpsn.errors import CorruptStoreError
    from dpsn.store import remote

    root = Path(root)
    layout.read_root_manifest(root)
    record = layout.read_global(root)
    shards = []
    for d, commit in record.shards:
        store = PersistedStore.open(root / d, writable=True)  # no commit while it uploads
        try:
            if store.head() != commit:
                raise CorruptStoreError(
                    f"{root / d}: HEAD {store.head()} is not commit {commit}, which global "
                    f"commit {record.id} names (a rank died between the phases of a commit): "
                    "open the root for writing once (it rolls the shard back), then push"
                )
            shards.append(remote.publish(store, f"{url.rstrip('/')}/{d}", storage_options))
        finally:
            store.close()
    remote.publish_global(root, record, url, storage_options)
    return {
        "global_commit": record.id,
        "shards": shards,
        "objects_uploaded": sum(s["objects_uploaded"] for s in shards),
        "bytes_uploaded": sum(s["bytes_uploaded"] for s in shards),
        "url": url,
    }


def read_rows(root: str | os.PathLike[str], ids: Any, *, at: int | None = None) -> torch.Tensor:
    """Rows ``[*shape, dim]`` of a sharded root at its newest global commit (or ``at``), read
    in this one process from every shard (no process group): for checks, tools and export."""
    root = Path(root)
    layout.read_root_manifest(root)
    record = layout.read_global(root, at)
    ids_t = torch.as_tensor(ids, dtype=torch.int64)
    flat = ids_t.reshape(-1)
    owner = owner_of(flat, record.count)
    out: torch.Tensor | None = None
    for i, (shard_dir, commit) in enumerate(record.shards):
        where = torch.nonzero(owner == i).flatten()
        if not len(where):
            continue
        with _api.open(root / shard_dir, "r", at=commit, cache_rows=0) as p:
            rows = p.read(flat[where])
        if out is None:
            out = torch.empty((len(flat), rows.shape[1]), dtype=rows.dtype)
        out[where] = rows
    if out is None:
        out = torch.empty((0, layout.read_root_manifest(root).dim))
    return out.reshape(*ids_t.shape, -1)
