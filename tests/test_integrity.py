"""The integrity machinery itself: entry hashes against the xxhash package, digests that follow
every write, the LMDB page walk on real stores, the torch-free verify."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given
from hypothesis import strategies as st

import dpsn
import dpsn.index
from dpsn import errors
from dpsn.hypernet import make_generator
from dpsn.store import PersistedStore
from dpsn.store._digest import check_record, entry_hash, rows_hash, seal_record
from dpsn.store._generator_shapes import generator_shapes
from dpsn.store._lmdbfile import check_trees, read_meta
from dpsn.store._records import DIGESTED_DBS, compute_digests, stored_digests

U64 = st.integers(0, 2**64 - 1)
I63 = st.integers(0, 2**63 - 1)


@given(st.lists(st.tuples(I63, I63, I63, I63), max_size=40))
def test_row_entry_hashes_are_xxh64_of_the_lmdb_entry(rows):
    cols = [np.array(c, dtype=np.int64) for c in zip(*rows, strict=True)] or [
        np.zeros(0, dtype=np.int64)
    ] * 4
    got = rows_hash(*cols)
    want = [
        xxhash.xxh64_intdigest(struct.pack(">Q", i) + struct.pack("<QQQ", s, o, c))
        for i, s, o, c in rows
    ]
    assert got.tolist() == want


@given(st.binary(max_size=64), st.binary(max_size=300))
def test_entry_hash_keeps_key_and_value_apart(key, value):
    assert entry_hash(key, value) == xxhash.xxh64_intdigest(
        len(key).to_bytes(4, "little") + key + value
    )
    if key:
        assert entry_hash(key[:-1], key[-1:] + value) != entry_hash(key, value)


@given(st.dictionaries(st.text(max_size=8), st.integers() | st.text() | st.none(), max_size=6))
def test_sealed_records_check_and_any_change_is_caught(record):
    raw = json.loads(seal_record(record))
    assert check_record(raw, "r")
    for key in record:
        changed = dict(raw)
        changed[key] = [changed[key]]
        with pytest.raises(errors.CorruptStoreError, match="checksum"):
            check_record(changed, "r")


def _digests(path: Path) -> tuple[dict, dict, int, int | None]:
    """Stored and recomputed digests, the LMDB transaction, HEAD's index digest."""
    store = PersistedStore.open(path, writable=False)
    try:
        env = store._env

        def scan(txn):
            return (
                stored_digests(txn.get(b"digests", db=env.dbs[b"meta"])),
                compute_digests(txn, env.dbs),
                txn.id(),
            )

        stored, computed, txn = env.read(scan)
        head = store.commit_record(store.head()).index_digest
    finally:
        store.close()
    return stored, computed, txn, head


def test_digests_follow_every_kind_of_write(tmp_path):
    """Commits (writes, overwrites, drops, generator and router changes), pins, unpins and gc
    each update the digests incrementally; after each, they equal a full recount."""
    path = tmp_path / "s"
    rng = np.random.default_rng(0)
    with dpsn.create(
        path,
        rows=10**6,
        dim=4,
        chunk_rows=8,
        cache_rows=64,
        generator={"kind": "hashed_slices", "memory_size": 64},
    ) as p:
        for k in range(6):
            ids = torch.from_numpy(rng.choice(500, 60, replace=False))
            p.write(ids, torch.randn(60, 4))
            p.drop(torch.from_numpy(rng.choice(500, 10, replace=False)))
            if k == 2:
                p.save_router(
                    "r", dpsn.index.ProductKeyRouter(d_in=4, num_rows=10**6, k=2, d_key=4)
                )
            if k == 3:
                p.generator.requires_grad_(False)
                with torch.no_grad():
                    p.generator.memory.add_(1.0)
            p.commit(f"c{k}")
            if k in (1, 4):
                p.snapshot(f"s{k}")
            if k == 5:
                p._store.unpin("s1")
                p.gc()
            stored, computed, txn, head = _digests_while_open(p)
            assert stored is not None and stored[0] == txn
            assert stored[1] == computed
            assert head == computed[b"rows"].total
    assert dpsn.open(path).verify().ok


def _digests_while_open(pool):
    env = pool._store._env

    def scan(txn):
        return (
            stored_digests(txn.get(b"digests", db=env.dbs[b"meta"])),
            compute_digests(txn, env.dbs),
            txn.id(),
        )

    stored, computed, txn = env.read(scan)
    return stored, computed, txn, pool._store.commit_record(pool.head).index_digest


def test_a_format1_store_gains_digests_at_its_next_commit(tmp_path):
    path = tmp_path / "f32"
    shutil.copytree(Path(__file__).parent / "data" / "format1" / "f32", path)
    with dpsn.open(path) as p:
        report = p.verify()
        assert report.ok and any("no digests" in n for n in report.notes)
    with dpsn.open(path, "r+") as p:
        p.write([4], torch.ones(1, 8))
        p.commit("later")
    stored, computed, txn, head = _digests(path)
    assert stored is not None and stored[0] == txn and stored[1] == computed
    assert head == computed[b"rows"].total
    with dpsn.open(path) as p:
        report = p.verify()
        assert report.ok and not report.notes


def test_digests_written_by_another_writer_are_reported_stale(tmp_path):
    """A dpsn that does not keep digests (or anything else) wrote after the last one that did:
    verify cannot vouch for the index and says so; the next commit records them again."""
    import lmdb

    path = tmp_path / "s"
    with dpsn.create(
        path, rows=100, dim=4, generator={"kind": "hashed_slices", "memory_size": 64}
    ) as p:
        p.write([1], torch.ones(1, 4))
        p.commit("a")
    env = lmdb.open(str(path / "index.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        txn.put(b"unrelated", b"x", db=meta)
    env.close()
    problems = PersistedStore.open(path, writable=False).verify().problems
    assert any("recorded at LMDB transaction" in p for p in problems)
    with dpsn.open(path, "r+") as p:
        p.write([2], torch.ones(1, 4))
        p.commit("b")
    assert PersistedStore.open(path, writable=False).verify().problems == []


def test_the_lmdb_walk_accepts_real_stores_and_sees_their_pages(tmp_path):
    """A store with thousands of rows over many commits, drops, snapshots and gc: a B+tree of
    depth >= 2 with branch pages, freed pages and overflow records."""
    path = tmp_path / "s"
    rng = np.random.default_rng(1)
    with dpsn.create(
        path,
        rows=10**9,
        dim=4,
        chunk_rows=16,
        cache_rows=0,
        generator={"kind": "hashed_slices", "memory_size": 64},
    ) as p:
        for k in range(5):
            ids = torch.from_numpy(rng.choice(10**6, 2000, replace=False))
            p.write(ids, torch.randn(2000, 4))
            p.drop(torch.from_numpy(rng.choice(10**6, 300, replace=False)))
            p.commit(f"c{k}")
            if k % 3 == 0:
                p.snapshot(f"s{k}")
        p._store.unpin("s0")
        p.gc()
    data = path / "index.lmdb" / "data.mdb"
    meta = read_meta(data)
    used = check_trees(data, meta)
    assert 2 < len(used) <= meta.last_page + 1
    raw = data.read_bytes()
    branch = [p for p in used.tolist() if struct.unpack_from("<H", raw, p * 4096 + 10)[0] & 1]
    assert branch, "the row index should need branch pages"
    with dpsn.open(path) as p:
        assert p.verify().ok


def test_a_damaged_next_segment_never_overwrites_a_live_segment(tmp_path):
    import lmdb

    path = tmp_path / "s"
    with dpsn.create(
        path, rows=100, dim=4, generator={"kind": "hashed_slices", "memory_size": 64}
    ) as p:
        p.write([1], torch.ones(1, 4))
        p.commit("a")
    env = lmdb.open(str(path / "index.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        txn.delete(b"digests", db=meta)  # a store without digests: only this check stands
        txn.put(b"next_segment", struct.pack(">Q", 1), db=meta)
    env.close()
    with dpsn.open(path, "r+") as p:
        p.write([2], torch.ones(1, 4))
        with pytest.raises(errors.CorruptStoreError, match="next segment"):
            p.commit("b")
    with dpsn.open(path) as p:
        assert torch.equal(p.delta([1]), torch.ones(1, 4))


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("hashed_slices", {}),
        ("hashed_slices", {"memory_size": 100, "slice_size": 7}),
        ("rf_mlp", {}),
        ("rf_mlp", {"features": 5, "hidden": 9, "layers": 0}),
        ("rf_mlp", {"features": 3, "hidden": 4, "layers": 3}),
        ("zeros", {}),
        ("region_mlp", {"rows": 1000}),
        ("region_mlp", {"rows": 1001, "region_dim": 3, "layers": 0}),
        ("region_mlp", {"rows": 50, "region_map": "block", "num_regions": 7, "hidden": 5}),
    ],
)
def test_generator_shapes_mirror_hypernet(kind, config):
    gen = make_generator(kind, dim=6, seed=0, **config)
    want = {k: list(v.shape) for k, v in gen.state_dict().items()}
    assert generator_shapes(kind, 6, gen.config()) == want


def test_generator_config_past_sane_size_is_refused():
    with pytest.raises(ValueError):
        generator_shapes("hashed_slices", 8, {"memory_size": 2**39, "slice_size": 4})
    with pytest.raises(ValueError):
        generator_shapes("rf_mlp", 8, {"layers": 10**6})
    with pytest.raises(ValueError):
        generator_shapes("region_mlp", 8, {"rows": 2**62})
    with pytest.raises(ValueError):
        generator_shapes("region_mlp", 8, {"rows": 9, "region_map": "block", "num_regions": 10})
    assert generator_shapes("some_future_kind", 8, {}) is None


TORCH_FREE = """
    import importlib.abc, sys
    from pathlib import Path
    # torch and faiss cannot be imported: the store engine (dpsn.store) must verify without them
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "faiss"):
                raise ImportError(f"{name} is blocked")
            return None
    sys.meta_path.insert(0, Block())
    from dpsn.store import PersistedStore
    with PersistedStore.open(Path(sys.argv[1]), writable=False) as store:
        report = store.verify()
    print("OK" if report.ok else "PROBLEMS", report.problems)
    print("TORCH" if any(m.split(".")[0] == "torch" for m in sys.modules) else "NO TORCH")
"""


def test_verify_needs_no_torch(tmp_path):
    path = tmp_path / "s"
    with dpsn.create(path, rows=10**6, dim=4, generator={"kind": "rf_mlp", "hidden": 8}) as p:
        p.write([1, 2], torch.ones(2, 4))
        p.save_router("r", dpsn.index.ProductKeyRouter(d_in=4, num_rows=10**6, k=2, d_key=4))
        p.commit("a")
        p.snapshot("s")
    root = Path(dpsn.__file__).parent.parent
    code = textwrap.dedent(TORCH_FREE)
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "OK []" in out.stdout and "NO TORCH" in out.stdout, out.stdout + out.stderr[-3000:]
    router = next(p for p in (path / "data.zarr" / "routers" / "r").iterdir() if p.is_dir())
    chunk = max(
        (p for p in router.rglob("*") if p.is_file() and p.name != "zarr.json"),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    chunk.write_bytes(bytes(raw))
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "PROBLEMS" in out.stdout and "router 'r'" in out.stdout, out.stdout + out.stderr
    assert "NO TORCH" in out.stdout


def test_store_digests_cover_every_database():
    assert {d.decode() for d in DIGESTED_DBS} == {
        "meta",
        "rows",
        "commits",
        "segments",
        "snapshots",
    }
