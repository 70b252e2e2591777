"""Benchmarks write under --out (default ./bench-results in the working directory), one
stamped file per run, recording dpsn's and torch's versions and the git commit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpsn.bench import _provenance

ROOT = Path(__file__).resolve().parents[1]


def test_default_out_is_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("DPSN_BENCH_OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert _provenance.default_out() == tmp_path / "bench-results"
    a = _provenance.stamped(None, "x")
    assert a.parent == tmp_path / "bench-results" and a.name.startswith("x-")
    v = _provenance.versions()
    assert v["dpsn"] and v["torch"]
    assert v["git_commit"] is None or len(v["git_commit"].split("+")[0]) == 40


@pytest.mark.slow
def test_embedding_bench_writes_under_out(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "embedding.py"),
            "--quick",
            "--sizes",
            "1e3",
            "--tables",
            "2",
            "--batch",
            "64",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--cache-rows",
            "4096",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (tmp_path / "bench-results").glob("embedding-*.json")
    payload = json.loads(path.read_text())
    assert payload["machine"]["dpsn"] and "git_commit" in payload["machine"]
    (size,) = payload["results"]
    for peer in ("dense", "dpsn"):
        assert size[peer]["rows_per_s"] > 0 and size[peer]["peak_rss"] > 0, size
