"""xxh64_ids against the xxhash package, the reference that defines every base row."""

from __future__ import annotations

import pytest
import torch
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from dpsn.errors import InvalidIdsError
from dpsn.hypernet import _hash, derive_seed, xxh64_ids

INT64 = st.integers(-(2**63), 2**63 - 1)
SEEDS = st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
EDGE_IDS = [0, 1, -1, 2**63 - 1, -(2**63), 2**32, -(2**32), 0x0123456789ABCDEF]


def reference(ids: list[int], seed: int) -> list[int]:
    """The spec: xxh64 of each id's 8 little-endian bytes, as a signed int64."""
    out = []
    for i in ids:
        h = xxhash.xxh64_intdigest(i.to_bytes(8, "little", signed=True), seed)
        out.append(h - 2**64 if h >= 2**63 else h)
    return out


@given(ids=st.lists(INT64, min_size=1, max_size=64), seed=SEEDS)
def test_matches_xxhash_package(ids: list[int], seed: int) -> None:
    got = xxh64_ids(torch.tensor(ids, dtype=torch.int64), seed)
    assert got.tolist() == reference(ids, seed)


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1, 2**63, 2**64 - 1])
def test_edge_ids_and_seeds(seed: int) -> None:
    assert xxh64_ids(torch.tensor(EDGE_IDS), seed).tolist() == reference(EDGE_IDS, seed)


def test_chunked_cpu_path_matches_reference() -> None:
    # More ids than one CPU chunk, with a ragged tail, so chunk boundaries are exercised.
    n = 2 * _hash._CPU_CHUNK + 7
    ids = torch.arange(n, dtype=torch.int64).mul_(0x9E3779B97F4A7C15 - 2**64)
    got = xxh64_ids(ids, 42)
    probe = [0, 1, _hash._CPU_CHUNK - 1, _hash._CPU_CHUNK, _hash._CPU_CHUNK + 1, n - 2, n - 1]
    probe += list(range(0, n, 9973))
    assert got[probe].tolist() == reference(ids[probe].tolist(), 42)


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 4), (3, 1, 2)])
def test_shape_dtype_device_preserved(shape: tuple[int, ...]) -> None:
    ids = torch.arange(int(torch.tensor(shape).prod().item()) if shape else 1).reshape(shape)
    got = xxh64_ids(ids, 7)
    assert got.shape == ids.shape and got.dtype == torch.int64 and got.device == ids.device
    assert got.reshape(-1).tolist() == reference(ids.reshape(-1).tolist(), 7)


def test_non_contiguous_and_narrow_dtypes() -> None:
    base = torch.arange(-50, 50, dtype=torch.int64).reshape(10, 10)
    view = base.t()[::2]
    assert not view.is_contiguous()
    assert xxh64_ids(view, 3).tolist() == xxh64_ids(view.contiguous(), 3).tolist()
    for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        small = torch.arange(0, 100, dtype=dtype)
        assert torch.equal(xxh64_ids(small, 3), xxh64_ids(small.long(), 3))


def test_input_untouched_and_out_param() -> None:
    ids = torch.tensor(EDGE_IDS)
    before = ids.clone()
    expected = xxh64_ids(ids, 9)
    assert torch.equal(ids, before)
    assert expected.data_ptr() != ids.data_ptr()
    out = torch.empty_like(ids)
    assert xxh64_ids(ids, 9, out=out) is out and torch.equal(out, expected)
    assert torch.equal(xxh64_ids(ids, 9, out=ids), expected)  # in place is allowed
    with pytest.raises(ValueError, match="contiguous int64"):
        xxh64_ids(before, 9, out=torch.empty(3, dtype=torch.int64))


@pytest.mark.parametrize(
    "bad", [torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.zeros(2, dtype=torch.float64)]
)
def test_non_integer_ids_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(InvalidIdsError, match="integer dtype"):
        xxh64_ids(bad, 0)


def test_bad_seed_rejected() -> None:
    ids = torch.arange(3)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            xxh64_ids(ids, seed)
    with pytest.raises(TypeError, match="seed"):
        xxh64_ids(ids, 1.5)  # type: ignore[arg-type]


def test_derive_seed() -> None:
    assert derive_seed(5, 3) == xxhash.xxh64_intdigest((3).to_bytes(8, "little"), 5)
    seeds = {derive_seed(s, k) for s in (0, 1, 2**64 - 1) for k in range(50)}
    assert len(seeds) == 150
    assert all(0 <= s < 2**64 for s in seeds)
    with pytest.raises(ValueError, match="stream"):
        derive_seed(0, -1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    ids = torch.cat([torch.tensor(EDGE_IDS), torch.randint(-(2**63), 2**63 - 1, (100_000,))])
    for seed in (0, 2**63 - 1, 2**64 - 1):
        got = xxh64_ids(ids.cuda(), seed)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), xxh64_ids(ids, seed))
