"""A pool sharded row-wise over ``torch.distributed`` ranks (TorchRec's row-wise sharding).

Each rank owns the rows whose id hashes to it (``owner_of``) and keeps them in its own shard
store (an ordinary :class:`Pool`) under one root (``tiers._shards`` has the layout). Executors
(``PoolLayer``, ``PoolEmbedding``, a user's own) need no change: :class:`ShardedPool` keeps the
executor contract (``page_in`` -> a batch -> ``apply_grads`` -> ``release``), and the batch it
returns moves rows between ranks with three all-to-alls a step:

1. forward, ids: every rank sends the distinct ids it needs to their owners;
2. forward, rows: each owner pages its requested rows in from its own tier stack (pinned until
   the backward) and sends their values back; the requester computes on a private copy;
3. backward, row gradients: each requester sends its summed gradient of each row to the row's
   owner, which adds the contributions of all ranks and applies one row step.

Sharding changes placement, not the math: the owner steps a row with the sum of its gradients
over every rank's uses, as the single-process pool steps it with the sum over the global batch
(only the order of that float32 sum differs). Dense parameters (routers, the rest of the model)
stay with the user's DDP. Every rank must call ``page_in``, the backward and ``commit`` in the
same order (SPMD), as with any collective.

What differs from one process (documented, not hidden): ``row_clip`` clips each rank's partial
sum; a step whose gradients are not finite on some rank is skipped by every owner that receives
a gradient from that rank; usage statistics count one use per requesting rank and step; a row
selection that needs usage statistics (``SparseFinetune``) runs at each owner among its own
rows (:meth:`ShardedRowBatch.select_at_owner`), so an int ``top`` is per shard.

Axes: n distinct ids this rank needs, r ids this rank owns and was asked for, D = dim, W ranks.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dpsn.errors import DistributedError, DpsnError, InvalidDeltaError, ReadOnlyError
from dpsn.hypernet import xxh64_ids
from dpsn.store import shards as layout
from dpsn.tiers import SECOND_BACKWARD, RowBatch, check_row_mask, check_update_scale

from ._pool import Pool

_TOP_BIT_CLEAR = (1 << 63) - 1


def owner_of(ids: torch.Tensor, shards: int) -> torch.Tensor:
    """The rank (shard) that owns each id: ``xxh64(id, layout.PLACEMENT_SEED) mod shards`` on the
    hash with its top bit cleared. Hashing spreads consecutive or clustered ids evenly."""
    h = xxh64_ids(ids, layout.PLACEMENT_SEED)
    return torch.remainder(h.bitwise_and_(_TOP_BIT_CLEAR), shards)


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    """All-to-all of the rows of ``x``: ``send[j]`` rows go to rank j, ``recv[j]`` come from it."""
    out = torch.empty((sum(recv), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class ShardedRowBatch:
    """The rows of one executor step on a sharded pool: :class:`dpsn.tiers.RowBatch`'s contract
    (``ids``, ``counts``, ``inverse``, ``order``, ``offsets``, ``table``, ``index``,
    ``use_index``, ``anchor``, ``apply_grads``, ``release``) over rows fetched from their owners.

    ``table`` is a private ``[n, D]`` copy of the rows (``index`` is ``arange(n)``). The
    exchange of gradients is a collective: it runs in ``apply_grads``, or in ``release`` for a
    rank that has no gradient to give (no rows, or a skipped step), so that every rank takes
    part once per batch whenever a backward is expected (the batch was paged in under grad
    mode on a writable pool).
    """

    def __init__(
        self,
        pool: ShardedPool,
        ids: torch.Tensor,
        counts: torch.Tensor,
        inverse: torch.Tensor,
        table: torch.Tensor,
        perm: torch.Tensor,
        send: list[int],
        recv: list[int],
        local: RowBatch,
        expects_backward: bool,
    ) -> None:
        self.ids, self.counts, self.inverse, self.table = ids, counts, inverse, table
        self.index = torch.arange(len(ids), device=ids.device)
        self.order = torch.argsort(inverse.reshape(-1), stable=True)
        self.anchor = torch.zeros((), requires_grad=True)
        self.applied = False
        self.spilled = True
        self.slots = None
        self._pool, self._perm, self._send, self._recv = pool, perm, send, recv
        self._local: RowBatch | None = local
        self._expects_backward = expects_backward
        self._offsets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            out = torch.zeros(len(self.ids) + 1, dtype=torch.int64, device=self.ids.device)
            torch.cumsum(self.counts, 0, out=out[1:])
            self._offsets = out
        return self._offsets

    @property
    def use_index(self) -> torch.Tensor:
        return self.inverse

    def rows(self) -> torch.Tensor:
        return self.table

    def keep_rows(self) -> None:
        """The table is already this batch's own copy."""

    def deltas(self) -> torch.Tensor:
        raise DpsnError(
            "a sharded pool keeps deltas on their owner rank: train_generator=True is not "
            "supported on a sharded pool (train the generator on one process)"
        )

    def apply_grads(
        self,
        grads: torch.Tensor,
        optimizer: Any,
        *,
        rows: torch.Tensor | None = None,
        strict: bool = False,
        scale: torch.Tensor | None = None,
    ) -> None:
        """Send each row's gradient (``[n, D]``, aligned with ``ids``) to its owner, which sums
        all ranks' contributions and applies one ``optimizer`` step (a collective).

        ``rows`` (bool ``[n]``) as in :meth:`dpsn.tiers.RowBatch.apply_grads`: an owner steps a
        row when a rank that used it marked it (with every rank's gradient); the rest keep
        delta and state. A selection that needs the owner's usage statistics runs at the owner
        instead (:meth:`select_at_owner`; ``SparseFinetune`` does so). Protected rows are left
        out by each owner. ``scale`` (float ``[n]``, finite and >= 0) scales each row's update
        as in ``RowBatch.apply_grads``; an owner scales a row by the mean of its requesters'
        scales (a rank that gives none counts 1). Gradients that are not finite are never
        sent: the step is skipped (counted) by every owner of this rank's rows, and with
        ``strict=True`` this rank raises ``InvalidDeltaError`` after the exchange (the others
        are not left waiting).
        ``strict`` travels with this rank's rows: an owner that refuses their step because
        its results would not be finite (gradients summed over ranks that overflow) skips and
        counts it whatever its own flag, and this rank raises ``InvalidDeltaError`` when it
        asked for ``strict``."""
        if self.applied or self._local is None:
            raise RuntimeError(SECOND_BACKWARD)
        if rows is not None:
            rows = check_row_mask(rows, self.ids)
        if scale is not None:
            scale = check_update_scale(scale, len(self.ids))  # checked here, before the collective
        self._pool._optimizer = optimizer
        finite = bool(torch.isfinite(grads).all())
        g = grads.float() if finite else torch.zeros_like(grads, dtype=torch.float32)
        self.applied = True
        refused = self._exchange_grads(g, contributes=finite, rows=rows, strict=strict, scale=scale)
        if not finite and strict:  # the owners counted the skipped step
            raise InvalidDeltaError(
                "the row gradients are not finite (NaN or Inf): the row step was not "
                "applied on this rank's rows (no row changed)"
            )
        if refused and strict:
            raise InvalidDeltaError(
                "the row step's results are not finite at the owner of some of this rank's "
                "rows (the gradients summed over ranks, or the row optimizer, overflowed): "
                "that owner skipped the step (no row of its batch changed)"
            )

    def select_at_owner(self, select: Any) -> None:
        """Run the row selection ``select(pool, batch, grads)`` at each row's owner rather than
        here: called by a :class:`dpsn.RowSelection` that needs what only the owner has (its
        rows' usage statistics), as ``SparseFinetune`` does when it is handed a sharded batch.
        Each owner then calls ``select(its shard's Pool, its RowBatch of the requested rows,
        the gradients summed over every rank)``, with ``counts`` the uses summed over every
        rank, and steps the rows it marks: each rank selects among its own rows (so an int
        ``top`` is per shard). The selection is kept for the pool's later steps."""
        self._pool._owner_select = select
        self._selects = True

    @property
    def writable(self) -> bool:
        """Whether the rows may train (see ``RowBatch.writable``)."""
        return self._pool.writable

    def skip_step(self) -> None:
        """Count a row step the executor skipped (see ``RowBatch.skip_step``)."""
        self._pool.count_skipped_row_step()

    def regroup(self, ids: torch.Tensor) -> ShardedRowBatch:
        """A new batch of ``ids`` fetched from their owners: a collective, like ``page_in``
        (see ``RowBatch.regroup``)."""
        return self._pool.page_in(ids)

    def release(self) -> None:
        """Take part in the gradient exchange if a backward was expected and none was given
        (idempotent), then let the owner's rows be evicted again."""
        if self._local is None:
            return
        if self._expects_backward:
            zeros = torch.zeros(
                (len(self.ids), self._pool.dim), dtype=torch.float32, device=self.ids.device
            )
            self.applied = True
            self._exchange_grads(zeros, contributes=False, rows=None, strict=False)
        else:
            self._local.release()
            self._local = None

    def _exchange_grads(
        self,
        grads: torch.Tensor,
        *,
        contributes: bool,
        rows: torch.Tensor | None,
        strict: bool,
        scale: torch.Tensor | None = None,
    ) -> bool:
        """Send ``[grads | contributed | uses | selected | selects-at-owner | scale]``
        ``(n, D + 5)``
        to the owners, each rank's rows for rank j led by one header row carrying the sender's
        ``strict`` flag; each owner sums the rows per row and steps those every requester gave
        a gradient for (all or none: a rank that skipped skips the batch for its rows).

        The owner never applies its own ``strict`` to others' rows: a step it refuses because
        its results would not be finite (gradients summed over ranks that overflow, an
        optimizer that does) is skipped and counted there, and when any rank asked for
        ``strict`` (every rank learns it from the headers, so all agree) a second, small
        all-to-all tells each requester which of its rows were refused. Returns whether this
        rank's rows were refused somewhere (False when no rank asked for ``strict``)."""
        local, self._local = self._local, None
        assert local is not None
        pool = self._pool
        n, d = len(grads), pool.dim
        world = len(self._send)
        extra = torch.zeros((n, 5), dtype=grads.dtype, device=grads.device)
        extra[:, 0] = 1.0 if contributes else 0.0
        extra[:, 1] = self.counts.to(grads.dtype)
        extra[:, 2] = 1.0 if rows is None else rows.to(grads.dtype)
        extra[:, 3] = 1.0 if getattr(self, "_selects", False) else 0.0
        extra[:, 4] = 1.0 if scale is None else scale.to(grads.device, grads.dtype)
        body = torch.cat([grads, extra], dim=1)[self._perm]  # grouped by owner, as the ids went
        # one header row ahead of each destination's rows: [0.., strict] (column d)
        send_counts = torch.tensor(self._send, dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(world), send_counts).to(grads.device)
        at = torch.arange(n, device=grads.device) + owner + 1
        heads = torch.cumsum(send_counts + 1, 0) - send_counts - 1
        send = torch.zeros((n + world, d + 5), dtype=grads.dtype, device=grads.device)
        send[at] = body
        send[heads.to(grads.device), d] = 1.0 if strict else 0.0
        got_all = pool._a2a(send, [c + 1 for c in self._send], [c + 1 for c in self._recv])
        recv_counts = torch.tensor(self._recv, dtype=torch.int64)
        rheads = (torch.cumsum(recv_counts + 1, 0) - recv_counts - 1).to(got_all.device)
        any_strict = bool((got_all[rheads, d] > 0).any())  # every rank sent every rank a header
        is_row = torch.ones(len(got_all), dtype=torch.bool, device=got_all.device)
        is_row[rheads] = False
        got = got_all[is_row]  # (r, D + 5), in the order the rows came
        refused = torch.zeros(len(got), dtype=grads.dtype, device=got.device)
        try:
            if len(local) and pool.writable:
                summed = torch.zeros((len(local), d + 5), dtype=torch.float32, device=got.device)
                summed.index_add_(0, local.inverse.reshape(-1), got)
                asked = torch.bincount(local.inverse.reshape(-1), minlength=len(local))
                # every requester of a row gave its gradient: step; else skip the batch, as one
                # process skips a step whose gradients are not finite (that requester raises
                # under its own strict)
                if bool((summed[:, d] == asked.to(summed.dtype)).all()):
                    if pool._optimizer is None:
                        raise DistributedError(
                            "this rank received row gradients before it applied any row step "
                            "itself, so it does not know the row optimizer: give every rank "
                            "rows in its first step"
                        )
                    g = summed[:, :d].contiguous()
                    keep = summed[:, d + 2] > 0  # some requester marked the row
                    if bool((summed[:, d + 3] > 0).any()):
                        keep &= self._owner_rows(local, g, summed[:, d + 1])
                    mask = None if bool(keep.all()) else keep
                    mean = summed[:, d + 4] / asked.to(summed.dtype).clamp_min(1)
                    step_scale = None if bool((mean == 1).all()) else mean.cpu()
                    try:  # strict here only to learn of a refusal, which is counted below
                        local.apply_grads(
                            g, pool._optimizer, rows=mask, strict=True, scale=step_scale
                        )
                    except InvalidDeltaError:
                        pool.local.count_skipped_row_step()
                        refused[:] = 1.0
                else:
                    pool.local.count_skipped_row_step()
        finally:
            local.release()
        if not any_strict:
            return False
        back = pool._a2a(refused[:, None], list(self._recv), list(self._send))
        return bool((back > 0).any())

    def _owner_rows(self, local: RowBatch, grads: torch.Tensor, uses: torch.Tensor) -> torch.Tensor:
        """The owner's selection over its rows of the step (see :meth:`select_at_owner`)."""
        select = self._pool._owner_select
        if select is None:
            raise DistributedError(
                "a rank asked for a row selection at the owners, but this rank never ran one "
                "(it had no rows in its first step): give every rank rows in its first step"
            )
        counts = local.counts
        local.counts = uses.round().to(counts.dtype)  # every rank's uses, not requests
        try:
            mask = select(self._pool.local, local, grads)
        finally:
            local.counts = counts
        if mask is None:
            return torch.ones(len(local), dtype=torch.bool, device=grads.device)
        mask = torch.as_tensor(mask, device=grads.device)
        if mask.dtype != torch.bool or mask.shape != (len(local),):
            raise ValueError(
                f"the row selection returned {mask.dtype} {tuple(mask.shape)}, not a bool mask "
                f"of shape ({len(local)},)"
            )
        return mask

    def __enter__(self) -> ShardedRowBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ShardedPool:
    """This rank's view of a pool sharded over a process group: the executor contract over
    all ranks' rows, and a two-phase ``commit``. Obtain one with :func:`dpsn.distributed.open`
    (or ``dpsn.open(root, process_group=...)``); ``local`` is this rank's own shard (an
    ordinary :class:`Pool`)."""

    def __init__(
        self,
        local: Pool,
        *,
        root: Path,
        manifest: layout.RootManifest,
        record: layout.GlobalCommit,
        group: Any,
    ) -> None:
        self.local = local
        self.root = root
        self.manifest = manifest
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._record = record
        self._optimizer: Any = None
        self._owner_select: Any = None  # a row selection run at the owners (select_at_owner)
        # a group of one skips its all-to-alls; True runs them anyway (to test a backend's
        # collectives on one device, as tests/test_distributed.py does with NCCL)
        self.exchange_when_alone = False
        # bytes this rank sent to other ranks (ids, rows, gradients) and collectives run
        # and the wall time spent inside them (waiting for the slowest rank included)
        self.traffic = {"bytes_sent": 0, "exchanges": 0, "seconds": 0.0}

    def _a2a(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """:func:`_exchange`, counted in :attr:`traffic`."""
        per_row = x.element_size() * math.prod(x.shape[1:])
        t = time.perf_counter()
        # one rank: nothing to move (gloo still paid ~1-7 ms a call for its loopback pair)
        alone = self.world == 1 and not self.exchange_when_alone
        out = x if alone else _exchange(x, send, recv, self.group)
        self.traffic["seconds"] += time.perf_counter() - t
        self.traffic["bytes_sent"] += (sum(send) - send[self.rank]) * per_row
        self.traffic["exchanges"] += 1
        return out

    # -- what executors read -------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.root

    @property
    def rows(self) -> int:
        return self.local.rows

    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def seed(self) -> int:
        return self.local.seed

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def generator(self) -> Any:
        return self.local.generator

    @property
    def writable(self) -> bool:
        return self.local.writable

    @property
    def uuid(self) -> str:
        return self.manifest.uuid

    @property
    def head(self) -> int:
        """The global commit this rank's view is at."""
        return self._record.id

    @property
    def global_commit(self) -> layout.GlobalCommit:
        return self._record

    def __repr__(self) -> str:
        return (
            f"ShardedPool({str(self.root)!r}, rank={self.rank}/{self.world}, rows={self.rows}, "
            f"dim={self.dim}, head={self.head})"
        )

    def set_state_width(self, width: int) -> None:
        self.local.set_state_width(width)

    def count_skipped_row_step(self) -> None:
        self.local.count_skipped_row_step()

    def save_router(self, name: str, router: torch.nn.Module) -> None:
        """Routers are dense (replicated by DDP): each rank saves its copy in its shard."""
        self.local.save_router(name, router)

    def save_module(self, name: str, config: dict[str, Any]) -> None:
        """A module's configuration, like its router, is the same on every rank: each rank
        saves it in its shard (see :meth:`dpsn.Pool.save_module`)."""
        self.local.save_module(name, config)

    def modules(self) -> dict[str, dict[str, Any]]:
        """Module configurations saved with this rank's shard commit: name -> config."""
        return self.local.modules()

    # -- the row path --------------------------------------------------------------------------

    def page_in(self, ids: Any) -> ShardedRowBatch:
        """Fetch the rows of ``ids`` (any shape) from their owners: a collective every rank
        must call. A rank whose ids are invalid raises their error; the others raise a
        :class:`DistributedError` naming it, instead of waiting forever."""
        dev = self.device
        problem: BaseException | None = None
        try:
            ids_t = self.local._ids(ids).to(dev)
        except (DpsnError, TypeError, ValueError) as e:
            problem, ids_t = e, torch.zeros(0, dtype=torch.int64, device=dev)
        flat = ids_t.reshape(-1)
        uniq, inverse, counts = torch.unique(
            flat, sorted=True, return_inverse=True, return_counts=True
        )
        owner = owner_of(uniq, self.world)
        perm = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.world)
        if problem is not None:
            send_counts = torch.full_like(send_counts, -1)
        ones = [1] * self.world
        recv_counts = self._a2a(send_counts, ones, ones)
        if problem is not None:
            raise problem
        bad = torch.nonzero(recv_counts < 0).flatten().tolist()
        if bad:
            raise DistributedError(f"rank(s) {bad} were given invalid ids in this page_in")
        send, recv = send_counts.tolist(), recv_counts.tolist()
        asked = self._a2a(uniq[perm], send, recv)  # (r,) ids this rank owns
        local = self.local.page_in(asked)
        try:
            values = torch.index_select(local.table, 0, local.use_index.reshape(-1))  # (r, D)
            got = self._a2a(values, recv, send)  # (n, D) grouped by owner
        except BaseException:
            local.release()
            raise
        table = torch.empty_like(got)
        table[perm] = got
        expects = torch.is_grad_enabled() and self.writable
        return ShardedRowBatch(
            self,
            uniq,
            counts,
            inverse.reshape(ids_t.shape),
            table,
            perm,
            send,
            recv,
            local,
            expects,
        )

    def read(self, ids: Any) -> torch.Tensor:
        """Rows of ``ids`` (``[*shape, D]``) wherever they live: a collective."""
        with torch.no_grad():
            batch = self.page_in(ids)
            try:
                return batch.table[batch.inverse]
            finally:
                batch.release()

    # -- history -------------------------------------------------------------------------------

    def commit(self, message: str = "") -> layout.GlobalCommit:
        """Two-phase commit (a collective): every rank commits its shard, then rank 0 writes
        the global record naming each shard's commit. A crash before the record leaves the
        previous global commit whole; shards that got ahead of it are rolled back when the
        root is next opened for writing."""
        if not self.writable:
            raise ReadOnlyError("this sharded pool is read-only: open it with mode='r+'")
        problem = None
        try:
            self.local.commit(message)
            mine = self.local.head  # after any compaction the commit triggered
        except BaseException as e:  # report to the others rather than leave them waiting
            problem, mine = e, -1
        ids = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(ids, torch.tensor([mine], device=self.device), group=self.group)
        commits = [int(t) for t in ids]
        if problem is not None:
            raise problem
        if min(commits) < 0:
            raise DistributedError(
                f"rank(s) {[i for i, c in enumerate(commits) if c < 0]} failed to commit their "
                f"shard; global commit {self.head} stays the newest"
            )
        dirs = [d for d, _ in self._record.shards]
        status = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            try:
                self._record = layout.write_global(
                    self.root, list(zip(dirs, commits, strict=True)), message
                )
                status[0] = self._record.id
            except OSError:
                status[0] = -1
        dist.broadcast(status, src=0, group=self.group)
        gid = int(status)
        if gid < 0:
            raise DistributedError(f"rank 0 could not write the global record under {self.root}")
        if self.rank != 0:
            self._record = layout.read_global(self.root, gid)
        return self._record

    def publish(self, url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish the newest global commit to object storage (a collective, after
        :meth:`commit`): every rank publishes its shard's commit under ``URL/<shard dir>``,
        then rank 0, once all have, the root manifest, the global record and the root's HEAD
        (last: a reader of the bucket opens this global commit or the previous one, never a
        mix). Returns this rank's shard upload and the global commit."""
        from dpsn.store import remote

        d, commit = self._record.shards[self.rank]
        problem: BaseException | None = None
        mine: dict[str, Any] = {}
        try:
            mine = self.local.publish(f"{url.rstrip('/')}/{d}", storage_options)
            if mine["commit"] != commit:
                raise DistributedError(
                    f"shard {d} published commit {mine['commit']}, not {commit} that global "
                    f"commit {self._record.id} names: commit on every rank before publishing"
                )
        except BaseException as e:  # report to the others rather than leave them waiting
            problem = e
        ok = torch.tensor([0 if problem is not None else 1], device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        if problem is not None:
            raise problem
        if int(ok) == 0:
            raise DistributedError(
                f"a rank failed to publish its shard; {url} keeps its previous global commit"
            )
        status = torch.ones(1, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            try:
                remote.publish_global(self.root, self._record, url, storage_options)
            except BaseException as e:
                problem, status[0] = e, 0
        dist.broadcast(status, src=dist.get_global_rank(self.group, 0), group=self.group)
        if problem is not None:
            raise problem
        if int(status) == 0:
            raise DistributedError(f"rank 0 could not publish the global record to {url}")
        return {"global_commit": self._record.id, "shard": mine, "url": url}

    def close(self) -> None:
        self.local.close()

    def __enter__(self) -> ShardedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
