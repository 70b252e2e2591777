"""VQ and LSH regions: ids inside the chosen regions, hierarchy, backends, drift and refresh."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from dpsn.index import (
    LSHRouter,
    RouterConfigError,
    RouterNotFittedError,
    VQRouter,
    load_router,
    save_router,
)
from dpsn.index._regions import RegionRouter
from dpsn.index.testing import mixture, single_threaded


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_threaded():  # see its docstring: small problems, shared machine
        yield


D_IN = 16
SAMPLE = mixture(4000, seed=1)
_FITTED: dict[tuple, RegionRouter] = {}


def _fitted(cls: type[RegionRouter], **args: Any) -> Any:
    """``cls(**args).fit(SAMPLE)``, fitted once per configuration and copied per call."""
    key = (cls, tuple(sorted(args.items())))
    if key not in _FITTED:
        _FITTED[key] = cls(**args).fit(SAMPLE)  # type: ignore[attr-defined]
    proto = _FITTED[key]
    copy = cls(proto.config())
    copy.load_state_dict(proto.state_dict())
    return copy.eval()


def vq(**kw: object) -> VQRouter:
    args: dict = {"d_in": D_IN, "num_rows": 50_021, "k": 8, "levels": (8, 4), "beam": 6}
    args.update(kw)
    return _fitted(VQRouter, **args)


def lsh(**kw: object) -> LSHRouter:
    args: dict = {"d_in": D_IN, "num_rows": 50_021, "k": 8, "nbits": 6, "beam": 6}
    args.update(kw)
    return _fitted(LSHRouter, **args)


@pytest.mark.parametrize(("n", "r"), [(100, 7), (50_021, 32), (10**12, 625**3), (2**62, 2**40)])
def test_region_arithmetic(n: int, r: int) -> None:
    router = VQRouter.__new__(VQRouter)  # only the id arithmetic, no codebooks
    router.block, router.rem = divmod(n, r)
    regions = torch.tensor(sorted({0, 1, r // 3, r // 2, r - 2, r - 1}))
    start = RegionRouter.region_start(router, regions)
    size = RegionRouter.region_size(router, regions)
    assert bool((size >= n // r).all()) and bool((size <= n // r + 1).all())
    assert torch.equal(RegionRouter.region_of(router, start), regions)
    assert torch.equal(RegionRouter.region_of(router, start + size - 1), regions)
    last = int(start[-1] + size[-1])
    assert last == n  # the regions tile the pool exactly
    assert torch.equal(start[1:] > start[:-1], torch.ones(len(regions) - 1, dtype=torch.bool))


@pytest.mark.parametrize("make", [vq, lsh], ids=["vq", "lsh"])
def test_ids_inside_pool_and_chosen_regions(make) -> None:
    router = make()
    x = mixture(100, seed=9)
    res = router(x)
    assert res.regions is not None and res.regions.shape == (100, router.beam)
    assert bool(((res.regions >= 0) & (res.regions < router.num_regions)).all())
    assert bool(((res.ids >= 0) & (res.ids < router.num_rows)).all())
    owner = router.region_of(res.ids)  # [T, k]
    assert bool((owner[:, :, None] == res.regions[:, None, :]).any(-1).all())
    start = router.region_start(owner)
    assert bool(((res.ids >= start) & (res.ids < start + router.region_size(owner))).all())


@pytest.mark.parametrize("make", [vq, lsh], ids=["vq", "lsh"])
@pytest.mark.parametrize("heads", [1, 2])
def test_top_k_is_exact_within_the_beam(make, heads: int) -> None:
    """Over every row of the searched regions (big and small ones: 647 rows do not divide
    evenly; regions of 10-21 rows make the big regions' extra row a likely pick), the router
    returns exactly the best k by its dense score."""
    router = make(heads=heads, num_rows=647)
    assert router.rem and router.block < 3 * router.k_max
    x = mixture(12, seed=14)
    res = router(x)
    owner = router.region_of(res.ids)
    assert bool((owner < router.rem).any()) and bool((owner >= router.rem).any())  # both kinds
    for t in range(x.shape[0]):
        regions = res.regions[t]
        starts, sizes = router.region_start(regions).tolist(), router.region_size(regions).tolist()
        rows = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, sizes, strict=True)])
        with torch.no_grad():
            q = router.dense_queries(x[t : t + 1])[0]  # [H, D]
            dense = (router.dense_keys(rows) @ q.T).amax(-1) + router.dense_offset(x[t : t + 1])
        want = dense.topk(router.k_max)
        assert torch.equal(res.ids[t].sort().values, rows[want.indices].sort().values)
        torch.testing.assert_close(res.scores[t].detach(), want.values, atol=1e-4, rtol=1e-4)


def test_vq_hierarchy_is_nested_and_residual() -> None:
    router = vq(levels=(4, 4, 2), beam=1)
    x = mixture(50, seed=12)
    res = router(x)
    region = res.regions[:, 0]
    # greedy residual descent reproduces the beam-1 region code, level by level
    res_x, code = x, torch.zeros(50, dtype=torch.int64)
    for lvl, c in enumerate(router.levels):
        cb = getattr(router, f"codebook{lvl}")
        a = torch.cdist(res_x, cb).argmin(1)
        code = code * c + a
        res_x = res_x - cb[a]
    assert torch.equal(code, region)
    # a coarse code owns one contiguous run of rows
    coarse = region // (4 * 2)
    lo = router.region_start(coarse * 8)
    hi = router.region_start((coarse + 1) * 8)
    assert bool(((res.ids >= lo[:, None]) & (res.ids < hi[:, None])).all())


def test_vq_scales_to_a_trillion_rows() -> None:
    router = VQRouter(d_in=D_IN, num_rows=10**12, k=8, niter=4).fit(SAMPLE).eval()
    assert len(router.levels) == 3 and router.num_regions <= 10**12 // 8
    res = router(mixture(8, seed=3))
    assert bool(((res.ids >= 0) & (res.ids < 10**12)).all())


@pytest.mark.parametrize("make", [vq, lsh], ids=["vq", "lsh"])
def test_faiss_and_torch_paths_agree(make) -> None:
    x = mixture(80, seed=6)
    a = make(backend="faiss")(x)
    b = make(backend="torch")(x)
    assert torch.equal(a.regions, b.regions) and torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-4)


def test_lsh_codes_are_faiss_codes() -> None:
    router = lsh(beam=1)
    x = mixture(64, seed=8)
    packed = router._faiss_index().sa_encode(x.numpy())
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : router.nbits]
    region = (bits * (1 << np.arange(router.nbits - 1, -1, -1))).sum(1)
    assert torch.equal(router(x).regions[:, 0], torch.from_numpy(region).long())


def test_lsh_beam_is_the_exact_best_codes() -> None:
    router = lsh(nbits=5, beam=7)
    x = mixture(20, seed=13)
    res = router(x)
    every = torch.arange(32).expand(20, 32)
    want = router.region_scores(x, every).detach().topk(7).indices
    assert torch.equal(res.regions.sort(1).values, want.sort(1).values)


def test_novelty_budget_gives_unfamiliar_inputs_more_rows() -> None:
    router = vq(k_min=2)
    assert router.budget.signal == "novelty"
    near = router(router.codebook0[:4] + router.codebook1[0])
    far = router(mixture(4, seed=2) * 20)
    assert bool((near.k < far.k).all()) and bool((far.k == 8).all())
    assert 0 < router.usage()["compute_saved"] < 1


def test_vq_drift_refresh_by_threshold() -> None:
    router = vq(drift_tol=0.5, refresh_every=0, ema_decay=0.9)
    assert router.drift() == pytest.approx(0.0, abs=1e-6)  # live == indexed right after fit
    x = mixture(64, seed=4)
    before = router(x)
    shifted = mixture(512, seed=5) + 1.5
    out = router.update(shifted)
    assert not out["refreshed"] and out["drift"] > 0
    # the live codebook moved, routing did not (it uses the indexed one until refresh)
    assert torch.equal(router(x).ids, before.ids)
    for _ in range(50):
        out = router.update(shifted)
        if out["refreshed"]:
            break
    assert out["refreshed"] and int(router.refreshes) == 1
    assert router.drift() == pytest.approx(0.0, abs=1e-6)
    for lvl in range(len(router.levels)):
        cb = getattr(router, f"codebook{lvl}")
        torch.testing.assert_close(cb, router._live(lvl))
        assert np.array_equal(router._indexes[lvl].vectors(), cb.numpy())
    assert not torch.equal(router(x).ids, before.ids)


def test_vq_refresh_every_n_updates_and_persisted(tmp_path) -> None:
    router = vq(drift_tol=1e9, refresh_every=3)
    flags = [router.update(mixture(128, seed=s) + 0.3)["refreshed"] for s in range(7)]
    assert flags == [False, False, True, False, False, True, False]
    group = zarr.open_group(tmp_path / "s", mode="a").require_group("routers/vq")
    save_router(router, group)
    loaded = load_router(group).eval()
    assert int(loaded.updates) == 7 and int(loaded.updates_since_refresh) == 1
    x = mixture(32, seed=1)
    assert torch.equal(loaded(x).ids, router(x).ids)
    assert loaded.drift() == pytest.approx(router.drift())


def test_lsh_threshold_drift_and_refresh() -> None:
    router = lsh(drift_tol=0.2, refresh_every=0, threshold_rate=0.05)
    x = mixture(64, seed=4)
    before = router(x)
    shifted = mixture(512, seed=5) + 2.0
    out = router.update(shifted)
    assert not out["refreshed"] and out["drift"] > 0
    assert torch.equal(router(x).ids, before.ids)  # routing waits for the refresh
    for _ in range(100):
        out = router.update(shifted)
        if out["refreshed"]:
            break
    assert out["refreshed"] and router.drift() == 0.0 and int(router.refreshes) == 1
    faiss_thr = np.array([router._faiss_index().thresholds.at(i) for i in range(router.nbits)])
    assert np.array_equal(faiss_thr, router.thresholds.numpy())
    assert not torch.equal(router(x).ids, before.ids)


def test_lsh_thresholds_track_the_median() -> None:
    router = lsh(drift_tol=float("inf"), refresh_every=0, threshold_rate=0.05)
    shifted = mixture(2048, seed=5) + 2.0
    for s in range(120):
        router.update(shifted[(s % 4) * 512 : (s % 4 + 1) * 512])
    above = (shifted @ router.proj.T > router.live_thresholds).float().mean(0)
    assert bool(((above - 0.5).abs() < 0.1).all()), above


@pytest.mark.parametrize("cls", [VQRouter, LSHRouter])
def test_unfitted_router_refuses_to_route(cls) -> None:
    router = cls(d_in=D_IN, num_rows=50_000, k=4)
    with pytest.raises(RouterNotFittedError, match="fit"):
        router(mixture(3))


def test_bad_region_configs() -> None:
    with pytest.raises(RouterConfigError, match="fewer than k"):
        VQRouter(d_in=D_IN, num_rows=1000, k=8, levels=(32, 32))
    with pytest.raises(RouterConfigError, match="fewer than k"):
        LSHRouter(d_in=D_IN, num_rows=1000, k=8, nbits=10)
    with pytest.raises(RouterConfigError, match="samples"):
        VQRouter(d_in=D_IN, num_rows=10_000, k=4, levels=(64,)).fit(mixture(10))
    with pytest.raises(RouterConfigError, match="refresh_every"):
        LSHRouter(d_in=D_IN, num_rows=10_000, k=4, refresh_every=-1)
    with pytest.raises(RouterConfigError, match="drift_tol"):
        VQRouter(d_in=D_IN, num_rows=10_000, k=4, drift_tol=float("nan"))
