"""PoolEmbedding against nn.EmbeddingBag over the same rows: outputs, row updates (SGD, lr 1:
a row moves by minus its gradient), per_sample_weights' gradient; training through a tiny cache
(spilled batches), exact resume, bad input."""

import pytest
import torch
from torch import nn

import dpsn
from dpsn.pool import PoolEmbedding

DIM = 6
SMALL = {"kind": "hashed_slices", "memory_size": 512}


def make(path, cache_rows=256, **kw):
    pool = dpsn.create(path, rows=10**12, dim=DIM, seed=2, generator=SMALL, cache_rows=cache_rows)
    return pool, PoolEmbedding(pool, **kw)


def reference(pool, ids, mode):
    """An nn.EmbeddingBag whose weight holds the pool's rows of the distinct ``ids``."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    bag = nn.EmbeddingBag(len(uniq), DIM, mode=mode)
    with torch.no_grad():
        bag.weight.copy_(pool.read(uniq))
    return bag, uniq, inverse


CASES = [
    # (input, offsets, with per_sample_weights)
    (torch.tensor([[3, 10**11, 3], [7, 7, 5]]), None, False),
    (torch.tensor([4, 4, 9, 10**12 - 1, 2]), torch.tensor([0, 2, 2, 4]), False),  # an empty bag
    (torch.tensor([[3, 8], [8, 1]]), None, True),
    (torch.tensor([5, 6, 5, 7]), torch.tensor([0, 1]), True),
]


@pytest.mark.parametrize(
    ("ids", "offsets", "weighted", "mode"),
    # per_sample_weights need mode="sum", as in PyTorch
    [(*case, mode) for case in CASES for mode in ("sum", "mean") if mode == "sum" or not case[2]],
)
def test_matches_embedding_bag_forward_and_backward(tmp_path, ids, offsets, weighted, mode):
    pool, emb = make(tmp_path / "s", mode=mode, row_optimizer="sgd", row_lr=1.0)
    pool.write(ids.reshape(-1)[:2], torch.randn(2, DIM))  # some rows trained, some procedural
    bag, uniq, inverse = reference(pool, ids, mode)
    g = torch.Generator().manual_seed(0)
    psw = torch.rand(ids.shape, generator=g) if weighted else None
    psw_ref = psw.clone().requires_grad_() if weighted else None
    psw_pool = psw.clone().requires_grad_() if weighted else None
    before = pool.read(uniq).clone()

    want = bag(inverse, offsets, per_sample_weights=psw_ref)
    got = emb(ids, offsets, per_sample_weights=psw_pool)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6)

    target = torch.randn(want.shape, generator=g)
    ((want - target) ** 2).sum().backward()
    ((got - target) ** 2).sum().backward()
    # SGD with lr 1: each row moved by minus the gradient nn.EmbeddingBag computed for it
    assert torch.allclose(pool.read(uniq) - before, -bag.weight.grad, atol=1e-5)
    if weighted:
        assert torch.allclose(psw_pool.grad, psw_ref.grad, atol=1e-5)
    pool.close()


def test_rows_outside_the_batch_stay_bit_identical(tmp_path):
    pool, emb = make(tmp_path / "s")
    others = torch.tensor([11, 12, 13])
    before = pool.read(others).clone()
    emb(torch.tensor([[1, 2], [3, 4]])).sum().backward()
    assert torch.equal(pool.read(others), before)
    assert bool((pool.delta([1, 2, 3, 4]) != 0).any(dim=1).all())
    pool.close()


def test_trains_through_a_cache_smaller_than_the_batch(tmp_path):
    """A batch of 40 distinct ids through a 16-row cache is served spilled, and trains exactly
    like the same run through a cache that holds everything."""
    results = []
    for cache_rows in (16, 4096):
        pool, emb = make(tmp_path / f"s{cache_rows}", cache_rows=cache_rows, mode="sum")
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            ids = torch.randint(0, 60, (8, 5), generator=g)
            emb(ids).square().sum().backward()
        results.append(pool.delta(torch.arange(60)).clone())
        if cache_rows == 16:
            assert pool.stats()["spilled_batches"] >= 5
        pool.close()
    assert torch.equal(results[0], results[1])


def test_resume_after_commit_is_exact(tmp_path):
    def run(pool, emb, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            emb(torch.randint(0, 30, (4, 3), generator=g)).square().sum().backward()

    pool, emb = make(tmp_path / "a", row_optimizer="adam")
    run(pool, emb, 3, 0)
    run(pool, emb, 3, 1)
    straight = pool.delta(torch.arange(30)).clone()
    pool.close()

    pool, emb = make(tmp_path / "b", row_optimizer="adam")
    run(pool, emb, 3, 0)
    pool.commit("half")
    pool.close()
    with dpsn.open(tmp_path / "b", "r+") as pool:
        emb = PoolEmbedding(pool, row_optimizer="adam")
        run(pool, emb, 3, 1)
        assert torch.equal(pool.delta(torch.arange(30)), straight)


def test_bad_input(tmp_path):
    pool, emb = make(tmp_path / "s")
    with pytest.raises(ValueError, match="mode must be one of"):
        PoolEmbedding(pool, mode="min")
    with pytest.raises(ValueError, match="offsets must be None"):
        emb(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="1-D offsets"):
        emb(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="start with 0"):
        emb(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        emb(torch.tensor([1, 2]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match='only supported with mode="sum"'):
        emb(torch.tensor([[1, 2]]), per_sample_weights=torch.ones(1, 2))
    with pytest.raises(IndexError, match="out of range"):
        emb(torch.tensor([[1, 10**12]]))
    pool.close()
