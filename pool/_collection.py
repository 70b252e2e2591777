"""``PoolEmbeddingCollection``: named embedding tables fed with TorchRec's jagged convention.

Recommender models look up many tables per batch (user ids, item ids, categories, ...), each
feature a *jagged* list of ids per sample: TorchRec and FBGEMM pass them as a
``KeyedJaggedTensor`` (keys, one flat ``values`` tensor, ``lengths`` per key and sample). A
table is either a pool of its own or an id range of a shared pool. Tables that share a pool are
looked up together: their ids (shifted to their range) form one batch, paged in once and pooled
by one ``embedding_bag``, and their rows take one fused row step in backward, as FBGEMM's
table-batched embedding does for the tables it fuses.

Axes: B samples (bags per table), m ids of one table, D a table's width (its pool's ``dim``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dpsn.tiers import RowOptimizer

from ._embedding import PoolEmbedding
from ._pool import Pool

__all__ = ["PoolEmbeddingCollection", "TableRange"]


@dataclass(frozen=True, slots=True)
class TableRange:
    """A table that is the id range ``[start, start + rows)`` of a shared pool: its id ``i``
    is the pool's row ``start + i``."""

    pool: Pool
    start: int
    rows: int

    def __post_init__(self) -> None:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.start, self.rows))
        if not ok or self.start < 0 or self.rows < 1 or self.start + self.rows > self.pool.rows:
            raise ValueError(
                f"a table range needs 0 <= start and 1 <= rows with start + rows <= "
                f"{self.pool.rows} (the pool's rows); got start={self.start}, rows={self.rows}"
            )


class PoolEmbeddingCollection(nn.Module):
    """Named ``PoolEmbedding`` tables, looked up with jagged features.

    Args:
        tables: name -> a :class:`~dpsn.Pool` (a table of its own: ids ``0 .. pool.rows``) or a
            :class:`TableRange` of a pool that other tables share (use :meth:`shared` to cut
            one pool into consecutive ranges).
        mode: ``"sum"`` (TorchRec's default pooling), ``"mean"`` or ``"max"``, for every table.
        row_optimizer, row_lr, grad_scaler, row_clip: as :class:`PoolEmbedding`; one row
            optimizer per pool.

    ``forward(features)`` takes either a ``KeyedJaggedTensor`` (anything with ``keys()``,
    ``values()`` and ``lengths()``: TorchRec's is used as is when installed) or a mapping
    name -> ``(values, lengths)``, name -> ``{"values": v, "lengths": l}`` or
    ``{"values": v, "offsets": o}`` (offsets ``[B + 1]``, TorchRec's ``JaggedTensor``
    convention), or a ``JaggedTensor`` (``values()`` and ``offsets()``). Every named feature
    must be a table of this collection; tables missing from the input are not looked up.
    Returns name -> ``[B, D]`` pooled embeddings (an empty sample gives zeros).
    """

    def __init__(
        self,
        tables: Mapping[str, Pool | TableRange],
        mode: Literal["sum", "mean", "max"] = "sum",
        *,
        row_optimizer: str | RowOptimizer = "adagrad",
        row_lr: float | None = None,
        grad_scaler: Any = None,
        row_clip: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(tables, Mapping) or not tables:
            raise TypeError("tables must be a non-empty mapping of name -> Pool or TableRange")
        self._ranges: dict[str, TableRange] = {}
        for name, table in tables.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"table names are non-empty strings, got {name!r}")
            if isinstance(table, Pool):
                table = TableRange(table, 0, table.rows)
            if not isinstance(table, TableRange):
                raise TypeError(f"table {name!r} must be a Pool or a TableRange, not {table!r}")
            self._ranges[name] = table
        _check_disjoint(self._ranges)
        pools: dict[int, Pool] = {}
        for table in self._ranges.values():
            pools.setdefault(id(table.pool), table.pool)
        self.mode = mode
        # one PoolEmbedding per pool: the fused lookup and row step of the tables it holds
        self.bags = nn.ModuleList(
            PoolEmbedding(
                pool,
                mode,
                row_optimizer=row_optimizer,
                row_lr=row_lr,
                grad_scaler=grad_scaler,
                row_clip=row_clip,
            )
            for pool in pools.values()
        )
        self._bag_of = {key: i for i, key in enumerate(pools)}

    @classmethod
    def shared(cls, pool: Pool, rows: Mapping[str, int], **kwargs: Any) -> PoolEmbeddingCollection:
        """Tables cut from one pool as consecutive id ranges, in ``rows``' order (name -> the
        table's rows): all of them are looked up and trained in one fused step."""
        tables, start = {}, 0
        for name, n in rows.items():
            tables[name] = TableRange(pool, start, n)
            start += n
        return cls(tables, **kwargs)

    @property
    def tables(self) -> dict[str, TableRange]:
        """name -> the table's pool and id range."""
        return dict(self._ranges)

    def embedding_dims(self) -> dict[str, int]:
        """name -> the width of its pooled embedding."""
        return {name: t.pool.dim for name, t in self._ranges.items()}

    def commit(self, message: str = "") -> list[Any]:
        """Commit every pool the tables live in (one commit per pool, in table order)."""
        return [bag.commit(message) for bag in self.bags]

    def accumulate(self) -> Any:
        """Gradient accumulation over every pool's rows (see :meth:`PoolEmbedding.accumulate`)."""
        from contextlib import ExitStack

        stack = ExitStack()
        for bag in self.bags:
            stack.enter_context(bag.accumulate())
        return stack

    def forward(self, features: Any) -> dict[str, torch.Tensor]:
        jagged = _jagged(features)
        unknown = sorted(set(jagged) - set(self._ranges))
        if unknown:
            raise KeyError(f"features {unknown} are not tables of this collection")
        groups: dict[int, list[str]] = {}
        for name in jagged:
            groups.setdefault(self._bag_of[id(self._ranges[name].pool)], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for b, names in groups.items():
            bag = self.bags[b]
            device = bag.pool.device
            ids, offsets, sizes, shift = [], [], [], 0
            for name in names:
                values, lengths = jagged[name]
                table = self._ranges[name]
                values = _table_ids(name, values, table).to(device)
                starts = torch.zeros(len(lengths), dtype=torch.int64, device=device)
                if len(lengths) > 1:
                    torch.cumsum(lengths[:-1].to(device), 0, out=starts[1:])
                ids.append(values + table.start if table.start else values)
                offsets.append(starts + shift)
                sizes.append(len(lengths))
                shift += len(values)
            pooled = bag(torch.cat(ids), torch.cat(offsets))  # (sum B, D): one page-in, one step
            for name, part in zip(names, torch.split(pooled, sizes), strict=True):
                out[name] = part
        return out


def _check_disjoint(ranges: dict[str, TableRange]) -> None:
    by_pool: dict[int, list[tuple[int, int, str]]] = {}
    for name, t in ranges.items():
        by_pool.setdefault(id(t.pool), []).append((t.start, t.start + t.rows, name))
    for spans in by_pool.values():
        spans.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            if start < end:
                raise ValueError(f"tables {a!r} and {b!r} overlap in their shared pool")


def _table_ids(name: str, values: torch.Tensor, table: TableRange) -> torch.Tensor:
    """A feature's ids as int64, checked against its table's range (the ranges of a shared
    pool must not leak into each other)."""
    if values.is_floating_point() or values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"feature {name!r}: ids must be integers, got {values.dtype}")
    values = values.to(torch.int64)
    if len(values) and (int(values.min()) < 0 or int(values.max()) >= table.rows):
        raise IndexError(
            f"feature {name!r}: ids must be within [0, {table.rows}) (its table's rows); got "
            f"[{int(values.min())}, {int(values.max())}]"
        )
    return values


def _lengths_from_offsets(name: str, offsets: torch.Tensor, m: int) -> torch.Tensor:
    offsets = torch.as_tensor(offsets).to(torch.int64)
    if offsets.dim() != 1 or len(offsets) == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != m:
        raise ValueError(
            f"feature {name!r}: offsets are [B + 1], start at 0 and end at len(values)={m}"
        )
    lengths = torch.diff(offsets)
    if bool((lengths < 0).any()):
        raise ValueError(f"feature {name!r}: offsets must be non-decreasing")
    return lengths


def _one(name: str, feature: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``[m]``, lengths ``[B]``) of one feature, checked."""
    if isinstance(feature, Mapping):
        values = feature.get("values")
        if ("lengths" in feature) == ("offsets" in feature) or values is None:
            raise ValueError(
                f"feature {name!r}: a mapping holds 'values' and one of 'lengths' / 'offsets'"
            )
        values = torch.as_tensor(values)
        if "offsets" in feature:
            lengths = _lengths_from_offsets(name, feature["offsets"], len(values.reshape(-1)))
        else:
            lengths = torch.as_tensor(feature["lengths"])
    elif hasattr(feature, "values") and hasattr(feature, "offsets") and callable(feature.values):
        values = feature.values()  # a JaggedTensor
        lengths = _lengths_from_offsets(name, feature.offsets(), len(values))
    elif isinstance(feature, tuple | list) and len(feature) == 2:
        values, lengths = (torch.as_tensor(f) for f in feature)
    else:
        raise TypeError(
            f"feature {name!r}: expected (values, lengths), a mapping with values and "
            f"lengths/offsets, or a JaggedTensor; got {type(feature).__name__}"
        )
    if values.dim() != 1 or lengths.dim() != 1:
        raise ValueError(f"feature {name!r}: values and lengths must be 1-D")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"feature {name!r}: lengths must be integers, got {lengths.dtype}")
    lengths = lengths.to(torch.int64)
    if bool((lengths < 0).any()) or int(lengths.sum()) != len(values):
        raise ValueError(
            f"feature {name!r}: lengths must be non-negative and sum to len(values)="
            f"{len(values)}, got a sum of {int(lengths.sum())}"
        )
    return values, lengths


def _jagged(features: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (values, lengths) from a KeyedJaggedTensor (duck-typed) or a mapping."""
    if isinstance(features, Mapping):
        return {name: _one(name, f) for name, f in features.items()}
    if all(hasattr(features, a) for a in ("keys", "values", "lengths")):
        keys = list(features.keys())
        values, lengths = features.values(), features.lengths()
        if not keys:
            return {}
        if len(lengths) % len(keys):
            raise ValueError(
                "a KeyedJaggedTensor with a different batch size per key (variable batch) is "
                "not supported: give every key the same number of samples"
            )
        per_key = lengths.reshape(len(keys), -1)
        counts = per_key.sum(dim=1).tolist()
        if sum(counts) != len(values):
            raise ValueError("the KeyedJaggedTensor's lengths do not sum to len(values)")
        split = torch.split(values, counts)
        pairs = zip(keys, split, strict=True)
        return {k: _one(k, (v, per_key[i])) for i, (k, v) in enumerate(pairs)}
    raise TypeError(
        "features must be a KeyedJaggedTensor or a mapping of name -> (values, lengths), got "
        f"{type(features).__name__}"
    )
