import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import dpsn

# Hypothesis budgets live here, not in the tests: every property test and state machine runs
# as many examples as the profile says (no test carries its own max_examples). "ci", the
# default, keeps the suite within its 10 minutes on 2 cores; "thorough" is the long run
# (HYPOTHESIS_PROFILE=thorough). No deadlines: the shared CI machine's timing is noise.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=20, stateful_step_count=15, **_COMMON)
settings.register_profile("thorough", max_examples=300, stateful_step_count=50, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "store"


# A small shared array keeps store creation fast in tests; the row formula is the same.
SMALL_GENERATOR = {"kind": "hashed_slices", "memory_size": 4096}


@pytest.fixture
def pool(store_path):
    p = dpsn.create(
        store_path, rows=10**12, dim=16, seed=7, chunk_rows=8, generator=SMALL_GENERATOR
    )
    yield p
    p.close()


@pytest.fixture(params=["native", "torch"])
def row_kernels(request, monkeypatch):
    """Run a test on both paths of the row path's hot loops: the fused C loops of
    ``dpsn._native`` (when built) and the PyTorch ops they replace."""
    from dpsn import _kernels

    if request.param == "native":
        if _kernels._lib is None:
            pytest.skip("dpsn._native was not built (no C compiler at install)")
        monkeypatch.setattr(_kernels, "ENABLED", True)
    else:
        monkeypatch.setattr(_kernels, "ENABLED", False)
    return request.param
