"""Product keys: exact top-k against brute force over every combined key, and the search kernel."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpsn import _kernels
from dpsn.index import ProductKeyRouter, RouterConfigError
from dpsn.index._product_keys import grid_shape
from dpsn.index._topk import _chunk_topk, merge_heads, sorted_pair_candidates, topk_ip
from dpsn.index.testing import mixture, single_threaded


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_threaded():  # see its docstring: small problems, shared machine
        yield


D_IN = 16


def brute_force(router: ProductKeyRouter, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Score all n1 * n2 combined keys per head, mask ids >= N, max over heads, top-k."""
    pk = router.pk
    with torch.no_grad():
        q = pk.queries(x)  # [T, H, d_key]
        s1 = torch.einsum("the,hne->thn", q[..., : pk.half], pk.keys1)  # [T, H, n1]
        s2 = torch.einsum("the,hne->thn", q[..., pk.half :], pk.keys2)  # [T, H, n2]
        full = (s1[..., :, None] + s2[..., None, :]).flatten(2).amax(1)  # [T, n1 * n2]
        full[:, router.num_rows :] = float("-inf")
        return full.topk(k, dim=-1)


@pytest.mark.parametrize("num_rows", [16, 17, 1000, 1023, 4099, 10_000])
@pytest.mark.parametrize("heads", [1, 3])
def test_exact_top_k_against_all_combined_keys(num_rows: int, heads: int) -> None:
    k = min(8, num_rows)
    router = ProductKeyRouter(d_in=D_IN, num_rows=num_rows, k=k, heads=heads, seed=3).eval()
    x = mixture(48, seed=2)
    res = router(x)
    want_scores, want_ids = brute_force(router, x, k)
    assert torch.equal(res.ids, want_ids)
    torch.testing.assert_close(res.scores.detach(), want_scores, atol=1e-5, rtol=1e-5)
    assert int(res.ids.max()) < num_rows


@pytest.mark.parametrize("num_rows", [1000, 4099, 10_000])
@pytest.mark.parametrize("heads", [1, 2])
def test_learned_budget_search_stops_at_each_budget(
    num_rows: int, heads: int, row_kernels: str
) -> None:
    """A learned budget is known before the search, which then stops at each input's k (the
    native search's cost falls with it); the kept rows and scores are the full search's."""
    router = ProductKeyRouter(
        d_in=D_IN, num_rows=num_rows, k=16, k_min=1, budget="learned", heads=heads, seed=5
    ).eval()
    assert router.budget.head is not None
    with torch.no_grad():
        router.budget.head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    x = mixture(64, seed=6)
    res = router(x)
    assert len(res.k.unique()) > 3  # budgets really differ
    full_ids, full_scores = router.pk.select(router.pk.queries(x), 16, num_rows)
    mask = res.mask
    assert torch.equal(res.ids[mask], full_ids[mask])
    torch.testing.assert_close(res.scores.detach()[mask], full_scores.detach()[mask])
    assert bool((res.ids[~mask] == -1).all())
    assert bool(torch.isneginf(res.scores.detach()[~mask]).all())
    res.scores[mask].sum().backward()  # gradients reach the query through the kept scores
    assert router.pk.query.weight.grad is not None
    assert bool(router.pk.query.weight.grad.abs().sum() > 0)


def test_k_equal_to_pool_returns_every_row() -> None:
    router = ProductKeyRouter(d_in=D_IN, num_rows=10, k=10).eval()
    res = router(mixture(5))
    assert torch.equal(res.ids.sort(1).values, torch.arange(10).expand(5, 10))


def test_chunking_does_not_change_results() -> None:
    x = mixture(32, seed=4)
    small = ProductKeyRouter(d_in=D_IN, num_rows=200_003, k=16, max_elems=4096).eval()
    big = ProductKeyRouter(d_in=D_IN, num_rows=200_003, k=16).eval()
    assert torch.equal(small(x).ids, big(x).ids)


def test_trillion_rows() -> None:
    """N = 10**12 with 10**6 sub-keys per half; also N just below (a partial grid row)."""
    x = mixture(4, seed=5)
    for n in (10**12, 10**12 - 7):
        router = ProductKeyRouter(d_in=D_IN, num_rows=n, k=8, d_key=8).eval()
        assert (router.pk.n1, router.pk.n2) == (10**6, 10**6)
        res = router(x)
        assert bool(((res.ids >= 0) & (res.ids < n)).all())
        pk = router.pk
        with torch.no_grad():
            q = pk.queries(x)[:, 0]
            s1 = q[:, : pk.half] @ pk.keys1[0].T  # [T, n1]
            s2 = q[:, pk.half :] @ pk.keys2[0].T
        best = s1.argmax(1) * pk.n2 + s2.argmax(1)
        if n == 10**12:  # the best row is (argmax half a, argmax half b)
            assert torch.equal(res.ids[:, 0], best)
        i1, i2 = res.ids // pk.n2, res.ids % pk.n2
        torch.testing.assert_close(
            res.scores.detach(), s1.gather(1, i1) + s2.gather(1, i2), atol=1e-5, rtol=1e-5
        )


@given(st.integers(1, 10**15))
def test_grid_shape(n: int) -> None:
    n1, n2 = grid_shape(n)
    assert n1 * n2 >= n and n1 * n2 - n < n2 and n1 <= n2


@given(
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(1, 3000),
    st.integers(1, 40),
    st.data(),
)
def test_topk_ip_is_exact(g: int, m: int, n: int, k: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    gen = torch.Generator().manual_seed(n * 31 + k)
    q = torch.randn(g, m, 6, generator=gen)
    keys = torch.randn(g, n, 6, generator=gen)
    v, i = topk_ip(q, keys, k, start=start, stop=stop, max_elems=512)
    want_v, want_i = torch.bmm(q, keys[:, start:stop].transpose(1, 2)).topk(min(k, stop - start))
    torch.testing.assert_close(v, want_v)
    assert torch.equal(i, want_i + start)


@given(
    st.integers(1, 40), st.integers(1, 40), st.integers(1, 64), st.booleans(), st.integers(0, 99)
)
def test_pruned_pairs_keep_the_top_k_of_sums(n1: int, n2: int, k: int, ties: bool, seed: int):
    """Of a[i] + b[j] with a, b sorted descending, the pairs with (i+1)(j+1) <= k hold the top k
    (the values exactly, ties included)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(3, n1, generator=gen), torch.randn(3, n2, generator=gen)
    if ties:
        a, b = a.round(), b.round()
    a, b = a.sort(-1, descending=True).values, b.sort(-1, descending=True).values
    full = (a[:, :, None] + b[:, None, :]).flatten(1)
    pairs = sorted_pair_candidates(n1, n2, k, torch.device("cpu"))
    kk = min(k, n1 * n2)
    assert len(pairs) >= kk
    got = full[:, pairs].topk(kk, dim=-1).values
    assert torch.equal(got, full.topk(kk, dim=-1).values)


@pytest.mark.parametrize("k", [1, 7, 40])
@pytest.mark.parametrize("ties", [False, True])
def test_block_max_kernel_is_exact(k: int, ties: bool) -> None:
    """The block-max path (chunks a multiple of 32 wide, more than 2k blocks) that does the work
    at scale, which random small shapes rarely reach; with ties, values must still be exact and
    every index must point at its value."""
    gen = torch.Generator().manual_seed(k)
    scores = torch.randn(2, 5, 32 * 97, generator=gen)
    if ties:
        scores = scores.round()  # a handful of distinct values, many ties
    v, i = _chunk_topk(scores, k)
    want = scores.topk(k, dim=-1).values
    assert torch.equal(v, want) and torch.equal(scores.gather(-1, i), v)
    assert bool((i.sort(-1).values[..., 1:] != i.sort(-1).values[..., :-1]).all())  # distinct
    # and through topk_ip, whose key chunks then take the block-max path
    q = torch.randn(2, 5, 6, generator=gen)
    keys = torch.randn(2, 32 * 1000, 6, generator=gen)
    got_v, got_i = topk_ip(q, keys, k, max_elems=1 << 12)
    want_v, want_i = torch.bmm(q, keys.transpose(1, 2)).topk(k)
    torch.testing.assert_close(got_v, want_v)
    assert torch.equal(got_i, want_i)


@pytest.mark.skipif(not _kernels.ENABLED, reason="dpsn._native was not built")
@given(
    st.integers(1, 2000),  # rows (the grid's last row partial or not)
    st.integers(1, 24),  # k: <= 16 takes the vectorized selection, more the scalar one
    st.integers(1, 2),  # heads
    st.integers(1, 9),  # queries
    st.sampled_from(["distinct", "ties", "budgets", "nan"]),
    st.integers(0, 99),
)
def test_native_search_is_the_exact_top_k_of_the_sums(
    rows: int, k: int, heads: int, t: int, mode: str, seed: int
) -> None:
    """_kernels.pk_search against every combined key's score, computed from the same sub-key
    scores: the values exactly (ties included), every id pointing at its value, ids distinct
    and in range; with distinct scores the ids themselves; with budgets each query's first
    budget entries, then padding. The vectorized selection (k <= 16) and the scalar one give
    the same bits, NaN scores included."""
    k = min(k, rows)
    n1, n2 = grid_shape(rows)
    e = 4
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, heads, 2 * e, generator=gen)
    keys1 = torch.randn(heads, n1, e, generator=gen)
    keys2 = torch.randn(heads, n2, e, generator=gen)
    if mode == "ties":  # few distinct sub-key scores: many equal sums
        q, keys1, keys2 = q.round(), keys1.round(), keys2.round()
    if mode == "nan":  # a diverged model: some sub-keys NaN
        keys1[torch.rand(heads, n1, generator=gen) < 0.2] = float("nan")
        keys2[torch.rand(heads, n2, generator=gen) < 0.2] = float("nan")
    budgets = torch.randint(1, k + 1, (t,), generator=gen) if mode == "budgets" else None
    ids, vals = _kernels.pk_search(q, keys1, keys2, k, rows, budgets)
    scalar_ids, scalar_vals = _kernels.pk_search(q, keys1, keys2, k, rows, budgets, simd=False)
    assert torch.equal(ids, scalar_ids)
    assert torch.equal(vals.view(torch.int32), scalar_vals.view(torch.int32))
    if mode == "nan":
        return
    qh = q.transpose(0, 1)  # what pk_search scores the halves with
    s1 = torch.matmul(qh[..., :e], keys1.transpose(1, 2))  # [H, T, n1]
    s2 = torch.matmul(qh[..., e:], keys2.transpose(1, 2))
    full = (s1[..., :, None] + s2[..., None, :]).flatten(2)[..., :rows]  # [H, T, rows]
    want_v, want_i = full.topk(k, dim=-1)
    want_v, want_i = want_v.transpose(0, 1), want_i.transpose(0, 1)  # [T, H, k]
    keep = torch.ones(t, heads, k, dtype=torch.bool)
    if budgets is not None:
        keep = (torch.arange(k)[None, None, :] < budgets[:, None, None]).expand(t, heads, k)
        assert bool((ids[~keep] == -1).all()) and bool(torch.isneginf(vals[~keep]).all())
    assert torch.equal(vals[keep], want_v[keep])
    got = ids.clamp(min=0)
    at = full.transpose(0, 1).gather(-1, got)
    assert torch.equal(at[keep], vals[keep])  # each id's own score
    assert int(ids.max()) < rows
    srt = ids.sort(-1).values
    assert bool(((srt[..., 1:] != srt[..., :-1]) | (srt[..., 1:] == -1)).all())  # distinct
    if mode != "ties":
        assert torch.equal(ids[keep], want_i[keep])


def test_merge_heads_keeps_best_copy() -> None:
    ids = torch.tensor([[5, 3, 9, 5, 3, 1]])
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.95, 0.8, 0.2]])
    pos = merge_heads(ids, scores, 3)
    assert ids.gather(1, pos).tolist() == [[5, 3, 9]]
    torch.testing.assert_close(scores.gather(1, pos), torch.tensor([[0.95, 0.8, 0.5]]))


@pytest.mark.parametrize(
    "kw",
    [
        {"num_rows": 0, "k": 1},
        {"num_rows": 10, "k": 11},
        {"num_rows": 2**63, "k": 1},
        {"num_rows": 10, "k": 2, "d_key": 7},
        {"num_rows": 10, "k": 2, "heads": 0},
        {"num_rows": 10, "k": 2, "k_min": 3},
        {"num_rows": 10, "k": 2, "budget": "novelty", "k_min": 1},
        {"num_rows": 10, "k": 2, "budget": "vibes"},
    ],
)
def test_bad_config_is_refused(kw: dict) -> None:
    with pytest.raises(RouterConfigError):
        ProductKeyRouter(d_in=D_IN, **kw)
