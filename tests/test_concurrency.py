"""Readers in other processes see one consistent commit while a writer goes on."""

import subprocess
import sys

import pytest
import torch

import dpsn

pytestmark = pytest.mark.slow

READER = r"""
import sys, torch, dpsn
path, rounds = sys.argv[1], int(sys.argv[2])
seen = set()
for _ in range(rounds):
    with dpsn.open(path) as r:
        d = r.delta(torch.arange(512))[:, 0]
        # every commit k writes the value k to all 512 rows: a mix would be a torn read
        assert torch.all(d == d[0]), ("torn read", r.head, d.unique().tolist())
        assert int(d[0]) == r.head - 1 or r.head == 1, (int(d[0]), r.head)
        seen.add(r.head)
print("OK", len(seen))
"""


def test_readers_in_other_processes_never_see_a_torn_commit(tmp_path):
    path = tmp_path / "s"
    w = dpsn.create(path, rows=10**6, dim=4, chunk_rows=16)
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(path), "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    k = 1
    while any(r.poll() is None for r in readers):
        k += 1
        w.write(torch.arange(512), torch.full((512, 4), float(k - 1)))
        w.commit(f"c{k}")
    for r in readers:
        out, err = r.communicate()
        assert r.returncode == 0, err
        assert out.startswith("OK")
    w.close()


def test_second_writer_in_another_process_is_refused(tmp_path):
    path = tmp_path / "s"
    with dpsn.create(path, rows=10, dim=4):
        code = (
            "import dpsn, sys\n"
            "try:\n"
            f"    dpsn.open({str(path)!r}, mode='r+')\n"
            "except dpsn.errors.StoreLockedError as e:\n"
            "    print('LOCKED', e); sys.exit(0)\n"
            "sys.exit(1)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0 and "LOCKED" in out.stdout, out.stderr
    # released when the writer closes
    with dpsn.open(path, mode="r+"):
        pass
