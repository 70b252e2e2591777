"""The rules of the fused row step, which PyTorch habits would otherwise get silently wrong
(DESIGN "Training rules"): once per graph, GradScaler, accumulate(), row_clip, no_grad."""

import pytest
import torch

import dpsn
from dpsn.pool import PoolEmbedding, PoolLayer

DIM = 4
SMALL = {"kind": "hashed_slices", "memory_size": 512}
IDS = torch.tensor([[1, 2, 3], [3, 4, 5], [6, 1, 1]])


def make(path, cache_rows=64, **kw):
    pool = dpsn.create(path, rows=1000, dim=DIM, seed=1, generator=SMALL, cache_rows=cache_rows)
    kw.setdefault("row_optimizer", "sgd")
    kw.setdefault("row_lr", 0.1)
    return pool, PoolEmbedding(pool, mode="sum", **kw)


def loss_of(emb, ids=IDS, scale=1.0):
    target = torch.linspace(-1, 1, len(ids) * DIM).reshape(len(ids), DIM)
    return scale * ((emb(ids) - target) ** 2).sum()


def deltas(pool):
    return pool.delta(torch.arange(10)).clone()


def test_a_second_backward_through_the_same_graph_raises_and_applies_once(tmp_path):
    pool, emb = make(tmp_path / "s")
    loss = loss_of(emb)
    loss.backward(retain_graph=True)
    once = deltas(pool)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        loss.backward()
    assert torch.equal(deltas(pool), once)
    pool.close()


def test_a_second_backward_through_a_pool_layer_raises(tmp_path):
    pool = dpsn.create(tmp_path / "s", rows=1000, dim=10, generator=SMALL, cache_rows=64)
    layer = PoolLayer(pool, 4, 6, k=2, row_optimizer="sgd")
    y = layer(torch.randn(5, 4)).square().sum()
    y.backward(retain_graph=True)
    once = pool.delta(torch.arange(1000)).clone()
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        y.backward()
    assert torch.equal(pool.delta(torch.arange(1000)), once)
    pool.close()


def test_grad_scaler_scale_is_divided_out(tmp_path):
    plain, emb = make(tmp_path / "a")
    loss_of(emb).backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled, emb2 = make(tmp_path / "b", grad_scaler=scaler)
    scaler.scale(loss_of(emb2)).backward()
    assert torch.allclose(deltas(scaled), deltas(plain), rtol=1e-6, atol=1e-7)
    assert bool((deltas(plain) != 0).any())
    plain.close()
    scaled.close()


def test_non_finite_row_gradients_skip_the_step_and_are_counted(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)
    pool, emb = make(tmp_path / "s", grad_scaler=scaler)
    loss = scaler.scale(loss_of(emb))  # float32 overflows: the scaled gradients are not finite
    loss.backward()
    assert torch.equal(deltas(pool), torch.zeros(10, DIM))
    assert pool.stats()["skipped_row_steps"] == 1 and pool.stats()["row_steps"] == 0
    scaler.update(2.0**4)  # what GradScaler.update does after an overflow: a smaller scale
    scaler.scale(loss_of(emb)).backward()  # a finite step goes through
    assert pool.stats()["row_steps"] == 1
    pool.close()


def test_accumulate_applies_one_step_equal_to_the_concatenated_batch(tmp_path):
    whole, emb = make(tmp_path / "a")
    loss_of(emb).backward()
    split, emb2 = make(tmp_path / "b")
    with emb2.accumulate():
        for part in (slice(0, 1), slice(1, 3)):
            target = torch.linspace(-1, 1, len(IDS) * DIM).reshape(len(IDS), DIM)[part]
            ((emb2(IDS[part]) - target) ** 2).sum().backward()
            assert torch.equal(deltas(split), torch.zeros(10, DIM))  # nothing applied yet
    assert torch.allclose(deltas(split), deltas(whole), atol=1e-6)
    assert split.stats()["row_steps"] == 1
    whole.close()
    split.close()


def test_accumulate_applies_nothing_when_the_block_raises(tmp_path):
    pool, emb = make(tmp_path / "s")
    with pytest.raises(KeyError), emb.accumulate():
        loss_of(emb).backward()
        raise KeyError("abandon the step")
    assert torch.equal(deltas(pool), torch.zeros(10, DIM))
    loss_of(emb).backward()  # and the next step is a plain one again
    assert bool((deltas(pool) != 0).any())
    pool.close()


def test_row_clip_bounds_each_rows_step(tmp_path):
    pool, emb = make(tmp_path / "s", row_lr=1.0, row_clip=0.5)
    loss_of(emb, scale=100.0).backward()
    norms = deltas(pool).norm(dim=1)
    assert float(norms.max()) <= 0.5 + 1e-5
    assert float(norms[1]) > 0.49  # row 1 is used: its big gradient was clipped, not zeroed
    pool.close()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_row_update_without_grad(tmp_path, mode):
    pool, emb = make(tmp_path / "s")
    with mode():
        out = loss_of(emb)
    assert not out.requires_grad
    assert torch.equal(deltas(pool), torch.zeros(10, DIM))
    assert pool.stats()["locked_rows"] == 0  # the rows were released at once
    pool.close()


def test_bad_rule_arguments(tmp_path):
    pool, _ = make(tmp_path / "s")
    with pytest.raises(ValueError, match="row_clip"):
        PoolEmbedding(pool, row_clip=-1.0)
    with pytest.raises(TypeError, match="GradScaler"):
        PoolEmbedding(pool, grad_scaler=object())
    pool.close()


class _NoPool:
    """A stand-in for the pool that fails on any use: the row trainer must reach rows only
    through the batches it is given (issue 20, one road from executor to rows)."""

    def __getattr__(self, name):
        raise AssertionError(f"the row trainer called the pool: .{name}")


def test_the_row_trainer_reaches_rows_only_through_the_batch(tmp_path):
    from dpsn.pool import RowSGD
    from dpsn.pool._training import RowTrainer

    pool, _ = make(tmp_path / "s")
    trainer = RowTrainer(_NoPool(), RowSGD(lr=0.1))
    ids = torch.tensor([1, 2, 2, 5])
    with pool.page_in(ids) as batch:  # a plain step
        trainer.step(batch, torch.ones(len(batch), DIM))
    with pool.page_in(ids) as batch:  # a skipped one (counted through the batch)
        trainer.step(batch, torch.full((len(batch), DIM), float("nan")))
    with trainer.accumulate():  # micro-batches regrouped through the batch
        for part in (ids[:2], ids[2:]):
            with pool.page_in(part) as batch:
                trainer.step(batch, torch.ones(len(batch), DIM))
    stats = pool.stats()
    assert (stats["row_steps"], stats["skipped_row_steps"]) == (2, 1)
    # SGD, lr 0.1, gradient 1 per row and batch: each row -0.1 in the first step; in the
    # block row 2's two micro-batch gradients are summed
    want = torch.tensor([-0.2, -0.3, -0.2])[:, None].expand(3, DIM)
    assert torch.allclose(pool.delta(torch.tensor([1, 2, 5])), want)
    pool.close()
