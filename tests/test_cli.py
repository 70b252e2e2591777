"""The dpsn command line on real stores: tables, --json, exit codes."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpsn
from dpsn.tools import _commands
from dpsn.tools.cli import main, parse_count


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s"
    with dpsn.create(
        path, rows=10**12, dim=8, generator={"kind": "hashed_slices", "memory_size": 4096}
    ) as p:
        p.write([5, 6], torch.ones(2, 8))
        p.commit("train")
        p.snapshot("v1")
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_count():
    assert parse_count("1e12") == 10**12
    assert parse_count("10**12") == 10**12
    assert parse_count("1_000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count("abc")


def test_create_then_info(tmp_path, capsys):
    code, out, _ = run(capsys, "create", tmp_path / "new", "--rows", "1e12", "--dim", "16")
    assert code == 0 and "created" in out
    code, out, _ = run(capsys, "info", tmp_path / "new", "--json")
    info = json.loads(out)
    assert code == 0 and info["rows"] == 10**12 and info["dim"] == 16
    code, out, _ = run(capsys, "info", tmp_path / "new")
    assert "virtual parameters" in out and "16T" in out


def test_log_lists_commits_and_snapshots(store, capsys):
    code, out, _ = run(capsys, "log", store, "--json")
    log = json.loads(out)
    assert code == 0 and [c["message"] for c in log] == ["create", "train"]
    assert log[1]["snapshots"] == ["v1"]
    code, out, _ = run(capsys, "log", store)
    assert "train" in out.splitlines()[2]  # newest first


def test_inspect_reports_norms_and_last_commit(store, capsys):
    code, out, _ = run(capsys, "inspect", store, "5", "7", "--json")
    rows = json.loads(out)
    assert code == 0
    assert rows[0]["last_commit"] == 2 and rows[0]["delta_norm"] == pytest.approx(8**0.5)
    assert rows[1]["last_commit"] is None and rows[1]["delta_norm"] == 0
    code, out, _ = run(capsys, "inspect", store, "7")
    assert "procedural" in out


def test_inspect_bad_row_is_a_usage_error(store, capsys):
    code, _, err = run(capsys, "inspect", store, str(10**12))
    assert code == 2 and "out of range" in err


def test_verify_exit_codes(store, capsys):
    code, out, _ = run(capsys, "verify", store, "--json")
    assert code == 0 and json.loads(out)["ok"]
    chunk = next(p for p in (store / "data.zarr" / "segments").rglob("deltas/c/*/*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x55
    chunk.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", store)
    assert code == 1 and "1 problem" in out and "segment 0000000000000001" in out


def test_gc(store, capsys):
    with dpsn.open(store, mode="r+") as p:
        p.write([5, 6], torch.zeros(2, 8))
        p.commit()
    (store / "data.zarr" / "segments" / "00000000000000ff").mkdir()  # a crashed commit's leftover
    code, out, _ = run(capsys, "gc", store, "--json")
    result = json.loads(out)
    assert code == 0 and result["orphan_segments"] == [0xFF] and result["removed_segments"] == []


def test_missing_store_exit_code(tmp_path, capsys):
    code, _, err = run(capsys, "info", tmp_path / "nothing")
    assert code == 1 and "does not exist" in err


def test_usage_error_exit_code(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info"])
    assert e.value.code == 2


def test_demo_runs_end_to_end_as_a_real_command(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpsn.tools.cli",
            "demo",
            str(tmp_path / "demo"),
            "--steps",
            "40",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["loss_after"] < result["loss_before"] * 0.8  # 40 steps: a real decrease
    assert result["verify"]["ok"] and result["info"]["persisted_rows"] > 0
    again = subprocess.run(
        [sys.executable, "-m", "dpsn.tools.cli", "demo", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 1 and "--force" in again.stderr


# -- issue 12: a CLI that answers at once --------------------------------------------------------

# Runs the CLI in a fresh interpreter and reports on stderr which heavy modules it imported.
PROBE = (
    "import sys\n"
    "from dpsn.tools.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "print('IMPORTED', ' '.join(m for m in ('torch', 'zarr') if m in sys.modules), "
    "file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def probe(*argv):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, argv)], capture_output=True, text=True, timeout=120
    )
    imported = out.stderr.rsplit("IMPORTED", 1)[-1].split()
    return out.returncode, out.stdout, out.stderr, set(imported)


def cli(*argv, input=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dpsn.tools.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        input=input,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.mark.parametrize(
    ("argv", "may_import"),
    [
        (["info"], set()),
        (["info", "--json", "--at", "v1"], set()),
        (["log"], set()),
        (["stats"], set()),
        (["inspect", "--no-base", "5", "7"], {"zarr"}),
        (["verify"], {"zarr"}),
        (["gc", "--dry-run"], {"zarr"}),
    ],
)
def test_read_commands_do_not_import_torch(store, argv, may_import):
    code, out, err, imported = probe(argv[0], store, *argv[1:])
    assert code == 0, err
    assert out.strip()
    assert imported <= may_import, f"dpsn {argv[0]} imported {imported}"


def test_info_sizes_are_consistent(store, capsys):
    with dpsn.open(store, mode="r+") as p:  # a second commit supersedes row 5, drops row 6
        p.write([5, 9], torch.full((2, 8), 2.0))
        p.drop([6])
        p.commit("more")
    code, out, _ = run(capsys, "info", store, "--json")
    info = json.loads(out)
    from dpsn.tiers import PersistedStore

    ps = PersistedStore.open(store, writable=False)
    try:
        records = ps.segment_records().values()
        raw = sum(r.raw_bytes for r in records)
        stored = sum(r.stored_bytes for r in records)
        assert info["row_versions"] == sum(r.rows for r in records) == 4
    finally:
        ps.close()
    assert info["persisted_rows"] == 2  # rows 5 and 9
    assert info["segment_bytes_raw"] == raw and info["segment_bytes_stored"] == stored
    assert info["compression_ratio"] == pytest.approx(raw / stored)
    assert info["live_bytes"] == 2 * (8 + 8 * 4) and info["live_bytes_exact"]
    assert info["live_bytes"] + info["garbage_bytes"] == raw
    assert info["delta_bytes_raw"] == 2 * 8 * 4
    assert info["commit"] == info["head"] == 3 and info["commits"] == 3
    assert info["generator"]["parameters"] == 4096
    with dpsn.open(store) as p:  # the library says the same
        assert p.info() == info | {"staged_rows": 0, "reader_lease": True}
    code, out, _ = run(capsys, "info", store, "--at", "v1", "--json")
    past = json.loads(out)
    assert past["commit"] == 2 and past["persisted_rows"] == 2
    assert past["garbage_bytes"] == info["garbage_bytes"]  # garbage is measured at HEAD
    code, out, _ = run(capsys, "info", store)
    assert code == 0
    for name in ("raw", "stored", "ratio", "live", "garbage", "leftovers", "on disk"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def test_info_help_defines_the_size_names(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    out = capsys.readouterr().out
    for name in ("raw", "stored", "ratio", "live", "garbage"):
        assert f"\n  {name} " in out


def test_info_bad_at_names_the_snapshots(store, capsys):
    code, _, err = run(capsys, "info", store, "--at", "nope")
    assert code == 1 and "v1" in err and "at=" not in err
    code, _, err = run(capsys, "info", store, "--at", "99")
    assert code == 1 and "commits 1..2" in err


def test_closed_pipe_ends_quietly(store):
    ids = [str(i) for i in range(6000)]  # far more output than a pipe buffer holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpsn.tools.cli", "inspect", "--no-base", str(store), *ids],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""


def test_closed_pipe_in_a_shell(store):
    out = subprocess.run(
        f"{sys.executable} -m dpsn.tools.cli info {store} | head -2",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stderr == "" and len(out.stdout.splitlines()) == 2


def test_failures_say_why_without_traceback(store, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "dpsn.json").write_text("{not json")
    cases = [
        (["info", tmp_path / "nothing"], 1, "does not exist"),
        (["info", tmp_path / "empty"], 1, "dpsn create"),
        (["info", tmp_path / "junk"], 1, "not valid JSON"),
        (["stats", store, "--replay", tmp_path / "trace.txt"], 1, "no such file"),
        (["stats", store, "--policy", "fifo"], 2, "known: lfu, lru, tinylfu"),
        (["demo", tmp_path / "d", "--steps", "0"], 2, "at least 1"),
        (["inspect", store, "10**20000000"], 2, "too large"),
        (["create", tmp_path / "c", "--rows", "10", "--dim", "4", "--generator", "x"], 2, "zeros"),
        (["import", tmp_path / "nothing.npy", tmp_path / "o"], 1, "no such file"),
    ]
    for argv, code, needle in cases:
        r = cli(*argv)
        assert r.returncode == code, (argv, r.stderr)
        assert needle in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr, (argv, r.stderr)
        assert sum("error:" in line for line in r.stderr.splitlines()) == 1, (argv, r.stderr)
        for python in ('mode="', "dpsn.open(", "dpsn.create(", "pool."):
            assert python not in r.stderr, (argv, r.stderr)


def test_parse_count_bounds_before_computing():
    # 10**20000000 computed would take ~30 s: refused from its text, it returns at once (a
    # regression shows in --durations, not as a timed assertion)
    for text in ("10**20000000", "1e20000000", "9" * 5000, "2**65", str(2**64)):
        with pytest.raises(argparse.ArgumentTypeError, match="too large"):
            parse_count(text)
    assert parse_count("2**63") == 2**63
    assert parse_count(str(2**64 - 1)) == 2**64 - 1
    assert parse_count("0**0") == 1 and parse_count("1**99999") == 1
    with pytest.raises(argparse.ArgumentTypeError, match="not a count"):
        parse_count("-5")


def test_unexpected_failure_is_one_line_and_debug_shows_the_traceback(store, monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(_commands, "cmd_log", broken)
    code, _, err = run(capsys, "log", store)
    assert code == 1
    assert "RuntimeError: something unforeseen" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        main(["--debug", "log", str(store)])
    monkeypatch.setenv("DPSN_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["log", str(store)])


def test_gc_on_a_locked_store_names_the_writer(store):
    with dpsn.open(store, mode="r+"):
        r = cli("gc", store)
    assert r.returncode == 1
    assert f"process {os.getpid()}" in r.stderr and "writer.lock" in r.stderr
    assert "dpsn gc" in r.stderr and "mode=" not in r.stderr and "Traceback" not in r.stderr


def damage_a_delta_chunk(store: Path) -> None:
    chunk = next(p for p in (store / "data.zarr" / "segments").rglob("deltas/c/*/*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x55
    chunk.write_bytes(bytes(data))


def test_damage_messages_fit_the_command(store):
    damage_a_delta_chunk(store)
    r = cli("verify", store)
    assert r.returncode == 1 and "1 problem" in r.stdout
    assert "run `dpsn verify" not in (r.stdout + r.stderr).lower()
    assert f"dpsn drop {store} 5 6" in r.stdout
    r = cli("inspect", "--no-base", store, "5")
    assert r.returncode == 1
    assert f"dpsn verify {store}" in r.stderr and f"dpsn drop {store}" in r.stderr
    assert "pool.drop" not in r.stderr and "Traceback" not in r.stderr
    r = cli("drop", store, "5", "6")
    assert r.returncode == 0, r.stderr
    r = cli("inspect", "--no-base", store, "5", "6", "--json")  # HEAD no longer reads them
    assert r.returncode == 0 and [x["delta_norm"] for x in json.loads(r.stdout)] == [0, 0]
    assert cli("verify", store).returncode == 1  # snapshot v1 still pins the damaged segment


def test_create_help_lists_the_generator_kinds(capsys):
    from dpsn.hypernet import GENERATORS

    with pytest.raises(SystemExit):
        main(["create", "--help"])
    out = capsys.readouterr().out
    for kind in GENERATORS:
        assert f"\n  {kind} " in out


def test_cli_policy_names_match_the_registry():
    # A fresh interpreter: other tests register policies of their own in this one.
    out = subprocess.run(
        [sys.executable, "-c", "from dpsn.tiers import policies; print(*policies())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert list(_commands.POLICIES) == out.stdout.split()


def test_inspect_no_base_matches_inspect(store, capsys):
    with dpsn.open(store, mode="r+") as p:
        p.write([7], torch.full((1, 8), 3.0))
        p.commit("row 7")
    for at in ([], ["--at", "v1"]):
        code, out, _ = run(capsys, "inspect", store, "5", "7", "10**11", *at, "--json")
        full = json.loads(out)
        code, out, _ = run(capsys, "inspect", "--no-base", store, "5", "7", "10**11", *at, "--json")
        fast = json.loads(out)
        assert [(r["row"], r["last_commit"]) for r in full] == [
            (r["row"], r["last_commit"]) for r in fast
        ]
        for a, b in zip(full, fast, strict=True):
            assert b["delta_norm"] == pytest.approx(a["delta_norm"])
    code, _, err = run(capsys, "inspect", "--no-base", store, str(10**12))
    assert code == 2 and "out of range" in err


def test_inspect_no_base_reads_bfloat16(tmp_path, capsys):
    path = tmp_path / "bf"
    with dpsn.create(path, rows=100, dim=4, dtype="bfloat16", generator="zeros") as p:
        p.write([3], torch.tensor([[1.5, -2.0, 0.25, 4.0]]))
        p.commit()
    code, out, _ = run(capsys, "inspect", "--no-base", path, "3", "--json")
    assert code == 0
    assert json.loads(out)[0]["delta_norm"] == pytest.approx((1.5**2 + 4 + 0.0625 + 16) ** 0.5)


def test_snapshot_and_gc_dry_run(store, capsys):
    code, out, _ = run(capsys, "snapshot", store, "pinned")
    assert code == 0 and "pinned" in out
    code, out, _ = run(capsys, "log", store, "--json")
    assert json.loads(out)[-1]["snapshots"] == ["pinned", "v1"]
    code, _, err = run(capsys, "snapshot", store, "pinned")
    assert code == 2 and "exists" in err
    code, out, _ = run(capsys, "gc", store, "--dry-run")
    assert code == 0 and out.startswith("would remove 0 unreferenced segment(s)")


def test_stats_replay_from_stdin_and_file(store, tmp_path, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("5 6\n7,8\n"))
    code, out, err = run(capsys, "stats", store, "--replay", "-", "--json")
    assert code == 0, err
    replay = json.loads(out)["replay"]
    assert replay["batches"] == 2 and replay["misses"] == 4
    trace = tmp_path / "trace.txt"
    trace.write_text("5 6 x\n")
    code, _, err = run(capsys, "stats", store, "--replay", trace)
    assert code == 2 and "line 1" in err and "'x'" in err


def test_bench_dispatch(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "scaling" in out and "cli" in out
    assert main(["bench", "nope"]) == 2
    assert "no benchmark 'nope'" in capsys.readouterr().err


def test_verify_checks_saved_routers(tmp_path, capsys):
    path = tmp_path / "f32"
    shutil.copytree(Path(__file__).parent / "data" / "format1" / "f32", path)
    code, out, _ = run(capsys, "verify", path)
    assert code == 0 and " ok:" in out
    keys = next(p for p in (path / "data.zarr" / "routers").rglob("state.pk.keys1/c/0/0/0"))
    data = bytearray(keys.read_bytes())
    data[len(data) // 2] ^= 0x55
    keys.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", path)
    assert code == 1 and "router 'router'" in out


def test_gc_dry_run_says_what_gc_frees(store, capsys):
    with dpsn.open(store, mode="r+") as p:  # supersede every row of v1's segment, unpin nothing
        p.write([5, 6], torch.zeros(2, 8))
        p.commit()
    (store / "data.zarr" / "segments" / "00000000000000ff" / "x").mkdir(parents=True)
    (store / "data.zarr" / "segments" / "00000000000000ff" / "x" / "junk").write_bytes(b"1" * 999)
    code, out, _ = run(capsys, "gc", store, "--dry-run", "--json")
    dry = json.loads(out)
    assert code == 0 and dry["dry_run"] and dry["orphan_segments"] == [0xFF]
    code, out, _ = run(capsys, "gc", store, "--json")
    real = json.loads(out)
    assert real["freed_bytes"] == dry["freed_bytes"] >= 999


@pytest.mark.parametrize(
    ("error", "command", "want"),
    [
        (
            "s is not a dpsn store: it has no dpsn.json. "
            "Create one with dpsn.create(path, rows, dim) or `dpsn create`.",
            "info",
            "`dpsn create s --rows N --dim D`",
        ),
        (
            "commit 3 can no longer be reconstructed: gone. Only HEAD and pinned snapshots "
            "survive gc; use pool.snapshot(name) to keep a commit.",
            "info",
            "`dpsn snapshot s NAME`",
        ),
        (
            "segment 01: deltas chunks 0..0 fails its checksum; rows affected: [5] (1 rows). "
            "Run `dpsn verify` for the full list; `pool.drop(rows)` returns them to procedural.",
            "export",
            "Run `dpsn verify s` for the full list; `dpsn drop s ROW...`",
        ),
        (
            's is open read-only (mode="r" or a snapshot view); '
            'open it with dpsn.open(path, mode="r+") to change it',
            "drop",
            "use a command that writes",
        ),
    ],
)
def test_library_messages_are_said_in_cli_terms(error, command, want):
    from dpsn.tools._messages import cli_message

    text = cli_message(dpsn.DpsnError(error), command=command, path="s")
    assert want in text
    for python in ('mode="', "dpsn.open(", "dpsn.create(", "pool."):
        assert python not in text


def test_info_reads_segment_sizes_fast_and_right(store):
    """The regex fast path over segment records agrees with parsing them, falls back to JSON
    on anything unexpected, and on-disk bytes (segments as recorded) match a full walk."""
    from dpsn.tiers import StoreFacts
    from dpsn.tiers._info import _segment_sizes, tree_bytes

    with dpsn.open(store, mode="r+") as p:
        p.set_state_width(3)
        p.write([11], torch.ones(1, 8))
        p.commit("with row state")
    with StoreFacts(store) as facts:
        raws = facts._read(lambda txn, dbs: [v for _, v in txn.cursor(db=dbs[b"segments"])])
        info = facts.info()
    assert info["bytes_on_disk"] == tree_bytes(store)
    assert len(raws) == 2
    for raw in raws:
        rec = json.loads(raw)
        want = {k: rec.get(k, 0) for k in ("id", "commit", "rows", "drops", "raw_bytes")}
        want |= {"stored_bytes": rec["stored_bytes"], "state_width": rec.get("state_width", 0)}
        want |= {"usage_width": rec.get("usage_width", 0)}
        assert _segment_sizes(raw) == want
        shuffled = json.dumps(dict(reversed(list(rec.items())))).encode()
        assert _segment_sizes(shuffled) == want
        spaced = json.dumps(rec, indent=1).encode()  # another layout: parsed as JSON
        assert _segment_sizes(spaced) == want
    assert {_segment_sizes(r)["state_width"] for r in raws} == {0, 3}
    assert not info["live_bytes_exact"]  # rows of both widths: live is an estimate, and says so
    from dpsn.errors import CorruptStoreError

    with pytest.raises(CorruptStoreError):
        _segment_sizes(b'{"id": 1, "id": 2, "rows": -1}')


def _flip_record(store: Path, db: bytes, key: int) -> None:
    """Flip one byte inside a JSON record of the closed store's LMDB index (its checksum then
    fails)."""
    import lmdb

    env = lmdb.open(str(store / "index.lmdb"), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            handle = env.open_db(db, txn=txn, create=False)
            k = key.to_bytes(8, "big")
            raw = bytearray(txn.get(k, db=handle))
            at = raw.index(b'"message"' if db == b"commits" else b'"rows"') + 2
            raw[at] ^= 0x01
            txn.put(k, bytes(raw), db=handle)
    finally:
        env.close()


@pytest.mark.parametrize("db", [b"segments", b"commits"])
def test_verify_reports_a_damaged_record_instead_of_failing(store, capsys, db):
    """Review of issue 14: a flipped byte in a segment record or in HEAD's commit record made
    `dpsn verify` print one error line and no report (nothing at all with --json)."""
    _flip_record(store, db, 1 if db == b"segments" else 2)
    code, out, err = run(capsys, "verify", store, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["problems"], (out, err)
    code, out, _ = run(capsys, "verify", store)
    assert code == 1 and "problem(s)" in out


def _edit_record(store: Path, db: bytes, key: bytes, edit) -> None:
    import lmdb

    env = lmdb.open(str(store / "index.lmdb"), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            handle = env.open_db(db, txn=txn, create=False)
            txn.put(key, edit(txn.get(key, db=handle)), db=handle)
    finally:
        env.close()


@pytest.mark.parametrize(
    "db, key, edit, command",
    [
        (b"commits", (2).to_bytes(8, "big"), lambda r: r.replace(b'"train"', b'"trbin"'), "log"),
        (b"commits", (2).to_bytes(8, "big"), lambda r: r.replace(b'"train"', b'"trbin"'), "info"),
        (b"commits", (2).to_bytes(8, "big"), lambda r: b"[" * 100_000 + b"]" * 100_000, "log"),
        (
            b"segments",
            (1).to_bytes(8, "big"),
            lambda r: r.replace(b'"rows":2', b'"rows":3'),
            "info",
        ),
        (b"snapshots", b"v1", lambda r: r.replace(b'"rows":2', b'"rows":3'), "log"),
        (
            b"meta",
            b"generator/" + (1).to_bytes(8, "big"),
            lambda r: r.replace(b"[", b"[1,", 1),
            "info",
        ),
    ],
)
def test_read_commands_check_record_checksums(store, capsys, db, key, edit, command):
    """Review of issue 14: `dpsn log` and `info` parsed records without their checksum (an
    edited commit message showed as valid) and let a deeply nested one raise RecursionError."""
    code, _, _ = run(capsys, command, store)
    assert code == 0
    _edit_record(store, db, key, edit)
    code, out, err = run(capsys, command, store)
    assert code == 1 and not out and ("checksum" in err or "not valid JSON" in err), err
    assert "Traceback" not in err
