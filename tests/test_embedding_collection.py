"""PoolEmbedding's nn.EmbeddingBag options (padding_idx, mode="max", include_last_offset,
the refused ones) against nn.EmbeddingBag over the same rows, and PoolEmbeddingCollection fed
with TorchRec's jagged convention (a duck-typed KeyedJaggedTensor and plain mappings) against
one PoolEmbedding per table."""

import pytest
import torch
from torch import nn

import dpsn
from dpsn.pool import PoolEmbedding, PoolEmbeddingCollection, TableRange

DIM = 6
SMALL = {"kind": "hashed_slices", "memory_size": 512}


def make(path, rows=10**9, **kw):
    pool = dpsn.create(path, rows=rows, dim=DIM, seed=2, generator=SMALL, cache_rows=512)
    return pool, PoolEmbedding(pool, row_optimizer="sgd", row_lr=1.0, **kw)


def reference(pool, ids, mode, padding_idx=None):
    uniq, inverse = torch.unique(ids, return_inverse=True)
    pad = None
    if padding_idx is not None and bool((uniq == padding_idx).any()):
        pad = int(torch.nonzero(uniq == padding_idx)[0, 0])
    bag = nn.EmbeddingBag(len(uniq), DIM, mode=mode, padding_idx=pad)
    with torch.no_grad():
        bag.weight.copy_(pool.read(uniq))
    return bag, uniq, inverse


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("last", [False, True])
def test_padding_max_last_offset_match_embedding_bag(tmp_path, mode, last):
    pool, emb = make(tmp_path / "s", mode=mode, padding_idx=7, include_last_offset=last)
    ids = torch.tensor([3, 7, 10**8, 3, 7, 7, 5, 9, 3])
    offsets = torch.tensor([0, 3, 3, 6])  # bag 1 empty, bag 2 all padding
    pool.write(torch.tensor([3, 5]), torch.randn(2, DIM))
    bag, uniq, inverse = reference(pool, ids, mode, padding_idx=7)
    before = pool.read(uniq).clone()
    offs = torch.cat([offsets, torch.tensor([len(ids)])]) if last else offsets
    want = nn.functional.embedding_bag(
        inverse, bag.weight, offsets, mode=mode, padding_idx=bag.padding_idx
    )
    got = emb(ids, offs)
    assert torch.allclose(got, want, atol=1e-6)
    target = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    ((want - target) ** 2).sum().backward()
    ((got - target) ** 2).sum().backward()
    # SGD with lr 1: each row moved by minus nn.EmbeddingBag's gradient for it
    moved = pool.read(uniq) - before
    assert torch.allclose(moved, -bag.weight.grad, atol=1e-5)
    assert torch.equal(pool.delta(torch.tensor([7])), torch.zeros(1, DIM))  # padding untrained
    pool.close()


def test_refused_options_and_checks(tmp_path):
    pool, _ = make(tmp_path / "s")
    for kw in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"_weight": torch.zeros(1)}):
        with pytest.raises(TypeError, match="does not support"):
            PoolEmbedding(pool, **kw)
    with pytest.raises(TypeError, match="unexpected keyword"):
        PoolEmbedding(pool, num_embeddings=4)
    PoolEmbedding(pool, sparse=True)  # rows are always updated sparsely: accepted
    with pytest.raises(ValueError, match="padding_idx must be within"):
        PoolEmbedding(pool, padding_idx=10**9)
    assert PoolEmbedding(pool, padding_idx=-1).padding_idx == 10**9 - 1
    last = PoolEmbedding(pool, include_last_offset=True)
    with pytest.raises(ValueError, match="include_last_offset"):
        last(torch.tensor([1, 2]), torch.tensor([0, 1]))
    maxed = PoolEmbedding(pool, "max")
    with pytest.raises(ValueError, match='only supported with mode="sum"'):
        maxed(torch.tensor([[1, 2]]), per_sample_weights=torch.ones(1, 2))
    pool.close()


class FakeKJT:
    """The part of torchrec's KeyedJaggedTensor the collection reads (torchrec is not a
    dependency; the collection duck-types it)."""

    def __init__(self, keys, values, lengths):
        self._keys, self._values, self._lengths = keys, values, lengths

    def keys(self):
        return self._keys

    def values(self):
        return self._values

    def lengths(self):
        return self._lengths


def _features():
    user = (torch.tensor([1, 5, 5, 2]), torch.tensor([2, 0, 2]))
    item = (torch.tensor([9, 0, 4, 4, 8]), torch.tensor([1, 3, 1]))
    return user, item


@pytest.mark.parametrize("shared", [False, True])
def test_collection_matches_one_embedding_per_table(tmp_path, shared):
    rows = {"user": 100, "item": 50}
    if shared:
        pool = dpsn.create(tmp_path / "p", rows=150, dim=DIM, seed=4, generator=SMALL)
        coll = PoolEmbeddingCollection.shared(pool, rows, row_optimizer="sgd", row_lr=1.0)
        pools = {"user": pool, "item": pool}
        start = {"user": 0, "item": 100}
        assert len(coll.bags) == 1  # one pool: one fused lookup and row step
    else:
        pools = {
            n: dpsn.create(tmp_path / n, rows=r, dim=DIM, seed=4, generator=SMALL)
            for n, r in rows.items()
        }
        coll = PoolEmbeddingCollection(pools, row_optimizer="sgd", row_lr=1.0)
        start = {"user": 0, "item": 0}
    user, item = _features()
    before = {n: pools[n].read(torch.arange(rows[n]) + start[n]).clone() for n in rows}
    kjt = FakeKJT(["user", "item"], torch.cat([user[0], item[0]]), torch.cat([user[1], item[1]]))
    out = coll(kjt)
    assert set(out) == {"user", "item"} and out["user"].shape == (3, DIM)
    for name, (values, lengths) in {"user": user, "item": item}.items():
        weight = before[name].clone().requires_grad_()
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
        want = nn.functional.embedding_bag(values, weight, offsets, mode="sum")
        assert torch.allclose(out[name], want, atol=1e-6)
        want.pow(2).sum().backward()
        before[name] = (before[name], weight.grad)
    (out["user"].pow(2).sum() + out["item"].pow(2).sum()).backward()
    for name in rows:
        old, grad = before[name]
        now = pools[name].read(torch.arange(rows[name]) + start[name])
        assert torch.allclose(now - old, -grad, atol=1e-5)
    # the same lookups through plain mappings, offsets or lengths
    as_offsets = {
        "user": {"values": user[0], "offsets": torch.tensor([0, 2, 2, 4])},
        "item": {"values": item[0], "lengths": item[1]},
    }
    with torch.no_grad():
        again = coll(as_offsets)
        by_tuple = coll({"user": user, "item": item})
    for name in rows:
        assert torch.equal(again[name], by_tuple[name])
    for p in set(pools.values()):
        p.close()


def test_collection_bad_input(tmp_path):
    pool = dpsn.create(tmp_path / "p", rows=150, dim=DIM, generator=SMALL)
    coll = PoolEmbeddingCollection.shared(pool, {"a": 100, "b": 50})
    with pytest.raises(IndexError, match="within \\[0, 50\\)"):
        coll({"b": (torch.tensor([50]), torch.tensor([1]))})  # table b has 50 rows
    with pytest.raises(KeyError, match="not tables"):
        coll({"c": (torch.tensor([1]), torch.tensor([1]))})
    with pytest.raises(ValueError, match="sum to len"):
        coll({"a": (torch.tensor([1, 2]), torch.tensor([1]))})
    with pytest.raises(ValueError, match="end at len"):
        coll({"a": {"values": torch.tensor([1]), "offsets": torch.tensor([0])}})
    with pytest.raises(TypeError, match="integers"):
        coll({"a": (torch.tensor([1.0]), torch.tensor([1]))})
    with pytest.raises(ValueError, match="overlap"):
        PoolEmbeddingCollection({"a": TableRange(pool, 0, 10), "b": TableRange(pool, 5, 10)})
    with pytest.raises(ValueError, match="start \\+ rows"):
        TableRange(pool, 100, 100)
    with pytest.raises(ValueError, match="variable batch"):
        coll(FakeKJT(["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1])))
    pool.close()


@pytest.mark.slow
def test_property_forward_matches_embedding_bag(tmp_path):
    """Any bags, any mode, with or without padding and a last offset: the same pooled rows as
    nn.functional.embedding_bag over the pool's rows (no training: no_grad)."""
    from hypothesis import given
    from hypothesis import strategies as st

    pool = dpsn.create(tmp_path / "s", rows=40, dim=DIM, seed=5, generator=SMALL)
    pool.write(torch.arange(0, 40, 3), torch.randn(14, DIM))
    weight = pool.read(torch.arange(40))
    modules = {
        (mode, pad, last): PoolEmbedding(pool, mode, padding_idx=pad, include_last_offset=last)
        for mode in ("sum", "mean", "max")
        for pad in (None, 4)
        for last in (False, True)
    }

    @given(
        ids=st.lists(st.integers(0, 39), max_size=30),
        cuts=st.lists(st.integers(0, 30), min_size=1, max_size=6),
        mode=st.sampled_from(["sum", "mean", "max"]),
        pad=st.sampled_from([None, 4]),
        last=st.booleans(),
    )
    def check(ids, cuts, mode, pad, last):
        values = torch.tensor(ids, dtype=torch.int64)
        offsets = torch.tensor(sorted({0, *(min(c, len(ids)) for c in cuts)}))
        want = nn.functional.embedding_bag(values, weight, offsets, mode=mode, padding_idx=pad)
        offs = torch.cat([offsets, torch.tensor([len(ids)])]) if last else offsets
        with torch.no_grad():
            got = modules[(mode, pad, last)](values, offs)
        assert torch.allclose(got, want, atol=1e-5), (got, want)

    check()
    pool.close()
