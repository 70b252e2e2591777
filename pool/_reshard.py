"""``dpsn reshard``: rewrite a sharded root for another number of ranks, offline.

The new shard stores are written beside the old ones under new names (``shard-XXXX.G``, G the
global commit that will name them), with the old shards' spec, generator weights, maintenance
policy and routers; every persisted row (delta, optimizer state, usage) is read at the newest
global commit and written to the shard its id now hashes to. Only then is one global record
written naming the new shards: a crash before it leaves the old layout whole (the next
reshard or ``gc`` of the root removes the half-made directories), and after it the old shard
directories are deleted. Every old shard's writer lock is held throughout, so no training run
writes while the rows move. Costs one read and one write of every persisted row.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpsn.errors import InvalidArgumentError
from dpsn.store import CommitRequest, PersistedStore, read_policy, rollback, write_policy
from dpsn.store import shards as layout

from ._sharded import owner_of

CHUNK_ROWS = 1 << 16  # rows read and routed at a time: bounds memory to ~CHUNK_ROWS rows


def reshard(
    root: str | os.PathLike[str],
    shards: int,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Rewrite the sharded root ``root`` for ``shards`` ranks; returns a summary (old and new
    counts, rows moved, the new global commit)."""
    layout.check_shards(shards)
    root = Path(root)
    layout.read_root_manifest(root)
    record = layout.read_global(root)
    generation = record.id + 1
    for leftover in root.glob(f"shard-*.{generation}"):  # a crashed reshard's half-made dirs
        shutil.rmtree(leftover)
    old = [PersistedStore.open(root / d, writable=True) for d, _ in record.shards]
    new: list[PersistedStore] = []
    try:
        first, first_commit = old[0], record.shards[0][1]
        for s, (_d, c) in zip(old, record.shards, strict=True):
            if s.commit_record(c).lifecycle is not None:
                raise InvalidArgumentError(
                    f"{s.root}: reshard of stores with a row lifecycle is not supported (their "
                    "per-region statistics cannot be split by id)"
                )
        base = first.commit_record(first_commit)
        gen_state = first.read_generator(base.generator)
        policy = read_policy(first)
        for j in range(shards):
            m = dataclasses.replace(first.manifest, uuid=uuid.uuid4().hex)
            s = PersistedStore.create(root / layout.shard_dir_name(j, generation), m, gen_state)
            write_policy(s, policy)
            new.append(s)
        heads = [1] * shards
        indexes: list[Any] = [s.load_head()[1] for s in new]
        moved = 0
        total = sum(len(s.load_index(c)) for s, (_d, c) in zip(old, record.shards, strict=True))
        for s, (_d, c) in zip(old, record.shards, strict=True):
            index = s.load_index(c)
            ids_all = np.asarray(index.ids, dtype=np.int64)
            for a in range(0, len(ids_all), CHUNK_ROWS):
                ids = ids_all[a : a + CHUNK_ROWS]
                state_w, usage_w = rollback.widths(s, index, ids)
                found, deltas, state, usage = s.read_deltas(
                    index, ids, state_width=state_w, usage_width=usage_w
                )
                ids = ids[found]
                owner = owner_of(torch.from_numpy(ids), shards).numpy()
                for j in np.unique(owner).tolist():
                    sel = owner == j
                    has_usage = usage_w and not np.isnan(usage[sel]).all()
                    request = CommitRequest(
                        ids[sel],
                        deltas[sel],
                        np.zeros(0, dtype=np.int64),
                        message=f"reshard: rows of {s.root.name}",
                        state=state[sel] if state_w else None,
                        usage=usage[sel] if has_usage else None,
                    )
                    rec, indexes[j] = new[j].commit(indexes[j], heads[j], request)
                    heads[j] = rec.id
                moved += len(ids)
                if progress is not None:
                    progress(moved, total)
        for j, s in enumerate(new):  # routers are replicated: every new shard gets shard 0's
            routers = {}
            for name, r in (base.routers or {}).items():
                dst = s.router_dir(name, heads[j] + 1)
                layout.copy_durably(first.router_dir(name, int(r["version"])), dst)
                routers[name] = r["digest"]
            if routers:
                rec, indexes[j] = s.commit(
                    indexes[j],
                    heads[j],
                    np.zeros(0, dtype=np.int64),
                    np.zeros((0, s.manifest.dim), dtype=s.storage_dtype),
                    np.zeros(0, dtype=np.int64),
                    message="reshard: routers",
                    routers=routers,
                )
                heads[j] = rec.id
        for s in new:
            s.close()
        new = []
        dirs = [layout.shard_dir_name(j, generation) for j in range(shards)]
        out = layout.write_global(
            root,
            list(zip(dirs, heads, strict=True)),
            f"reshard {record.count} -> {shards} shards",
        )
    except BaseException:
        for s in new:
            path = s.root
            s.close()
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        for s in old:
            s.close()
    for d, _c in record.shards:  # the new record is durable: the old layout is garbage now
        shutil.rmtree(root / d, ignore_errors=True)
    return {
        "old_shards": record.count,
        "new_shards": shards,
        "rows_moved": moved,
        "global_commit": out.id,
        "dirs": dirs,
    }
