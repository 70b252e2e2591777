"""Hashed features: the documented formulas, ranges and rough distributions.

The statistical checks run on a fixed sample (ids 0..N-1, fixed seeds), so they are
deterministic: loose bounds guard against a broken formula, never against bad luck.
"""

from __future__ import annotations

import math

import pytest
import torch
import xxhash

from dpsn.hypernet import hashed_normal, hashed_offsets, hashed_uniform
from dpsn.hypernet._features import stream_bits

U64 = 2**64
N = 100_000


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % U64
    return z ^ (z >> 31)


def reference_bits(i: int, seed: int, n: int) -> list[int]:
    """Pure-Python statement of the formula in ``_features``' docstring (unsigned words)."""
    h = xxhash.xxh64_intdigest(i.to_bytes(8, "little", signed=True), seed)
    return [_mix64((h + (j + 1) * 0x9E3779B97F4A7C15) % U64) for j in range(n)]


def test_stream_bits_formula() -> None:
    ids = [0, 1, -1, 2**63 - 1, 12345]
    got = stream_bits(torch.tensor(ids), 2**64 - 1, 5)
    for row, i in zip(got.tolist(), ids, strict=True):
        assert [b % U64 for b in row] == reference_bits(i, 2**64 - 1, 5)


def test_uniform_formula_and_range() -> None:
    ids = [3, -7, 2**40]
    got = hashed_uniform(torch.tensor(ids), 11, 4)
    for row, i in zip(got.tolist(), ids, strict=True):
        expected = []
        for w in reference_bits(i, 11, 4):
            top = w >> 40
            expected.append((top - 2**24 if top >= 2**23 else top) * 2.0**-23)
        assert row == expected

    u = hashed_uniform(torch.arange(N), 1, 4)
    assert u.shape == (N, 4) and u.dtype == torch.float32
    assert u.min() >= -1.0 and u.max() < 1.0
    assert torch.equal(u * 2**23, (u * 2**23).round())  # 24-bit grid, exact in float32
    assert abs(u.mean().item()) < 0.01
    assert abs(u.var().item() - 1 / 3) < 0.01
    counts = torch.histc(u, bins=20, min=-1.0, max=1.0)
    expected = u.numel() / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 60  # 19 dof: mean 19; a broken map gives thousands
    corr = torch.corrcoef(u.T)
    assert (corr - torch.eye(4)).abs().max() < 0.02  # streams are uncorrelated


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_normal_shape_and_moments(n: int) -> None:
    z = hashed_normal(torch.arange(N), 2, n)
    assert z.shape == (N, n) and z.dtype == torch.float32 and z.is_contiguous()
    assert z.abs().max() <= math.sqrt(48 * math.log(2)) + 1e-4
    assert abs(z.mean().item()) < 0.02
    assert abs(z.std().item() - 1.0) < 0.02
    within_one = (z.abs() < 1).float().mean().item()
    assert abs(within_one - 0.6827) < 0.01
    if n >= 2:
        assert abs(torch.corrcoef(z[:, :2].T)[0, 1].item()) < 0.02


def test_normal_prefix_consistent() -> None:
    # Feature j does not depend on how many features were asked for.
    ids = torch.arange(100)
    assert torch.equal(hashed_normal(ids, 5, 3), hashed_normal(ids, 5, 4)[:, :3])
    assert torch.equal(hashed_uniform(ids, 5, 3), hashed_uniform(ids, 5, 6)[:, :3])


@pytest.mark.parametrize("modulus", [1, 7, 1000, 2**20, 2**20 - 31, 2**62 + 1, 2**63])
def test_offsets_range_and_formula(modulus: int) -> None:
    ids = torch.arange(-500, 500)
    off = hashed_offsets(ids, 3, 3, modulus)
    assert off.dtype == torch.int64 and off.shape == (1000, 3)
    assert off.min().item() >= 0 and off.max().item() < modulus
    for i in (-500, 0, 499):
        expected = [(w & (2**63 - 1)) % modulus for w in reference_bits(i, 3, 3)]
        assert off[i + 500].tolist() == expected


def test_offsets_roughly_uniform() -> None:
    off = hashed_offsets(torch.arange(N), 4, 1, 10)
    counts = torch.bincount(off.view(-1), minlength=10).float()
    assert ((counts - N / 10).abs() / (N / 10)).max() < 0.05


def test_bad_arguments() -> None:
    ids = torch.arange(3)
    for bad_n in (0, -1, 1.5):
        with pytest.raises(ValueError, match="positive int"):
            hashed_uniform(ids, 0, bad_n)  # type: ignore[arg-type]
    for bad_mod in (0, 2**63 + 1):
        with pytest.raises(ValueError, match="modulus"):
            hashed_offsets(ids, 0, 1, bad_mod)


def test_deterministic_and_batch_independent() -> None:
    ids = torch.tensor([[5, 9], [2**62, -3]])
    for fn in (hashed_uniform, hashed_normal):
        batch = fn(ids, 77, 5)
        assert batch.shape == (2, 2, 5)
        assert torch.equal(batch, fn(ids, 77, 5))
        assert torch.equal(batch[1, 0], fn(ids[1, 0], 77, 5))  # 0-d id alone
        assert not torch.equal(batch, fn(ids, 78, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features() -> None:
    ids = torch.arange(-1000, 1000)
    assert torch.equal(hashed_uniform(ids.cuda(), 1, 6).cpu(), hashed_uniform(ids, 1, 6))
    assert torch.equal(hashed_offsets(ids.cuda(), 1, 6, 999).cpu(), hashed_offsets(ids, 1, 6, 999))
    torch.testing.assert_close(hashed_normal(ids.cuda(), 1, 6).cpu(), hashed_normal(ids, 1, 6))
