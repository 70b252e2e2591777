"""bench/continual.py's validation split (settings are chosen on it, figures reported on the
test split) and a smoke run of its no-forgetting variants through the public API."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def continual():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("continual_bench", BENCH / "continual.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["continual_bench"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _sorted_rows(x):
    return sorted(tuple(r.tolist()) for r in x)


def test_validation_images_come_from_training_and_never_from_test(continual):
    xtr, _, xte, _ = continual.load_digits_split(0, "test")
    vtr, _, vva, vyva = continual.load_digits_split(0, "val")
    # the validation run trains and evaluates on a partition of the test run's training images
    assert _sorted_rows(torch.cat([vtr, vva])) == _sorted_rows(xtr)
    assert len(vva) == pytest.approx(len(xtr) / 4, abs=1)
    assert torch.bincount(vyva, minlength=10).min() > 0  # stratified: every digit
    assert len(xte) and not torch.equal(vva[: len(xte)], xte[: len(vva)])
    with pytest.raises(ValueError, match="split"):
        continual.load_digits_split(0, "train")


@pytest.mark.slow
def test_variants_run_through_the_public_api(continual, tmp_path):
    res = continual.main(
        [
            "--quick",
            "--steps",
            "4",
            "--protocols",
            "domain",
            "--split",
            "val",
            "--variants",
            f"c'',{continual._key(continual.MAIN)}",
            "--no-write",
        ]
    )
    models = res["domain_incremental"]["models"]
    assert set(models) == {continual.UNPROTECTED, continual.MAIN}
    assert res["domain_incremental"]["newest_vs_unprotected"] is not None
    with pytest.raises(SystemExit):
        continual.main(["--variants", "zz", "--no-write"])


def test_levels_tune_runs_on_the_validation_split(continual, tmp_path, monkeypatch):
    """bench/levels.py --tune (issue 23) runs through the public API, on bench/continual.py's
    validation split: one row per setting and the single-level pool."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("levels_bench", BENCH / "levels.py")
        levels = importlib.util.module_from_spec(spec)
        sys.modules["levels_bench"] = levels
        spec.loader.exec_module(levels)
    finally:
        sys.path.remove(str(BENCH))
    val = levels._validation_tasks(0)
    assert [len(t[2]) for t in val] == [len(continual.load_digits_split(0, "val")[2])] * 5
    monkeypatch.setattr(levels, "TUNE_GRID", levels.TUNE_GRID[-1:])  # one setting: fast
    res = levels.main(["--quick", "--steps", "2", "--tune", "--no-write"])
    assert [r["model"] for r in res["tune"]] == ["pool", "grid 0"]
    assert all(0 <= r["task1_final"] <= 1 for r in res["tune"])
