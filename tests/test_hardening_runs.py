"""Issue 21, findings 1-3: the row index's run files are derived data and never decide what gc
deletes; a damaged ``runs.json`` or run file never makes a read return wrong rows silently.

Each test damages a store whose index lives in run files (thresholds lowered, as in
``test_index_runs.py``) and checks the store's truth (LMDB) still wins. "Resealed" damage
rewrites ``runs.json`` with a valid checksum: what a bug in a writer (or a hand edit that knows
the format) would leave, which the checksum cannot catch, so gc and openers must not trust it.
"""

import json
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import dpsn
from dpsn.errors import CorruptStoreError
from dpsn.store import PersistedStore
from dpsn.store import _runs as runs
from dpsn.store._digest import seal_record

SMALL = {"kind": "hashed_slices", "memory_size": 1024}
ROWS = 600


@contextmanager
def small_runs():
    with (
        mock.patch.object(runs, "RUN_MIN_ROWS", 4),
        mock.patch.object(runs, "FLUSH_ROWS", 6),
        mock.patch.object(runs, "FLUSH_COMMITS", 2),
    ):
        yield


def _grow(path: Path, commits: int = 6) -> torch.Tensor:
    """A store whose HEAD rows sit in several segments, its index in run files."""
    with dpsn.create(
        path, rows=ROWS, dim=4, chunk_rows=4, generator=SMALL, cache_rows=0, compact_above=None
    ) as pool:
        for k in range(commits):
            ids = torch.arange(k * 90, k * 90 + 100) % ROWS
            pool.write(ids, torch.full((100, 4), float(k + 1)))
            pool.commit(f"c{k}")
        return pool.delta(torch.arange(ROWS)).clone()


def _manifest(path: Path) -> Path:
    return path / runs.RUNS_DIR / runs.RUNS_MANIFEST


def _doc(path: Path) -> dict:
    return json.loads(_manifest(path).read_text())


def _reseal(path: Path, doc: dict) -> None:
    """Write ``doc`` as runs.json with a checksum that matches it."""
    _manifest(path).write_bytes(seal_record(doc))


def _reads(path: Path) -> torch.Tensor:
    with dpsn.open(path) as r:
        return r.delta(torch.arange(ROWS)).clone()


def test_runs_json_carries_a_checksum_that_openers_check(tmp_path):
    """One changed digit in runs.json (no reseal): the set is refused, readers read LMDB."""
    path = tmp_path / "s"
    with small_runs():
        want = _grow(path)
        doc = _doc(path)
        assert "record_xxh64" in doc
        doc["count"] += 1
        _manifest(path).write_text(json.dumps(doc))
        store = PersistedStore.open(path, writable=False)
        try:
            with pytest.raises(runs.RunsUnusableError, match="checksum"):
                store.load_from_runs()
        finally:
            store.close()
        assert torch.equal(_reads(path), want)


@pytest.mark.parametrize("how", ["pool", "dpsn gc", "compact"])
def test_gc_keeps_heads_rows_whatever_runs_json_says(tmp_path, how):
    """Finding 1: `live` lists one segment fewer (checksum resealed); gc keeps every segment
    HEAD's rows are in, because it asks LMDB, not runs.json."""
    path = tmp_path / "s"
    with small_runs():
        want = _grow(path)
        doc = _doc(path)
        doc["live"] = doc["live"][1:]  # HEAD's oldest live segment no longer named
        doc.pop("record_xxh64", None)
        _reseal(path, doc)
        if how == "dpsn gc":
            from dpsn.tools.cli import main

            assert main(["gc", str(path), "--keep-last", "1"]) == 0
        else:
            with dpsn.open(path, mode="r+", cache_rows=0) as w:
                if how == "pool":
                    w.gc(keep_last=1)
                else:
                    w.compact()
                    w.gc(keep_last=1)
        assert torch.equal(_reads(path), want)
        with dpsn.open(path, mode="r+") as w:  # a writer's open rebuilds the run set
            assert torch.equal(w.delta(torch.arange(ROWS)), want)
        with dpsn.open(path) as r:
            assert r.verify().ok, r.verify().problems


def test_verify_checks_every_runs_json_field_against_lmdb(tmp_path):
    """Finding 1/3: verify compares live, count and newest with LMDB's index."""
    path = tmp_path / "s"
    with small_runs():
        _grow(path)
        clean = _doc(path)
        clean.pop("record_xxh64", None)
        for field, value in [
            ("live", clean["live"][1:]),
            ("live", [[s, n + 1] for s, n in clean["live"]]),
            ("newest", clean["newest"] + 10**6),
            ("newest", 0),
        ]:
            _reseal(path, {**clean, field: value})
            with dpsn.open(path) as r:
                report = r.verify()
            assert not report.ok, (field, value)
            assert any("run" in p for p in report.problems), report.problems
        _reseal(path, clean)
        with dpsn.open(path) as r:
            assert r.verify().ok


def test_live_naming_a_missing_segment_is_no_false_gc_error(tmp_path):
    """Finding 3: a `live` entry naming a segment the store never had makes no open fail
    with "removed by gc"; the opener reads LMDB's index instead, and every row reads."""
    path = tmp_path / "s"
    with small_runs():
        want = _grow(path)
        doc = _doc(path)
        doc.pop("record_xxh64", None)
        doc["live"] = sorted([*doc["live"], [0xDEAD, 3]])
        _reseal(path, doc)
        assert torch.equal(_reads(path), want)
        with dpsn.open(path, mode="r+", cache_rows=0) as w:
            assert torch.equal(w.delta(torch.arange(ROWS)), want)


def test_a_damaged_newest_never_makes_a_lease_name_an_unknown_commit(tmp_path):
    """Finding 3: `newest` far past HEAD (resealed): the reader's lease still names a commit
    of the log, so a gc in the writer keeps what the reader reads."""
    path = tmp_path / "s"
    with small_runs():
        want = _grow(path)
        doc = _doc(path)
        doc.pop("record_xxh64", None)
        doc["newest"] = 10**12
        _reseal(path, doc)
        with dpsn.open(path) as r:
            head = r.head
            lease = next((path / "readers").glob("*.lease"))
            held = json.loads(lease.read_text())["commit"]
            assert held is not None and held <= head
            with dpsn.open(path, mode="r+", cache_rows=0) as w:
                for k in range(3):  # move on, then gc with nothing kept but HEAD
                    w.write(torch.arange(ROWS), torch.full((ROWS, 4), 50.0 + k))
                    w.commit(f"later{k}")
                w.gc(keep_last=1)
            assert torch.equal(r.delta(torch.arange(ROWS)), want)


def _run_file(path: Path) -> tuple[Path, int]:
    doc = _doc(path)
    big = max(doc["runs"], key=lambda r: r["rows"])
    return path / runs.RUNS_DIR / big["file"], big["rows"]


@pytest.mark.parametrize("where", ["id", "segment", "offset", "commit", "fence"])
def test_a_flipped_bit_in_a_run_file_is_never_a_silent_wrong_read(tmp_path, where):
    """Finding 2: a reader (which does not read run files whole) either reads the right
    rows or gets a typed error; never another row's delta, a procedural base or an old
    version."""
    path = tmp_path / "s"
    with small_runs():
        want = _grow(path)
        run, n = _run_file(path)
        raw = bytearray(run.read_bytes())
        entry = 64 + 32 * (n // 2)
        at = {
            "id": entry + 1,
            "segment": entry + 8,
            "offset": entry + 16,
            "commit": entry + 24,
            "fence": 64 + 32 * n + 8 * (len(range(0, n, 128)) - 1),
        }[where]
        raw[at] ^= 0x02
        run.write_bytes(bytes(raw))
        try:
            got = _reads(path)
        except CorruptStoreError:
            return
        assert torch.equal(got, want)


def test_run_file_pages_checked_on_first_touch(tmp_path):
    """Finding 2: the block checksum of a touched page is checked before its entries are
    used; pages not touched are not read."""
    path = tmp_path / "s"
    with small_runs():
        _grow(path)
        run, n = _run_file(path)
        index = runs.open_run(run, n)
        assert not index.checked.any()
        index.lookup(np.array([int(index.ids[0])], dtype=np.int64))
        assert index.checked.sum() == 1
