"""Generators: one conformance suite every kind passes, then kind-specific checks."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from dpsn.errors import InvalidIdsError
from dpsn.hypernet import (
    GENERATORS,
    Generator,
    HashedSlices,
    RandomFeatureMLP,
    derive_seed,
    make_generator,
)
from dpsn.hypernet._features import stream_bits

IDS = torch.tensor([0, 1, -1, 2**63 - 1, 17, 10**12, 17])


class GeneratorConformance:
    """What the pool relies on, for every generator kind. Subclasses set ``kind``/``config``."""

    kind: ClassVar[str]
    config: ClassVar[dict[str, Any]] = {}
    batch_exact: ClassVar[bool] = True  # rows bit-identical whatever batch they are in

    def make(self, dim: int = 48, seed: int = 123, **overrides: Any) -> Generator:
        return make_generator(self.kind, dim=dim, seed=seed, **{**self.config, **overrides})

    def test_registered(self) -> None:
        g = self.make()
        assert GENERATORS[self.kind] is type(g) and g.kind == self.kind
        assert (g.dim, g.seed) == (48, 123)

    @pytest.mark.parametrize("shape", [(), (0,), (7,), (2, 3), (2, 1, 3)])
    @pytest.mark.parametrize("dim", [1, 7, 48, 65])
    def test_shape_and_dtype(self, shape: tuple[int, ...], dim: int) -> None:
        g = self.make(dim=dim)
        ids = torch.arange(int(np.prod(shape))).reshape(shape)
        out = g(ids)
        assert out.shape == (*shape, dim) and out.dtype == torch.float32
        assert out.is_contiguous() and torch.isfinite(out).all()

    def test_construction_is_deterministic(self) -> None:
        a, b = self.make(), self.make()
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and len(sa) > 0
        for name in sa:
            assert sa[name].dtype == torch.float32
            assert torch.equal(sa[name], sb[name]), name
        assert torch.equal(a(IDS), b(IDS))
        assert torch.equal(a(IDS), a(IDS))

    def test_seed_matters(self) -> None:
        a, b = self.make(seed=1), self.make(seed=2)
        assert not torch.equal(a(IDS), b(IDS))
        assert any(not torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

    def test_rows_independent_of_batch(self) -> None:
        g = self.make()
        batch = g(IDS)
        assert torch.equal(batch[4], batch[6])  # id 17 twice
        for i, row_id in enumerate(IDS.tolist()):
            alone = g(torch.tensor(row_id))
            if self.batch_exact:
                assert torch.equal(alone, batch[i])
            else:  # matmul kernels may block a batch differently
                torch.testing.assert_close(alone, batch[i], rtol=1e-5, atol=1e-6)

    def test_global_rng_untouched(self) -> None:
        before = torch.get_rng_state()
        g = self.make()
        g(IDS).square().sum().backward()
        assert torch.equal(torch.get_rng_state(), before)

    def test_rebuild_from_config(self) -> None:
        g = self.make(seed=2**64 - 1)
        config = json.loads(json.dumps(g.config()))  # what the manifest holds
        assert "dim" not in config and "seed" not in config
        for rebuilt in (
            type(g)(dim=g.dim, seed=g.seed, **config),
            make_generator(g.kind, dim=g.dim, seed=g.seed, **config),
        ):
            assert rebuilt.config() == g.config()
            for name, value in g.state_dict().items():
                assert torch.equal(rebuilt.state_dict()[name], value), name

    def test_state_dict_round_trip_through_numpy(self) -> None:
        g = self.make()
        with torch.no_grad():
            for p in g.parameters():
                p.add_(0.25)
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in g.state_dict().items()}
        fresh = self.make()
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        assert torch.equal(fresh(IDS), g(IDS))
        assert {k for k, _ in g.named_buffers()} <= set()  # nothing persisted but parameters

    def test_differentiable(self) -> None:
        g = self.make()
        g(IDS).square().sum().backward()
        for name, p in g.named_parameters():
            if not p.requires_grad:  # a signal, not a weight (region_mlp's novelty)
                assert p.grad is None, name
                continue
            assert p.grad is not None and p.grad.shape == p.shape, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    def test_ids_dtype(self) -> None:
        g = self.make()
        small = torch.tensor([0, 1, -1, 17, 2**31 - 1])
        assert torch.equal(g(small.to(torch.int32)), g(small))
        with pytest.raises(InvalidIdsError):
            g(IDS.float())

    def test_extra_repr_mentions_config(self) -> None:
        assert "seed=123" in repr(self.make())

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_matches_cpu(self) -> None:
        g = self.make()
        cpu = g(IDS)
        g_cuda = self.make().cuda()
        out = g_cuda(IDS)  # ids on CPU are moved to the module's device
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=1e-5)
        g_cuda(IDS.cuda()).sum().backward()
        assert all(p.grad is not None for p in g_cuda.parameters())


class TestHashedSlices(GeneratorConformance):
    kind = "hashed_slices"
    config: ClassVar[dict[str, Any]] = {"memory_size": 4096, "slice_size": 16}


class TestHashedSlicesUnsigned(GeneratorConformance):
    kind = "hashed_slices"
    config: ClassVar[dict[str, Any]] = {"memory_size": 1000, "slice_size": 5, "signed": False}


class TestRandomFeatureMLP(GeneratorConformance):
    kind = "rf_mlp"
    config: ClassVar[dict[str, Any]] = {"features": 16, "hidden": 32, "layers": 2}
    batch_exact = False


class TestRegionMLPProductKeys(GeneratorConformance):
    kind = "region_mlp"
    config: ClassVar[dict[str, Any]] = {"rows": 10**6, "features": 16, "hidden": 32}
    batch_exact = False


class TestRegionMLPBlock(GeneratorConformance):
    kind = "region_mlp"
    config: ClassVar[dict[str, Any]] = {
        "rows": 1003,
        "region_map": "block",
        "num_regions": 10,
        "region_dim": 4,
        "layers": 1,
    }
    batch_exact = False


class TestRandomFeatureMLPNormalLinear(GeneratorConformance):
    kind = "rf_mlp"
    config: ClassVar[dict[str, Any]] = {"distribution": "normal", "layers": 0, "features": 8}
    batch_exact = False


# -- hashed slices ---------------------------------------------------------------------------


def slices_reference(g: HashedSlices, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and the memory index of each element, straight from the documented formula."""
    s = min(g.slice_size, g.dim)
    k = -(-g.dim // s)
    bits = stream_bits(torch.tensor(ids), derive_seed(g.seed, 0), k)  # (n, k)
    offsets = (bits & (2**63 - 1)) % (g.memory_size - s + 1)
    sign = torch.where((bits < 0) & g.signed, -1.0, 1.0)
    d = torch.arange(g.dim)
    index = offsets[:, d // s] + d % s  # (n, dim)
    return g.memory.detach()[index] * sign[:, d // s], index


@pytest.mark.parametrize(("dim", "slice_size"), [(64, 16), (50, 16), (10, 32), (33, 1)])
@pytest.mark.parametrize("signed", [True, False])
def test_slices_formula(dim: int, slice_size: int, signed: bool) -> None:
    g = HashedSlices(dim=dim, seed=9, memory_size=300, slice_size=slice_size, signed=signed)
    ids = [0, 5, -9, 2**62]
    expected, index = slices_reference(g, ids)
    assert torch.equal(g(torch.tensor(ids)), expected)
    assert index.min() >= 0 and index.max() < g.memory_size
    if signed:
        assert (expected == -g.memory.detach()[index]).any()


def test_slices_gradient_only_at_gathered_positions() -> None:
    g = HashedSlices(dim=40, seed=4, memory_size=5000, slice_size=16)
    ids = [3, 1, 4, 1, 5]  # id 1 twice: its positions accumulate twice
    weights = torch.randn(len(ids), 40, generator=torch.Generator().manual_seed(0))
    (g(torch.tensor(ids)) * weights).sum().backward()
    _, index = slices_reference(g, ids)
    # Expected gradient: d/dmemory of sum(w * sign * memory[index]).
    memory = g.memory.detach().clone().requires_grad_(True)
    s = 16
    bits = stream_bits(torch.tensor(ids), derive_seed(g.seed, 0), 3)
    sign = torch.where(bits < 0, -1.0, 1.0)[:, torch.arange(40) // s]
    (memory[index] * sign * weights).sum().backward()
    torch.testing.assert_close(g.memory.grad, memory.grad)
    touched = torch.zeros(5000, dtype=torch.bool)
    touched[index.view(-1)] = True
    assert (g.memory.grad[~touched] == 0).all()
    assert (g.memory.grad[touched] != 0).all()


def test_slices_default_scale() -> None:
    g = HashedSlices(dim=256, seed=0)
    assert g.memory.numel() == 2**20
    assert abs(g.memory.detach().std().item() - 1 / 16) < 1e-3
    assert abs(g.memory.detach().mean().item()) < 1e-3


def test_rf_mlp_initial_scale() -> None:
    g = RandomFeatureMLP(dim=64, seed=0)
    with torch.no_grad():
        rows = g(torch.arange(20_000))
    assert 0.8 / 8 < rows.std().item() < 1.2 / 8  # std defaults to 1/sqrt(dim)


# -- registry and validation ------------------------------------------------------------------


def test_unknown_kind_lists_known_kinds() -> None:
    known = r"known kinds: \['hashed_slices', 'region_mlp', 'rf_mlp', 'zeros'\]"
    with pytest.raises(ValueError, match=known):
        make_generator("hashnet", dim=8, seed=0)


def test_unknown_option_lists_accepted_options() -> None:
    with pytest.raises(ValueError, match=r"accepts dim, seed and .*memory_size"):
        make_generator("hashed_slices", dim=8, seed=0, memroy_size=10)


@pytest.mark.parametrize(
    ("kind", "kwargs", "match"),
    [
        ("hashed_slices", {"dim": 0}, "dim"),
        ("hashed_slices", {"seed": -1}, "seed"),
        ("hashed_slices", {"seed": 2**64}, "seed"),
        ("hashed_slices", {"memory_size": 8, "slice_size": 16}, "memory_size"),
        ("hashed_slices", {"slice_size": 0}, "slice_size"),
        ("hashed_slices", {"std": -1.0}, "std"),
        ("hashed_slices", {"signed": 1}, "signed"),
        ("rf_mlp", {"features": 0}, "features"),
        ("rf_mlp", {"layers": -1}, "layers"),
        ("rf_mlp", {"activation": "swish"}, "activation"),
        ("rf_mlp", {"distribution": "cauchy"}, "distribution"),
    ],
)
def test_bad_config_rejected(kind: str, kwargs: dict[str, Any], match: str) -> None:
    args = {"dim": 8, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_generator(kind, **args)


# -- zeros ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (0,), (7,), (2, 3)])
def test_zeros_rows_are_negative_zero(shape: tuple[int, ...]) -> None:
    g = make_generator("zeros", dim=5, seed=3)
    assert isinstance(g, GENERATORS["zeros"]) and g.config() == {}
    assert len(g.state_dict()) == 0 and not list(g.parameters())
    out = g(torch.arange(int(np.prod(shape))).reshape(shape))
    assert out.shape == (*shape, 5) and out.dtype == torch.float32
    assert bool((out.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).all())
    with pytest.raises(InvalidIdsError):
        g(torch.zeros(3))


def test_zeros_is_the_additive_identity_bit_for_bit() -> None:
    """What makes imported tables exact: base + delta == delta for every float, +-0 included."""
    g = make_generator("zeros", dim=1, seed=0)
    special = [0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38, float("inf"), 1.0]
    values = torch.tensor(special + torch.randn(1000).tolist()).unsqueeze(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        deltas = values.to(dtype)
        rows = (g(torch.arange(len(values))) + deltas.float()).to(dtype)  # the pool's formula
        width = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(rows.view(width), deltas.view(width)), dtype
