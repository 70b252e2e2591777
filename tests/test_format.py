"""The on-disk format: a checked-in format-1 store must read back bit for bit with every later
dpsn, and a freshly written store must keep format 1's bytes (docs/format.md)."""

import json
import shutil
import struct
from pathlib import Path

import lmdb
import pytest
import torch

import dpsn

DATA = Path(__file__).parent / "data" / "format1"
EXPECTED = json.loads((DATA / "expected.json").read_text())


def _bits(t: torch.Tensor) -> list[str]:
    return [f"{v:08x}" for v in t.float().contiguous().view(torch.int32).reshape(-1).tolist()]


@pytest.fixture(params=["f32", "bf16"])
def golden(request, tmp_path):
    """A private copy: opening a store may create LMDB's lock file next to the data."""
    dst = tmp_path / request.param
    shutil.copytree(DATA / request.param, dst)
    return dst, EXPECTED[request.param]


@pytest.mark.parametrize("cache_rows", [0, 64])
def test_format1_store_reads_the_same_bits(golden, cache_rows):
    path, want = golden
    ids = want["ids"]
    with dpsn.open(path, cache_rows=cache_rows) as pool:
        assert _bits(pool.read(ids)) == want["head_rows"]
        assert _bits(pool.delta(ids)) == want["head_deltas"]
        assert _bits(pool.base(ids)) == want["bases"]
        assert len(pool.log()) == want["commits"]
        assert pool.info()["persisted_rows"] == want["persisted_rows"]
        assert pool.verify().ok
    with dpsn.open(path, at="v1", cache_rows=cache_rows) as old:
        assert _bits(old.read(ids)) == want["v1_rows"]


def test_format1_router_loads(tmp_path):
    path = tmp_path / "f32"  # the float32 store has a saved router
    shutil.copytree(DATA / "f32", path)
    with dpsn.open(path) as pool:
        router = pool.load_router("router")
        assert router.num_rows == 1000 and router.k_max == 2


def test_format1_store_takes_new_commits(golden):
    path, want = golden
    ids = want["ids"]
    with dpsn.open(path, "r+") as pool:
        pool.write([4], torch.ones(1, 8))
        pool.commit("written by a later dpsn")
    with dpsn.open(path) as pool:
        rows = pool.read(ids)
        assert _bits(rows) == want["head_rows"]  # id 4 is not among them
        assert torch.equal(pool.delta([4]).float(), torch.ones(1, 8))
        assert pool.verify().ok


def test_fresh_store_keeps_format1_bytes(tmp_path):
    """Pins what docs/format.md promises for a new store: LMDB keys and value layouts, the
    segment arrays' zarr metadata (dtype, chunks, codecs) and the manifest's keys."""
    path = tmp_path / "s"
    with dpsn.create(
        path,
        rows=100,
        dim=4,
        seed=1,
        chunk_rows=2,
        generator={"kind": "hashed_slices", "memory_size": 64},
        cache_rows=0,
    ) as pool:
        pool.write([7, 3, 9], torch.arange(12, dtype=torch.float32).reshape(3, 4))
        pool.commit("c")
    manifest = json.loads((path / "dpsn.json").read_text())
    assert manifest["format"] == "dpsn-store" and manifest["format_version"] == 1
    assert {"rows", "dim", "dtype", "seed", "generator", "chunk_rows", "compressor"} <= set(
        manifest
    )
    env = lmdb.open(str(path / "index.lmdb"), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            rows = env.open_db(b"rows", txn=txn, create=False)
            assert txn.get(b"format_version", db=meta) == struct.pack(">Q", 1)
            assert txn.get(b"head", db=meta) == struct.pack(">Q", 2)
            entries = list(txn.cursor(db=rows))
    finally:
        env.close()
    # row id (u64 BE) -> segment, offset, commit (<QQQ): ids sorted, offsets in id order
    assert entries == [
        (struct.pack(">Q", 3), struct.pack("<QQQ", 1, 0, 2)),
        (struct.pack(">Q", 7), struct.pack("<QQQ", 1, 1, 2)),
        (struct.pack(">Q", 9), struct.pack("<QQQ", 1, 2, 2)),
    ]
    seg = path / "data.zarr" / "segments" / "0000000000000001"
    meta = json.loads((seg / "deltas" / "zarr.json").read_text())
    assert meta["data_type"] == "float32" and meta["shape"] == [3, 4]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [2, 4]
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc"]
    assert meta["codecs"][1]["configuration"]["cname"] == "lz4"
    ids_meta = json.loads((seg / "ids" / "zarr.json").read_text())
    assert ids_meta["data_type"] == "int64"
