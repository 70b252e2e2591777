"""A newcomer's frictions, each mended and held by a test: repair after damage, snapshot
deletion and what pins bytes, dry runs beside a writer, durations as written, not-a-store,
exit codes, writer figures in stats, a rerunnable demo, .pt imports, one-line errors."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import dpsn
from dpsn.errors import SnapshotExistsError, SnapshotNotFoundError
from dpsn.tools.cli import main

SMALL = {"kind": "hashed_slices", "memory_size": 4096}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def make(path, snapshot=None, rows=64):
    with dpsn.create(path, rows=10**6, dim=8, generator=SMALL, chunk_rows=16) as p:
        p.write(torch.arange(rows), torch.ones(rows, 8))
        p.commit("train")
        if snapshot:
            p.snapshot(snapshot)
        p.write(torch.arange(rows, rows + 8), torch.ones(8, 8))
        p.commit("more")
    return path


def damage_first_delta_chunk(store: Path) -> None:
    chunk = sorted(p for p in (store / "data.zarr" / "segments").rglob("deltas/c/*/*"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x55
    chunk.write_bytes(bytes(data))


def test_verify_advice_repair_gives_a_clean_verify(tmp_path, capsys):
    store = make(tmp_path / "s")
    damage_first_delta_chunk(store)
    code, out, _ = run(capsys, "verify", store)
    assert code == 1 and f"dpsn repair {store}" in out
    code, out, _ = run(capsys, "repair", store)
    assert code == 0 and "verify: ok" in out, out
    assert "dropped 16 row(s)" in out  # the damaged chunk's rows; the other 48 moved out intact
    code, _, _ = run(capsys, "verify", store)
    assert code == 0
    with dpsn.open(store) as p:  # intact rows kept their deltas, damaged ones are procedural
        assert torch.equal(p.delta(torch.arange(16, 72)), torch.ones(56, 8))
        assert torch.equal(p.delta(torch.arange(16)), torch.zeros(16, 8))
    code, out, _ = run(capsys, "repair", store)
    assert code == 0 and "nothing to repair" in out


def test_repair_names_the_snapshot_that_pins_damage(tmp_path, capsys):
    store = make(tmp_path / "s", snapshot="v1")
    damage_first_delta_chunk(store)
    code, out, _ = run(capsys, "repair", store)
    assert code == 1 and f"dpsn snapshot {store} --delete v1" in out
    assert run(capsys, "snapshot", store, "v1", "--delete")[0] == 0
    assert run(capsys, "gc", store)[0] == 0
    assert run(capsys, "verify", store)[0] == 0


def test_snapshot_delete_and_gc_says_what_pins_bytes(tmp_path, capsys):
    store = make(tmp_path / "s", snapshot="v1")
    with dpsn.open(store, "r+") as p:
        p.drop(torch.arange(64))
        p.commit("drop all of the first commit's rows")
    code, out, _ = run(capsys, "gc", store, "--keep-last", "1")
    assert code == 0 and "kept by snapshot 'v1' (commit 2): 1 segment(s)" in out
    assert f"`dpsn snapshot {store} --delete v1` releases them" in out
    code, out, _ = run(capsys, "snapshot", store, "v1", "--delete")
    assert code == 0 and "deleted snapshot 'v1'" in out
    code, out, _ = run(capsys, "gc", store, "--keep-last", "1", "--json")
    result = json.loads(out)
    assert result["removed_segments"] and result["pinned"] == []
    code, _, err = run(capsys, "snapshot", store, "v1", "--delete")
    assert code == 1 and "no snapshot named 'v1'" in err
    with dpsn.open(store, "r+") as p:
        p.snapshot("v2")
        with pytest.raises(SnapshotExistsError, match="delete_snapshot"):
            p.snapshot("v2")
        p.delete_snapshot("v2")
        assert p.snapshots() == {}
        with pytest.raises(SnapshotNotFoundError):
            p.delete_snapshot("v2")


def test_gc_dry_run_beside_a_writer(tmp_path, capsys):
    store = make(tmp_path / "s")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import dpsn, sys, time\np = dpsn.open(sys.argv[1], 'r+')\nprint('open', flush=True)"
            "\ntime.sleep(60)",
            str(store),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        code, out, _ = run(capsys, "gc", store, "--dry-run")
        assert code == 0 and out.startswith("would remove")
        code, _, err = run(capsys, "gc", store)  # a real gc still needs the lock
        assert code == 1 and "writer lock" in err
        assert "\n" not in err.rstrip("\n")  # one line, although the holder's script has three
        assert "import dpsn, sys, time p = dpsn.open" in err
    finally:
        holder.kill()
        holder.wait()


def test_policy_durations_as_written(tmp_path, capsys):
    store = make(tmp_path / "s")
    code, out, _ = run(capsys, "policy", store, "--keep-within", "1d")
    assert code == 0 and "keep within" in out and "1d" in out and "e+04" not in out
    code, out, _ = run(capsys, "policy", store, "--keep-within", "36h")
    assert "36h" in out
    code, out, _ = run(capsys, "policy", store, "--json")
    assert json.loads(out)["keep_within"] == 36 * 3600


def test_not_a_store_said_plainly(tmp_path, capsys):
    f = tmp_path / "somefile.py"
    f.write_text("print('hi')\n")
    code, _, err = run(capsys, "info", f)
    assert code == 1 and "is a file, not a dpsn store" in err and "dpsn create" not in err


def test_exit_codes_as_documented(tmp_path, capsys):
    store = make(tmp_path / "s", snapshot="v1")
    code, _, err = run(capsys, "snapshot", store, "v1")  # a refused write: 1, not usage
    assert code == 1 and "exists already" in err and "--delete v1" in err
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(store), "abc"])
    assert e.value.code == 2
    assert "not a row id: 'abc'" in capsys.readouterr().err


def test_stats_keep_the_writers_figures_after_a_drop(tmp_path, capsys):
    store = tmp_path / "s"
    with dpsn.create(store, rows=1000, dim=8, generator=SMALL) as p:
        p.read(torch.arange(100))
        p.write(torch.arange(10), torch.ones(10, 8))
        p.commit("train")
    assert run(capsys, "drop", store, "3")[0] == 0
    _code, out, _ = run(capsys, "stats", store, "--json")
    stats = json.loads(out)
    assert stats["writer_commit"] == 2 and stats["writer"]["misses"] == 100


def test_demo_reruns(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "demo", "--steps", "2")[0] == 0
    code, out, _ = run(capsys, "demo", "--steps", "2")
    assert code == 0 and "replacing the store an earlier run left" in out
    other = tmp_path / "mine"
    make(other)
    code, _, err = run(capsys, "demo", other, "--steps", "2")  # not the demo's: left alone
    assert code == 1 and "--force" in err and (other / "dpsn.json").exists()


def test_pt_state_dict_imports(tmp_path, capsys):
    emb = nn.Embedding(50, 6)
    torch.save(emb.state_dict(), tmp_path / "emb.pt")
    code, _out, err = run(capsys, "import", tmp_path / "emb.pt", tmp_path / "s")
    assert code == 0, err
    with dpsn.open(tmp_path / "s") as p:
        assert torch.equal(p.read(torch.arange(50)), emb.weight.detach())
    model = nn.Sequential(nn.Embedding(20, 4), nn.Linear(4, 3))  # two 2-D weights
    torch.save(model.state_dict(), tmp_path / "model.pt")
    code, _, err = run(capsys, "import", tmp_path / "model.pt", tmp_path / "t")
    assert code == 1 and "--tensor NAME" in err and "0.weight [20, 4]" in err
    code, _, err = run(
        capsys, "import", tmp_path / "model.pt", tmp_path / "t", "--tensor", "0.weight"
    )
    assert code == 0, err


class NotATensor:
    def __reduce__(self):
        return (time.sleep, (0,))  # a pickle that would call a function


def test_pt_with_code_is_refused(tmp_path, capsys):
    torch.save({"weight": torch.zeros(3, 2), "x": NotATensor()}, tmp_path / "bad.pt")
    code, _, err = run(capsys, "import", tmp_path / "bad.pt", tmp_path / "s")
    assert code == 1 and "weights_only=True" in err
    assert not (tmp_path / "s").exists()
