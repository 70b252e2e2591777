"""A lifecycle store as untrusted input: its ``usage`` arrays, lifecycle records and format
version are checked on read and by ``verify`` like the rest of a store (docs/format.md)."""

import json
import struct

import lmdb
import pytest
import torch
import zarr

import dpsn
from dpsn.errors import CorruptSegmentError, CorruptStoreError
from dpsn.store import PersistedStore
from dpsn.store._digest import seal_record
from dpsn.store._lmdbfile import P_OVERFLOW, check_trees, read_meta
from dpsn.store._segments import _checksums

DIM = 8


@pytest.fixture
def store(tmp_path):
    """A format-2 store: rows 0..39 with deltas and usage statistics, chunks of 16 rows."""
    path = tmp_path / "s"
    with dpsn.create(
        path,
        rows=1000,
        dim=DIM,
        chunk_rows=16,
        generator={"kind": "hashed_slices", "memory_size": 256},
        cache_rows=0,
        lifecycle=dpsn.Lifecycle(regions=4),
    ) as pool:
        pool.write(
            torch.arange(40), torch.randn(40, DIM, generator=torch.Generator().manual_seed(1))
        )
        pool.commit("rows")
    return path


def _segment(path):
    env = lmdb.open(str(path / "index.lmdb"), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            db = env.open_db(b"segments", txn=txn, create=False)
            key, raw = next(iter(txn.cursor(db=db)))
    finally:
        env.close()
    rec = json.loads(raw)
    return key, rec, path / "data.zarr" / "segments" / f"{rec['id']:016x}" / "usage"


def _put(path, db_name, key, value):
    env = lmdb.open(str(path / "index.lmdb"), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            txn.put(key, value, db=env.open_db(db_name, txn=txn, create=False))
    finally:
        env.close()


def _read(path, ids):
    with dpsn.open(path, cache_rows=0) as pool:
        return pool.read(ids)


def _problems(path):
    store = PersistedStore.open(path, writable=False)  # the torch-free verify
    try:
        return store.verify().problems
    finally:
        store.close()


def test_usage_array_metadata_is_checked(store):
    _, _, usage = _segment(store)
    meta = json.loads((usage / "zarr.json").read_text())
    meta["data_type"] = "float32"  # a float32 array where float64 is due: never decoded
    (usage / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptSegmentError, match="'usage' cannot be opened"):
        _read(store, [3])
    assert any("usage" in p for p in _problems(store))


def test_usage_chunks_are_checksummed(store):
    _, _, usage = _segment(store)
    (usage / "c" / "1" / "0").unlink()  # rows 16..31: read as fill values, caught by checksum
    with pytest.raises(CorruptSegmentError, match=r"usage chunks 1\.\.1 fails its checksum") as e:
        _read(store, [20])
    assert e.value.rows == list(range(16, 32))
    _read(store, [3, 35])  # rows of intact chunks still read
    problems = _problems(store)
    assert any("usage chunks 1..1" in p for p in problems), problems


def test_usage_values_are_checked_even_with_valid_checksums(store):
    """A crafted segment whose checksums match statistics no dpsn writes (a phase of 7)."""
    key, rec, usage = _segment(store)
    arr = zarr.open_array(str(usage), mode="r+")
    values = arr[...]
    values[5, 0] = 7.0
    arr[...] = values
    rec["checksums"]["usage"] = _checksums(values, rec["chunk_rows"])
    del rec["record_xxh64"]
    _put(store, b"segments", key, seal_record(rec))
    with pytest.raises(CorruptSegmentError, match="usage statistics hold 1 rows"):
        _read(store, [5])
    problems = _problems(store)
    assert any("usage statistics hold 1 rows with out-of-range values" in p for p in problems)


def test_lifecycle_data_under_format_1_is_reported(store):
    _put(store, b"meta", b"format_version", struct.pack(">Q", 1))
    problems = _problems(store)
    assert any("format_version is 1 but the store holds lifecycle data" in p for p in problems), (
        problems
    )


def test_a_segment_record_with_another_usage_width_is_refused(store):
    key, rec, _ = _segment(store)
    rec["usage_width"] = 9
    del rec["record_xxh64"]
    _put(store, b"segments", key, seal_record(rec))
    with pytest.raises(CorruptStoreError, match="usage_width=9"):
        _read(store, [3])


def test_an_overflow_page_claiming_too_many_pages_is_refused(store):
    """The lifecycle's commit records are long enough for overflow pages; one whose header
    claims 2**32-1 pages must be refused before anything is sized by that number."""
    data = store / "index.lmdb" / "data.mdb"
    meta = read_meta(data)
    raw = bytearray(data.read_bytes())
    psize = meta.page_size
    overflow = [
        p
        for p in check_trees(data, meta).tolist()
        if p >= 2 and struct.unpack_from("<H", raw, p * psize + 10)[0] & P_OVERFLOW
    ]
    assert overflow, "the store has no overflow page to damage"
    struct.pack_into("<I", raw, overflow[0] * psize + 12, 0xFFFFFFFF)
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="past the end of the file"):
        dpsn.open(store, cache_rows=0).close()
    assert any("past the end of the file" in p for p in _problems_or_open_error(store))


def _problems_or_open_error(path):
    try:
        return _problems(path)
    except CorruptStoreError as e:
        return [str(e)]


def test_verify_checks_every_stored_policy_setting_without_torch(store):
    """A hand-edited policy (exit above enter) is reported by the torch-free verify, naming the
    setting, and refused by an open, not first discovered by the pool that adopts it."""
    env = lmdb.open(str(store / "index.lmdb"), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            db = env.open_db(b"commits", txn=txn, create=False)
            cur = txn.cursor(db=db)
            cur.last()
            key, raw = cur.key(), cur.value()
    finally:
        env.close()
    rec = json.loads(raw)
    rec["lifecycle"]["policy"]["exit"] = 0.3
    del rec["record_xxh64"]
    _put(store, b"commits", key, seal_record(rec))
    problems = _problems(store)
    assert any("Lifecycle.exit (0.3) must be below enter (0.2)" in p for p in problems), problems
    with pytest.raises(CorruptStoreError, match="exit"):
        dpsn.open(store)


def test_the_torch_free_policy_check_knows_every_setting():
    from dataclasses import fields

    from dpsn.store import LIFECYCLE_DEFAULTS

    assert {f.name: f.default for f in fields(dpsn.Lifecycle)} == LIFECYCLE_DEFAULTS
