"""The command line on sharded roots: ``dpsn reshard``, and ``info``/``log``/``verify`` of a
root (each shard read at the newest global commit; torch-free except ``reshard``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_PROBLEM = 0, 1
Command = Callable[[argparse.Namespace], int]


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register the sharded-root commands (called by ``cli.build_parser``)."""
    sp = add(
        "reshard",
        "rewrite a sharded root for another number of ranks (offline: takes every shard's "
        "writer lock)",
        cmd_reshard,
    )
    sp.add_argument("path")
    sp.add_argument("--shards", type=int, required=True, help="the new number of shards")


def route(args: argparse.Namespace) -> Command:
    """The command to run: the sharded-root version of ``info``, ``log`` and ``verify`` when
    ``args.path`` is a sharded root, else the command as parsed."""
    from dpsn.store import shards as layout

    command = getattr(args, "command", None)
    path = getattr(args, "path", None)
    if command in _READERS and path is not None and layout.is_sharded(path):
        return _READERS[command]
    return args.fn  # type: ignore[no-any-return]


def _print_json(obj: Any) -> None:
    from ._commands import _print_json as p

    p(obj)


def cmd_reshard(args: argparse.Namespace) -> int:
    from dpsn.distributed import reshard

    out = reshard(args.path, args.shards)
    if args.json:
        _print_json(out)
    else:
        print(
            f"{args.path}: {out['old_shards']} -> {out['new_shards']} shards, "
            f"{out['rows_moved']} rows moved, global commit {out['global_commit']}"
        )
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from dpsn.store import StoreFacts
    from dpsn.store import shards as layout

    from ._format import fields, human_bytes

    root = Path(args.path)
    manifest = layout.read_root_manifest(root)
    at = None if getattr(args, "at", None) is None else int(args.at)
    record = layout.read_global(root, at)
    shards = []
    for d, c in record.shards:
        with StoreFacts(root / d) as facts:
            shards.append({"dir": d, "commit": c, "info": facts.info(at=c)})
    total_rows = sum(s["info"]["persisted_rows"] for s in shards)
    stored = sum(s["info"]["segment_bytes_stored"] for s in shards)
    out = {
        "path": str(root),
        "uuid": manifest.uuid,
        "rows": manifest.rows,
        "dim": manifest.dim,
        "global_commit": record.id,
        "message": record.message,
        "shards": shards,
        "persisted_rows": total_rows,
        "segment_bytes_stored": stored,
    }
    if args.json:
        _print_json(out)
        return EXIT_OK
    lines = [
        ("path", str(root)),
        ("format", "dpsn sharded root"),
        ("rows", manifest.rows),
        ("dim", manifest.dim),
        ("global commit", f"{record.id} ({record.message!r})"),
        ("shards", record.count),
        ("persisted rows", total_rows),
        ("stored", human_bytes(stored)),
    ]
    for s in shards:
        i = s["info"]
        lines.append(
            (
                s["dir"],
                f"commit {s['commit']} (HEAD {i['head']}), {i['persisted_rows']} persisted rows, "
                f"{human_bytes(i['segment_bytes_stored'])} stored",
            )
        )
    print(fields(lines))
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    from dpsn.store import shards as layout

    from ._commands import _when
    from ._format import table

    layout.read_root_manifest(args.path)
    log = layout.global_log(args.path)
    if args.json:
        _print_json([r.to_json() for r in log])
        return EXIT_OK
    rows = [
        (r.id, _when(r.time), r.count, " ".join(str(c) for _d, c in r.shards), r.message)
        for r in reversed(log)
    ]
    print(table(["global", "time", "shards", "shard commits", "message"], rows))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Every shard's checksums, and that every shard still holds the commit the newest global
    record names (HEAD at or past it)."""
    from dpsn.errors import DpsnError
    from dpsn.store import PersistedStore
    from dpsn.store import shards as layout

    root = Path(args.path)
    layout.read_root_manifest(root)
    record = layout.read_global(root)
    problems: list[str] = []
    reports = []
    for d, c in record.shards:
        try:
            store = PersistedStore.open(root / d, writable=False)
        except DpsnError as e:
            problems.append(f"{d}: {e}")
            continue
        try:
            if store.head() < c:
                problems.append(f"{d}: HEAD {store.head()} is behind its global commit {c}")
            else:
                store.commit_record(c)
            rep = store.verify()
            problems += [f"{d}: {p}" for p in rep.problems]
            reports.append({"dir": d, "commit": c} | rep.to_json())
        except DpsnError as e:
            problems.append(f"{d}: {e}")
        finally:
            store.close()
    ok = not problems
    if args.json:
        _print_json({"ok": ok, "global_commit": record.id, "problems": problems, "shards": reports})
    else:
        status = "ok" if ok else f"{len(problems)} problem(s)"
        rows = sum(r.get("checked_rows", 0) for r in reports)
        print(f"{root}: {status}: {record.count} shards, {rows} rows checked")
        for p in problems:
            print(f"  - {p}")
    return EXIT_OK if ok else EXIT_PROBLEM


_READERS: dict[str, Command] = {"info": cmd_info, "log": cmd_log, "verify": cmd_verify}
