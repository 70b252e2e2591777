"""``dpsn reshard``: rewrite a sharded root for another number of ranks, offline.

The new shard stores are written beside the old ones under new names (``shard-XXXX.G``, G the
global commit that will name them), with the old shards' spec, generator weights, maintenance
policy and routers; every persisted row (delta, optimizer state, usage) is read at the newest
global commit and written to the shard its id now hashes to. Only then is one global record
written naming the new shards: a crash before it leaves the old layout whole (the next
reshard or ``gc`` of the root removes the half-made directories), and after it the old shard
directories are deleted. Every old shard's writer lock is held throughout, so no training run
writes while the rows move. Costs one read and one write of every persisted row.

What moves besides the rows: routers (replicated), the modules' configurations, the protected
rows (each to its new owner) and the row lifecycle. The lifecycle's per-row statistics travel
with the rows (the ``usage`` column); its clocks (``step``, ``epoch``) may differ between the old
shards, so the new shards take the latest and each row's clock columns move by its shard's
difference: "used n steps ago" and a FREE row's pending decay stay exactly as they were (a
test checks the values bit for bit). Region budgets need no state: they are recomputed from
the rows at each consolidation.
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
        first = old[0]
        olds = [s.commit_record(c) for s, (_d, c) in zip(old, record.shards, strict=True)]
        life, shifts = _merged_lifecycle([r.lifecycle for r in olds], [s.root for s in old])
        protected = _protected_ids(old, olds)
        base = olds[0]
        gen_state = first.read_generator(base.generator)
        policy = read_policy(first)
        if life is not None:
            life = [_for_new_shard(life, j) for j in range(shards)]
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
                if usage_w and shifts is not None:  # the rows' clocks onto the merged clocks
                    usage = _rebase_usage(usage, *shifts[old.index(s)])
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
                        lifecycle=None if life is None else life[j],
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
            mine = None
            if protected is not None:
                mine = protected[owner_of(torch.from_numpy(protected), shards).numpy() == j]
            if routers or life is not None or base.modules or mine is not None:
                # what each shard carries beside its rows: the routers (replicated), the
                # lifecycle (a shard that got no rows needs its record too), the modules'
                # configurations and the protected rows it now owns
                rec, indexes[j] = s.commit(
                    indexes[j],
                    heads[j],
                    CommitRequest(
                        np.zeros(0, dtype=np.int64),
                        np.zeros((0, s.manifest.dim), dtype=s.storage_dtype),
                        np.zeros(0, dtype=np.int64),
                        message="reshard: routers, lifecycle, modules, protected rows",
                        routers=routers or None,
                        lifecycle=None if life is None else life[j],
                        modules=base.modules or None,
                        protected=mine,
                    ),
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


_USAGE_STEP_COLS = (2,)  # last: a step (docs/format.md, "Row lifecycle": usage columns)
_USAGE_EPOCH_COLS = (7, 8, 9)  # epoch, since, born: consolidations
_EVENTS = ("decayed", "pruned", "entered", "exited")


def _merged_lifecycle(
    records: list[dict[str, Any] | None], roots: list[Path]
) -> tuple[dict[str, Any] | None, list[tuple[int, int]] | None]:
    """The lifecycle the new shards start from, and per old shard the (steps, epochs) to add
    to its rows' clock columns. Every old shard must have one with the same policy (they were
    trained together); the new clocks are the latest of the old ones and each row's clocks
    move by the same amount, so "used n steps ago" and a FREE row's pending decay
    (``(1 - decay) ** (epoch_now - epoch_row)``) are exactly what they were. The thresholds
    (homeostasis moves them per shard) start from their mean; ``totals`` keep the root's sums
    (the row events go to the new shard 0, ``consolidations`` is the latest count);
    ``health`` is recomputed by the next consolidation."""
    from dpsn.errors import LifecycleError

    if all(r is None for r in records):
        return None, None
    for r, root in zip(records, roots, strict=True):
        if r is None:
            raise LifecycleError(
                f"{root} has no row lifecycle while other shards of the root have one; the "
                "root is inconsistent: open it with lifecycle= once and commit, then reshard"
            )
    live = [r for r in records if r is not None]
    if any(r["policy"] != live[0]["policy"] for r in live):
        raise LifecycleError(
            "the shards' lifecycle policies differ; open the root with one lifecycle= and "
            "commit once, then reshard"
        )
    step = max(int(r["step"]) for r in live)
    epoch = max(int(r["epoch"]) for r in live)
    totals = {k: sum(int(r.get("totals", {}).get(k, 0)) for r in live) for k in _EVENTS}
    totals["consolidations"] = max(int(r.get("totals", {}).get("consolidations", 0)) for r in live)
    merged = {
        **live[0],
        "step": step,
        "epoch": epoch,
        "enter": sum(float(r["enter"]) for r in live) / len(live),
        "exit": sum(float(r["exit"]) for r in live) / len(live),
        "totals": totals,
        "health": {},
    }
    return merged, [(step - int(r["step"]), epoch - int(r["epoch"])) for r in live]


def _for_new_shard(life: dict[str, Any], j: int) -> dict[str, Any]:
    if j == 0:
        return life
    totals = {**life["totals"], **dict.fromkeys(_EVENTS, 0)}
    return {**life, "totals": totals}


def _rebase_usage(usage: np.ndarray, steps: int, epochs: int) -> np.ndarray:
    """``usage`` rows (float64 ``[n, 10]``; NaN rows have no statistics and stay NaN) with
    their clock columns moved by ``steps`` and ``epochs``: exact (integers below 2**53)."""
    if steps == 0 and epochs == 0:
        return usage
    out = usage.copy()
    out[:, list(_USAGE_STEP_COLS)] += steps
    out[:, list(_USAGE_EPOCH_COLS)] += epochs
    return out


def _protected_ids(old: list[PersistedStore], records: list[Any]) -> np.ndarray | None:
    """Every old shard's protected rows at the global commit (sorted unique), or None."""
    from dpsn.store import read_protected

    parts = [
        read_protected(s.root, r.protected, s.manifest.rows)
        for s, r in zip(old, records, strict=True)
        if r.protected is not None
    ]
    if not parts:
        return None
    return np.unique(np.concatenate(parts)).astype(np.int64)
