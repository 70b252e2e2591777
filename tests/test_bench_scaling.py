"""dpsn bench scaling: the JSON our checks read, from a real (small) run in child processes."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_scaling_json_schema_and_10_to_the_12(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpsn.tools.cli",
            "bench",
            "scaling",
            "--quick",
            "--working-set",
            "2000",
            "--stream-batches",
            "4",
            "--dense-max-params",
            "1e6",
            "--model-rows",
            "1000",
            "--model-steps",
            "2",
            "--no-plot",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "memory and speed" in out.stdout and "against the aims" in out.stdout
    assert "missed" not in out.stdout  # --quick's aims it cannot measure say so, not "missed"
    (path,) = tmp_path.glob("scaling-*.json")  # one file per run, stamped: never overwritten
    payload = json.loads(path.read_text())
    assert payload["machine"]["dpsn"] and payload["machine"]["torch"]
    assert "git_commit" in payload["machine"]
    records = payload["records"]
    assert isinstance(records, list) and records
    for r in records:
        assert r["system"] in ("dpsn", "dense")
        assert isinstance(r["params"], int) and isinstance(r["fits"], bool)
        for key in ("peak_rss_bytes", "disk_bytes", "rows_per_s"):
            assert r[key] is None or isinstance(r[key], (int, float)), (key, r)
            assert (r[key] is None) == (not r["ran"]), (key, r)
    dpsn_runs = {r["params"]: r for r in records if r["system"] == "dpsn"}
    assert set(dpsn_runs) == {10**6, 10**9, 10**12}
    for r in dpsn_runs.values():
        assert r["ran"] and r["trained_rows"] == 2000 and r["mean_abs_delta_of_trained_rows"] > 0
        assert 0 < r["hit_rate"] <= 1 and r["peak_rss_bytes"] >= r["rss_after_import_bytes"]
    dense = {r["params"]: r for r in records if r["system"] == "dense"}
    assert dense[10**6]["ran"] and dense[10**6]["disk_bytes"] == 10**6 * 4
    assert not dense[10**12]["fits"] and not dense[10**12]["ran"]  # 4 TB: never started
    assert not dense[10**9]["ran"] and "dense-max-params" in dense[10**9]["reason"]
    kinds = {m["kind"]: m for m in payload["model"]}
    assert kinds["pool"]["val_bpb"] > 0 and kinds["pool"]["steps"] == 2
    assert (
        kinds["dense_active"]["active_ffn_params_per_token"]
        == kinds["pool"]["active_ffn_params_per_token"]
    )
