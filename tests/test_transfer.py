"""dpsn export / import: tables in and out of stores, bit for bit, in chunks; bad tables refused."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

import dpsn
from dpsn.tools import _transfer
from dpsn.tools.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def awkward_table(n, dim, dtype=torch.float32, seed=0):
    """Random rows plus the values that trip naive arithmetic: -0.0, +0.0, subnormals, extremes."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, dim, generator=g) * 3).to(dtype)
    info = torch.finfo(dtype)
    special = torch.tensor([-0.0, 0.0, info.tiny / 4, -info.tiny / 4, info.max, info.min, 1e-3])
    flat = t.view(-1)
    flat[: len(special)] = special.to(dtype)
    return t


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_embedding_imports_bit_for_bit(tmp_path, capsys, dtype):
    emb = torch.nn.Embedding(3000, 12).to(dtype)
    with torch.no_grad():
        emb.weight.copy_(awkward_table(3000, 12, dtype))
    save_file({"weight": emb.weight.detach()}, tmp_path / "emb.safetensors")
    code, out, err = run(capsys, "import", tmp_path / "emb.safetensors", tmp_path / "s")
    assert code == 0, err
    assert "3000 rows x 12" in out and "generator zeros" in out
    with dpsn.open(tmp_path / "s", cache_rows=0) as pool:
        assert pool.rows == 3000 and pool.dtype == dtype
        assert torch.equal(bits(pool.read(torch.arange(3000))), bits(emb.weight.detach()))
        assert pool.info()["persisted_rows"] == 3000
    with dpsn.open(tmp_path / "s", cache_rows=256) as pool:  # the cached path too
        ids = torch.tensor([0, 1, 2, 2999, 0])
        assert torch.equal(bits(pool.read(ids)), bits(emb.weight.detach()[ids]))
    code, _, err = run(capsys, "export", tmp_path / "s", tmp_path / "back.safetensors")
    assert code == 0, err
    back = load_file(tmp_path / "back.safetensors")["weight"]
    assert back.dtype == dtype and torch.equal(bits(back), bits(emb.weight.detach()))


def test_export_import_export_round_trip(tmp_path, capsys):
    src = tmp_path / "src"
    with dpsn.create(src, rows=10**9, dim=16, seed=3) as pool:
        ids = torch.unique(
            torch.randint(0, 10**9, (500,), generator=torch.Generator().manual_seed(1))
        )
        pool.write(ids, awkward_table(len(ids), 16))
        pool.commit("trained")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    code, _, err = run(capsys, "export", src, a, "--rows", "persisted")
    assert code == 0, err
    with safe_open(str(a), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "dpsn-export" and meta["values"] == "rows"
        assert (
            meta["rows"] == str(10**9) and json.loads(meta["generator"])["kind"] == "hashed_slices"
        )
    exported = load_file(a)
    assert torch.equal(exported["ids"], ids)
    with dpsn.open(src, cache_rows=0) as pool:
        assert torch.equal(bits(exported["weight"]), bits(pool.read(ids)))
    code, out, err = run(capsys, "import", a, tmp_path / "copy")
    assert code == 0, err and "at the table's ids" in out
    with dpsn.open(tmp_path / "copy", cache_rows=0) as pool:
        assert pool.rows == 10**9  # from the export's metadata
        assert pool.info()["persisted_rows"] == len(ids)
    code, _, err = run(capsys, "export", tmp_path / "copy", b, "--rows", "persisted")
    assert code == 0, err
    again = load_file(b)
    assert torch.equal(again["ids"], exported["ids"])
    assert torch.equal(bits(again["weight"]), bits(exported["weight"]))


def test_large_table_moves_in_chunks_and_commits(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_transfer, "CHUNK_BYTES", 64 << 10)  # 1024 rows of 16 floats a chunk
    table = awkward_table(20_000, 16, seed=5).numpy()
    np.save(tmp_path / "t.npy", table)
    code, out, err = run(
        capsys, "import", tmp_path / "t.npy", tmp_path / "s", "--commit-rows", "8000", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    # 8000 rows a commit, rounded up to whole chunks of 1024: 8192
    assert result["commits"] == math.ceil(20_000 / 8192) and result["rows_imported"] == 20_000
    with dpsn.open(tmp_path / "s") as pool:
        assert len(pool.log()) == 1 + result["commits"]
    code, _, err = run(capsys, "export", tmp_path / "s", tmp_path / "t.safetensors")
    assert code == 0, err
    with safe_open(str(tmp_path / "t.safetensors"), framework="numpy") as f:
        assert np.array_equal(f.get_tensor("ids"), np.arange(20_000))
        assert np.array_equal(f.get_tensor("weight").view(np.int32), table.view(np.int32))


def test_export_rows_ranges_deltas_only_and_at(tmp_path, capsys):
    path = tmp_path / "s"
    with dpsn.create(
        path, rows=10**12, dim=4, generator={"kind": "hashed_slices", "memory_size": 64}
    ) as p:
        p.write([5, 10**11], torch.ones(2, 4))
        p.commit("one")
        p.snapshot("v1")
        p.write([5], torch.full((1, 4), 2.0))
        p.commit("two")
    out = tmp_path / "x.safetensors"
    code, _, err = run(capsys, "export", path, out, "--rows", "3:7,10**11,4", "--deltas-only")
    assert code == 0, err
    t = load_file(out)
    assert t["ids"].tolist() == [3, 4, 5, 6, 10**11]
    assert t["weight"][:, 0].tolist() == [0, 0, 2, 0, 1]
    code, _, err = run(capsys, "export", path, out, "--deltas-only", "--at", "v1")
    assert code == 1 and "exists" in err and "--force" in err
    code, _, err = run(capsys, "export", path, out, "--deltas-only", "--at", "v1", "--force")
    assert code == 0, err
    t = load_file(out)
    assert t["ids"].tolist() == [5, 10**11] and t["weight"][:, 0].tolist() == [1, 1]
    with dpsn.open(path, cache_rows=0) as pool:
        code, _, err = run(capsys, "export", path, out, "--rows", "0:3", "--force")
        assert torch.equal(load_file(out)["weight"], pool.read(torch.arange(3)))
    for bad, needle in (
        ("5:3", "empty or outside"),
        (f"{10**12}", "outside"),
        ("x", "not an id"),
        ("all", "free"),  # 10^12 rows x 4 floats: no disk holds that
    ):
        code, _, err = run(capsys, "export", path, out, "--rows", bad, "--force")
        assert code in (1, 2) and needle in err, (bad, err)
    assert not list(tmp_path.glob(".x.safetensors.*"))  # no temp file left behind


def test_import_with_another_generator_counts_inexact_rows(tmp_path, capsys):
    table = awkward_table(2000, 8, seed=2)
    table[:, :] = table.clamp(-100, 100)  # keep base + delta finite
    np.save(tmp_path / "t.npy", table.numpy())
    code, out, err = run(
        capsys,
        "import",
        tmp_path / "t.npy",
        tmp_path / "s",
        "--generator",
        "hashed_slices",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    with dpsn.open(tmp_path / "s", cache_rows=0) as pool:
        back = pool.read(torch.arange(2000))
    wrong = int((bits(back) != bits(table)).any(dim=1).sum())
    assert result["rows_not_exact"] == wrong  # the count is the truth, whatever it is
    torch.testing.assert_close(back, table, rtol=1e-6, atol=1e-6)


def test_float64_needs_an_explicit_dtype(tmp_path, capsys):
    table = np.random.default_rng(0).standard_normal((100, 4))
    np.save(tmp_path / "t.npy", table)
    code, _, err = run(capsys, "import", tmp_path / "t.npy", tmp_path / "s")
    assert code == 1 and "--dtype float32" in err and not (tmp_path / "s").exists()
    code, _, err = run(capsys, "import", tmp_path / "t.npy", tmp_path / "s", "--dtype", "float32")
    assert code == 0, err
    with dpsn.open(tmp_path / "s", cache_rows=0) as pool:
        assert torch.equal(pool.read(torch.arange(100)), torch.from_numpy(table).float())


def test_bad_tables_are_refused_and_leave_nothing(tmp_path, capsys):
    np.save(tmp_path / "one_d.npy", np.ones(5, np.float32))
    np.save(tmp_path / "three_d.npy", np.ones((2, 3, 4), np.float32))
    np.save(tmp_path / "ints.npy", np.ones((5, 3), np.int32))
    np.save(tmp_path / "empty.npy", np.ones((0, 3), np.float32))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    nan = np.ones((10, 3), np.float32)
    nan[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "junk.bin").write_bytes(b"not a table at all")
    save_numpy(
        {"a": np.ones((3, 2), np.float32), "b": np.ones((4, 2), np.float32)},
        str(tmp_path / "two.safetensors"),
    )
    cases = [
        ("one_d.npy", "2-D"),
        ("three_d.npy", "2-D"),
        ("ints.npy", "int32"),
        ("empty.npy", "empty"),
        ("pickled.npy", "pickle"),
        ("nan.npy", "row 7"),
        ("junk.bin", "neither"),
        ("two.safetensors", "--tensor"),
    ]
    for name, needle in cases:
        code, _, err = run(capsys, "import", tmp_path / name, tmp_path / "out")
        assert code in (1, 2) and needle in err, (name, err)
        assert "Traceback" not in err
        assert not (tmp_path / "out").exists(), name  # nothing half-made is left
    code, _, err = run(
        capsys, "import", tmp_path / "two.safetensors", tmp_path / "out", "--tensor", "b"
    )
    assert code == 0, err
    code, _, err = run(capsys, "import", tmp_path / "two.safetensors", tmp_path / "out")
    assert code == 1 and "not empty" in err  # an existing store is never overwritten


def test_export_loads_into_nn_embedding(tmp_path, capsys):
    path = tmp_path / "s"
    with dpsn.create(path, rows=100, dim=6, seed=9) as p:
        p.write([3], torch.ones(1, 6))
        p.commit()
    code, _, err = run(capsys, "export", path, tmp_path / "e.safetensors")
    assert code == 0, err
    weight = load_file(tmp_path / "e.safetensors")["weight"]
    emb = torch.nn.Embedding.from_pretrained(weight)
    with dpsn.open(path, cache_rows=0) as pool:
        assert torch.equal(emb(torch.arange(100)), pool.read(torch.arange(100)))
