"""An overlay's own pin record in its base, also on a snapshot the user made (so deleting that
snapshot does not let the base's gc take the commit), the fallback where the base cannot be
written, and overlays refusing a spec that differs from their base's (issue 24)."""

import json
import shutil

import pytest
import torch

import dpsn
import dpsn.pool._overlay as overlay
from dpsn.errors import InvalidArgumentError
from dpsn.store import PersistedStore
from dpsn.store._overlay_facts import overlay_pins
from dpsn.tools.cli import main as cli

DIM = 4
SMALL = {"kind": "hashed_slices", "memory_size": 512}


def make_base(path):
    base = dpsn.create(path, rows=1000, dim=DIM, seed=3, generator=SMALL)
    base.write([1, 2], torch.ones(2, DIM))
    base.commit("b1")
    base.snapshot("mine")
    base.write([1], torch.full((1, DIM), 5.0))
    base.commit("b2")
    return base


def test_overlay_on_a_user_snapshot_pins_the_commit_itself(tmp_path, capsys):
    make_base(tmp_path / "base").close()
    with dpsn.open(tmp_path / "base", at="mine") as at_mine:
        want = at_mine.read([1, 2, 3]).clone()
        commit = at_mine.head
    ov = dpsn.create(tmp_path / "ov", base=tmp_path / "base", base_at="mine")
    uuid = ov.uuid
    ov.close()
    with dpsn.open(tmp_path / "base", mode="r+") as b:
        assert overlay_pins({k: {"commit": v} for k, v in b.snapshots().items()}) == {uuid: commit}
        b.delete_snapshot("mine")  # the user's snapshot goes ...
        b.write([1, 2], torch.full((2, DIM), 7.0))  # ... and commit b1's rows are rewritten
        b.commit()
        b.gc()
    overlay._SHARED.clear()
    with dpsn.open(tmp_path / "ov") as r:  # the overlay's own pin kept commit b1
        assert torch.equal(r.read([1, 2, 3]), want)
        assert r.base_store == {
            "path": str((tmp_path / "base").resolve()),
            "uuid": r.base_store["uuid"],
            "commit": commit,
            "snapshot": f"overlay-{uuid}",
        }
    capsys.readouterr()
    assert cli(["info", str(tmp_path / "base"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overlays"] == {uuid: commit}  # dpsn info


def test_a_busy_base_makes_an_overlay_rely_on_the_user_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(overlay, "PIN_WAIT_S", 0.1)
    base = make_base(tmp_path / "base")  # its writer stays open: the pin cannot be written
    with pytest.warns(overlay.OverlayPinWarning, match="relies on the base's snapshot 'mine'"):
        ov = dpsn.create(tmp_path / "ov", base=tmp_path / "base", base_at="mine")
    assert ov.base_store["snapshot"] == "mine"
    ov.close()
    assert set(base.snapshots()) == {"mine"}
    with pytest.raises(InvalidArgumentError, match="snapshot it in the base first"):
        dpsn.create(tmp_path / "ov2", base=tmp_path / "base")  # HEAD: nothing would keep it
    base.close()


def test_an_overlay_refuses_a_spec_that_differs_from_its_base(tmp_path):
    make_base(tmp_path / "base").close()
    with pytest.raises(InvalidArgumentError, match=r"seed=7 \(the base's: 3\)") as e:
        dpsn.create(tmp_path / "x", base=tmp_path / "base", seed=7, dim=5)
    assert "dim=5 (the base's: 4)" in str(e.value)  # every difference is named
    with pytest.raises(InvalidArgumentError, match=r"generator=.*memory_size.*64"):
        dpsn.create(tmp_path / "x", base=tmp_path / "base", generator={**SMALL, "memory_size": 64})
    with pytest.raises(InvalidArgumentError, match="dtype='float16'"):
        dpsn.create(tmp_path / "x", base=tmp_path / "base", dtype="float16")
    with pytest.raises(InvalidArgumentError, match="compressor='zstd'"):
        dpsn.create(tmp_path / "x", base=tmp_path / "base", compressor="zstd")
    # a spec= is compared whole: its default seed 0 is not the base's 3
    with pytest.raises(InvalidArgumentError, match=r"seed=0 \(the base's: 3\)"):
        dpsn.create(
            tmp_path / "x",
            base=tmp_path / "base",
            spec=dpsn.StoreSpec(rows=1000, dim=DIM, generator=SMALL),
        )
    assert not (tmp_path / "x").exists()  # refused before anything was written
    # the base's own settings are welcome, as a spec or as keywords
    same = dpsn.StoreSpec(rows=1000, dim=DIM, seed=3, generator=SMALL)
    dpsn.create(tmp_path / "a", base=tmp_path / "base", spec=same).close()
    dpsn.create(
        tmp_path / "b", base=tmp_path / "base", rows=1000, dim=DIM, seed=3, generator=SMALL
    ).close()


def test_a_failed_create_leaves_no_pin_in_the_base(tmp_path):
    make_base(tmp_path / "base").close()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("not empty")
    with pytest.raises(dpsn.errors.DpsnError):
        dpsn.create(tmp_path / "taken", base=tmp_path / "base", base_at="mine")
    with dpsn.open(tmp_path / "base") as b:
        assert set(b.snapshots()) == {"mine"}


def test_a_base_whose_generator_cannot_be_read_leaves_no_pin(tmp_path):
    """The pin is written before the base's generator is read for the overlay: a failure there
    (here the generator's arrays are gone) removes it again (review of issue 24's merge)."""
    make_base(tmp_path / "base").close()
    generators = tmp_path / "base" / "data.zarr" / "generator"
    assert generators.is_dir()
    for d in generators.iterdir():
        if d.is_dir():
            shutil.rmtree(d)
    with pytest.raises(dpsn.errors.DpsnError):
        dpsn.create(tmp_path / "ov", base=tmp_path / "base", base_at="mine")
    with PersistedStore.open(tmp_path / "base", writable=False) as b:  # (no pool: no generator)
        assert set(b.snapshots()) == {"mine"}
