"""NgramMemory: hashed N-gram addresses, the gated read, row training through the executor
contract, the lifecycle on its rows, and ahead-of-time paging (real stores in tmp dirs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dpsn
from dpsn.errors import InvalidArgumentError, InvalidArgumentTypeError, InvalidIdsError
from dpsn.pool import prefetching

SMALL = {"kind": "hashed_slices", "memory_size": 4096}  # fast store creation


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: extra threads only spin
    yield
    torch.set_num_threads(n)


@pytest.fixture
def pool(tmp_path):
    p = dpsn.create(tmp_path / "s", rows=1 << 20, dim=8, cache_rows=8192, generator=SMALL)
    yield p
    p.close()


def test_exported():
    assert dpsn.NgramMemory is dpsn.pool.NgramMemory
    assert "NgramMemory" in dpsn.__all__


def test_shapes_and_ids(pool):
    m = dpsn.NgramMemory(pool, 16, orders=(2, 3), heads=4)
    tokens = torch.randint(0, 256, (3, 10))
    ids = m.ids(tokens)
    assert ids.shape == (3, 10, 8) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < pool.rows
    assert torch.equal(ids, m.ids(tokens.clone()))  # deterministic
    out = m(torch.randn(3, 10, 16), tokens)
    assert out.shape == (3, 10, 16)
    # heads hash apart: one N-gram's K heads land on different rows
    assert bool((ids[..., 0] != ids[..., 1]).all())


def _window(seq: list[int], t: int, n: int) -> tuple[int, ...]:
    return tuple(seq[t - j] if t - j >= 0 else -1 for j in range(n - 1, -1, -1))


@settings(max_examples=40, deadline=None)
@given(
    a=st.lists(st.integers(0, 5), min_size=1, max_size=12),
    b=st.lists(st.integers(0, 5), min_size=1, max_size=12),
)
def test_ids_depend_only_on_trailing_tokens(tmp_path_factory, a, b):
    """Two positions (in any sequences) whose trailing n tokens agree, padding before the start
    included, get the same ids for order n; positions whose windows differ get different ids
    in at least one head (a 1-in-2**20 collision in all four heads is not expected here)."""
    p = _shared_pool(tmp_path_factory)
    m = dpsn.NgramMemory(p, 4, orders=(1, 2, 3), heads=4)
    ia = m.ids(torch.tensor([a]))[0]
    ib = m.ids(torch.tensor([b]))[0]
    for o, n in enumerate(m.orders):
        cols = slice(o * 4, (o + 1) * 4)
        for s in range(len(a)):
            for t in range(len(b)):
                same = _window(a, s, n) == _window(b, t, n)
                agree = torch.equal(ia[s, cols], ib[t, cols])
                assert same == agree, (n, a, s, b, t)


_POOLS: dict[str, dpsn.Pool] = {}


def _shared_pool(factory) -> dpsn.Pool:
    if "p" not in _POOLS:
        _POOLS["p"] = dpsn.create(factory.mktemp("ng") / "s", rows=1 << 20, dim=4, generator=SMALL)
    return _POOLS["p"]


def test_bad_inputs(pool):
    with pytest.raises(InvalidArgumentTypeError):
        dpsn.NgramMemory(object(), 8)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        dpsn.NgramMemory(pool, 8, orders=(0,))
    with pytest.raises(InvalidArgumentError):
        dpsn.NgramMemory(pool, 8, orders=(2, 2))
    with pytest.raises(InvalidArgumentTypeError):
        dpsn.NgramMemory(pool, 8, orders=[])
    with pytest.raises(InvalidArgumentError):
        dpsn.NgramMemory(pool, 8, heads=0)
    with pytest.raises(InvalidArgumentError):
        dpsn.NgramMemory(pool, 0)
    m = dpsn.NgramMemory(pool, 8)
    h = torch.randn(2, 5, 8)
    with pytest.raises(InvalidIdsError):
        m(h, torch.rand(2, 5))  # float tokens
    with pytest.raises(InvalidIdsError):
        m(h, torch.randint(0, 9, (10,)))  # not [B, T]
    with pytest.raises(InvalidIdsError):
        m(h, torch.full((2, 5), -3))
    with pytest.raises(InvalidArgumentError):
        m(h, torch.randint(0, 9, (2, 4)))  # [B, T] disagree
    with pytest.raises(InvalidArgumentError):
        m(torch.randn(2, 5, 7), torch.randint(0, 9, (2, 5)))
    with pytest.raises(InvalidArgumentTypeError):
        m(torch.ones(2, 5, 8, dtype=torch.int64), torch.randint(0, 9, (2, 5)))
    # a ValueError / TypeError catches them, as the builtins would
    with pytest.raises(ValueError):
        m(h, torch.full((2, 5), -3))


def test_only_used_rows_train(pool):
    m = dpsn.NgramMemory(pool, 8, orders=(2,), heads=2, row_optimizer="sgd", row_lr=0.5)
    tokens = torch.randint(0, 50, (2, 6))
    used = torch.unique(m.ids(tokens))
    other = torch.arange(1000, 1100)
    other = other[~torch.isin(other, used)]
    before_used, before_other = pool.read(used).clone(), pool.read(other).clone()
    m(torch.randn(2, 6, 8), tokens).sum().backward()
    assert not torch.equal(pool.read(used), before_used)
    assert torch.equal(pool.read(other), before_other)
    with torch.no_grad():  # no graph: no row update, rows released
        m(torch.randn(2, 6, 8), tokens)
    assert pool.stats()["row_steps"] == 1


def test_training_lowers_loss(tmp_path, one_thread):
    """Next token = a random function of the last two tokens: only a model that sees bigrams
    can learn it. A per-token embedding plateaus; the memory's bigram rows learn the table."""
    torch.manual_seed(0)
    vocab, b, t = 12, 16, 24
    steps = 80
    table = torch.randint(0, vocab, (vocab, vocab))

    def batch():
        x = torch.randint(0, vocab, (b, t))
        y = table[F.pad(x, (1, 0))[:, :-1], x]
        return x, y

    def run(use_memory: bool) -> tuple[float, float]:
        torch.manual_seed(1)
        pool = dpsn.create(
            tmp_path / f"s{use_memory}", rows=1 << 16, dim=16, cache_rows=4096, generator=SMALL
        )
        emb = nn.Embedding(vocab, 32)
        head = nn.Linear(32, vocab)
        mem = dpsn.NgramMemory(pool, 32, orders=(2,), heads=2, row_lr=0.1)
        params = [*emb.parameters(), *head.parameters(), *mem.parameters()]
        opt = torch.optim.Adam(params, lr=1e-2)
        losses = []
        for _ in range(steps):
            x, y = batch()
            h = emb(x)
            if use_memory:
                h = h + mem(h, x)
            loss = F.cross_entropy(head(h).reshape(-1, vocab), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        pool.close()
        return sum(losses[:10]) / 10, sum(losses[-10:]) / 10

    first, last = run(True)
    _, base_last = run(False)
    assert last < 0.5 * first
    assert last < 0.6 * base_last  # the bigram memory beats the unigram baseline clearly
    assert base_last > 0.5 * math.log(vocab)  # the baseline cannot learn the table


def test_lifecycle_prunes_rare_ngrams(tmp_path):
    pool = dpsn.create(
        tmp_path / "s",
        rows=1 << 20,
        dim=8,
        generator=SMALL,
        lifecycle=dpsn.Lifecycle(max_idle=2, warmup=0, consolidate_every=0, homeostasis=False),
    )
    m = dpsn.NgramMemory(pool, 8, orders=(2,), heads=1, row_lr=0.1)
    common = torch.tensor([[1, 2, 3, 4, 5, 6]])
    rare = torch.tensor([[200, 201, 202, 203, 204, 205]])
    m(torch.randn(1, 6, 8), rare).sum().backward()
    for _ in range(4):
        m(torch.randn(1, 6, 8), common).sum().backward()
        pool.commit("step")
        pool.consolidate()
    rare_ids = torch.unique(m.ids(rare))
    common_ids = torch.unique(m.ids(common))
    pool.commit("after")
    assert not bool(pool.usage(rare_ids)["has_delta"].any())  # faded back to procedural
    assert bool(pool.usage(common_ids)["has_delta"].all())
    assert torch.equal(pool.read(rare_ids), pool.base(rare_ids))
    pool.close()


def test_prefetch_pages_next_batch(pool):
    m = dpsn.NgramMemory(pool, 8, orders=(2, 3), heads=2)
    now, nxt = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    handle = m.prefetch(nxt)
    m(torch.randn(2, 16, 8), now).sum().backward()
    handle.wait()
    m(torch.randn(2, 16, 8), nxt).sum().backward()
    last = m.last_page_in
    assert last["misses"] == 0 and last["hits"] > 0  # every row of nxt was already resident
    assert m._ahead == []  # its prefetch was released by the forward that used it


def test_prefetching_helper(pool):
    m = dpsn.NgramMemory(pool, 8, orders=(2,), heads=2)
    batches = [(torch.randint(0, 256, (2, 8)), None) for _ in range(4)]
    seen = []
    for x, _ in prefetching(batches, m):
        seen.append(x)
        m(torch.randn(2, 8, 8), x).sum().backward()
        assert m.last_page_in["misses"] == 0 and m.last_page_in["hits"] > 0
    assert all(torch.equal(a, b[0]) for a, b in zip(seen, batches, strict=True))
    assert m._ahead == []
    assert list(prefetching([], m)) == []


def test_couse_recorded_by_memory(pool):
    pool.track_couse(1 << 12)
    m = dpsn.NgramMemory(pool, 8, orders=(2, 3), heads=2, couse_every=1)
    tokens = torch.tensor([[7, 8, 9, 7, 8, 9]])
    for _ in range(3):
        m(torch.randn(1, 6, 8), tokens).sum().backward()
    ids = m.ids(tokens)[0, 3]  # the window (8, 9, 7) of position 3, 4 rows
    groups = pool.circuits(min_support=3)
    assert any(bool(torch.isin(ids, rows).all()) for rows, _ in groups)
    _, partner, count = pool.partners(ids[:1], k=3)
    assert len(partner) == 3 and bool((count >= 3).all())
    assert bool(torch.isin(partner, m.ids(tokens)).all())


@pytest.mark.gpu
def test_on_cuda_matches_cpu(tmp_path):
    """Same ids and the same output on CUDA as on CPU; prefetch through the side stream."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 12))
    hidden = torch.randn(2, 12, 8)
    outs = []
    for dev in ("cpu", "cuda"):
        p = dpsn.create(tmp_path / dev, rows=1 << 20, dim=8, generator=SMALL, device=dev)
        torch.manual_seed(1)
        m = dpsn.NgramMemory(p, 8, orders=(2, 3), heads=2).to(dev)
        assert torch.equal(m.ids(tokens.to(dev)).cpu(), m.ids(tokens))
        m.prefetch(tokens.to(dev)).wait()
        outs.append(m(hidden.to(dev), tokens.to(dev)).detach().cpu())
        assert m.last_page_in["misses"] == 0
        p.close()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
