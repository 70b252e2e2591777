"""The commit protocol: the only way data becomes visible in a store.

1. write the new segment (and new generator weights, the protected set) under fresh names and
   fsync them, through the store's file seam (``dpsn.store.fs``);
2. in ONE LMDB write transaction: upsert the written rows, delete the dropped ones, add the
   segment and commit records, advance ``head``, update the index digests. LMDB commits are
   atomic and durable.

A crash before step 2 leaves unreferenced files that ``gc`` (or the next commit, which reuses
the names) removes; after it the commit is durable. A failure before step 2 removes what step 1
wrote and raises a typed error (``StoreFullError``/``StoreWriteError``); the caller keeps its
staged rows and may retry. tests/test_fault_seam.py fails every file operation of a commit in
turn and checks exactly that. Part of ``PersistedStore`` (``store.committer``)."""

from __future__ import annotations

import hashlib
import json
import time
import weakref
from dataclasses import dataclass, replace
from typing import Any

import lmdb
import numpy as np

from dpsn.errors import CorruptStoreError, StoreFullError, StoreWriteError

from ._checks import write_failed
from ._compact import count_commit_bytes
from ._digest import rows_hash
from ._format import (
    DB_COMMITS,
    DB_META,
    DB_ROWS,
    DB_SEGMENTS,
    FORMAT_LIFECYCLE,
    GENERATOR_GROUP,
    META_FORMAT,
    META_GENERATOR_PREFIX,
    META_HEAD,
    META_NEXT_SEGMENT,
    ROW_VALUE,
    ROW_VALUE_DTYPE,
    ZARR_DIR,
    generator_name,
    u64_key,
)
from ._generators import check_generator_state
from ._layered import LayeredIndex
from ._protected import protected_dir, write_protected
from ._records import Commit, Writer, read_u64
from ._rowindex import RowIndex

__all__ = ["CommitProtocol", "CommitRequest", "digest_after", "lmdb_keys", "provenance_digest"]


@dataclass(frozen=True)
class CommitRequest:
    """What one commit writes, as one object handed from the row path to the store (it was a
    dozen arguments passed down three layers). ``ids`` sorted unique int64 and ``deltas`` their
    ``[n, dim]`` values in the storage dtype; ``drops`` sorted ids going back to procedural;
    ``generator_state`` new generator weights (a new generator version); ``routers`` name ->
    digest of routers already written for this commit; ``state`` / ``usage`` per-row columns
    beside the deltas; ``lifecycle`` the lifecycle's JSON record; ``protected`` the new set of
    protected rows (None: the parent's carried forward); ``modules`` module configurations that
    changed (name -> JSON object), or with ``modules_exact`` the whole set (a rollback)."""

    ids: np.ndarray
    deltas: np.ndarray
    drops: np.ndarray
    message: str = ""
    stats: dict[str, Any] | None = None
    generator_state: dict[str, np.ndarray] | None = None
    routers: dict[str, str] | None = None
    state: np.ndarray | None = None
    usage: np.ndarray | None = None
    lifecycle: dict[str, Any] | None = None
    protected: np.ndarray | None = None
    modules: dict[str, dict[str, Any]] | None = None
    modules_exact: bool = False


def provenance_digest(*parts: Any) -> str:
    """The provenance hash of ``parts`` (canonical JSON, blake2b-128): what a commit records
    of its parent's provenance and what it wrote."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def lmdb_keys(ids: np.ndarray) -> list[bytes]:
    """LMDB keys (u64 big-endian) of many ids at once."""
    return np.ascontiguousarray(ids, dtype=">u8").view("V8").tolist()


def digest_change(
    index: RowIndex | LayeredIndex, ids: np.ndarray, segment: int, commit: int, drops: np.ndarray
) -> tuple[int, int, int]:
    """What a commit that writes sorted ``ids`` to ``segment`` and drops ``drops`` (all
    present) does to the row index's digest: the hash sum of the entries it replaces or
    deletes, how many it replaces, and the hash sum of the entries it adds. O(rows changed)."""
    had, seg, off, com = index.lookup(np.concatenate([ids, drops]))
    removed = int(
        rows_hash(np.concatenate([ids, drops])[had], seg[had], off[had], com[had]).sum(
            dtype=np.uint64
        )
    )
    n = len(ids)
    added = int(
        rows_hash(ids, np.full(n, segment), np.arange(n), np.full(n, commit)).sum(dtype=np.uint64)
    )
    return removed, int(had[:n].sum()), added


def digest_after(
    index: RowIndex | LayeredIndex,
    digest: int,
    ids: np.ndarray,
    segment: int,
    commit: int,
    drops: np.ndarray,
) -> int:
    drops = drops[index.contains(drops)]
    removed, _, added = digest_change(index, ids, segment, commit, drops)
    return (digest - removed + added) & ((1 << 64) - 1)


class CommitProtocol:
    """Commits of one store (its public operations only)."""

    def __init__(self, store: Any) -> None:
        # ``store``: the PersistedStore that owns this part (typed loosely: that module imports
        # this one, never the other way round). A weak proxy: no reference cycle, so a store
        # dropped without close() still goes (and releases its reader lease) at once.
        self._store = weakref.proxy(store)

    def commit(
        self, index: LayeredIndex | RowIndex, head: int, request: CommitRequest
    ) -> tuple[Commit, LayeredIndex]:
        """Persist what ``request`` (a :class:`CommitRequest`) holds on top of ``index`` at
        commit ``head``: ``deltas`` for sorted unique ``ids``, sorted ``drops`` (disjoint from
        ``ids``) back to procedural. Returns the record and the new index.

        ``generator_state`` (new generator weights) is written as a new generator version;
        ``routers`` maps names to digests of routers the caller has already written with
        :meth:`router_group` for this commit. Both join the provenance hash. ``state`` and
        ``usage`` are per-row columns written beside the deltas; ``lifecycle`` (JSON) goes into
        the commit record, and the first commit that has one raises the store's format
        version to ``FORMAT_LIFECYCLE``. ``protected`` (sorted unique ids) replaces the set of
        protected rows (``_protected.py``; empty: none); None carries the parent's forward.

        The row index's digest is updated in O(rows written): the hashes of the entries this
        commit replaces or deletes (taken from ``index``) are subtracted and those of the new
        entries added (``_digest.py``)."""
        store = self._store
        ids, deltas, drops, message = request.ids, request.deltas, request.drops, request.message
        stats, generator_state, routers = request.stats, request.generator_state, request.routers
        state, usage, lifecycle = request.state, request.usage, request.lifecycle
        protected, modules = request.protected, request.modules
        store.require_writer()
        if generator_state is not None:
            check_generator_state(generator_state)
        if isinstance(index, RowIndex):
            index = LayeredIndex.of(index, head)
        env = store.env
        current = store.head()
        if current != head:
            raise CorruptStoreError(
                f"{store.root}: HEAD moved from {head} to {current} under the writer lock"
            )
        parent = store.commit_record(head)
        commit_id = head + 1
        # Dropping a row that has no delta changes nothing; keep the record honest.
        present = index.contains(drops)
        drops = drops[present]
        segment_id = store.next_segment()
        seg = None
        gen_version, gen_record = parent.generator, None
        try:
            if len(ids) or len(drops):
                seg = store.segments.write(
                    segment_id,
                    commit_id,
                    ids,
                    deltas,
                    drops,
                    # A small commit gets one tight chunk instead of a mostly-padding one.
                    chunk_rows=min(store.manifest.chunk_rows, max(1, len(ids))),
                    state=state,
                    usage=usage,
                )
            if generator_state is not None:
                gen_version = commit_id
                gen_record = store.generators.write(commit_id, generator_state)
            protected_record = parent.protected
            if protected is not None:
                protected_record = (
                    write_protected(store.root, commit_id, protected, store.fs)
                    if len(protected)
                    else None
                )
        except OSError as e:
            store.fs.rmtree(protected_dir(store.root, commit_id), ignore_errors=True)
            if seg is not None:
                store.segments.remove(segment_id)
            store.fs.rmtree(
                store.root / ZARR_DIR / GENERATOR_GROUP / generator_name(commit_id),
                ignore_errors=True,
            )
            if isinstance(e, StoreFullError | StoreWriteError):
                raise
            raise write_failed(e, f"could not write commit {commit_id}") from e
        router_records = dict(parent.routers or {})
        for name, digest in (routers or {}).items():
            router_records[name] = {"version": commit_id, "digest": digest}
        module_records = {
            **({} if request.modules_exact else parent.modules or {}),
            **(modules or {}),
        }
        new_index = index.apply(ids, segment_id, commit_id, drops)
        # Module configurations join the provenance only where a store has some, so stores
        # without them keep the provenance they always had.
        extra = (module_records,) if module_records else ()
        record = Commit(
            id=commit_id,
            parent=head,
            time=time.time(),
            message=message,
            rows_written=len(ids),
            rows_dropped=len(drops),
            persisted_rows=len(new_index),
            segment=segment_id if seg else None,
            generator=gen_version,
            provenance=provenance_digest(
                parent.provenance,
                seg.checksums if seg else None,
                gen_record or gen_version,
                router_records,
                *([protected_record] if protected_record is not None else []),
                *extra,
            ),
            stats=stats,
            routers=router_records or None,
            lifecycle=lifecycle,
            protected=protected_record,
            modules=module_records or None,
        )
        removed, replaced, added = digest_change(index, ids, segment_id, commit_id, drops)
        values = np.empty(len(ids), dtype=ROW_VALUE_DTYPE)
        values["segment"] = segment_id
        values["offset"] = np.arange(len(ids))
        values["commit"] = commit_id
        # bytes objects built by numpy in C; putmulti inserts them in C: no per-row Python loop.
        items = list(zip(lmdb_keys(ids), values.view(f"V{ROW_VALUE.size}").tolist(), strict=True))
        drop_keys = lmdb_keys(drops)

        def flip(txn: lmdb.Transaction) -> Commit:
            w = Writer(txn, env.dbs)
            rows = w.digests[DB_ROWS]
            if rows.count != len(index):
                raise CorruptStoreError(
                    f"{store.root}: the LMDB row index holds {rows.count} rows but the writer's "
                    f"copy {len(index)}; the index changed or is damaged: nothing was committed"
                )
            rows.remove(removed, replaced + len(drops))
            rows.add(added, len(ids))
            db = env.dbs[DB_ROWS]
            if items:
                txn.cursor(db=db).putmulti(items, dupdata=False, overwrite=True)
            cur = txn.cursor(db=db)
            for k in drop_keys:  # drops are rare and small; py-lmdb has no batch delete
                if cur.set_key(k):
                    cur.delete()
            if seg is not None:
                count_commit_bytes(w, seg.stored_bytes)
                w.put_record(DB_SEGMENTS, u64_key(segment_id), seg.to_json())
                w.put(DB_META, META_NEXT_SEGMENT, u64_key(segment_id + 1))
            if gen_record is not None:
                w.put_record(DB_META, META_GENERATOR_PREFIX + u64_key(commit_id), gen_record)
            final = replace(record, index_digest=rows.total)
            w.put_record(DB_COMMITS, u64_key(commit_id), final.to_json())
            w.put(DB_META, META_HEAD, u64_key(commit_id))
            if lifecycle is not None:
                version = read_u64(txn.get(META_FORMAT, db=env.dbs[DB_META]), "format version")
                if version < FORMAT_LIFECYCLE:
                    w.put(DB_META, META_FORMAT, u64_key(FORMAT_LIFECYCLE))
            w.finish()
            return final

        try:
            record = env.write(flip)
        except BaseException:
            if seg is not None:
                store.segments.remove(segment_id)
            if protected is not None and len(protected):
                store.fs.rmtree(protected_dir(store.root, commit_id), ignore_errors=True)
            raise
        return record, store.maintain_runs(new_index, record)
