"""A damaged or hostile store cannot crash dpsn, fool verify or exhaust memory; no races at
create or snapshot (issue 14). One regression test per finding, each on a real store."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

import dpsn
import dpsn.index
from dpsn import errors
from dpsn.store import PersistedStore
from dpsn.store._digest import seal_record

SMALL = {"kind": "hashed_slices", "memory_size": 256, "slice_size": 4}
DIM = 8


def make(path: Path, rows: int = 199, **kw) -> None:
    """A store with ``rows`` persisted rows over two commits, a snapshot of the first."""
    with dpsn.create(path, rows=10**6, dim=DIM, seed=3, chunk_rows=16, generator=SMALL, **kw) as p:
        half = rows // 2
        p.write(torch.arange(half) * 5, torch.randn(half, DIM))
        p.commit("a")
        p.snapshot("s1")
        p.write(torch.arange(half, rows) * 5, torch.randn(rows - half, DIM))
        p.commit("b")


def reads(path: Path, **kw) -> torch.Tensor:
    with dpsn.open(path, **kw) as p:
        return p.read(torch.arange(0, 1000))


def run_py(code: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def edit_lmdb(path: Path, fn) -> None:
    """Change a closed store's LMDB index directly (what damage or a crafted store does)."""
    env = lmdb.open(str(path / "index.lmdb"), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            dbs = {
                n: env.open_db(n, txn=txn, create=False)
                for n in (b"meta", b"rows", b"commits", b"segments", b"snapshots")
            }
            fn(txn, dbs)
    finally:
        env.close()


def as_legacy(txn, dbs) -> None:
    """Drop the digests, so what is tested is the cross-check itself, not the digest that would
    catch it first (verify also reports the lost digests: the commits carry index_digest)."""
    txn.delete(b"digests", db=dbs[b"meta"])


def verify(path: Path) -> list[str]:
    store = PersistedStore.open(path, writable=False)
    try:
        return store.verify().problems
    finally:
        store.close()


# -- 1. the LMDB index has an integrity check ----------------------------------------------------


def test_truncated_lmdb_file_is_an_error_never_a_signal(tmp_path):
    """Cut at page boundaries and inside pages; each open and verify runs in one child process:
    a SIGBUS would kill it (rc < 0) instead of printing a line per length."""
    path = tmp_path / "s"
    make(path)
    data = path / "index.lmdb" / "data.mdb"
    size = data.stat().st_size
    lengths = sorted({0, 1, 100, 4095, 4096, 4097, 8192, 12000, size // 2, size - 4096, size - 1})
    code = """
        import shutil, sys, dpsn
        from pathlib import Path
        from dpsn.store import PersistedStore
        src, work = Path(sys.argv[1]), Path(sys.argv[2])
        original = (src / "index.lmdb" / "data.mdb").read_bytes()
        for n in map(int, sys.argv[3:]):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(src, work)
            (work / "index.lmdb" / "data.mdb").write_bytes(original[:n])
            (work / "index.lmdb" / "lock.mdb").unlink(missing_ok=True)
            for what, fn in (("open", lambda: dpsn.open(work).close()),
                             ("verify", lambda: PersistedStore.open(work, writable=False))):
                try:
                    fn()
                    print(n, what, "opened", flush=True)
                except dpsn.errors.CorruptStoreError as e:
                    print(n, what, "corrupt", flush=True)
            print(n, "size after", (work / "index.lmdb" / "data.mdb").stat().st_size, flush=True)
    """
    out = run_py(code, str(path), str(tmp_path / "w"), *map(str, lengths))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for n in lengths:
        assert f"{n} open corrupt" in out.stdout and f"{n} verify corrupt" in out.stdout
        assert f"{n} size after {n}" in out.stdout  # not re-initialised, not grown


def test_a_meta_page_naming_more_pages_than_any_index_is_damage(tmp_path):
    """Review of issue 14: the walk sized a page map from the meta page's last page, which a
    sparse file backs whatever it says: a MemoryError (or a huge allocation), not damage."""
    from dpsn.store._lmdbfile import MAX_FILE_BYTES, read_meta

    path = tmp_path / "s"
    make(path, rows=10)
    data = path / "index.lmdb" / "data.mdb"
    meta = read_meta(data)
    huge = MAX_FILE_BYTES // meta.page_size
    with open(data, "r+b") as f:  # last_page of the newer meta page (after its header)
        f.seek((meta.txnid & 1) * meta.page_size + 16 + 4 + 4 + 8 + 8 + 48 + 48)
        f.write(struct.pack("<Q", huge))
    for attempt in (lambda: dpsn.open(path), lambda: PersistedStore.open(path, writable=False)):
        with pytest.raises(errors.CorruptStoreError, match="dpsn lets an index grow to"):
            attempt()


def _find_live(data: Path, needle: bytes) -> int:
    """Where ``needle`` is in a page the newest transaction uses (freed pages keep old
    copies of entries)."""
    from dpsn.store._lmdbfile import check_trees, read_meta

    meta = read_meta(data)
    used = set(check_trees(data, meta).tolist())
    raw = data.read_bytes()
    hits = []
    at = raw.find(needle)
    while at >= 0:
        page, offset = divmod(at, meta.page_size)
        upper = struct.unpack_from("<H", raw, page * meta.page_size + 14)[0]
        if page in used and offset >= upper:  # not in the unused gap of a page
            hits.append(at)
        at = raw.find(needle, at + 1)
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize("where", ["key", "segment", "offset"])
def test_flipped_byte_in_the_row_index_is_caught_on_open_and_by_verify(tmp_path, where):
    """Issue: one flipped byte in a leaf page made 81 of 199 rows read as procedural while
    verify exited 0. Now the row index is checked against its digest when it is loaded."""
    path = tmp_path / "s"
    make(path)
    with dpsn.open(path) as p:
        seg, off, com = p._store.load_head()[1].segment[7], 7, p.row_commits([35])[0]
    raw = (path / "index.lmdb" / "data.mdb").read_bytes()
    entry = struct.pack(">Q", 35) + struct.pack("<QQQ", seg, off, com)
    at = _find_live(path / "index.lmdb" / "data.mdb", entry)
    at += {"key": 7, "segment": 8, "offset": 16}[where]
    damaged = bytearray(raw)
    damaged[at] ^= 0x01
    (path / "index.lmdb" / "data.mdb").write_bytes(bytes(damaged))
    with pytest.raises(errors.CorruptStoreError, match=r"digest|order"):
        dpsn.open(path)
    assert verify(path)


def test_lost_digests_of_a_store_that_keeps_them_are_a_problem(tmp_path):
    """Review of issue 14: deleting meta/digests from a store whose commits carry index_digest
    made verify note "written by a dpsn that did not keep them" and pass."""
    path = tmp_path / "s"
    make(path, rows=10)
    edit_lmdb(path, as_legacy)
    problems = verify(path)
    assert any("no meta/digests" in p for p in problems), problems


def test_verify_compares_the_index_with_the_commit_record(tmp_path):
    path = tmp_path / "s"
    make(path)

    def lose_a_row(txn, dbs):
        as_legacy(txn, dbs)
        txn.delete(struct.pack(">Q", 35), db=dbs[b"rows"])

    edit_lmdb(path, lose_a_row)
    with pytest.raises(errors.CorruptStoreError, match="198 rows but commit 3 recorded 199"):
        dpsn.open(path)
    problems = verify(path)
    assert any("198 rows but commit 3 recorded 199" in p for p in problems)


def test_verify_checks_snapshot_arrays_and_records(tmp_path):
    path = tmp_path / "s"
    make(path)
    snap = next(p for p in (path / "data.zarr" / "snapshots").iterdir() if p.is_dir())
    chunk = snap / "offset" / "c" / "0"
    original = chunk.read_bytes()
    chunk.write_bytes(original[:-3] + bytes([original[-3] ^ 0xFF]) + original[-2:])
    assert any("snapshot 's1'" in p for p in verify(path))
    with pytest.raises(errors.CorruptStoreError):
        dpsn.open(path, at="s1")
    chunk.write_bytes(original)
    assert verify(path) == []

    def repoint(txn, dbs):  # the record names another commit, consistently resealed
        as_legacy(txn, dbs)
        rec = json.loads(txn.get(b"s1", db=dbs[b"snapshots"]))
        rec["commit"] = 3
        txn.put(b"s1", seal_record(rec), db=dbs[b"snapshots"])

    edit_lmdb(path, repoint)
    assert any("snapshot 's1'" in p and "recorded" in p for p in verify(path))


def test_edited_manifest_is_refused(tmp_path):
    """Issue: a manifest edited to dim 17 passed verify, then every read failed with a numpy
    ValueError. A manifest is checked against the digest commit 1 holds of it."""
    path = tmp_path / "s"
    make(path)
    for field, value in (("dim", 17), ("seed", 4), ("chunk_rows", 32)):
        m = json.loads((path / "dpsn.json").read_text())
        saved = m[field]
        m[field] = value
        (path / "dpsn.json").write_text(json.dumps(m))
        with pytest.raises(errors.CorruptStoreError, match="not the manifest"):
            dpsn.open(path)
        with pytest.raises(errors.CorruptStoreError):
            PersistedStore.open(path, writable=False)
        m[field] = saved
        (path / "dpsn.json").write_text(json.dumps(m))
    assert verify(path) == []


MALFORMED = {
    "zero chunk_rows": lambda r: r | {"chunk_rows": 0},
    "checksums not a dict": lambda r: r | {"checksums": "abc"},
    "missing rows": lambda r: {k: v for k, v in r.items() if k != "rows"},
    "huge id": lambda r: r | {"id": 2**70},
    "bool dim": lambda r: r | {"dim": True},
    "too few checksums": lambda r: r | {"checksums": {**r["checksums"], "ids": []}},
}


@pytest.mark.parametrize("how", [*MALFORMED, "deep nesting", "not json"])
def test_verify_reports_malformed_records_instead_of_raising(tmp_path, how):
    """Issue: verify raised ZeroDivisionError, TypeError, struct.error, KeyError and
    RecursionError on malformed records. Written unsealed, as an older dpsn would."""
    path = tmp_path / "s"
    make(path)

    def damage(txn, dbs):
        as_legacy(txn, dbs)
        key = struct.pack(">Q", 1)
        rec = json.loads(txn.get(key, db=dbs[b"segments"]))
        rec.pop("record_xxh64")
        if how == "deep nesting":
            raw = b"[" * 100_000 + b"]" * 100_000
        elif how == "not json":
            raw = b"\xff\xfe{"
        else:
            raw = json.dumps(MALFORMED[how](rec)).encode()
        txn.put(key, raw, db=dbs[b"segments"])

    edit_lmdb(path, damage)
    problems = verify(path)
    assert any("segment 0000000000000001" in p for p in problems), problems
    with dpsn.open(path) as p, pytest.raises(errors.CorruptStoreError):
        p.read(torch.arange(0, 1000, 5))


def test_a_reader_never_writes_a_byte(tmp_path):
    """Issue: a mode="r" reader opened an LMDB write transaction (and re-initialised an empty
    data.mdb). Every file but LMDB's lock file keeps its bytes and its mtime."""
    path = tmp_path / "s"
    make(path)
    with dpsn.open(path, "r+") as w:
        w.save_router("r", dpsn.index.ProductKeyRouter(d_in=4, num_rows=10**6, k=2, d_key=4))
        w.commit("router")

    def files():
        return {
            p: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in path.rglob("*")
            if p.is_file() and p.name != "lock.mdb"
        }

    before = files()
    time.sleep(0.01)
    with dpsn.open(path) as r:
        assert r._store._env.env.flags()["readonly"]
        r.read(torch.arange(100))
        r.info(), r.log(), r.snapshots(), r.refresh()
        assert r.verify().ok
        r.load_router("r")
    with dpsn.open(path, at="s1") as old:
        old.delta(torch.arange(100))
    assert PersistedStore.open(path, writable=False).verify().ok
    assert files() == before


def test_an_empty_lmdb_file_is_not_reinitialised(tmp_path):
    path = tmp_path / "s"
    make(path)
    (path / "index.lmdb" / "data.mdb").write_bytes(b"")
    with pytest.raises(errors.CorruptStoreError, match="empty"):
        dpsn.open(path)
    with pytest.raises(errors.CorruptStoreError, match="empty"):
        dpsn.open(path, "r+")
    assert (path / "index.lmdb" / "data.mdb").stat().st_size == 0


def test_a_reader_then_a_writer_in_one_process(tmp_path):
    """Both share one LMDB environment; the reader opened it read-only, so the writer's
    arrival reopens it writable in place."""
    path = tmp_path / "s"
    make(path)
    r = dpsn.open(path)
    rows = r.read(torch.arange(20))
    with dpsn.open(path, "r+") as w:
        assert r._store._env is w._store._env and not r._store._env.env.flags()["readonly"]
        w.write([1], torch.ones(1, DIM))
        w.commit("c")
    assert torch.equal(r.read(torch.arange(20)), rows)  # still its commit
    assert r.refresh() == 4 and torch.equal(r.delta([1]), torch.ones(1, DIM))
    assert r.verify().ok
    r.close()


# -- 2. resource bounds --------------------------------------------------------------------------

PEAK = """
    import resource, sys, dpsn
    from pathlib import Path
    from dpsn.store import PersistedStore
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10  # MiB
    path = Path(sys.argv[1])
    store = PersistedStore.open(path, writable=False)
    store.verify()  # warm: every module loaded, caches filled
    base = peak()
    print("STORE", store.verify().problems[:1], flush=True)
    store.close()
    with dpsn.open(path, cache_rows=0) as p:
        print("POOL", p.verify().problems[:1], flush=True)
        try:
            if p.routers():
                p.load_router("r")
                print("LOADED")
        except dpsn.errors.CorruptStoreError as e:
            print("REFUSED", e)
        try:
            {read}
            print("READ")
        except dpsn.errors.CorruptStoreError as e:
            print("READ REFUSED", e)
    print("PEAK", peak() - base, flush=True)
"""


def test_a_router_config_asking_for_gigantic_arrays_is_refused_before_allocating(tmp_path):
    """Issue: d_in=2**19, num_rows=2**36, heads=4, d_key=128 in a router's config (with its
    self-digest recomputed) made verify peak at 3.25 GB before it refused the router."""
    from dpsn.index._persist import _manifest_digest

    path = tmp_path / "s"
    make(path)
    with dpsn.open(path, "r+") as w:
        w.save_router("r", dpsn.index.ProductKeyRouter(d_in=4, num_rows=10**6, k=2, d_key=4))
        w.commit("router")
    group = next(p for p in (path / "data.zarr" / "routers" / "r").iterdir() if p.is_dir())
    meta = json.loads((group / "zarr.json").read_text())
    m = meta["attributes"]["dpsn_router"]
    m["config"].update(d_in=2**19, num_rows=2**36, heads=4, d_key=128)
    m["digest"] = _manifest_digest(
        m["kind"], m["config"], {n: e["blake2b"] for n, e in m["arrays"].items()}
    )
    (group / "zarr.json").write_text(json.dumps(meta))
    # and the same group loaded on its own, without the commit's digest to compare: the build
    # itself is held to a budget and refused before the allocation
    direct = f"""
    import zarr, dpsn.index
    group = zarr.open_group({str(path / "data.zarr")!r}, mode="r")["routers/r/{group.name}"]
    try:
        dpsn.index.load_router(group)
    except dpsn.errors.CorruptStoreError as e:
        print("DIRECT REFUSED", e)
    """
    code = textwrap.dedent(PEAK).replace("{read}", "pass") + textwrap.dedent(direct) + _PEAK_AGAIN
    out = run_py(code, str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED" in out.stdout and "router 'r'" in out.stdout
    assert "DIRECT REFUSED" in out.stdout and "more memory than its saved state" in out.stdout
    assert int(out.stdout.split("PEAK")[1].split()[0]) < 100, out.stdout  # MiB over baseline
    assert int(out.stdout.split("AGAIN")[1].split()[0]) < 100, out.stdout


_PEAK_AGAIN = """
print("AGAIN", peak() - base, flush=True)
"""


def test_verify_checks_a_hostile_segments_chunks_one_at_a_time(tmp_path):
    """Review of issue 14: a segment read decoded its whole span before comparing checksums,
    so a record and zarr.json claiming 3 GiB of ids (chunks missing: they read as zeros) made
    verify allocate all of it before the first checksum failed."""
    path = tmp_path / "s"
    make(path)
    rows, chunk = 24 << 24, 1 << 24  # 24 chunks of 128 MiB of int64 ids

    def grow(txn, dbs):
        as_legacy(txn, dbs)
        key = struct.pack(">Q", 1)
        rec = json.loads(txn.get(key, db=dbs[b"segments"]))
        rec |= {"rows": rows, "chunk_rows": chunk}
        rec["checksums"] |= {"ids": [0] * (rows // chunk), "deltas": [0] * (rows // chunk)}
        txn.put(key, seal_record(rec), db=dbs[b"segments"])

    edit_lmdb(path, grow)
    ids = path / "data.zarr" / "segments" / f"{1:016x}" / "ids"
    meta = json.loads((ids / "zarr.json").read_text())
    meta["shape"] = [rows]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [chunk]
    (ids / "zarr.json").write_text(json.dumps(meta))
    import shutil

    shutil.rmtree(ids / "c")
    out = run_py(
        """
        import resource, sys
        from pathlib import Path
        from dpsn.store import PersistedStore
        store = PersistedStore.open(Path(sys.argv[1]), writable=False)
        problems = store.verify().problems
        print("CHUNK", any("ids chunks 0..0" in p for p in problems), flush=True)
        print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10, flush=True)
        """,
        str(path),
    )
    assert "CHUNK True" in out.stdout, out.stdout + out.stderr[-2000:]
    peak = int(out.stdout.split("PEAK")[1])
    # 3 GiB if the span were read whole; ~0.5 GiB here alone, up to ~1.1 GiB seen when two
    # 128 MiB chunk decodes overlapped on a loaded machine
    assert peak < 1536, f"verify peaked at {peak} MiB"


def test_a_snapshot_record_with_the_wrong_rows_is_refused_before_reading(tmp_path):
    path = tmp_path / "s"
    make(path)

    def inflate(txn, dbs):
        as_legacy(txn, dbs)
        rec = json.loads(txn.get(b"s1", db=dbs[b"snapshots"]))
        txn.put(b"s1", seal_record(rec | {"rows": 1 << 40}), db=dbs[b"snapshots"])

    edit_lmdb(path, inflate)
    with pytest.raises(errors.CorruptStoreError, match="recorded"):
        dpsn.open(path, at="s1")
    assert any("recorded" in p for p in verify(path))


def _bomb_chunk(path: Path) -> tuple[Path, str]:
    seg = path / "data.zarr" / "segments" / "0000000000000001" / "deltas"
    return seg / "c" / "1" / "0", "0000000000000001"


@pytest.mark.parametrize("compressor", ["lz4", "zstd"])
def test_a_chunk_that_decompresses_huge_is_refused_before_decoding(tmp_path, compressor):
    """Issue: a Blosc chunk that decompresses huge added 370 MB before its checksum failed.
    The decoded size a chunk's header declares is checked against the chunk's size first."""
    import numcodecs.blosc
    import numcodecs.zstd

    path = tmp_path / "s"
    make(path, compressor=compressor)
    chunk, name = _bomb_chunk(path)
    zeros = np.zeros(96 << 20, dtype=np.uint8)  # 96 MiB that compress to almost nothing
    if compressor == "lz4":
        bomb = numcodecs.blosc.compress(zeros, b"lz4", 5, 1)
    else:
        bomb = numcodecs.zstd.compress(zeros, 1)
    del zeros
    chunk.write_bytes(bomb)
    out = run_py(PEAK.replace("{read}", "p.read(list(range(0, 1000, 5)))"), str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "READ REFUSED" in out.stdout and f"segment {name}" in out.stdout, out.stdout
    assert f"segment {name}" in out.stdout.split("STORE")[1].split("\n")[0]
    assert int(out.stdout.split("PEAK")[1]) < 48, out.stdout  # MiB: not 96 MiB of zeros


def test_segments_accept_only_the_manifest_codec(tmp_path):
    """Issue: segments had no codec allow-list (routers did). A chunk rewritten with another
    codec that zarr would happily decode is refused."""
    import zarr
    from numcodecs.zarr3 import Zlib

    path = tmp_path / "s"
    make(path)
    arr_path = path / "data.zarr" / "segments" / "0000000000000001" / "deltas"
    data = zarr.open_array(str(arr_path), mode="r")[...]
    meta = json.loads((arr_path / "zarr.json").read_text())
    import shutil

    shutil.rmtree(arr_path)
    with pytest.warns(UserWarning):
        forged = zarr.create_array(
            str(arr_path),
            shape=data.shape,
            chunks=meta["chunk_grid"]["configuration"]["chunk_shape"],
            dtype=data.dtype,
            compressors=[Zlib(level=1)],
            fill_value=0,
        )
    forged[...] = data
    assert np.array_equal(zarr.open_array(str(arr_path), mode="r")[...], data)  # zarr reads it
    with dpsn.open(path) as p, pytest.raises(errors.CorruptSegmentError, match="codec"):
        p.read(torch.arange(0, 1000, 5))
    assert any("codec" in p for p in verify(path))


# -- 3. snapshot ---------------------------------------------------------------------------------

FULL_DISK = """
    import resource, signal, sys, torch, dpsn
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[2])
    {body}
"""


def test_snapshot_on_a_full_disk_and_its_retry(tmp_path):
    """Issue: snapshot() on a full disk raised a raw OSError, left a partial pinned group, and
    the retry "succeeded" without rewriting it; verify then passed while every gc failed."""
    path = tmp_path / "s"
    with dpsn.create(path, rows=10**9, dim=4, generator=SMALL, cache_rows=0) as p:
        p.write(torch.randperm(10**6)[:60_000] * 1000, torch.randn(60_000, 4))
        p.commit("big")
    body = """
    p = dpsn.open(sys.argv[1], mode="r+")
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        p.snapshot("v1")
        print("PINNED")
    except dpsn.errors.StoreFullError as e:
        print("FULL", isinstance(e, OSError), p.snapshots())
    """
    out = run_py(
        FULL_DISK.format(body=textwrap.indent(textwrap.dedent(body), "    ")), str(path), "50000"
    )
    assert "FULL True {}" in out.stdout, out.stdout + out.stderr[-2000:]
    snaps = path / "data.zarr" / "snapshots"
    assert not snaps.exists() or not any(p.is_dir() for p in snaps.iterdir())
    with dpsn.open(path) as r:
        assert r.snapshots() == {} and r.verify().ok
    # a partial group left by an older dpsn (only some columns): the retry rewrites it
    (snaps / f"{2:016x}" / "ids").mkdir(parents=True, exist_ok=True)
    with dpsn.open(path, "r+") as w:
        w.snapshot("v1")
        w.write([1], torch.ones(1, 4))
        w.commit("after")
        w.gc()
    with dpsn.open(path, at="v1") as old:
        assert old.info()["persisted_rows"] == 60_000
        assert old.verify().ok


@pytest.mark.parametrize("what", ["snapshot", "commit"])
def test_a_write_that_fails_for_another_reason_is_not_a_full_disk(tmp_path, what):
    """Review of issue 14: every OSError while writing a snapshot index (or a commit's segment)
    became StoreFullError ("free space"), whatever the cause."""
    import errno

    path = tmp_path / "s"
    with dpsn.create(path, rows=100, dim=4, generator=SMALL) as p:
        p.write([1], torch.ones(1, 4))
        p.commit("a")
    # a file where the write needs a directory: ENOTDIR, not a full disk
    blocker = (
        path / "data.zarr" / ("snapshots" if what == "snapshot" else "segments/" + "0" * 15 + "2")
    )
    blocker.write_bytes(b"")
    with dpsn.open(path, "r+") as p:
        p.write([2], torch.ones(1, 4))
        with pytest.raises(errors.StoreWriteError) as e:
            p.snapshot("x") if what == "snapshot" else p.commit("b")
        assert not isinstance(e.value, errors.StoreFullError) and isinstance(e.value, OSError)
        assert e.value.errno == errno.ENOTDIR and "Not a directory" in str(e.value)
        assert p.snapshots() == {} and p.head == 2
        blocker.unlink()
        p.snapshot("x") if what == "snapshot" else p.commit("b")
    assert not verify(path)


def test_gc_removes_unpinned_snapshot_indexes(tmp_path):
    path = tmp_path / "s"
    make(path)
    with dpsn.open(path, "r+") as w:
        w._store.unpin("s1")
        assert w.gc()["stale_versions"] == ["data.zarr/snapshots/0000000000000002"]
        assert verify(path) == []


# -- 4. create -----------------------------------------------------------------------------------

# A file system (the store's file seam, dpsn.store.fs) that stops at create's first write of
# the generator's weights: it pauses (PAUSED_CREATOR) or fails with EIO (FAILING_CREATOR).
GENERATOR_WRITE_HOOK = """
    import errno, sys, time
    from dpsn.store.fs import OsFileSystem, using
    class AtGenerator(OsFileSystem):
        def __init__(self, then):
            self.then, self.hit = then, False
        def open_write(self, path, **kw):
            if not self.hit and "/generator/" in str(path):
                self.hit = True
                self.then()
            return super().open_write(path, **kw)
"""

PAUSED_CREATOR = (
    GENERATOR_WRITE_HOOK
    + """
    import torch, dpsn
    def pause():
        print("PAUSED", flush=True)
        time.sleep(3)
    with using(AtGenerator(pause)), dpsn.create(sys.argv[1], rows=100, dim=4,
            generator={"kind": "hashed_slices", "memory_size": 64}) as p:
        p.write([7], torch.full((1, 4), 7.0))
        p.commit("mine")
    print("CREATED", flush=True)
"""
)


def test_a_second_create_while_the_first_is_paused_fails_and_harms_nothing(tmp_path):
    """Issue: the emptiness check ran before the lock; a creator paused after its check wiped
    the other's committed data and both returned success."""
    path = tmp_path / "s"
    first = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PAUSED_CREATOR), str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert first.stdout.readline().strip() == "PAUSED"
    with pytest.raises(errors.StoreExistsError, match="being created"):
        dpsn.create(path, rows=100, dim=4)
    out, _ = first.communicate(timeout=120)
    assert "CREATED" in out and first.returncode == 0
    with dpsn.open(path) as p:
        assert p.head == 2 and torch.equal(p.delta([7]), torch.full((1, 4), 7.0))
        assert p.verify().ok
    with pytest.raises(errors.StoreExistsError, match="not an empty directory"):
        dpsn.create(path, rows=100, dim=4)


FAILING_CREATOR = (
    GENERATOR_WRITE_HOOK
    + """
    import dpsn
    def fail():
        print("PAUSED", flush=True)
        sys.stdin.readline()
        raise OSError(errno.EIO, "injected I/O error")
    try:
        with using(AtGenerator(fail)):
            dpsn.create(sys.argv[1], rows=100, dim=4,
                        generator={"kind": "hashed_slices", "memory_size": 64})
    except OSError as e:
        print("FAILED", type(e).__name__, e, flush=True)
"""
)


def test_a_failed_create_leaves_a_sibling_store_under_its_new_parent_intact(tmp_path):
    """Review of issue 14: a failed create removed the directories it had made with rmtree,
    including a new parent in which another process had since created its own store."""
    parent = tmp_path / "new"
    first = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(FAILING_CREATOR), str(parent / "a")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert first.stdout.readline().strip() == "PAUSED"  # it made new/ and new/a
    with dpsn.create(parent / "b", rows=100, dim=4, generator=SMALL) as p:
        p.write([7], torch.full((1, 4), 7.0))
        p.commit("mine")
    out, _ = first.communicate("go\n", timeout=120)
    assert "FAILED StoreWriteError" in out and "injected" in out  # typed, the cause kept
    assert not (parent / "a").exists()
    with dpsn.open(parent / "b") as p:
        assert p.head == 2 and torch.equal(p.delta([7]), torch.full((1, 4), 7.0))
        assert p.verify().ok


@pytest.mark.slow
def test_concurrent_creators_exactly_one_wins(tmp_path):
    path = tmp_path / "s"
    code = """
        import sys, torch, dpsn
        try:
            with dpsn.create(sys.argv[1], rows=100, dim=4,
                             generator={"kind": "hashed_slices", "memory_size": 64}) as p:
                p.write([int(sys.argv[2])], torch.ones(1, 4))
                p.commit(sys.argv[2])
            print("WON")
        except dpsn.errors.StoreExistsError:
            print("LOST")
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(path), str(i)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outs = [p.communicate(timeout=180)[0].strip() for p in procs]
    assert sorted(outs) == ["LOST", "LOST", "LOST", "WON"], outs
    winner = outs.index("WON")
    with dpsn.open(path) as p:
        assert p.log()[-1].message == str(winner) and p.verify().ok


@pytest.mark.parametrize(
    "bad",
    [
        {"cache_rows": -1},
        {"cache_rows": 2**40},
        {"device": "bogus"},
        {"device": "cuda:99"},
        {"chunk_rows": 2**30},
        {"map_size": 10},
        {"policy": "nope"},
    ],
)
def test_create_checks_every_argument_before_touching_the_disk(tmp_path, bad):
    """Issue: cache_rows=-1 and device="bogus" wrote a whole store before failing, and the
    retry then got StoreExistsError."""
    path = tmp_path / "new" / "s"
    with pytest.raises(ValueError):
        dpsn.create(path, rows=100, dim=4, **bad)
    assert not (tmp_path / "new").exists()
    with dpsn.create(path, rows=100, dim=4, generator=SMALL) as p:
        assert p.head == 1


def test_create_on_a_full_disk_leaves_nothing_behind(tmp_path):
    """Issue: create on a full disk left folders that blocked a retry. A new path (with a new
    parent) and an empty directory, each created under a file-size limit."""
    body = """
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    for target in sys.argv[3:]:
        try:
            dpsn.create(target, rows=100, dim=4, generator={"kind": "rf_mlp", "hidden": 512})
            print("CREATED")
        except dpsn.errors.StoreFullError as e:
            print("FULL", isinstance(e, OSError))
    """
    (tmp_path / "empty").mkdir()
    targets = [tmp_path / "a" / "b", tmp_path / "empty"]
    out = run_py(
        FULL_DISK.format(body=textwrap.indent(textwrap.dedent(body), "    ")),
        "",
        "20000",
        *map(str, targets),
    )
    assert out.stdout.split() == ["FULL", "True"] * 2, out.stdout + out.stderr[-2000:]
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    for target in targets:
        with dpsn.create(target, rows=100, dim=4, generator={"kind": "rf_mlp", "hidden": 512}):
            pass


# -- generator weights over 1 GiB (review of issue 14) --------------------------------------------


@pytest.mark.parametrize(
    "shape", [(393_216, 1024), (2**29,), (3, 2**27), (2, 3, 2**26), (5, 7), (1,), (0, 4)]
)
def test_generator_arrays_are_written_in_chunks_a_reader_accepts(shape):
    """Review of issue 14: generator weights over 1 GiB were written as one chunk, which the
    reader refuses (at most 1 GiB a chunk), so the store could never be opened again."""
    from dpsn.store._generators import GENERATOR_CHUNK_BYTES, generator_chunks
    from dpsn.store._zarrsafe import MAX_CHUNK_BYTES

    chunks = generator_chunks(shape)
    assert len(chunks) == len(shape)
    assert all(1 <= c <= max(1, s) for c, s in zip(chunks, shape, strict=True))
    assert 4 * np.prod(chunks) <= GENERATOR_CHUNK_BYTES < MAX_CHUNK_BYTES
    if 4 * np.prod(shape) <= GENERATOR_CHUNK_BYTES:
        assert chunks == tuple(max(1, s) for s in shape)  # small weights: one chunk, as before


def test_a_generator_written_in_many_chunks_reopens(tmp_path, monkeypatch):
    import dpsn.store._generators as persisted

    monkeypatch.setattr(persisted, "GENERATOR_CHUNK_BYTES", 1024)  # weights of ~10 KiB
    path = tmp_path / "s"
    gen = {"kind": "rf_mlp", "hidden": 512}
    with dpsn.create(path, rows=1000, dim=4, generator=gen) as p:
        p.write([3], torch.ones(1, 4))
        p.commit("one")
        want = p.read(torch.arange(100))
    monkeypatch.undo()
    gen_dir = path / "data.zarr" / "generator"
    assert max(len(list(a.rglob("c/*"))) for a in gen_dir.glob("*/*")) > 1
    with dpsn.open(path) as p:
        assert torch.equal(p.read(torch.arange(100)), want)
        assert p.verify().ok


@pytest.mark.parametrize(
    "state",
    [
        {f"w{i}": np.zeros(1, np.float32) for i in range(4097)},
        {"w": np.zeros((1,) * 9, np.float32)},
        {"w": np.broadcast_to(np.float32(0), (2**20, 2**20))},
        {"../w": np.zeros(1, np.float32)},
    ],
    ids=["arrays", "ndim", "elements", "name"],
)
def test_create_refuses_generator_weights_a_reader_would_refuse(tmp_path, state):
    from dpsn.store._format import Manifest

    manifest = Manifest(
        rows=10, dim=4, dtype="float32", seed=0, generator={"kind": "zeros", "config": {}},
        chunk_rows=16, compressor="zstd", created=0.0, uuid="x",
    )  # fmt: skip
    with pytest.raises(errors.InvalidArgumentError):
        PersistedStore.create(tmp_path / "s", manifest, state)
    assert not (tmp_path / "s").exists()


# -- 6. typed errors for bad input ---------------------------------------------------------------


@pytest.mark.parametrize("at", [-1, 0, 2**64, 2**63, "9" * 30, "\u0663"])
def test_bad_commit_ids_are_snapshot_not_found(tmp_path, at):
    path = tmp_path / "s"
    make(path, rows=10)
    with pytest.raises(errors.SnapshotNotFoundError) as e:
        dpsn.open(path, at=at)
    assert isinstance(e.value, LookupError)


@pytest.mark.parametrize(
    "bad, builtin",
    [
        ({"rows": "x"}, TypeError),
        ({"rows": 0}, ValueError),
        ({"dim": 0}, ValueError),
        ({"dim": 4.0}, TypeError),
        ({"seed": -1}, ValueError),
        ({"compressor": "foo"}, ValueError),
        ({"chunk_rows": 0}, ValueError),
        ({"chunk_rows": "x"}, ValueError),
        ({"generator": {"kind": "nope"}}, ValueError),
        ({"generator": "nope"}, ValueError),
        ({"generator": {"memory_size": 64}}, ValueError),
        ({"generator": {"kind": "hashed_slices", "memory_size": -5}}, ValueError),
        ({"generator": {"kind": "hashed_slices", "bogus": 1}}, ValueError),
        ({"generator": 5}, TypeError),
        ({"dtype": "int7"}, TypeError),
        ({"dtype": torch.int32}, TypeError),
        ({"policy": "nope"}, ValueError),
        ({"policy": ["lru"]}, ValueError),
    ],
)
def test_bad_create_arguments_are_dpsn_errors(tmp_path, bad, builtin):
    """Review of issue 14: these raised plain TypeError or ValueError."""
    with pytest.raises(errors.DpsnError) as e:
        dpsn.create(tmp_path / "s", **({"rows": 100, "dim": 4} | bad))
    assert isinstance(e.value, builtin)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "bad, builtin",
    [
        ({"at": True}, TypeError),
        ({"at": 1.5}, TypeError),
        ({"at": b"1"}, TypeError),
        ({"mode": "w"}, ValueError),
        ({"mode": "r+", "at": 1}, ValueError),
        ({"policy": "nope"}, ValueError),
    ],
)
def test_bad_open_arguments_are_dpsn_errors(tmp_path, bad, builtin):
    path = tmp_path / "s"
    make(path, rows=10)
    with pytest.raises(errors.DpsnError) as e:
        dpsn.open(path, **bad)
    assert isinstance(e.value, builtin)


def test_tensors_on_the_meta_device_are_typed_errors(tmp_path):
    path = tmp_path / "s"
    make(path, rows=10)
    meta_ids = torch.empty(3, dtype=torch.int64, device="meta")
    with dpsn.open(path, "r+") as p:
        with pytest.raises(errors.InvalidIdsError, match="meta device"):
            p.read(meta_ids)
        with pytest.raises(errors.InvalidIdsError):
            p.write(meta_ids, torch.zeros(3, DIM))
        with pytest.raises(errors.InvalidDeltaError, match="meta device"):
            p.write([1, 2, 3], torch.zeros(3, DIM, device="meta"))
        assert p.staged_rows == 0


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "meta", "xla"])
def test_bad_devices_are_value_errors_before_anything_is_opened(tmp_path, device):
    path = tmp_path / "s"
    make(path, rows=10)
    with pytest.raises(errors.InvalidDeviceError) as e:
        dpsn.open(path, device=device)
    assert isinstance(e.value, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_says_so(tmp_path):
    with pytest.raises(errors.InvalidDeviceError, match="no usable CUDA"):
        dpsn.create(tmp_path / "s", rows=10, dim=4, device="cuda")
    assert not (tmp_path / "s").exists()


def test_a_cache_larger_than_memory_names_its_size(tmp_path):
    path = tmp_path / "s"
    make(path, rows=10)
    with pytest.raises(errors.CacheTooLargeError, match=r"cache_rows=1099511627776 needs") as e:
        dpsn.open(path, cache_rows=2**40)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, ValueError)
    assert "TiB" in str(e.value) and "use at most cache_rows=" in str(e.value)


@pytest.mark.parametrize("name", ["\udc80", "a\x00b", "", "x" * 201, "12", "a/b", "\u0663", 7])
def test_odd_snapshot_names_are_value_errors(tmp_path, name):
    path = tmp_path / "s"
    make(path, rows=10)
    with dpsn.open(path, "r+") as p:
        with pytest.raises(errors.InvalidSnapshotNameError) as e:
            p.snapshot(name)
        assert isinstance(e.value, ValueError)
        assert p.snapshots() == {"s1": 2}
