"""Staging (tiers/_staging.py) against a plain dict model: whatever the order of puts, drops,
keeps and column reads, it holds exactly the last rows put for each id, in id order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpsn.tiers._columns import RowLayout
from dpsn.tiers._staging import Staging

LAYOUT = RowLayout(dim=3, dtype=torch.float32, state_width=2, usage_width=4)
NAMES = [c.name for c in LAYOUT.persisted_columns()]


def _rows(ids: np.ndarray, tag: int) -> dict[str, torch.Tensor]:
    """Rows whose every value says which id and which put wrote it."""
    out = {}
    for c in LAYOUT.persisted_columns():
        v = torch.from_numpy(ids * 1000 + tag).to(c.dtype)[:, None] + torch.arange(c.width)
        out[c.name] = v.to(c.dtype)
    return out


def _check(staging: Staging, model: dict[int, dict[str, torch.Tensor]], drops: set[int]) -> None:
    ids = staging.ids
    assert list(ids) == sorted(model)
    assert set(staging.drops.tolist()) == drops
    probe = np.array(sorted(set(model) | drops | {10_000}), dtype=np.int64)
    staged, cols, dropped = staging.lookup(probe)
    assert staged.tolist() == [int(i) in model for i in probe]
    assert dropped.tolist() == [int(i) in drops for i in probe]
    for name in NAMES:
        want = [model[int(i)][name] for i in probe[staged]]
        got = cols[name]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    values = staging.values
    for name in NAMES:
        assert len(values[name]) == len(ids)
        for i, row in zip(ids, values[name], strict=True):
            assert torch.equal(row, model[int(i)][name])


ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "drop", "keep", "read", "set_usage"]),
        st.lists(st.integers(0, 60), max_size=25),
    ),
    max_size=25,
)


@given(ops)
def test_staging_matches_a_dict(sequence: list[tuple[str, list[int]]]) -> None:
    staging = Staging(LAYOUT)
    model: dict[int, dict[str, torch.Tensor]] = {}
    drops: set[int] = set()
    for tag, (op, raw) in enumerate(sequence):
        ids = np.array(sorted(set(raw)), dtype=np.int64)
        if op == "put":
            rows = _rows(ids, tag)
            staging.put(ids, rows)
            for k, i in enumerate(ids):
                model[int(i)] = {name: rows[name][k] for name in NAMES}
                drops.discard(int(i))
        elif op == "drop":
            staging.drop(ids)
            for i in ids:
                model.pop(int(i), None)
            drops |= set(ids.tolist())
        elif op == "keep":  # a commit that wrote the staged ids in raw
            mask = ~np.isin(staging.ids, ids)
            staging.keep(mask)
            model = {i: r for i, r in model.items() if i not in set(ids.tolist())}
            drops = set()
        elif op == "read":
            _ = staging.values
        else:
            usage = torch.full((len(staging.ids), LAYOUT.usage_width), float(tag))
            staging.set_column(LAYOUT.usage.name, usage)
            for i in model:
                model[i] = {**model[i], LAYOUT.usage.name: usage[0].clone()}
        _check(staging, model, drops)


def test_put_without_a_column_stages_zeros_and_values_is_read_only() -> None:
    staging = Staging(LAYOUT)
    ids = np.array([2, 5], dtype=np.int64)
    staging.put(ids, {"delta": torch.ones(2, 3)})
    assert torch.equal(staging.values["state"], torch.zeros(2, 2))
    with pytest.raises(TypeError):
        staging.values["delta"] = torch.zeros(2, 3)  # type: ignore[index]
    with pytest.raises(ValueError, match="3 rows for 2 staged ids"):
        staging.set_column("usage", torch.zeros(3, 4))


def test_many_small_puts_keep_the_columns_bounded() -> None:
    """Appends grow the columns geometrically; holes left by drops are reclaimed."""
    staging = Staging(LAYOUT)
    for a in range(0, 10_000, 100):
        staging.put(np.arange(a, a + 100, dtype=np.int64), {})
    assert len(staging.ids) == 10_000
    assert staging._cols["delta"].shape[0] < 2 * 10_000
    staging.drop(np.arange(0, 9_000, dtype=np.int64))
    assert staging._cols["delta"].shape[0] <= 1_000
    assert staging.ids.tolist() == list(range(9_000, 10_000))
