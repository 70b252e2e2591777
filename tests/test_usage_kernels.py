"""The native usage loops (``_kernels.usage_touch``, ``_kernels.apply_rows_tracked``) compute what
the PyTorch path they replace computes (``tiers/_usage.py``, the row optimizers' ``step``), loop
by loop and through training: the same bits for every field but RECENT (libm's ``pow``), UPDATE
(the gradient norm's summation order) and damped deltas (a fused multiply-add), which may differ
in the last place."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpsn
from dpsn import _kernels
from dpsn.index import ProductKeyRouter
from dpsn.pool import RowAdagrad, RowAdam, RowSGD
from dpsn.tiers import UsageClock, UsageRules
from dpsn.tiers import usage as U
from dpsn.tiers._stack_usage import UsageStatistics

pytestmark = pytest.mark.skipif(
    not _kernels.has_usage_loops(), reason="dpsn._native was not built (no C compiler)"
)

RULES = UsageRules(
    use_decay=0.5 ** (1 / 7), update_decay=0.5 ** (1 / 3), delta_decay=0.9, inertia=0.25, warmup=2
)
# fields whose last bit may differ from the PyTorch path's (see the module docstring), and how
# much: RECENT by a float64 rounding, UPDATE by a float32 one (the norm is float32)
ROUNDED = {U.RECENT: 1e-12, U.UPDATE: 1e-6}


def _column(seed: int, capacity: int, step: int, epoch: int) -> torch.Tensor:
    """A cache's usage column of plausible statistics (some rows without any: NaN); half the
    rows were last used within 70 steps (the loops' table of decay powers), some after
    ``step``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros((capacity, U.WIDTH), dtype=torch.float64)
    u[:, U.PHASE] = torch.randint(0, 2, (capacity,), generator=g).double()
    u[:, U.USES] = torch.randint(0, 1000, (capacity,), generator=g).double()
    far = torch.randint(0, step + 50, (capacity,), generator=g)
    near = (step - torch.randint(-3, 70, (capacity,), generator=g)).clamp(min=0)
    u[:, U.LAST] = torch.where(torch.rand(capacity, generator=g) < 0.5, near, far).double()
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


def _same_statistics(got: torch.Tensor, want: torch.Tensor) -> None:
    """Every field bit for bit but the ROUNDED ones, which agree to a few ulps."""
    exact = [f for f in range(U.WIDTH) if f not in ROUNDED]
    _same(got[:, exact].contiguous(), want[:, exact].contiguous())
    for f, rtol in ROUNDED.items():
        torch.testing.assert_close(got[:, f], want[:, f], rtol=rtol, atol=0, equal_nan=True)


cases = st.tuples(
    st.integers(0, 2**31),  # seed
    st.integers(1, 300),  # capacity
    st.integers(0, 300),  # rows in the step (at most capacity)
    st.integers(0, 10**6),  # step
    st.integers(0, 500),  # epoch
)


@given(cases)
def test_usage_touch_matches_the_pytorch_touch(case: tuple[int, int, int, int, int]) -> None:
    seed, capacity, n, step, epoch = case
    n = min(n, capacity)
    col = _column(seed, capacity, step, epoch)
    g = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(capacity, generator=g)[:n]
    counts = torch.randint(1, 50, (n,), generator=g)
    clock = UsageClock(step=step, epoch=epoch)
    trained = torch.rand(capacity, generator=g) < 0.8  # some trained rows lack statistics
    t = trained[slots]
    known = t & ~U.missing(col[slots])

    want = col.clone()
    u = want[slots[known]]
    U.touch(u, counts[known], clock, RULES)
    want[slots[known]] = u

    got = col.clone()
    dirty = torch.zeros(capacity, dtype=torch.bool)
    _kernels.usage_touch(got, slots, counts, trained, dirty, step, epoch, RULES.use_decay)
    _same_statistics(got, want)
    assert dirty.nonzero().flatten().tolist() == sorted(slots[t].tolist())


OPTIMIZERS = {"sgd": RowSGD(lr=0.3), "adagrad": RowAdagrad(lr=0.2), "adam": RowAdam(lr=0.1)}


@given(cases, st.sampled_from(sorted(OPTIMIZERS)), st.booleans(), st.integers(1, 40))
def test_apply_rows_tracked_matches_the_pytorch_path(
    case: tuple[int, int, int, int, int], opt_name: str, touch: bool, dim: int
) -> None:
    seed, capacity, n, step, epoch = case
    n = min(n, capacity)
    opt = OPTIMIZERS[opt_name]
    width = opt.state_width(dim)
    col = _column(seed, capacity, step, epoch)
    g = torch.Generator().manual_seed(seed + 2)
    delta = torch.randn(capacity, dim, generator=g)
    base = torch.randn(capacity, dim, generator=g)
    row = base + delta
    state = torch.rand(capacity, width, generator=g)
    slots = torch.randperm(capacity, generator=g)[:n]
    counts = torch.randint(1, 50, (n,), generator=g)
    grads = torch.randn(n, dim, generator=g)
    trained = torch.rand(capacity, generator=g) < 0.7
    clock = UsageClock(step=step, epoch=epoch)

    # the PyTorch path: fresh rows start at zero from their row; touch; step; damp; record
    fresh = ~trained[slots]
    u = col[slots].clone()
    u[fresh] = float("nan")  # what _cached_usage shows for untrained rows
    if touch:
        known = ~U.missing(u)
        v = u[known]
        U.touch(v, counts[known], clock, RULES)
        u[known] = v
    old = torch.where(fresh[:, None], 0.0, delta[slots])
    old_state = torch.where(fresh[:, None], 0.0, state[slots])
    b = torch.where(fresh[:, None], row[slots], base[slots])
    new, new_state = opt.step(old, grads, old_state)
    damp = U.damping(u, RULES.inertia).float()[:, None]
    screened = u[:, U.PHASE] == U.SCREENED
    new = torch.where(screened[:, None], old + (new - old) * damp, new)
    new_rows = U.missing(u)
    if bool(new_rows.any()):
        u[new_rows] = U.start(int(new_rows.sum()), counts[new_rows], clock, RULES)
    U.updated(u, torch.linalg.vector_norm(grads, dim=1), clock, RULES)
    want = col.clone()
    want[slots] = u

    rates = _kernels.UsageStep(
        step, epoch, RULES.use_decay, RULES.update_decay, RULES.inertia, touch
    )
    # the same rows as compact copies, through the spilled rows' loop: the same bits
    spilled = (delta[slots].clone(), state[slots].clone(), u_before := col[slots].clone())
    u_before[fresh] = float("nan")
    spilled[0][fresh] = 0.0
    spilled[1][fresh] = 0.0
    _kernels.step_rows_tracked(
        opt.native, opt.native_hyper(), spilled[0], spilled[1], grads, spilled[2], counts, rates
    )
    _kernels.apply_rows_tracked(
        opt.native, opt.native_hyper(), delta, state, base, row, slots, grads, col,
        trained.clone(), counts, rates,
    )  # fmt: skip
    _same(spilled[0].double(), delta[slots].double())
    _same(spilled[1].double(), state[slots].double())
    _same(spilled[2], col[slots])
    _same_statistics(col, want)
    torch.testing.assert_close(delta[slots], new, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[slots], new_state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base[slots], b, rtol=0, atol=0)
    torch.testing.assert_close(row[slots], b + delta[slots], rtol=0, atol=0)


def test_the_loops_check_what_they_are_given() -> None:
    col = torch.zeros((4, U.WIDTH), dtype=torch.float64)
    one = torch.ones(1, dtype=torch.int64)
    flags = torch.zeros(4, dtype=torch.bool)
    with pytest.raises(IndexError, match="out of the cache"):
        _kernels.usage_touch(col, torch.tensor([4]), one, flags, flags.clone(), 1, 0, 0.9)
    with pytest.raises(ValueError, match="float64"):
        _kernels.usage_touch(col.float(), one, one, flags, flags.clone(), 1, 0, 0.9)
    cache = torch.zeros(4, 2)
    rates = _kernels.UsageStep(1, 0, 0.9, 0.9, 0.5)
    sgd = (_kernels.OPT_SGD, (0.1, 0.0, 0.0, 0.0))
    with pytest.raises(IndexError, match="out of the cache"):
        _kernels.apply_rows_tracked(
            *sgd, cache, torch.zeros(4, 0), cache.clone(), cache.clone(), torch.tensor([-1]),
            torch.zeros(1, 2), col, flags, one, rates,
        )  # fmt: skip
    with pytest.raises(ValueError, match="float64"):
        _kernels.apply_rows_tracked(
            *sgd, cache, torch.zeros(4, 0), cache.clone(), cache.clone(), one,
            torch.zeros(1, 2), col.float(), flags, one, rates,
        )  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        _kernels.step_rows_tracked(
            *sgd, torch.zeros(2, 2), torch.zeros(2, 0), torch.zeros(2, 2), col, one, rates
        )
    assert _kernels.USAGE_WIDTH == U.WIDTH


def _train(path, native: bool, monkeypatch) -> tuple[dict, torch.Tensor, torch.Tensor, dict]:
    monkeypatch.setattr(_kernels, "has_usage_loops", lambda: native)
    calls = {"usage_touch": 0, "apply_rows_tracked": 0, "damped": 0}

    def counted(owner, name):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counted(_kernels, "usage_touch")
    counted(_kernels, "apply_rows_tracked")
    counted(UsageStatistics, "damped")  # the stack's usage component
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


# figures that count (uses, steps, epochs, bits): the same on both paths
COUNTS = {"phase", "uses", "last", "history", "epoch", "since", "born", "has_delta"}


def test_training_computes_the_same_with_and_without_the_loops(tmp_path, monkeypatch) -> None:
    fast = _train(tmp_path / "fast", True, monkeypatch)
    slow = _train(tmp_path / "slow", False, monkeypatch)
    assert int(fast[2].sum()) > 0
    assert fast[3]["apply_rows_tracked"] > 0  # which counts the page-ins' uses too
    assert fast[3]["usage_touch"] == 0  # (every batch was stepped)
    assert fast[3]["damped"] == 0  # damped inside the native loop
    assert slow[3]["damped"] > 0  # the run trained SCREENED rows
    assert slow[3]["usage_touch"] == slow[3]["apply_rows_tracked"] == 0
    assert set(fast[0]) >= set(U.FIELDS)
    for name in fast[0]:
        a, b = fast[0][name].double(), slow[0][name].double()
        if name in COUNTS:
            _same(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(fast[2], slow[2])


def _two_in_flight(pool, step) -> None:
    a = pool.page_in(torch.tensor([3, 5]))
    b = pool.page_in(torch.tensor([3, 7]))  # counts a's uses at a's own step
    b.apply_grads(torch.ones(len(b), 8), step)
    a.apply_grads(torch.ones(len(a), 8), step)
    a.release()
    b.release()


def _steps_between(pool, step) -> None:
    a = pool.page_in(torch.tensor([3, 5]))
    for _ in range(5):
        pool.page_in(torch.tensor([100])).release()
    a.apply_grads(torch.ones(len(a), 8), step)
    a.release()


def _write_in_flight(pool, step) -> None:
    a = pool.page_in(torch.tensor([3, 3, 3, 5]))
    pool.write([3], torch.full((1, 8), 0.5))
    a.apply_grads(torch.ones(len(a), 8), step)
    a.release()


def _failed_step(pool, step) -> None:
    a = pool.page_in(torch.tensor([3, 5, 5]))
    with pytest.raises((ValueError, RuntimeError)):
        a.apply_grads(torch.ones(len(a), 3), step)  # wrong width: refused, nothing changed
    a.release()


@pytest.mark.parametrize(
    "scenario", [_two_in_flight, _steps_between, _write_in_flight, _failed_step]
)
def test_uses_counted_late_match_uses_counted_at_page_in(tmp_path, monkeypatch, scenario) -> None:
    """The native path counts a batch's uses in its row step (or at the next page-in, a write,
    a release); the PyTorch path counts them at the page-in. Batches in flight together, steps
    between, a write, a refused step: the same statistics either way."""
    from dpsn.pool import RowSGD

    def run(native: bool) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(_kernels, "ENABLED", native)
        pool = dpsn.create(
            tmp_path / f"p{native}",
            rows=10_000,
            dim=8,
            seed=3,
            chunk_rows=16,
            generator={"kind": "hashed_slices", "memory_size": 4096},
            cache_rows=256,
            lifecycle=dpsn.Lifecycle(half_life=10),
        )
        step = RowSGD(lr=0.1)
        with pool.page_in(torch.tensor([3, 5, 7])) as batch:  # deltas and statistics
            batch.apply_grads(torch.ones(len(batch), 8), step)
        scenario(pool, step)
        out = pool.usage([3, 5, 7])
        pool.close()
        return out

    fast, slow = run(True), run(False)
    for name in COUNTS:
        _same(fast[name].double(), slow[name].double())
    torch.testing.assert_close(fast["recent"], slow["recent"], rtol=1e-12, atol=0)
