"""Issue 21, findings 5, 6, 8 and the small ones: readers without a lease say so; no file of a
store (a FIFO, a device link, a directory where a file belongs) makes a process hang, read
without end or die; a file cut under a mapped reader is a typed error, not SIGBUS."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import dpsn
from dpsn.errors import CorruptStoreError, DpsnError
from dpsn.store import _runs as runs

ROWS = 64


def _store(path, commits=2):
    with dpsn.create(
        path, rows=ROWS, dim=4, chunk_rows=4, generator={"kind": "zeros"}, cache_rows=0
    ) as pool:
        for k in range(commits):
            pool.write(torch.arange(8 * k, 8 * k + 8), torch.full((8, 4), float(k + 1)))
            pool.commit(f"c{k}")
        return pool.delta(torch.arange(ROWS)).clone()


# -- finding 5: lease-less readers --------------------------------------------------------------


def test_a_reader_that_cannot_lease_warns_and_says_so_in_info(tmp_path):
    path = tmp_path / "s"
    want = _store(path)
    (path / "readers").write_text("not a folder")  # no lease can be made
    with pytest.warns(dpsn.LeaseWarning, match="lease"):
        r = dpsn.open(path)
    try:
        assert r.info()["reader_lease"] is False
        assert torch.equal(r.delta(torch.arange(ROWS)), want)
    finally:
        r.close()
    (path / "readers").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", dpsn.LeaseWarning)
        with dpsn.open(path) as r:
            assert r.info()["reader_lease"] is True


# -- finding 6: special files never block or read without end ------------------------------------


def _in_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with a deadline: a hang fails the test instead of
    hanging the suite."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _replace_with_fifo(path):
    path.unlink()
    os.mkfifo(path)


def _lease_fifo(store):
    (store / "readers").mkdir(exist_ok=True)
    os.mkfifo(store / "readers" / "123-abcdef.lease")


SPECIALS = {
    "runs.json fifo": lambda s: _replace_with_fifo(s / runs.RUNS_DIR / runs.RUNS_MANIFEST),
    "runs.json /dev/zero": lambda s: (
        (s / runs.RUNS_DIR / runs.RUNS_MANIFEST).unlink(),
        (s / runs.RUNS_DIR / runs.RUNS_MANIFEST).symlink_to("/dev/zero"),
    ),
    "run file fifo": lambda s: _replace_with_fifo(
        s
        / runs.RUNS_DIR
        / json.loads((s / runs.RUNS_DIR / runs.RUNS_MANIFEST).read_text())["runs"][0]["file"]
    ),
    "run file /dev/zero": lambda s: (
        (
            p := s
            / runs.RUNS_DIR
            / json.loads((s / runs.RUNS_DIR / runs.RUNS_MANIFEST).read_text())["runs"][0]["file"]
        ).unlink(),
        p.symlink_to("/dev/zero"),
    ),
    "lease fifo": _lease_fifo,
    "chunk fifo": lambda s: _replace_with_fifo(_first(s, "segments", "c")),
    "array zarr.json fifo": lambda s: _replace_with_fifo(_first(s, "segments", "zarr.json")),
    "group zarr.json fifo": lambda s: _replace_with_fifo(s / "data.zarr" / "zarr.json"),
    "chunk /dev/zero": lambda s: (
        (p := _first(s, "segments", "c")).unlink(),
        p.symlink_to("/dev/zero"),
    ),
}


def _first(store, group, kind):
    """The first chunk file (``kind="c"``) or array ``zarr.json`` under a Zarr group."""
    files = sorted((store / "data.zarr" / group).rglob("*"))
    if kind == "c":
        return next(f for f in files if f.is_file() and "/c/" in str(f))
    return next(f for f in files if f.name == "zarr.json" and f.parent.parent.name != group)


@pytest.mark.slow
@pytest.mark.parametrize("what", sorted(SPECIALS))
def test_special_files_never_hang_readers_verify_or_gc(tmp_path, what):
    path = tmp_path / "s"
    code = f"""
        from unittest import mock
        import torch, dpsn
        from dpsn.store import _runs as runs
        with mock.patch.object(runs, "RUN_MIN_ROWS", 4), mock.patch.object(runs, "FLUSH_ROWS", 6):
            with dpsn.create({str(path)!r}, rows={ROWS}, dim=4, chunk_rows=4,
                             generator={{"kind": "zeros"}}, cache_rows=0) as p:
                for k in range(4):
                    p.write(torch.arange(8 * k, 8 * k + 8), torch.full((8, 4), float(k + 1)))
                    p.commit(f"c{{k}}")
    """
    done = _in_child(code)
    assert done.returncode == 0, done.stderr
    SPECIALS[what](path)
    # Each step either works or raises a typed error; none hangs, none reads without end.
    check = f"""
        import resource, torch, dpsn
        from dpsn.errors import DpsnError
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # reading /dev/zero whole fails
        got = None
        try:
            with dpsn.open({str(path)!r}) as r:
                try:
                    got = r.delta(torch.arange({ROWS})).clone()
                    assert float(got[:32].sum()) > 0
                except DpsnError as e:
                    print("read:", type(e).__name__, e)
                r.verify()
            with dpsn.open({str(path)!r}, mode="r+") as w:
                w.gc()
                if got is not None:
                    assert torch.equal(w.delta(torch.arange({ROWS})), got)
        except DpsnError as e:
            print("open:", type(e).__name__, e)
        print("ok")
    """
    done = _in_child(check)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_read_regular_refuses_fifos_devices_and_oversize(tmp_path):
    from dpsn.store._files import NotRegularFileError, read_regular

    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFileError, match="FIFO"):
        read_regular(fifo, 100)
    with pytest.raises(NotRegularFileError, match="character device"):
        read_regular("/dev/zero", 100)
    with pytest.raises(NotRegularFileError, match="directory"):
        read_regular(tmp_path, 100)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(CorruptStoreError, match="over the 100"):
        read_regular(big, 100)
    assert read_regular(big, 101) == b"x" * 101
    assert issubclass(NotRegularFileError, DpsnError)


# -- finding 8: files cut under a mapped reader ---------------------------------------------------


@pytest.mark.parametrize("what", ["data.mdb", "run file"])
def test_a_file_cut_under_a_live_reader_is_a_typed_error_not_sigbus(tmp_path, what):
    """A backup restored with cp over a live store truncates files in place: a reader that
    mapped them gets a typed error or right rows on its next read, never SIGBUS."""
    path = tmp_path / "s"
    code = f"""
        import os, signal, torch, dpsn, json
        from pathlib import Path
        from unittest import mock
        from dpsn.errors import DpsnError
        from dpsn.store import _runs as runs
        path = Path({str(path)!r})
        with mock.patch.object(runs, "RUN_MIN_ROWS", 4), mock.patch.object(runs, "FLUSH_ROWS", 6):
            with dpsn.create(path, rows=4096, dim=4, chunk_rows=64,
                             generator={{"kind": "zeros"}}, cache_rows=0) as p:
                for k in range(4):
                    p.write(torch.arange(900 * k, 900 * k + 1000), torch.full((1000, 4), k + 1.0))
                    p.commit(f"c{{k}}")
                want = p.delta(torch.arange(4096)).clone()
        r = dpsn.open(path, cache_rows=0)
        r.delta(torch.arange(0, 4096, 1000))  # a few pages touched, most not
        if {what!r} == "data.mdb":
            victim = path / "index.lmdb" / "data.mdb"
            keep = 2 * 4096  # the meta pages survive, every other page is cut away
        else:
            doc = json.loads((path / "index.runs" / "runs.json").read_text())
            big = max(doc["runs"], key=lambda x: x["rows"])
            victim = path / "index.runs" / big["file"]
            keep = 64 + 32 * 10
        os.truncate(victim, keep)
        try:
            got = r.delta(torch.arange(4096))
            assert torch.equal(got, want), "wrong rows"
            print("ok: right rows")
        except DpsnError as e:
            print("ok: typed", type(e).__name__, str(e)[:200])
    """
    done = _in_child(code, timeout=120)
    assert done.returncode == 0 and "ok:" in done.stdout, (
        done.returncode,
        done.stdout[-1000:],
        done.stderr[-2000:],
    )


# -- finding 12: the smaller ones ------------------------------------------------------------------


def test_a_compacted_lmdb_copy_verifies_clean(tmp_path):
    """``mdb_copy -c`` (py-lmdb's ``copy(compact=True)``), the usual LMDB backup, renumbers
    pages and transaction ids: a store restored from it is healthy and verify says so."""
    import shutil

    import lmdb

    path = tmp_path / "s"
    want = _store(path, commits=3)
    backup = tmp_path / "backup"
    backup.mkdir()
    env = lmdb.open(str(path / "index.lmdb"), readonly=True, lock=False, max_dbs=16)
    env.copy(str(backup), compact=True)
    env.close()
    shutil.copy(backup / "data.mdb", path / "index.lmdb" / "data.mdb")
    (path / "index.lmdb" / "lock.mdb").unlink(missing_ok=True)
    with dpsn.open(path) as r:
        assert torch.equal(r.delta(torch.arange(ROWS)), want)
        report = r.verify()
    assert report.ok, report.problems
    with dpsn.open(path, mode="r+") as w:  # and a writer carries on from it
        w.write(torch.arange(2), torch.full((2, 4), 9.0))
        w.commit("after restore")
        assert w.verify().ok


def test_readers_as_a_file_gives_no_bare_oserror_to_gc(tmp_path):
    path = tmp_path / "s"
    _store(path)
    (path / "readers").write_text("planted")
    with dpsn.open(path, mode="r+") as w:
        w.gc()
        w.gc(dry_run=True)


def test_a_segment_id_out_of_range_is_typed(tmp_path):
    from dpsn.store import PersistedStore

    path = tmp_path / "s"
    _store(path)
    store = PersistedStore.open(path, writable=False)
    try:
        for bad in (-1, 2**64):
            with pytest.raises(CorruptStoreError, match="segment"):
                store.segment_record(bad)
    finally:
        store.close()


def test_a_read_larger_than_memory_is_a_typed_error(tmp_path):
    from dpsn.errors import InvalidIdsError

    path = tmp_path / "s"
    with dpsn.create(path, rows=10**12, dim=1024, generator={"kind": "zeros"}, cache_rows=0) as p:
        ids = torch.zeros(5 * 10**7, dtype=torch.int64)  # 200 GB of float32 rows
        with pytest.raises(InvalidIdsError, match="memory") as e:
            p.read(ids)
        assert isinstance(e.value, MemoryError)
