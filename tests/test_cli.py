"""The dpsn command line on real stores: tables, --json, exit codes."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

import dpsn
from dpsn.tools.cli import main, parse_count


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s"
    with dpsn.create(
        path, rows=10**12, dim=8, generator={"kind": "hashed_slices", "memory_size": 4096}
    ) as p:
        p.write([5, 6], torch.ones(2, 8))
        p.commit("train")
        p.snapshot("v1")
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_count():
    assert parse_count("1e12") == 10**12
    assert parse_count("10**12") == 10**12
    assert parse_count("1_000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count("abc")


def test_create_then_info(tmp_path, capsys):
    code, out, _ = run(capsys, "create", tmp_path / "new", "--rows", "1e12", "--dim", "16")
    assert code == 0 and "created" in out
    code, out, _ = run(capsys, "info", tmp_path / "new", "--json")
    info = json.loads(out)
    assert code == 0 and info["rows"] == 10**12 and info["dim"] == 16
    code, out, _ = run(capsys, "info", tmp_path / "new")
    assert "virtual parameters" in out and "16T" in out


def test_log_lists_commits_and_snapshots(store, capsys):
    code, out, _ = run(capsys, "log", store, "--json")
    log = json.loads(out)
    assert code == 0 and [c["message"] for c in log] == ["create", "train"]
    assert log[1]["snapshots"] == ["v1"]
    code, out, _ = run(capsys, "log", store)
    assert "train" in out.splitlines()[2]  # newest first


def test_inspect_reports_norms_and_last_commit(store, capsys):
    code, out, _ = run(capsys, "inspect", store, "5", "7", "--json")
    rows = json.loads(out)
    assert code == 0
    assert rows[0]["last_commit"] == 2 and rows[0]["delta_norm"] == pytest.approx(8**0.5)
    assert rows[1]["last_commit"] is None and rows[1]["delta_norm"] == 0
    code, out, _ = run(capsys, "inspect", store, "7")
    assert "procedural" in out


def test_inspect_bad_row_is_a_usage_error(store, capsys):
    code, _, err = run(capsys, "inspect", store, str(10**12))
    assert code == 2 and "out of range" in err


def test_verify_exit_codes(store, capsys):
    code, out, _ = run(capsys, "verify", store, "--json")
    assert code == 0 and json.loads(out)["ok"]
    chunk = next(p for p in (store / "data.zarr" / "segments").rglob("deltas/c/*/*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x55
    chunk.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", store)
    assert code == 1 and "1 problem" in out and "segment 0000000000000001" in out


def test_gc(store, capsys):
    with dpsn.open(store, mode="r+") as p:
        p.write([5, 6], torch.zeros(2, 8))
        p.commit()
    (store / "data.zarr" / "segments" / "00000000000000ff").mkdir()  # a crashed commit's leftover
    code, out, _ = run(capsys, "gc", store, "--json")
    result = json.loads(out)
    assert code == 0 and result["orphan_segments"] == [0xFF] and result["removed_segments"] == []


def test_missing_store_exit_code(tmp_path, capsys):
    code, _, err = run(capsys, "info", tmp_path / "nothing")
    assert code == 1 and "does not exist" in err


def test_usage_error_exit_code(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info"])
    assert e.value.code == 2


def test_demo_runs_end_to_end_as_a_real_command(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpsn.tools.cli",
            "demo",
            str(tmp_path / "demo"),
            "--steps",
            "40",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["loss_after"] < result["loss_before"] * 0.8  # 40 steps: a real decrease
    assert result["verify"]["ok"] and result["info"]["persisted_rows"] > 0
    again = subprocess.run(
        [sys.executable, "-m", "dpsn.tools.cli", "demo", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 1 and "--force" in again.stderr
