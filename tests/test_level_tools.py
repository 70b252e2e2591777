"""A levelled root through the tools: ``dpsn create --levels``, ``dpsn export`` (rows sum every
level), and ``refresh()`` of a read-only levelled pool following a writer."""

from __future__ import annotations

import contextlib
import io
import json

import torch
from safetensors.numpy import load_file

import dpsn
from dpsn.store import levels as levels_format
from dpsn.tools.cli import main

GEN = {"kind": "hashed_slices", "memory_size": 4096}


def cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    return rc, buf.getvalue()


def test_cli_create_levels_then_export_sums_every_level(tmp_path, capsys):
    root = str(tmp_path / "root")
    rc, out = cli(
        "create", root, "--rows", "500", "--dim", "4", "--seed", "3",
        "--levels", "foundation,task,scratch:memory", "--model-id", "m1", "--json",
    )  # fmt: skip
    assert rc == 0, out
    info = json.loads(out)
    assert [lv["name"] for lv in info["levels"]] == ["foundation", "task", "scratch"]
    assert [lv["persist"] for lv in info["levels"]] == [True, True, False]
    assert info["train_level"] == "task" and info["model_id"] == "m1"
    assert levels_format.is_levelled(root)

    ids = torch.tensor([3, 10, 499])
    with dpsn.open(root, "r+") as p:
        p.write(ids[:2], torch.ones(2, 4), level="foundation")
        p.write(ids[1:], torch.full((2, 4), 0.5), level="task")
        p.commit("two levels")
        want_rows, want_deltas = p.read(torch.arange(500)), p.delta(ids)
    rc, out = cli("export", root, str(tmp_path / "rows.safetensors"), "--json")
    assert rc == 0, out
    rows = load_file(str(tmp_path / "rows.safetensors"))
    assert rows["ids"].tolist() == list(range(500))
    assert torch.equal(torch.from_numpy(rows["weight"]), want_rows)
    rc, out = cli("export", root, str(tmp_path / "d.safetensors"), "--deltas-only", "--json")
    assert rc == 0 and json.loads(out)["commit"] == 2
    deltas = load_file(str(tmp_path / "d.safetensors"))
    assert deltas["ids"].tolist() == ids.tolist()  # persisted on any level
    assert torch.equal(torch.from_numpy(deltas["weight"]), want_deltas)

    rc, _ = cli("create", str(tmp_path / "x"), "--rows", "9", "--dim", "2", "--levels", "a:disk")
    assert rc != 0 and "the only level kind is ':memory'" in capsys.readouterr().err
    rc, _ = cli("create", str(tmp_path / "y"), "--rows", "9", "--dim", "2", "--model-id", "m")
    assert rc != 0 and "--model-id needs --levels" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_refresh_follows_the_writer_root_commit_by_root_commit(tmp_path):
    path = tmp_path / "root"
    w = dpsn.create(path, rows=200, dim=4, seed=1, generator=GEN, levels=["slow", "fast"])
    w.commit("empty")
    r = dpsn.open(path, cache_rows=64)
    try:
        ids = torch.tensor([1, 2])
        before = r.read(ids)
        w.write(ids, torch.ones(2, 4), level="slow")
        w.write(ids, torch.ones(2, 4))
        w.commit("both")
        assert torch.equal(r.read(ids), before)  # a reader stays at its root commit...
        assert r.refresh() == w.head == 3  # ...until it refreshes
        assert torch.equal(r.read(ids), w.read(ids))
        assert torch.equal(r.delta(ids, level="slow"), torch.ones(2, 4))
        assert r.refresh() == 3 and w.refresh() == 3
    finally:
        r.close()
        w.close()
