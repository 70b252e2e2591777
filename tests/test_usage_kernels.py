"""The native usage loops (``kernels.usage_touch``, ``kernels.usage_updated``) give the same bits
as the PyTorch path they replace (``tiers/_usage.py``), loop by loop and through training."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpsn
from dpsn import kernels
from dpsn.index import ProductKeyRouter
from dpsn.tiers import RowStack, UsageClock, UsageRules
from dpsn.tiers import usage as U

pytestmark = pytest.mark.skipif(
    not kernels.has_usage_loops(), reason="dpsn._native was not built (no C compiler)"
)

RULES = UsageRules(
    use_decay=0.5 ** (1 / 7), update_decay=0.5 ** (1 / 3), delta_decay=0.9, inertia=0.25, warmup=2
)


def _column(seed: int, capacity: int, step: int, epoch: int) -> torch.Tensor:
    """A cache's usage column of plausible statistics (some rows without any: NaN)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros((capacity, U.WIDTH), dtype=torch.float64)
    u[:, U.PHASE] = torch.randint(0, 2, (capacity,), generator=g).double()
    u[:, U.USES] = torch.randint(0, 1000, (capacity,), generator=g).double()
    u[:, U.LAST] = torch.randint(0, step + 50, (capacity,), generator=g).double()  # some ahead
    u[:, U.RECENT] = torch.rand(capacity, generator=g, dtype=torch.float64)
    u[:, U.HISTORY] = torch.randint(0, 1 << 32, (capacity,), generator=g).double()
    u[:, U.UPDATE] = torch.rand(capacity, generator=g, dtype=torch.float64) * 3
    u[:, U.NORM] = torch.rand(capacity, generator=g, dtype=torch.float64)
    u[:, U.EPOCH] = torch.randint(0, epoch + 2, (capacity,), generator=g).double()
    u[:, U.SINCE] = torch.randint(0, epoch + 1, (capacity,), generator=g).double()
    u[:, U.BORN] = torch.randint(0, epoch + 1, (capacity,), generator=g).double()
    u[torch.rand(capacity, generator=g) < 0.1] = float("nan")
    return u


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a.view(torch.int64), b.view(torch.int64))  # bits, NaN included


cases = st.tuples(
    st.integers(0, 2**31),  # seed
    st.integers(1, 300),  # capacity
    st.integers(0, 300),  # rows in the step (at most capacity)
    st.integers(0, 10**6),  # step
    st.integers(0, 500),  # epoch
)


@settings(max_examples=60, deadline=None)
@given(cases)
def test_usage_touch_matches_the_pytorch_touch(case: tuple[int, int, int, int, int]) -> None:
    seed, capacity, n, step, epoch = case
    n = min(n, capacity)
    col = _column(seed, capacity, step, epoch)
    g = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(capacity, generator=g)[:n]
    counts = torch.randint(1, 50, (n,), generator=g)
    clock = UsageClock(step=step, epoch=epoch)
    known = ~U.missing(col[slots])

    want = col.clone()
    u = want[slots[known]]
    U.touch(u, counts[known], clock, RULES)
    want[slots[known]] = u

    got = col.clone()
    dirty = torch.zeros(capacity, dtype=torch.bool)
    trained = torch.zeros(capacity, dtype=torch.bool)
    trained[slots[known]] = True  # rows with statistics are the trained ones
    s, c, shift = kernels.usage_trained(got, slots, counts, trained, step)
    assert torch.equal(s, slots[known]) and torch.equal(c, counts[known])
    _same(shift, (step - got[s, U.LAST]).clamp(min=0))
    factor = torch.pow(torch.as_tensor(RULES.use_decay, dtype=torch.float64), shift)
    kernels.usage_touch(got, s, c, factor, step, epoch, RULES.use_decay, dirty)
    _same(got, want)
    assert dirty.nonzero().flatten().sort().values.tolist() == sorted(s.tolist())


@settings(max_examples=60, deadline=None)
@given(cases, st.booleans())
def test_usage_updated_matches_start_and_updated(
    case: tuple[int, int, int, int, int], with_norms: bool
) -> None:
    seed, capacity, n, step, epoch = case
    n = min(n, capacity)
    col = _column(seed, capacity, step, epoch)
    g = torch.Generator().manual_seed(seed + 2)
    slots = torch.randperm(capacity, generator=g)[:n]
    counts = torch.randint(1, 50, (n,), generator=g)
    fresh = torch.rand(n, generator=g) < 0.3
    norms = torch.rand(n, generator=g) * 5
    clock = UsageClock(step=step, epoch=epoch)

    want = col.clone()
    u = want[slots]
    u[fresh] = float("nan")  # what _cached_usage shows for untrained rows
    new = U.missing(u)
    if bool(new.any()):
        u[new] = U.start(int(new.sum()), counts[new], clock, RULES)
    U.updated(u, norms, clock, RULES)
    want[slots] = u

    trained = torch.zeros(capacity, dtype=torch.bool)
    trained[slots[~fresh]] = True
    phases = kernels.usage_phases(col, slots, trained)
    assert torch.equal(phases[0], fresh)
    screened = (col[slots, U.PHASE] == U.SCREENED) & ~fresh
    assert torch.equal(phases[1], torch.nonzero(screened).flatten())

    got = col.clone()
    kernels.usage_updated(
        got, slots, fresh, counts, norms, step, epoch, RULES.use_decay, RULES.update_decay
    )
    _same(got, want)


def test_the_loops_check_what_they_are_given() -> None:
    col = torch.zeros((4, U.WIDTH), dtype=torch.float64)
    one = torch.ones(1, dtype=torch.int64)
    with pytest.raises(IndexError, match="out of the cache"):
        kernels.usage_touch(
            col, torch.tensor([4]), one, torch.ones(1, dtype=torch.float64), 1, 0, 0.9,
            torch.zeros(4, dtype=torch.bool),
        )  # fmt: skip
    with pytest.raises(ValueError, match="float64"):
        kernels.usage_updated(
            col.float(), one, torch.zeros(1, dtype=torch.bool), one, torch.ones(1), 1, 0, 0.9, 0.9
        )
    assert kernels.USAGE_WIDTH == U.WIDTH


def _train(path, native: bool, monkeypatch) -> tuple[dict, torch.Tensor, torch.Tensor, dict]:
    monkeypatch.setattr(kernels, "has_usage_loops", lambda: native)
    calls = {"usage_touch": 0, "usage_updated": 0, "_damped": 0}

    def counted(owner, name):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counted(kernels, "usage_touch")
    counted(kernels, "usage_updated")
    counted(RowStack, "_damped")
    rows = 4096
    policy = dpsn.Lifecycle(half_life=5, min_uses=2, enter=0.05, exit=0.02, inertia=0.5)
    pool = dpsn.create(
        path,
        rows=rows,
        dim=8,
        seed=3,
        chunk_rows=16,
        generator={"kind": "hashed_slices", "memory_size": 4096},
        cache_rows=512,
        lifecycle=policy,
    )
    torch.manual_seed(0)
    router = ProductKeyRouter(d_in=4, num_rows=rows, k=4, seed=0)
    layer = dpsn.PoolLayer(pool, 4, 4, router=router, k=4, row_optimizer="adagrad")
    g = torch.Generator().manual_seed(1)
    for s in range(40):
        x = torch.randn(24, 4, generator=g) * (1 + (s % 3))
        layer(x).pow(2).mean().backward()
        if s % 8 == 7:
            pool.commit()  # consolidates: SCREENED rows are damped from then on
    ids = torch.arange(rows)
    out = pool.usage(ids), pool.delta(ids), pool.phase(ids), calls
    pool.close()
    monkeypatch.undo()
    return out


def test_training_gives_the_same_bits_with_and_without_the_loops(tmp_path, monkeypatch) -> None:
    fast = _train(tmp_path / "fast", True, monkeypatch)
    slow = _train(tmp_path / "slow", False, monkeypatch)
    assert int(fast[2].sum()) > 0
    assert fast[3]["usage_touch"] > 0 and fast[3]["usage_updated"] > 0
    assert fast[3]["_damped"] > 0  # SCREENED rows' steps were damped on the native path
    assert slow[3]["usage_touch"] == slow[3]["usage_updated"] == 0
    assert set(fast[0]) >= set(U.FIELDS)
    for name in fast[0]:
        _same(fast[0][name].double(), slow[0][name].double())
    assert torch.equal(fast[1].view(torch.int32), slow[1].view(torch.int32))
    assert torch.equal(fast[2], slow[2])
