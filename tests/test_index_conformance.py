"""The contract every router keeps, one suite subclassed per router (as zarr's testing/store.py).

A subclass supplies ``make_router(**overrides)`` (fitted, ready to route) and ``min_recall``, the
recall against brute force over the router's own dense scores it must reach on the test data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dpsn.errors import CorruptStoreError, DpsnError, StoreNotFoundError
from dpsn.index import (
    PAD_ID,
    LSHRouter,
    ProductKeyRouter,
    Router,
    RouterInputError,
    UnknownRouterError,
    VQRouter,
    load_router,
    router_digest,
    save_router,
)
from dpsn.index.testing import mixture, recall

N_ROWS = 20_011  # not a perfect square, not a multiple of the region counts
K = 8


D_IN = 16


class RouterConformance:
    """Tests every router must pass. Subclasses set ``make_router`` and ``min_recall``."""

    min_recall: float = 1.0
    has_regions: bool = False

    def make_router(self, **overrides: object) -> Router:
        raise NotImplementedError

    @pytest.fixture
    def router(self) -> Router:
        return self.make_router().eval()

    @pytest.fixture
    def x(self) -> torch.Tensor:
        return mixture(64, seed=7)

    # -- shape and padding contract -----------------------------------------------------------

    def test_result_shapes_and_ids(self, router: Router, x: torch.Tensor) -> None:
        res = router(x)
        assert res.ids.shape == (64, K) and res.ids.dtype == torch.int64
        assert res.scores.shape == (64, K) and res.k.shape == (64,)
        assert bool(((res.ids >= 0) & (res.ids < router.num_rows)).all())
        srt = res.ids.sort(dim=1).values
        assert bool((srt[:, 1:] != srt[:, :-1]).all()), "ids in a row must be distinct"
        assert bool((res.scores[:, :-1] >= res.scores[:, 1:] - 1e-4).all()), "best first"

    def test_regions_reported(self, router: Router, x: torch.Tensor) -> None:
        res = router(x)
        if not self.has_regions:
            assert res.regions is None
            return
        assert res.regions is not None and res.regions.dtype == torch.int64
        owner = router.region_of(res.ids)  # type: ignore[attr-defined]
        assert bool((owner[:, :, None] == res.regions[:, None, :]).any(-1).all())

    def test_deterministic(self, router: Router, x: torch.Tensor) -> None:
        a, b = router(x), router(x)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)
        again = self.make_router().eval()  # same config and seed, fitted again
        c = again(x)
        assert torch.equal(a.ids, c.ids)
        torch.testing.assert_close(a.scores, c.scores)

    def test_routing_is_per_input(self, router: Router, x: torch.Tensor) -> None:
        whole = router(x)
        part = router(x[5:9])
        assert torch.equal(whole.ids[5:9], part.ids)

    def test_empty_batch(self, router: Router) -> None:
        res = router(torch.zeros(0, D_IN))
        assert res.ids.shape == (0, K) and res.k.shape == (0,)

    def test_budget_and_padding(self, x: torch.Tensor) -> None:
        router = self.make_router(k_min=2).eval()
        assert router.budget.signal != "fixed"
        res = router(x * torch.linspace(0.1, 3.0, x.shape[0])[:, None])
        assert bool(((res.k >= 2) & (res.k <= K)).all())
        mask = torch.arange(K) < res.k[:, None]
        assert torch.equal(res.mask, mask)
        assert bool((res.ids[~mask] == PAD_ID).all())
        assert bool(torch.isneginf(res.scores[~mask]).all())
        assert bool(torch.isfinite(res.scores[mask]).all())
        assert bool((res.ids[mask] >= 0).all())
        gates = torch.softmax(res.scores, dim=-1)  # how a consumer turns scores into gates
        assert bool((gates[~mask] == 0).all()) and torch.allclose(gates.sum(-1), torch.ones(64))
        # the valid prefix is the same ranking the fixed budget gives
        full = self.make_router().eval()(x * torch.linspace(0.1, 3.0, x.shape[0])[:, None])
        assert torch.equal(torch.where(mask, full.ids, PAD_ID), res.ids)
        use = router.usage()
        assert use["mean_k"] == pytest.approx(float(res.k.float().mean()))
        assert use["compute_saved"] == pytest.approx(1 - use["mean_k"] / K)
        assert res.compute_saved == pytest.approx(use["compute_saved"])

    def test_calibrated_budget_varies_per_input(self, x: torch.Tensor) -> None:
        router = self.make_router(k_min=2).eval()
        router.calibrate_budget(mixture(512, seed=21))
        assert bool(router.budget.calibrated)
        res = router(mixture(256, seed=22))
        assert int(res.k.min()) < int(res.k.max())
        assert 0.2 < res.compute_saved < 0.6  # about the midpoint of [2, 8] on similar inputs

    def test_learned_budget_gets_gradients(self, x: torch.Tensor) -> None:
        router = self.make_router(k_min=1, budget="learned")
        res = router(x)
        assert bool(((res.k >= 1) & (res.k <= K)).all())
        res.complexity.sum().backward()
        assert router.budget.head is not None and router.budget.head.weight.grad is not None

    # -- gradients ----------------------------------------------------------------------------

    def test_gradients_reach_query_and_keys(self, router: Router, x: torch.Tensor) -> None:
        router.train()
        x = x.clone().requires_grad_(True)
        res = router(x)
        (torch.softmax(res.scores, -1) * torch.randn(64, K)).sum().backward()
        pk = router.pk if isinstance(router, ProductKeyRouter) else router.local  # type: ignore[attr-defined]
        for p in (pk.query.weight, pk.keys1, pk.keys2):
            assert p.grad is not None and bool(p.grad.abs().sum() > 0)
            assert bool(torch.isfinite(p.grad).all())
        assert x.grad is not None and bool(x.grad.abs().sum() > 0)
        # only the selected sub-keys get gradient
        assert int((pk.keys1.grad.abs().sum(-1) > 0).sum()) <= 64 * K * pk.heads

    # -- agreement with brute force ------------------------------------------------------------

    def test_scores_match_dense_view(self, router: Router, x: torch.Tensor) -> None:
        res = router(x)
        q = router.dense_queries(x)  # [T, H, D]
        keys = router.dense_keys(res.ids.reshape(-1)).view(64, K, -1)
        dense = torch.einsum("thd,tkd->thk", q, keys).amax(1) + router.dense_offset(x)[:, None]
        torch.testing.assert_close(res.scores.detach(), dense, atol=1e-4, rtol=1e-4)

    def test_recall_against_brute_force(self, router: Router, x: torch.Tensor) -> None:
        res = router(x)
        ids, scores = router.exact_topk(x)
        assert recall(res.ids, ids) >= self.min_recall
        if self.min_recall == 1.0:
            torch.testing.assert_close(res.scores.detach(), scores, atol=1e-4, rtol=1e-4)

    # -- bad input ----------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "bad",
        [
            torch.zeros(4, D_IN + 1),
            torch.zeros(D_IN),
            torch.zeros(2, 4, D_IN),
            torch.zeros(4, D_IN, dtype=torch.int64),
            torch.zeros(4, D_IN, dtype=torch.bool),
            torch.full((4, D_IN), float("nan")),
            torch.full((4, D_IN), float("inf")),
            np.zeros((4, D_IN), dtype=np.float32),
        ],
        ids=["wide", "1d", "3d", "int", "bool", "nan", "inf", "numpy"],
    )
    def test_bad_input_is_refused(self, router: Router, bad: object) -> None:
        with pytest.raises(RouterInputError) as info:
            router(bad)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError) and isinstance(info.value, DpsnError)
        assert str(info.value)

    def test_other_float_dtypes_are_cast(self, router: Router, x: torch.Tensor) -> None:
        a = router(x)
        b = router(x.double())
        assert torch.equal(a.ids, b.ids) and b.scores.dtype == torch.float32

    # -- persistence --------------------------------------------------------------------------

    def _group(self, tmp_path: Path) -> zarr.Group:
        return zarr.open_group(tmp_path / "store", mode="a").require_group("routers/main")

    def test_save_load_round_trip(self, router: Router, x: torch.Tensor, tmp_path: Path) -> None:
        before = router(x)
        digest = save_router(router, self._group(tmp_path))
        assert digest == router_digest(router) and len(digest) == 64
        group = zarr.open_group(tmp_path / "store", mode="r")["routers/main"]
        loaded = load_router(group).eval()
        assert type(loaded) is type(router)
        after = loaded(x)
        assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)
        assert router_digest(loaded) == digest
        assert loaded.config() == router.config()

    def test_round_trip_keeps_the_budget(self, x: torch.Tensor, tmp_path: Path) -> None:
        router = self.make_router(k_min=2).eval()
        router.calibrate_budget(mixture(512, seed=21))
        before = router(x)
        save_router(router, self._group(tmp_path))
        loaded = load_router(self._group(tmp_path)).eval()
        after = loaded(x)
        assert torch.equal(before.k, after.k) and torch.equal(before.ids, after.ids)

    def test_load_state_dict_gives_identical_routing(self, router: Router, x: torch.Tensor) -> None:
        other = self.make_router(seed=9).eval()
        if hasattr(other, "fit"):
            other.fit(mixture(600, seed=30))  # different regions, to be overwritten
        other.load_state_dict(router.state_dict())
        assert torch.equal(other(x).ids, router(x).ids)

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_matches_cpu(self, router: Router, x: torch.Tensor) -> None:
        cpu = router(x)
        gpu = router.to("cuda")(x.cuda())
        assert torch.equal(cpu.ids, gpu.ids.cpu())
        torch.testing.assert_close(cpu.scores, gpu.scores.cpu(), atol=1e-4, rtol=1e-4)

    def test_resave_overwrites(self, router: Router, tmp_path: Path) -> None:
        group = self._group(tmp_path)
        save_router(router, group)
        other = self.make_router(seed=5).eval()
        digest = save_router(other, group)
        assert digest != router_digest(router)
        assert router_digest(load_router(group)) == digest

    def test_changed_array_is_detected(self, router: Router, tmp_path: Path) -> None:
        group = self._group(tmp_path)
        save_router(router, group)
        name = next(n for n in sorted(group.array_keys()) if "keys1" in n)
        arr = group[name]
        data = arr[...]
        data.flat[0] += 1.0
        arr[...] = data
        with pytest.raises(CorruptStoreError, match=name):
            load_router(group)

    def test_flipped_byte_on_disk_is_detected(self, router: Router, tmp_path: Path) -> None:
        group = self._group(tmp_path)
        save_router(router, group)
        root = tmp_path / "store" / "routers" / "main"
        for chunk in sorted(p for p in root.rglob("c/*") if p.is_file()):
            raw = bytearray(chunk.read_bytes())
            original = bytes(raw)
            raw[len(raw) // 2] ^= 0x5A
            chunk.write_bytes(bytes(raw))
            with pytest.raises(CorruptStoreError):
                load_router(zarr.open_group(tmp_path / "store", mode="r")["routers/main"])
            chunk.write_bytes(original)
        load_router(zarr.open_group(tmp_path / "store", mode="r")["routers/main"])  # intact

    def test_unknown_kind_is_refused(self, router: Router, tmp_path: Path) -> None:
        group = self._group(tmp_path)
        save_router(router, group)
        manifest = dict(group.attrs["dpsn_router"])
        manifest["kind"] = "quantum_router"
        group.attrs["dpsn_router"] = manifest
        with pytest.raises(UnknownRouterError, match="quantum_router"):
            load_router(group)

    def test_empty_group_is_not_a_router(self, tmp_path: Path) -> None:
        with pytest.raises(StoreNotFoundError):
            load_router(self._group(tmp_path))

    # -- usage --------------------------------------------------------------------------------

    def test_usage_figures(self, router: Router) -> None:
        router.reset_usage()
        res = router(mixture(256, seed=3))
        use = router.usage()
        seen = torch.unique(res.ids[res.mask])
        assert use["rows_seen"] == seen.numel()
        assert use["fraction_used"] == pytest.approx(seen.numel() / router.num_rows)
        assert use["selections"] == float(res.k.sum())
        assert 0 < use["kl_uniform"] <= math.log(router.num_rows) + 1e-9
        assert 0 < use["gini"] <= 1
        router.reset_usage()
        assert router.usage()["rows_seen"] == 0


class TestProductKeyRouter(RouterConformance):
    min_recall = 1.0

    def make_router(self, **overrides: object) -> Router:
        kw: dict = {"d_in": D_IN, "num_rows": N_ROWS, "k": K, "heads": 2, "seed": 0}
        kw.update(overrides)
        return ProductKeyRouter(**kw)


class TestProductKeyRouterBatchNorm(TestProductKeyRouter):
    def make_router(self, **overrides: object) -> Router:
        router = super().make_router(query_batchnorm=True, heads=1, **overrides)
        router.train()
        router(mixture(512, seed=11))  # give the running statistics something to hold
        router.reset_usage()
        return router


class TestVQRouter(RouterConformance):
    min_recall = 0.9
    has_regions = True

    def make_router(self, **overrides: object) -> Router:
        kw: dict = {"d_in": D_IN, "num_rows": N_ROWS, "k": K, "levels": (8, 4), "beam": 8}
        kw.update(overrides)
        return VQRouter(**kw).fit(mixture(4000, seed=1))


class TestLSHRouter(RouterConformance):
    min_recall = 0.9
    has_regions = True

    def make_router(self, **overrides: object) -> Router:
        kw: dict = {"d_in": D_IN, "num_rows": N_ROWS, "k": K, "nbits": 5, "beam": 8}
        kw.update(overrides)
        return LSHRouter(**kw).fit(mixture(4000, seed=1))
