"""Roll a store's rows back to an earlier commit, by a new commit (history is append-only).

Why: in a sharded root a shard can be one commit ahead of the newest global commit, when its
rank died between its own commit (phase 1) and the global record (phase 2). The global commit
is what the run resumes from, so before a writer trains on, the shard's rows must be what that
global commit names. Store commits only go forward (the LMDB HEAD and the index digest move
together), so the rollback is one more ordinary commit: every row written or dropped after the
target is rewritten with its value at the target (delta, optimizer state, usage statistics) or
dropped where it had none; the generator, routers, protected rows and module configurations
(``Pool.modules()``: what ``PoolLayer.from_store`` rebuilds) the target used are restored. It
costs what it rewrites: the rows changed since the target.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from ._persisted import CommitRequest
from ._protected import read_protected
from .shards import copy_durably

if TYPE_CHECKING:
    from ._persisted import Commit, PersistedStore


def widths(store: PersistedStore, index: object, ids: np.ndarray) -> tuple[int, int]:
    """The per-row state and usage widths the rows' segments hold (the most common ones)."""
    found, seg, _off, _c = index.lookup(ids)  # type: ignore[attr-defined]
    segs = np.unique(seg[found])
    if not len(segs):
        return 0, 0
    recs = [store.segment_record(int(s)) for s in segs]
    state = Counter(r.state_width for r in recs).most_common(1)[0][0]
    usage = Counter(r.usage_width for r in recs).most_common(1)[0][0]
    return state, usage


def roll_back(store: PersistedStore, target: int, message: str | None = None) -> Commit | None:
    """Make HEAD's rows, generator, routers, protected rows and module configurations those of
    ``target`` by one new commit (None when HEAD is ``target`` already). ``store`` must be open
    for writing; nothing is read into the caller's caches, so open pools on it afterwards."""
    head, index_h = store.load_head()
    if head == target:
        return None
    index_t = store.load_index(target)
    ids_h, commits_h = index_h.ids, index_h.commit
    changed = ids_h[commits_h > target]  # written (again) after the target
    gone = index_t.ids[~index_h.contains(index_t.ids)]  # dropped after the target
    rows = np.union1d(changed, gone).astype(np.int64)
    state_w, usage_w = widths(store, index_t, rows)
    found, deltas, state, usage = store.read_deltas(
        index_t, rows, state_width=state_w, usage_width=usage_w
    )
    keep, drops = rows[found], rows[~found]
    rec_t, rec_h = store.commit_record(target), store.commit_record(head)
    generator_state = None
    if rec_t.generator != rec_h.generator:
        generator_state = store.read_generator(rec_t.generator)
    routers = {}
    for name, r in (rec_t.routers or {}).items():
        if (rec_h.routers or {}).get(name) != r:  # copy the target's version under the new id
            src = store.router_dir(name, int(r["version"]))
            dst = store.router_dir(name, head + 1)
            copy_durably(src, dst)
            routers[name] = r["digest"]
    has_usage = usage_w and len(keep) and not np.isnan(usage).all()
    request = CommitRequest(
        keep,
        deltas,
        drops,
        message=message or f"roll back to commit {target}",
        generator_state=generator_state,
        routers=routers or None,
        state=state if state_w else None,
        usage=usage if has_usage else None,
        lifecycle=rec_t.lifecycle,
        protected=_protected_at(store, rec_t) if rec_t.protected != rec_h.protected else None,
        # the target's configurations exactly: a module saved after it is gone again
        modules=rec_t.modules if rec_t.modules != rec_h.modules else None,
        modules_exact=rec_t.modules != rec_h.modules,
    )
    record, _ = store.commit(index_h, head, request)
    return record


def _protected_at(store: PersistedStore, record: Commit) -> np.ndarray:
    """The protected rows as of ``record`` (none: an empty set), to restore them."""
    if record.protected is None:
        return np.zeros(0, dtype=np.int64)
    return read_protected(store.root, record.protected, store.manifest.rows, store.fs)
