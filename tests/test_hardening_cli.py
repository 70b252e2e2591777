"""Issue 21, findings 9, 10 and 12 (the CLI's import/export/inspect inputs): export --force
replaces only regular files; counts are bounded before they are computed; hostile tables
(special files, huge headers, huge metadata numbers, long .npy headers) get typed, true
messages at once."""

import argparse
import json
import os
import signal
import struct
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import dpsn
from dpsn.tools._counts import parse_count
from dpsn.tools.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s"
    with dpsn.create(path, rows=32, dim=4, generator={"kind": "zeros"}, cache_rows=0) as pool:
        pool.write(torch.arange(4), torch.ones(4, 4))
        pool.commit("c")
    return path


@contextmanager
def hang_guard(seconds: int = 30):
    """Turn a hang (minutes of big-integer arithmetic) into a failure; not a timing check."""

    def fail(*_):
        raise TimeoutError(f"still computing after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("text", ["0e100000000", "00e999999999", "0**99999999999"])
def test_counts_are_bounded_before_they_are_computed(text):
    with hang_guard():
        assert parse_count(text) == 0


def test_huge_exponents_are_refused_before_they_are_computed():
    with hang_guard(), pytest.raises(argparse.ArgumentTypeError, match="too large"):
        parse_count("7e100000000")


def test_inspect_with_a_huge_zero_count_answers_at_once(store, capsys):
    with hang_guard():
        code, _, err = run(capsys, "inspect", store, "0e100000000")
    assert code == 0 and "Traceback" not in err, err


def test_export_force_replaces_only_regular_files(store, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to("/dev/null")
    for target in (fifo, link):
        code, _, err = run(capsys, "export", store, target, "--force")
        assert code != 0 and "not a regular file" in err, err
    assert (fifo.lstat().st_mode & 0o170000) == 0o010000  # still a FIFO
    assert link.is_symlink()
    regular = tmp_path / "old.safetensors"
    regular.write_bytes(b"old")
    code, _, err = run(capsys, "export", store, regular, "--force")
    assert code == 0, err


def _safetensors_with_header(path, header: bytes):
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_hostile_tables_get_true_typed_messages(store, tmp_path, capsys):
    fifo = tmp_path / "t.npy"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "import", fifo, tmp_path / "o1")
    assert code != 0 and "FIFO" in err and "no such file" not in err, err
    code, _, err = run(capsys, "import", tmp_path, tmp_path / "o2")
    assert code != 0 and "directory" in err and "no such file" not in err, err
    zero = tmp_path / "z.safetensors"
    zero.symlink_to("/dev/zero")
    code, _, err = run(capsys, "import", zero, tmp_path / "o3")
    assert code != 0 and "character device" in err, err

    big = tmp_path / "big.safetensors"
    _safetensors_with_header(big, b"{" + b" " * (80 << 20) + b"}")
    code, _, err = run(capsys, "import", big, tmp_path / "o4")
    assert code != 0 and "header" in err and "Traceback" not in err, err

    long_npy = tmp_path / "long.npy"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }"
    header = header + " " * (20000 - len(header)) + "\n"
    long_npy.write_bytes(
        b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header.encode() + bytes(32)
    )
    code, _, err = run(capsys, "import", long_npy, tmp_path / "o5")
    assert code != 0 and "pickle" not in err and "header" in err, err

    from safetensors.numpy import save_file

    meta = tmp_path / "meta.safetensors"
    save_file(
        {"weight": np.ones((2, 4), np.float32), "ids": np.arange(2, dtype=np.int64)},
        str(meta),
        metadata={"rows": "9" * 5000},
    )
    code, _, err = run(capsys, "import", meta, tmp_path / "o6")
    assert code != 0 and "rows" in err and "Traceback" not in err, err
    for k in range(1, 7):
        assert not (tmp_path / f"o{k}").exists()
    json.dumps(err)  # printable


# -- finding 7: import on a full disk -------------------------------------------------------------


@pytest.mark.parametrize("limit", [20_000, 60_000, 150_000, 400_000])
def test_import_on_a_full_disk_leaves_nothing_and_says_import(tmp_path, limit):
    """The disk fills (RLIMIT_FSIZE, in a child) at different points of an import: OUT is
    gone afterwards (a retry can start afresh), the message is about importing (not "commit
    again"), and no asyncio "Task was destroyed" noise is printed."""
    import subprocess
    import sys

    table = tmp_path / "t.npy"
    np.save(table, np.random.default_rng(0).standard_normal((20000, 16)).astype(np.float32))
    out = tmp_path / "out"
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from dpsn.tools.cli import main
sys.exit(main(["import", {str(table)!r}, {str(out)!r}, "--commit-rows", "5000"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout
    assert "commit again" not in done.stderr and "import" in done.stderr, done.stderr[-2000:]
    assert "Task was destroyed" not in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))[:10]
