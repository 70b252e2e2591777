"""The CUDA path end to end: the device cache on the GPU, fills from the host tiers, PoolLayer
and PoolEmbedding forward and backward, prefetch on a side stream, spilled batches. Each test
compares the GPU with the CPU path on the same store contents (within float tolerance: the
generator's and the executors' float32 sums may round differently across devices).

Marked ``gpu``: skipped without CUDA (conftest.py), run with ``pytest -m gpu`` where there is
one. dpsn's native loops are CPU-only, so on CUDA every step here is the PyTorch path.
"""

import pytest
import torch

import dpsn
from dpsn.pool import PoolEmbedding, PoolLayer

pytestmark = pytest.mark.gpu

SMALL = {"kind": "hashed_slices", "memory_size": 4096}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def make(path, device, cache_rows=256, dim=16, rows=10**9):
    return dpsn.create(
        path, rows=rows, dim=dim, seed=3, generator=SMALL, cache_rows=cache_rows, device=device
    )


def test_cached_reads_and_writes_on_the_gpu_match_the_cpu(tmp_path):
    gpu, cpu = make(tmp_path / "g", "cuda"), make(tmp_path / "c", "cpu", cache_rows=0)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        ids = torch.randint(0, 500, (64,), generator=g)
        d = torch.randn(64, 16, generator=g)
        for p in (gpu, cpu):
            p.write(ids, d, add=bool(step % 2))
        rows = gpu.read(ids)
        assert rows.device.type == "cuda"
        assert torch.allclose(rows.cpu(), cpu.read(ids), **TOL)
    for p in (gpu, cpu):
        p.commit("five steps")
    gpu.close()
    with dpsn.open(tmp_path / "g", device="cuda", cache_rows=128) as again:
        ids = torch.arange(500)
        assert torch.allclose(again.read(ids).cpu(), cpu.read(ids), **TOL)  # spilled: 500 > 128
        assert again.stats()["spilled_batches"] >= 1
    cpu.close()


def test_prefetch_on_a_side_stream(tmp_path):
    pool = make(tmp_path / "s", "cuda")
    ids = torch.arange(100, 164)
    with pool.prefetch(ids) as pf:
        pf.wait()  # the current stream waits for the side stream's copies
        hits = pool.stats()["hits"]
        rows = pool.read(ids)
        assert pool.stats()["hits"] == hits + len(ids)
    assert torch.allclose(rows.cpu(), pool.base(ids).cpu(), **TOL)
    pool.close()


def _train_layer(path, device, steps=2):
    pool = make(path, device, cache_rows=512, dim=14, rows=5000)
    layer = PoolLayer(pool, 8, 6, k=4, row_optimizer="sgd", row_lr=0.1).to(device)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g).to(device)
        layer(x).square().sum().backward()
    out = pool.delta(torch.arange(5000)).cpu()
    pool.close()
    return out


def test_pool_layer_trains_on_the_gpu_like_on_the_cpu(tmp_path):
    gpu = _train_layer(tmp_path / "g", "cuda")
    cpu = _train_layer(tmp_path / "c", "cpu")
    assert bool((gpu != 0).any())
    assert torch.allclose(gpu, cpu, rtol=1e-4, atol=1e-5)


def test_pool_embedding_on_the_gpu_matches_embedding_bag(tmp_path):
    pool = make(tmp_path / "s", "cuda", dim=6)
    emb = PoolEmbedding(pool, mode="sum", row_optimizer="sgd", row_lr=1.0)
    ids = torch.tensor([[3, 7, 3], [9, 1, 7]], device="cuda")
    uniq, inverse = torch.unique(ids, return_inverse=True)
    bag = torch.nn.EmbeddingBag(len(uniq), 6, mode="sum").cuda()
    with torch.no_grad():
        bag.weight.copy_(pool.read(uniq))
    before = pool.read(uniq).clone()
    want, got = bag(inverse), emb(ids)
    assert torch.allclose(got, want, **TOL)
    want.square().sum().backward()
    got.square().sum().backward()
    assert torch.allclose(pool.read(uniq) - before, -bag.weight.grad, **TOL)
    pool.close()


def test_grad_scaler_on_the_gpu(tmp_path):
    pool = make(tmp_path / "s", "cuda", dim=6)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    emb = PoolEmbedding(pool, mode="sum", row_optimizer="sgd", row_lr=0.5, grad_scaler=scaler)
    plain = make(tmp_path / "p", "cuda", dim=6)
    emb2 = PoolEmbedding(plain, mode="sum", row_optimizer="sgd", row_lr=0.5)
    ids = torch.tensor([[1, 2], [2, 3]], device="cuda")
    scaler.scale(emb(ids).square().sum()).backward()
    emb2(ids).square().sum().backward()
    assert torch.allclose(pool.delta(ids), plain.delta(ids), **TOL)
    pool.close()
    plain.close()
