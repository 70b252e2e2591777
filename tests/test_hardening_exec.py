"""Issue 21, finding 4: the executor contract never lets a non-finite value into the rows.

``RowBatch.apply_grads`` skips (and counts in ``stats()["skipped_row_steps"]``) a step whose
gradients or results are not finite, as the layer's GradScaler path does, or raises
``InvalidDeltaError`` with ``strict=True``; a row optimizer that would divide by zero is refused
where it is built.
"""

import pytest
import torch

import dpsn
from dpsn.errors import InvalidDeltaError
from dpsn.pool import RowAdagrad, RowOptimizer, RowSGD

DIM = 4


def _pool(path, **kw):
    return dpsn.create(
        path, rows=64, dim=DIM, generator={"kind": "zeros"}, cache_rows=kw.pop("cache_rows", 32)
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cache_rows", [32, 0])  # the cached (fused) and the spilled path
def test_non_finite_gradients_are_skipped_and_counted(tmp_path, bad, cache_rows):
    pool = _pool(tmp_path / "s", cache_rows=cache_rows)
    ids = torch.arange(8)
    before = pool.delta(ids).clone()
    skipped = pool.stats()["skipped_row_steps"]
    with pool.page_in(ids) as batch:
        grads = torch.ones(len(batch), DIM)
        grads[3, 1] = bad
        batch.apply_grads(grads, RowSGD(lr=0.1))
    assert torch.equal(pool.delta(ids), before)
    assert pool.stats()["skipped_row_steps"] == skipped + 1
    pool.commit("c")
    assert pool.verify().ok
    pool.close()


def test_non_finite_gradients_raise_in_strict_mode(tmp_path):
    pool = _pool(tmp_path / "s")
    ids = torch.arange(8)
    with pool.page_in(ids) as batch:
        grads = torch.full((len(batch), DIM), float("nan"))
        with pytest.raises(InvalidDeltaError, match="not finite"):
            batch.apply_grads(grads, RowSGD(lr=0.1), strict=True)
        batch.apply_grads(torch.ones(len(batch), DIM), RowSGD(lr=0.1), strict=True)
    assert torch.isfinite(pool.delta(ids)).all()
    pool.close()


class _Exploding(RowOptimizer):
    """A row optimizer of a user's own whose step overflows."""

    def __init__(self) -> None:
        super().__init__(lr=1.0)

    def state_width(self, dim: int) -> int:
        return 0

    def step(self, delta, grad, state):
        return delta + grad * 3e38 * 3e38, state


@pytest.mark.parametrize("strict", [False, True])
def test_non_finite_results_of_a_row_step_are_refused(tmp_path, strict):
    pool = _pool(tmp_path / "s")
    ids = torch.arange(8)
    before = pool.delta(ids).clone()
    with pool.page_in(ids) as batch:
        if strict:
            with pytest.raises(InvalidDeltaError, match="not finite"):
                batch.apply_grads(torch.ones(len(batch), DIM), _Exploding(), strict=True)
        else:
            batch.apply_grads(torch.ones(len(batch), DIM), _Exploding())
    assert torch.equal(pool.delta(ids), before)
    assert pool.stats()["skipped_row_steps"] == (0 if strict else 1)
    pool.close()


def test_an_optimizer_that_divides_by_zero_is_refused():
    with pytest.raises(ValueError, match="eps"):
        RowAdagrad(eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        dpsn.pool.RowAdam(eps=float("nan"))


# -- finding 11: one table of lifecycle and record bounds --------------------------------------


@pytest.mark.parametrize("name", ["warmup", "min_uses", "max_idle", "novelty_window"])
def test_lifecycle_settings_leave_room_below_what_readers_accept(name):
    from dpsn.errors import LifecycleError
    from dpsn.store import CLOCK_LIMIT, SETTING_LIMIT

    assert SETTING_LIMIT * 2 <= CLOCK_LIMIT
    dpsn.Lifecycle(**{name: SETTING_LIMIT})
    with pytest.raises(LifecycleError, match=name):
        dpsn.Lifecycle(**{name: 2**53})


def test_a_clock_at_the_readers_bound_is_refused_before_it_is_committed(tmp_path):
    from dpsn.errors import LifecycleError
    from dpsn.store import CLOCK_LIMIT

    path = tmp_path / "s"
    pool = dpsn.create(
        path,
        rows=64,
        dim=DIM,
        generator={"kind": "zeros"},
        cache_rows=32,
        lifecycle=dpsn.Lifecycle(),
    )
    pool.write(torch.arange(4), torch.ones(4, DIM))
    pool.commit("c")
    head = pool.head
    pool._stack.clock.step = CLOCK_LIMIT - 1
    with pool.page_in(torch.arange(4)) as batch:  # the step that reaches the bound
        batch.apply_grads(torch.ones(len(batch), DIM), RowSGD(lr=0.1))
    pool.write(torch.arange(4, 8), torch.ones(4, DIM))
    with pytest.raises(LifecycleError, match="2\\*\\*53"):
        pool.commit("past the bound")
    assert pool.head == head
    pool.close()
    with dpsn.open(path) as r:  # what was committed still reads
        assert r.head == head and torch.equal(r.delta(torch.arange(4)), torch.ones(4, DIM))


def test_verify_reports_non_finite_stored_values(tmp_path):
    """Finding 4: values that got in anyway (an older dpsn, a store written by hand) are
    reported by verify with the rows that hold them."""
    from unittest import mock

    from dpsn.tiers import _stack

    path = tmp_path / "s"
    pool = _pool(path)
    ids = torch.arange(8)
    # (the refusal patched away: as before the fix)
    with mock.patch.object(_stack, "all_finite", lambda t: True), pool.page_in(ids) as batch:
        grads = torch.ones(len(batch), DIM)
        grads[3, 1] = float("nan")
        batch.apply_grads(grads, RowSGD(lr=0.1))
    pool.commit("poisoned")
    report = pool.verify()
    pool.close()
    assert not report.ok
    assert any("not finite" in p for p in report.problems), report.problems
    assert 3 in report.damaged_rows
