"""create/open accept their configuration as frozen objects (issue 20): StoreSpec (what a store
is), OpenOptions (how a process serves it), MaintenancePolicy (retention and compaction)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import dpsn
from dpsn.errors import InvalidArgumentError, InvalidArgumentTypeError


def test_spec_objects_build_the_same_store_as_keywords(tmp_path):
    spec = dpsn.StoreSpec(rows=1000, dim=8, seed=3, generator="rf_mlp", chunk_rows=64)
    opts = dpsn.OpenOptions(cache_rows=32, policy="lfu")
    keep = dpsn.MaintenancePolicy(keep_last=4)
    a = dpsn.create(tmp_path / "a", spec=spec, options=opts, maintenance=keep)
    b = dpsn.create(
        tmp_path / "b",
        1000,
        8,
        seed=3,
        generator="rf_mlp",
        chunk_rows=64,
        cache_rows=32,
        policy="lfu",
        keep_last=4,
    )
    ids = torch.tensor([0, 5, 999])
    assert torch.equal(a.read(ids), b.read(ids))
    ia, ib = a.info(), b.info()
    for key in ("rows", "dim", "seed", "dtype", "generator"):
        assert ia[key] == ib[key], key
    assert a.policy() == b.policy()
    want = b.read(ids)
    a.close()
    b.close()
    with dpsn.open(tmp_path / "a", options=dpsn.OpenOptions(cache_rows=0)) as r:
        assert torch.equal(r.read(ids), want)


def test_a_setting_given_both_ways_is_refused(tmp_path):
    spec = dpsn.StoreSpec(rows=10, dim=4)
    with pytest.raises(InvalidArgumentError, match="seed"):
        dpsn.create(tmp_path / "s", spec=spec, seed=5)
    with pytest.raises(InvalidArgumentError, match="cache_rows"):
        dpsn.create(tmp_path / "s", spec=spec, options=dpsn.OpenOptions(), cache_rows=4)
    with pytest.raises(InvalidArgumentTypeError, match="rows and dim"):
        dpsn.create(tmp_path / "s")
    with pytest.raises(InvalidArgumentTypeError, match="StoreSpec"):
        dpsn.create(tmp_path / "s", spec={"rows": 10, "dim": 4})
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"rows": 0},
        {"dim": 2**21},
        {"seed": -1},
        {"compressor": "gzip"},
        {"chunk_rows": 0},
        {"map_size": 1},
        {"rows": True},
        {"dtype": "int8"},
    ],
)
def test_a_spec_is_checked_when_built(bad):
    with pytest.raises((InvalidArgumentError, InvalidArgumentTypeError)):
        dpsn.StoreSpec(**{"rows": 10, "dim": 4, **bad})


def test_spec_round_trips_through_json_and_is_frozen():
    spec = dpsn.StoreSpec(rows=10**12, dim=64, generator={"kind": "rf_mlp"}, dtype=torch.float16)
    back = dpsn.StoreSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back.to_json() == spec.to_json()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rows = 5  # type: ignore[misc]
    with pytest.raises(InvalidArgumentError, match="no field"):
        dpsn.StoreSpec.from_json({**spec.to_json(), "levels": 3})
    assert spec.replace(dim=32).dim == 32
    with pytest.raises(InvalidArgumentError):
        dpsn.OpenOptions(policy="nope")
