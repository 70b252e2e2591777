"""The contract every router keeps, one suite subclassed per router (as zarr's testing/store.py).

A subclass supplies ``make_router(**overrides)`` (fitted, ready to route) and ``min_recall``, the
recall against brute force over the router's own dense scores it must reach on the test data.
Tests get their routers from ``routed(**overrides)``: each configuration is built (and fitted)
once per class and handed out as a fresh copy (``type(r)(r.config())`` + ``load_state_dict``),
which keeps the suite fast and exercises that rebuild path on every test.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs.numcodecs import Zlib

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
from dpsn.index._persist import _array_digest, _manifest_digest
from dpsn.index.testing import mixture, recall, single_threaded


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_threaded():  # see its docstring: small problems, shared machine
        yield


N_ROWS = 20_011  # not a perfect square, not a multiple of the region counts
K = 8
D_IN = 16


def _subkeys(router: Router) -> Any:
    return router.pk if isinstance(router, ProductKeyRouter) else router.local  # type: ignore[attr-defined]


def _forge(group: zarr.Group, name: str, data: np.ndarray, **create: Any) -> None:
    """Rewrite one array and re-sign the manifest, as a crafted store would: digests all agree."""
    manifest = json.loads(json.dumps(group.attrs["dpsn_router"]))
    group.create_array(name, data=data, overwrite=True, **create)
    entry = manifest["arrays"][name]
    entry["blake2b"] = _array_digest(data)
    entry["shape"] = list(data.shape)
    digests = {n: e["blake2b"] for n, e in manifest["arrays"].items()}
    manifest["digest"] = _manifest_digest(manifest["kind"], manifest["config"], digests)
    group.attrs["dpsn_router"] = manifest


class RouterConformance:
    """Tests every router must pass. Subclasses set ``make_router`` and ``min_recall``."""

    min_recall: float = 1.0
    has_regions: bool = False
    _built: ClassVar[dict[tuple, Router]]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls._built = {}

    def make_router(self, **overrides: object) -> Router:
        raise NotImplementedError

    def routed(self, **overrides: object) -> Router:
        """A fresh copy of ``make_router(**overrides)``, built once per class and config."""
        key = tuple(sorted(overrides.items()))
        if key not in self._built:
            self._built[key] = self.make_router(**overrides)
        proto = self._built[key]
        copy = type(proto)(proto.config())
        copy.load_state_dict(proto.state_dict())
        return copy.train(proto.training)

    @pytest.fixture
    def router(self) -> Router:
        return self.routed().eval()

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
        rng = torch.get_rng_state()
        try:  # a different global RNG state must not matter
            torch.manual_seed(12345)
            again = self.make_router().eval()  # same config and seed, built and fitted again
            torch.manual_seed(54321)
            learned = self.make_router(k_min=1, budget="learned").eval()
        finally:
            torch.set_rng_state(rng)
        c = again(x)
        assert torch.equal(a.ids, c.ids)
        torch.testing.assert_close(a.scores, c.scores)
        other = self.routed(k_min=1, budget="learned").eval()  # the learned head is seeded too
        assert torch.equal(learned(x).k, other(x).k) and torch.equal(learned(x).ids, other(x).ids)

    def test_building_leaves_the_global_rng_alone(self) -> None:
        rng = torch.get_rng_state()
        self.routed(k_min=1, budget="learned")
        assert torch.equal(rng, torch.get_rng_state())

    def test_routing_is_per_input(self, router: Router, x: torch.Tensor) -> None:
        whole = router(x)
        part = router(x[5:9])
        assert torch.equal(whole.ids[5:9], part.ids)

    def test_empty_batch(self, router: Router) -> None:
        res = router(torch.zeros(0, D_IN))
        assert res.ids.shape == (0, K) and res.k.shape == (0,)

    def test_budget_and_padding(self, x: torch.Tensor) -> None:
        router = self.routed(k_min=2).eval()
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
        full = self.routed().eval()(x * torch.linspace(0.1, 3.0, x.shape[0])[:, None])
        assert torch.equal(torch.where(mask, full.ids, PAD_ID), res.ids)
        use = router.usage()
        assert use["mean_k"] == pytest.approx(float(res.k.float().mean()))
        assert use["compute_saved"] == pytest.approx(1 - use["mean_k"] / K)
        assert res.compute_saved == pytest.approx(use["compute_saved"])

    def test_calibrated_budget_varies_per_input(self, x: torch.Tensor) -> None:
        router = self.routed(k_min=2).eval()
        router.calibrate_budget(mixture(512, seed=21))
        assert bool(router.budget.calibrated)
        res = router(mixture(256, seed=22))
        assert int(res.k.min()) < int(res.k.max())
        assert 0.2 < res.compute_saved < 0.6  # about the midpoint of [2, 8] on similar inputs

    def test_learned_budget_gets_gradients(self, x: torch.Tensor) -> None:
        router = self.routed(k_min=1, budget="learned")
        res = router(x)
        assert bool(((res.k >= 1) & (res.k <= K)).all())
        res.complexity.sum().backward()
        head = router.budget.head
        assert head is not None and head.weight.grad is not None
        assert bool(head.weight.grad.abs().sum() > 0)

    def test_calibration_leaves_routing_state_alone(self) -> None:
        router = self.routed(k_min=2).train()
        before = {n: t.clone() for n, t in router.state_dict().items() if "budget" not in n}
        router.calibrate_budget(mixture(300, seed=23))
        assert router.training  # mode restored
        after = router.state_dict()
        for name, t in before.items():  # e.g. a query batch norm's running statistics
            assert torch.equal(t, after[name]), name

    # -- gradients ----------------------------------------------------------------------------

    def test_gradients_reach_query_and_keys(self, router: Router, x: torch.Tensor) -> None:
        """The gradient is exactly that of the dense score of the selected rows: it reaches the
        query, the input and the selected sub-keys, and no other sub-key."""
        router.train()
        pk = _subkeys(router)
        params = [pk.query.weight, pk.keys1, pk.keys2]
        w = torch.randn(64, K, generator=torch.Generator().manual_seed(0))
        xa = x.clone().requires_grad_(True)
        res = router(xa)
        got = torch.autograd.grad((res.scores * w).sum(), [xa, *params])
        xb = x.clone().requires_grad_(True)
        q = router.dense_queries(xb)  # [T, H, D]
        keys = router.dense_keys(res.ids.reshape(-1)).view(64, K, -1)
        dense = torch.einsum("thd,tkd->thk", q, keys).amax(1) + router.dense_offset(xb)[:, None]
        want = torch.autograd.grad((dense * w).sum(), [xb, *params])
        for g, r in zip(got, want, strict=True):
            assert bool(g.abs().sum() > 0) and bool(torch.isfinite(g).all())
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)

    def test_padded_entries_pass_no_nan_gradient(self, x: torch.Tensor) -> None:
        router = self.routed(k_min=2).train()
        xa = (x * torch.linspace(0.1, 3.0, x.shape[0])[:, None]).requires_grad_(True)
        res = router(xa)
        assert bool((res.k < K).any())  # some rows are padded
        gates = torch.softmax(res.scores, dim=-1)
        (gates * torch.randn(64, K)).sum().backward()
        for p in (xa, _subkeys(router).query.weight, _subkeys(router).keys1):
            assert p.grad is not None and bool(torch.isfinite(p.grad).all())

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
        ("bad", "says"),
        [
            (torch.zeros(4, D_IN + 1), "d_in=16"),
            (torch.zeros(D_IN), "reshape"),
            (torch.zeros(2, 4, D_IN), "reshape"),
            (torch.zeros(4, D_IN, dtype=torch.int64), "x.float()"),
            (torch.zeros(4, D_IN, dtype=torch.bool), "x.float()"),
            (torch.full((4, D_IN), float("nan")), "NaN"),
            (torch.zeros(4, D_IN).index_fill(1, torch.tensor([3]), float("inf")), "Inf"),
            (np.zeros((4, D_IN), dtype=np.float32), "torch.Tensor"),
        ],
        ids=["wide", "1d", "3d", "int", "bool", "nan", "inf", "numpy"],
    )
    def test_bad_input_is_refused(self, router: Router, bad: object, says: str) -> None:
        with pytest.raises(RouterInputError, match=re.escape(says)) as info:
            router(bad)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError) and isinstance(info.value, DpsnError)

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
        router = self.routed(k_min=2).eval()
        router.calibrate_budget(mixture(512, seed=21))
        before = router(x)
        save_router(router, self._group(tmp_path))
        loaded = load_router(self._group(tmp_path)).eval()
        after = loaded(x)
        assert torch.equal(before.k, after.k) and torch.equal(before.ids, after.ids)

    def test_load_state_dict_gives_identical_routing(self, router: Router, x: torch.Tensor) -> None:
        other = self.routed(seed=5).eval()  # other keys (and regions), to be overwritten
        assert not torch.equal(other(x).ids, router(x).ids)
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
        other = self.routed(seed=5).eval()
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

    def test_round_trip_keeps_the_dtype(self, x: torch.Tensor, tmp_path: Path) -> None:
        router = self.routed().double().eval()
        before = router(x)
        save_router(router, self._group(tmp_path))
        loaded = load_router(self._group(tmp_path)).eval()
        after = loaded(x)
        assert after.scores.dtype == torch.float64
        assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)

    @pytest.mark.parametrize(
        "lie",
        [
            {"dtype": "float64"},  # the bytes are float32
            {"dtype": "int16"},
            {"dtype": "object"},
            {"shape": [1, 2]},
            {"blake2b": None},
        ],
        ids=["float64", "int16", "object", "shape", "no-digest"],
    )
    def test_manifest_that_lies_is_refused(self, router: Router, tmp_path: Path, lie: dict) -> None:
        group = self._group(tmp_path)
        save_router(router, group)
        manifest = json.loads(json.dumps(group.attrs["dpsn_router"]))
        name = next(n for n in manifest["arrays"] if "keys1" in n)
        manifest["arrays"][name].update(lie)
        group.attrs["dpsn_router"] = manifest
        with pytest.raises(CorruptStoreError):
            load_router(group)

    def test_crafted_state_shape_is_refused_before_reading(
        self, router: Router, tmp_path: Path
    ) -> None:
        group = self._group(tmp_path)
        save_router(router, group)
        name = next(n for n in sorted(group.array_keys()) if "keys1" in n)
        _forge(group, name, np.zeros((1, 3, 2), dtype=np.float32))  # digests all agree
        with pytest.raises(CorruptStoreError, match="does not fit its config"):
            load_router(group)

    @pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")
    def test_unexpected_codec_is_refused(self, router: Router, tmp_path: Path) -> None:
        group = self._group(tmp_path)
        save_router(router, group)
        name = next(n for n in sorted(group.array_keys()) if "keys1" in n)
        same = np.asarray(group[name][...])
        _forge(group, name, same, compressors=[Zlib()])  # same values, a codec not allowed
        with pytest.raises(CorruptStoreError, match="codecs"):
            load_router(group)

    def test_forged_faiss_blob_is_refused(self, router: Router, tmp_path: Path) -> None:
        """A blob that passes its digest but is not the router's index is never deserialised."""
        blobs = router.extra_arrays()
        if not blobs:
            pytest.skip("no FAISS index to forge")
        group = self._group(tmp_path)
        save_router(router, group)
        name = sorted(blobs)[0]
        forged = self.routed(seed=5).extra_arrays()[name]  # another fit's index
        assert not np.array_equal(forged, blobs[name])
        _forge(group, f"extra.{name}", forged)
        with pytest.raises(CorruptStoreError, match="disagrees"):
            load_router(group)

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


# -- configuration objects ------------------------------------------------------------------


def test_routers_take_a_frozen_config_and_save_exactly_it(tmp_path):
    import dataclasses

    import zarr

    from dpsn.index import (
        LSHConfig,
        LSHRouter,
        ProductKeyConfig,
        ProductKeyRouter,
        RouterConfigError,
        VQConfig,
        VQRouter,
        load_router,
        save_router,
    )

    cfg = ProductKeyConfig(d_in=8, num_rows=1000, k=4, heads=2)
    a, b = ProductKeyRouter(cfg), ProductKeyRouter(d_in=8, num_rows=1000, k=4, heads=2)
    assert a.config() == b.config()  # keywords build the same config
    resolved = a.config()
    assert isinstance(resolved, ProductKeyConfig) and resolved.k_min == 4
    assert resolved.budget == "fixed" and resolved.d_key == 8  # "auto" and None resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.k = 5  # type: ignore[misc]
    with pytest.raises(RouterConfigError, match="not both"):
        ProductKeyRouter(cfg, k=3)
    with pytest.raises(RouterConfigError, match="expected a ProductKeyConfig"):
        ProductKeyRouter(VQConfig(d_in=8, num_rows=1000, k=4))
    with pytest.raises(RouterConfigError, match="bad router arguments"):
        ProductKeyRouter(d_in=8, num_rows=1000, k=4, levels=(2,))
    assert VQRouter(d_in=8, num_rows=1000, k=4).config().levels is not None
    assert LSHRouter(LSHConfig(d_in=8, num_rows=1000, k=4)).config().nbits is not None

    group = zarr.open_group(str(tmp_path / "r"), mode="w", zarr_format=3)
    save_router(a, group)
    assert load_router(group).config() == a.config()
    with pytest.raises(RouterConfigError, match="unknown ProductKeyConfig fields"):
        ProductKeyConfig.from_json({"d_in": 8, "num_rows": 10, "k": 2, "nope": 1})
