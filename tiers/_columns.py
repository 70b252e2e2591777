"""The per-row columns of the tier stack, declared once.

A cached row is more than its value: it carries its learned delta, the procedural base the value
was made from, a row optimizer's state, and the lifecycle's usage statistics. Each is a
:class:`Column` with a name, a dtype and a width, declared here and nowhere else; the cache
allocates one ``[capacity, width]`` tensor per column, the host staging area and the persisted
segments keep the persisted ones. Code refers to columns by these objects, never by string literals.

``RowLayout`` is the set of columns of one pool: the widths depend on the pool's ``dim``, on
the state width its executor's row optimizer asks for, and on whether the pool has a lifecycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True, slots=True)
class Column:
    """One per-row value. ``persisted``: written to the store beside the delta at commit (the
    segment array of the same name; ``deltas`` for the delta, see docs/format.md)."""

    name: str
    width: int
    dtype: torch.dtype
    persisted: bool

    def empty(self, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.empty((rows, self.width), dtype=self.dtype, device=device)

    def zeros(self, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros((rows, self.width), dtype=self.dtype, device=device)


@dataclass(frozen=True, slots=True)
class RowLayout:
    """The columns of one pool's rows.

    - ``row``: the materialized value ``base + delta`` in the pool dtype; what reads and
      executors gather (cache only).
    - ``delta``: the learned part, in the pool dtype (persisted).
    - ``base``: the generator's float32 output the row was made from, kept beside a delta so
      that an update recomputes ``row`` without regenerating the base (cache only).
    - ``state``: ``state_width`` float32 values of a row optimizer (persisted; width 0: none).
    - ``usage``: ``usage_width`` float64 usage statistics and the lifecycle phase (persisted;
      width 0: the pool has no lifecycle; the fields are listed in ``_usage.py``). Float64 so
      that counts and step numbers stay exact integers (below 2**53) in one column.

    A cached row that was never written is *untrained*: its ``row`` is valid and its delta and
    state are zero by definition; ``delta``, ``base``, ``state`` and ``usage`` are only written
    (and read) for trained rows, which keeps a cache miss to one column write. Statistics are
    kept for rows that have a delta, because those are the rows a lifecycle can decay, prune
    or protect; a procedural row costs nothing whether it is used or not.
    """

    dim: int
    dtype: torch.dtype
    state_width: int = 0
    usage_width: int = 0
    # The columns themselves, made once from the four fields above (a layout is frozen; a new
    # width is a new layout, ``with_state``/``with_usage``): plain attributes, so that the row
    # path reads them on every step without a call.
    row: Column = field(init=False, repr=False, compare=False)
    delta: Column = field(init=False, repr=False, compare=False)
    base: Column = field(init=False, repr=False, compare=False)
    state: Column = field(init=False, repr=False, compare=False)
    usage: Column = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        made = {
            "row": Column("row", self.dim, self.dtype, persisted=False),
            "delta": Column("delta", self.dim, self.dtype, persisted=True),
            "base": Column("base", self.dim, torch.float32, persisted=False),
            "state": Column("state", self.state_width, torch.float32, persisted=True),
            "usage": Column("usage", self.usage_width, torch.float64, persisted=True),
        }
        for name, col in made.items():
            object.__setattr__(self, name, col)  # (frozen: set once, here)

    def columns(self) -> tuple[Column, ...]:
        """Every column a cache slot holds."""
        return (self.row, self.delta, self.base, self.state, self.usage)

    def trained_columns(self) -> tuple[Column, ...]:
        """The columns that exist only for trained rows (see the class docstring)."""
        return (self.delta, self.base, self.state, self.usage)

    def persisted_columns(self) -> tuple[Column, ...]:
        """The columns staged on eviction and written to the store at commit."""
        return (self.delta, self.state, self.usage)

    def with_state(self, width: int) -> RowLayout:
        return replace(self, state_width=width)

    def with_usage(self, width: int) -> RowLayout:
        return replace(self, usage_width=width)

    def row_bytes(self) -> int:
        return sum(c.width * c.dtype.itemsize for c in self.columns())
