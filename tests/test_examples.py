"""Smoke tests of ``examples/`` and ``bench/quality.py``: a few steps each, on tiny settings,
with stores in tmp_path: finite losses and committed stores."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import dpsn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import digits  # noqa: E402
import lm  # noqa: E402

pytest.importorskip("sklearn")

TINY_LM = [
    "--steps", "4", "--d-model", "32", "--layers", "2", "--heads", "2", "--context", "16",
    "--batch", "2", "--k", "4", "--rows", "4096", "--eval-every", "2", "--eval-windows", "2",
    "--val-windows", "4", "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_digits_trains_both_models_and_commits_the_pool(tmp_path):
    store = tmp_path / "digits"
    results = digits.main(["--steps", "30", "--rows", "100000", "--store", str(store)])
    assert [r["model"] for r in results] == ["dense", "pool"]
    for r in results:
        assert all(math.isfinite(v) for v in r["losses"])
        assert 0.0 <= r["test_accuracy"] <= 1.0
    assert results[1]["test_accuracy"] > 0.3  # 30 steps already learn something
    with dpsn.open(store) as pool:
        messages = [c.message for c in pool.log()]
        assert messages[0] == "create" and messages[-1].startswith("digits: 30 steps")
        assert pool.info()["persisted_rows"] > 0
        assert "router" in pool.routers()


def test_lm_checkpoints_every_n_steps_and_resumes(tmp_path):
    store = tmp_path / "lm"
    result = lm.main([*TINY_LM, "--store", str(store), "--checkpoint-every", "2"])
    curves = result["curves"]
    assert len(curves["train_bpb"]) == 4
    assert all(math.isfinite(v) for v in curves["train_bpb"] + curves["val_bpb"])
    assert math.isfinite(result["val_bpb"]) and result["val_bpb"] < 8.5
    for i in range(2):
        with dpsn.open(store / f"layer{i}") as pool:
            messages = [c.message for c in pool.log()]
            assert messages[0] == "create"
            assert messages[1].startswith("step 2,") and messages[2].startswith("step 4,")
            assert messages[-1] == "final: step 4"
            assert pool.info()["persisted_rows"] > 0
    assert torch.load(store / "dense.pt", weights_only=True)["step"] == 4

    resumed = lm.main([*TINY_LM, "--store", str(store), "--resume", "--steps", "6"])
    assert resumed["steps"] == 6 and len(resumed["curves"]["train_bpb"]) == 2
    with dpsn.open(store / "layer0") as pool:
        assert pool.log()[-1].message == "final: step 6"


def test_lm_resume_matches_an_uninterrupted_run(tmp_path):
    full = lm.main([*TINY_LM, "--store", str(tmp_path / "a"), "--checkpoint-every", "0"])
    lm.main([*TINY_LM, "--store", str(tmp_path / "b"), "--steps", "2"])
    resumed = lm.main([*TINY_LM, "--store", str(tmp_path / "b"), "--resume"])
    assert resumed["curves"]["train_bpb"] == full["curves"]["train_bpb"][2:]


def test_lm_dense_runs(tmp_path):
    result = lm.main([*TINY_LM, "--dense", "--store", str(tmp_path / "d")])
    assert math.isfinite(result["val_bpb"])
    assert "router" not in result["macs_per_token"]
    assert (tmp_path / "d" / "dense.pt").exists()


def test_quality_bench_quick_runs_without_writing():
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    tiny = ["d_model=32", "n_heads=2", "context=16", "batch=2", "k=4", "rows=4096"]
    args = ["--quick", "--steps", "3", "--skip-digits", "--no-write"]
    payload = quality.main(args + [a for t in tiny for a in ("--set", t)])
    assert set(payload["summary"]) == {"pydoc", "code"}  # the tuned text and a second one
    for summary in payload["summary"].values():
        for key in (
            "val_bpb_dense",
            "test_bpb_dense",
            "test_bpb_pool_equal_steps",
            "test_bpb_pool_equal_time",
        ):
            assert math.isfinite(summary[key])
        assert summary["tokens_per_s_ratio"] > 0
    profile = payload["profile_ms_per_step"]
    assert profile["total"] > 0 and profile["dpsn.executor.forward"] > 0
    active = payload["matching"]["active_ffn_params_per_token"]
    assert active[0] == active[1]  # the dense FFN is as wide as the active rows


@pytest.mark.slow
def test_quality_bench_budget_prices_reports_mean_k_and_bytes():
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    tiny = ["d_model=32", "n_heads=2", "context=16", "batch=2", "k=4", "rows=4096"]
    args = [
        "--quick",
        "--steps",
        "3",
        "--no-write",
        "--budget-prices",
        "0.01",
        "--budget-k-min",
        "1",
    ]
    payload = quality.main(args + [a for t in tiny for a in ("--set", t)])
    fixed, learned = payload["runs"]["fixed k"], payload["runs"]["learned, price 0.01"]
    assert fixed["inspect"]["mean_k"] == 4.0  # every byte gets k_max
    assert 1.0 <= learned["inspect"]["mean_k"] <= 4.0
    assert learned["price"] == 0.01 and math.isfinite(learned["test_bpb"])
    assert len(learned["inspect"]["most_frequent_bytes"]) == 10
    assert set(payload["aims"]) == {"learned, price 0.01"}
