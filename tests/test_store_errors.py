"""Bad input gets a clear, typed error and leaves the store as it was. One test each."""

import os

import numpy as np
import pytest
import torch

import dpsn
from dpsn import errors


@pytest.fixture
def committed(pool):
    pool.write(torch.arange(32), torch.randn(32, 16))
    pool.commit("base")
    return pool


def _unchanged(pool, before):
    assert pool.staged_rows == 0
    assert torch.equal(pool.read(torch.arange(32)), before)


def test_negative_id(committed):
    before = committed.read(torch.arange(32))
    with pytest.raises(errors.RowIdOutOfRangeError, match="-1 is out of range"):
        committed.write([-1], torch.zeros(1, 16))
    with pytest.raises(IndexError):
        committed.read([-1])
    _unchanged(committed, before)


def test_id_not_below_rows(committed):
    with pytest.raises(errors.RowIdOutOfRangeError, match=str(10**12)):
        committed.read([10**12])


def test_non_integer_ids(committed):
    with pytest.raises(errors.InvalidIdsError, match="integer"):
        committed.read(torch.tensor([1.0, 2.0]))
    with pytest.raises(errors.InvalidIdsError):
        committed.read(np.array([0.5]))
    with pytest.raises(errors.InvalidIdsError):
        committed.read(torch.tensor([True]))


def test_deltas_of_wrong_shape(committed):
    before = committed.read(torch.arange(32))
    with pytest.raises(errors.InvalidDeltaError, match=r"expected \(2, 16\)"):
        committed.write([1, 2], torch.zeros(2, 15))
    with pytest.raises(errors.InvalidDeltaError):
        committed.write([1, 2], torch.zeros(3, 16))
    _unchanged(committed, before)


def test_deltas_of_wrong_dtype(committed):
    with pytest.raises(errors.InvalidDeltaError, match="floating point"):
        committed.write([1], torch.zeros(1, 16, dtype=torch.int32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_deltas(committed, bad):
    before = committed.read(torch.arange(32))
    d = torch.zeros(2, 16)
    d[1, 3] = bad
    with pytest.raises(errors.InvalidDeltaError, match="NaN or Inf"):
        committed.write([1, 2], d)
    _unchanged(committed, before)


def test_path_that_is_not_a_store(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(errors.StoreNotFoundError, match="not a dpsn store"):
        dpsn.open(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        dpsn.open(tmp_path / "missing")


def test_foreign_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "dpsn.json").write_text('{"format": "something-else"}')
    with pytest.raises(errors.StoreNotFoundError):
        dpsn.open(tmp_path / "x")
    (tmp_path / "x" / "dpsn.json").write_text("{not json")
    with pytest.raises(errors.CorruptStoreError):
        dpsn.open(tmp_path / "x")


def test_newer_format_version(committed, store_path):
    committed.close()
    import json

    m = json.loads((store_path / "dpsn.json").read_text())
    m["format_version"] = 999
    (store_path / "dpsn.json").write_text(json.dumps(m))
    with pytest.raises(errors.StoreVersionError, match="Upgrade dpsn"):
        dpsn.open(store_path)


def _segment_chunk(store_path):
    seg = next((store_path / "data.zarr" / "segments").iterdir())
    chunks = sorted((seg / "deltas" / "c").rglob("*"))
    return seg.name, [c for c in chunks if c.is_file()][1]


def test_byte_flipped_segment(committed, store_path):
    committed.close()
    name, chunk = _segment_chunk(store_path)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with dpsn.open(store_path) as r:
        with pytest.raises(errors.CorruptSegmentError) as e:
            r.read(torch.arange(32))
        assert e.value.segment == name and e.value.rows == list(range(8, 16))
        assert name in str(e.value)
        r.read(torch.arange(8))  # rows in intact chunks still read
        report = r.verify()
        assert not report.ok and report.damaged_rows == list(range(8, 16))


def test_truncated_segment(committed, store_path):
    committed.close()
    _, chunk = _segment_chunk(store_path)
    chunk.write_bytes(chunk.read_bytes()[:10])
    with dpsn.open(store_path) as r:
        with pytest.raises(errors.CorruptSegmentError):
            r.read(torch.arange(32))
        assert not r.verify().ok


def test_deleted_chunk_file(committed, store_path):
    committed.close()
    _, chunk = _segment_chunk(store_path)
    chunk.unlink()
    with dpsn.open(store_path) as r, pytest.raises(errors.CorruptSegmentError):
        r.read(torch.arange(32))


def test_missing_lmdb_file(committed, store_path):
    committed.close()
    os.remove(store_path / "index.lmdb" / "data.mdb")
    with pytest.raises(errors.StoreNotFoundError, match="LMDB index is missing"):
        dpsn.open(store_path)
    assert not (store_path / "index.lmdb" / "data.mdb").exists()  # not silently recreated


def test_second_writer(committed, store_path):
    with pytest.raises(errors.StoreLockedError, match="already open for writing"):
        dpsn.open(store_path, mode="r+")
    with dpsn.open(store_path) as reader:  # readers are always welcome
        reader.read([1])


def test_full_map_grows(tmp_path):
    with dpsn.create(tmp_path / "s", rows=10**9, dim=4, map_size=64 << 10) as p:
        p.write(torch.arange(20_000) * 7, torch.ones(20_000, 4))
        p.commit("bigger than the initial map")
        info = p._store._env.env.info()  # the map really grew
        assert info["map_size"] > 64 << 10
    with dpsn.open(tmp_path / "s") as r:
        assert r.info()["persisted_rows"] == 20_000
        assert r.verify().ok


@pytest.mark.parametrize("chunk_rows", [64, 4096], ids=["lmdb-fails", "segment-fails"])
def test_full_disk_leaves_store_unchanged(tmp_path, chunk_rows):
    """A real out-of-space failure: writes hit RLIMIT_FSIZE in a child process. With small
    chunks the LMDB file is the one that cannot grow; with big chunks the segment write fails."""
    import subprocess
    import sys

    store_path = tmp_path / "s"
    with dpsn.create(store_path, rows=10**12, dim=16, chunk_rows=chunk_rows) as p:
        p.write(torch.arange(32), torch.randn(32, 16))
        p.commit("base")
    code = f"""
import resource, signal, torch, dpsn
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
p = dpsn.open({str(store_path)!r}, mode="r+")
p.write(torch.arange(100, 20000), torch.randn(19900, 16))
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    p.commit("too big")
except dpsn.errors.StoreFullError as e:
    print("FULL", p.staged_rows)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "FULL 19900" in out.stdout, out.stderr
    with dpsn.open(store_path) as r:
        assert r.head == 2 and r.info()["persisted_rows"] == 32
        assert r.verify().ok
    with dpsn.open(store_path, mode="r+") as w:
        w.gc()
        assert not list((store_path / "data.zarr" / "segments").glob("*0002"))
        w.write([1], torch.ones(1, 16))
        assert w.commit("after the disk was freed").id == 3


def test_write_on_read_only_pool(committed, store_path):
    with dpsn.open(store_path) as r, pytest.raises(errors.ReadOnlyError):
        r.write([1], torch.zeros(1, 16))


def test_create_over_existing_store(committed, store_path):
    with pytest.raises(errors.StoreExistsError):
        dpsn.create(store_path, rows=10, dim=4)


def test_unknown_snapshot(committed, store_path):
    with pytest.raises(errors.SnapshotNotFoundError):
        dpsn.open(store_path, at="nope")
    with pytest.raises(errors.SnapshotNotFoundError):
        dpsn.open(store_path, at=99)


def test_bad_create_arguments(tmp_path):
    with pytest.raises(ValueError):
        dpsn.create(tmp_path / "a", rows=0, dim=4)
    with pytest.raises(TypeError):
        dpsn.create(tmp_path / "b", rows=10, dim=4, dtype=torch.int32)
    with pytest.raises(ValueError, match="hashed_slices"):
        dpsn.create(tmp_path / "c", rows=10, dim=4, generator="nope")


def test_lmdb_corrupt_file(committed, store_path):
    committed.close()
    (store_path / "index.lmdb" / "data.mdb").write_bytes(b"garbage" * 100)
    with pytest.raises(errors.CorruptStoreError):
        dpsn.open(store_path)
