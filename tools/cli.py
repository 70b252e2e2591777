"""The ``dpsn`` command line.

Exit codes scripts can trust: 0 ok, 1 a problem was found (a failed verify, a missing or damaged
store, a refused write), 2 a usage error (bad arguments). Read commands take ``--json`` and then
print exactly one JSON document on stdout. Progress bars go to stderr and only on a terminal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def parse_count(text: str) -> int:
    """An integer count as people write it: 1000000, 1_000_000, 1e12 or 10**12."""
    t = text.strip().replace("_", "")
    m = re.fullmatch(r"(\d+)\*\*(\d+)", t)
    if m:
        return int(m.group(1)) ** int(m.group(2))
    m = re.fullmatch(r"(\d+)(?:[eE](\d+))?", t)
    if m:
        return int(m.group(1)) * 10 ** int(m.group(2) or 0)
    raise argparse.ArgumentTypeError(f"not a count: {text!r} (try 1000000, 1e12 or 10**12)")


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="seg", file=sys.stderr, disable=None, leave=False)


# -- commands ------------------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    import dpsn

    with dpsn.create(
        args.path,
        rows=args.rows,
        dim=args.dim,
        seed=args.seed,
        generator=args.generator,
        dtype=args.dtype,
        compressor=args.compressor,
    ) as pool:
        info = pool.info()
    if args.json:
        _print_json(info)
    else:
        print(
            f"created {args.path}: {args.rows} rows x {args.dim} ({args.dtype}), "
            f"generator {args.generator}, seed {args.seed}"
        )
    return EXIT_OK


def _info_lines(info: dict[str, Any]) -> str:
    from ._format import fields, human_bytes, human_count

    gen = info["generator"]
    return fields(
        [
            ("path", info["path"]),
            ("format", f"dpsn-store v{info['format_version']}"),
            ("rows", f"{info['rows']} ({human_count(info['rows'])})"),
            ("dim", info["dim"]),
            ("dtype", info["dtype"]),
            ("seed", info["seed"]),
            (
                "generator",
                f"{gen['kind']} {json.dumps(gen['config'], sort_keys=True)} "
                f"({human_count(gen['parameters'])} parameters)",
            ),
            ("virtual parameters", human_count(info["virtual_parameters"])),
            ("commit", f"{info['commit']} of {info['commits']}"),
            ("snapshots", info["snapshots"]),
            ("persisted rows", info["persisted_rows"]),
            ("delta bytes (raw)", human_bytes(info["delta_bytes_raw"])),
            ("segments", info["segments"]),
            ("segment bytes stored", human_bytes(info["segment_bytes_stored"])),
            ("compression ratio", info["compression_ratio"]),
            ("bytes on disk", human_bytes(info["bytes_on_disk"])),
        ]
    )


def cmd_info(args: argparse.Namespace) -> int:
    import dpsn

    with dpsn.open(args.path, at=args.at) as pool:
        info = pool.info()
    if args.json:
        _print_json(info)
    else:
        print(_info_lines(info))
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    import datetime

    import dpsn

    from ._format import table

    with dpsn.open(args.path) as pool:
        commits = pool.log()
        snaps = pool.snapshots()
    by_commit: dict[int, list[str]] = {}
    for name, c in snaps.items():
        by_commit.setdefault(c, []).append(name)
    if args.json:
        _print_json([c.to_json() | {"snapshots": by_commit.get(c.id, [])} for c in commits])
        return EXIT_OK
    rows = [
        (
            c.id,
            datetime.datetime.fromtimestamp(c.time).isoformat(sep=" ", timespec="seconds"),
            c.rows_written,
            c.rows_dropped,
            c.persisted_rows,
            c.provenance[:12],
            ",".join(by_commit.get(c.id, [])),
            c.message,
        )
        for c in reversed(commits)
    ]
    print(
        table(
            [
                "commit",
                "time",
                "written",
                "dropped",
                "persisted",
                "provenance",
                "snapshots",
                "message",
            ],
            rows,
        )
    )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    import dpsn

    from ._format import table

    with dpsn.open(args.path, at=args.at) as pool:
        ids = torch.tensor(args.rows, dtype=torch.int64)
        base = pool.base(ids).float()
        delta = pool.delta(ids).float()
        commits = pool.row_commits(ids)
    out = [
        {
            "row": int(r),
            "base_norm": float(b.norm()),
            "delta_norm": float(d.norm()),
            "row_norm": float((b + d).norm()),
            "persisted": bool(c),
            "last_commit": int(c) if c else None,
        }
        for r, b, d, c in zip(args.rows, base, delta, commits.tolist(), strict=True)
    ]
    if args.json:
        _print_json(out)
    else:
        print(
            table(
                ["row", "base_norm", "delta_norm", "row_norm", "last_commit"],
                [
                    (
                        o["row"],
                        o["base_norm"],
                        o["delta_norm"],
                        o["row_norm"],
                        o["last_commit"] or "procedural",
                    )
                    for o in out
                ],
            )
        )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    import dpsn

    with dpsn.open(args.path) as pool:
        bar = _progress(pool.segments_total(), "verify")
        with bar:
            report = pool.verify(progress=bar.update)
    if args.json:
        _print_json(report.to_json())
    else:
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        print(
            f"{args.path}: {status}: {report.checked_segments} segments, "
            f"{report.checked_chunks} chunks, {report.checked_rows} rows checked"
        )
        for p in report.problems:
            print(f"  - {p}")
    return EXIT_OK if report.ok else EXIT_PROBLEM


def cmd_gc(args: argparse.Namespace) -> int:
    import dpsn

    from ._format import human_bytes

    with dpsn.open(args.path, mode="r+") as pool:
        bar = _progress(0, "gc")
        with bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            result = pool.gc(dry_run=args.dry_run, progress=progress)
    if args.json:
        _print_json(result)
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(
            f"{verb} {len(result['removed_segments'])} unreferenced segment(s), "
            f"{len(result['orphan_segments'])} leftover(s) of interrupted commits, "
            f"{result['partial_files']} partial file(s); freed {human_bytes(result['freed_bytes'])}"
        )
    return EXIT_OK


def _parse_trace(spec: str) -> list[list[int]]:
    """Batches of ids: a file with one batch per line, or one inline batch "1,2,3"."""
    from pathlib import Path

    path = Path(spec)
    lines = path.read_text().splitlines() if path.is_file() else [spec]
    batches = []
    for n, line in enumerate(lines, 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        try:
            batches.append([parse_count(p) for p in parts])
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--replay {spec}: line {n}: {e}") from None
    return batches


def cmd_stats(args: argparse.Namespace) -> int:
    import dpsn
    from dpsn.tiers import check_policy

    from ._format import fields, human_bytes

    check_policy(args.policy)  # even without --replay: a typo is an error
    with dpsn.open(args.path) as pool:
        info = pool.info()
        writer = next((c.stats for c in reversed(pool.log()) if c.stats), None)
    out: dict[str, Any] = {
        "store": {
            k: info[k] for k in ("persisted_rows", "segments", "bytes_on_disk", "compression_ratio")
        },
        "writer": writer,
    }
    if args.replay:
        batches = _parse_trace(args.replay)
        with dpsn.open(args.path, cache_rows=args.cache_rows, policy=args.policy) as pool:
            for batch in batches:
                pool.read(batch)
            out["replay"] = pool.stats() | {"batches": len(batches)}
    if args.json:
        _print_json(out)
        return EXIT_OK
    pairs: list[tuple[str, Any]] = [
        ("persisted rows", info["persisted_rows"]),
        ("segments", info["segments"]),
        ("bytes on disk", human_bytes(info["bytes_on_disk"])),
        ("compression ratio", info["compression_ratio"]),
    ]
    for title, s in (("writer (last commit)", writer), ("replay", out.get("replay"))):
        if not s:
            continue
        pairs += [
            (f"{title}: hit rate", s.get("hit_rate")),
            (f"{title}: hits / misses", f"{s.get('hits', 0)} / {s.get('misses', 0)}"),
            (f"{title}: evictions", s.get("evictions", 0)),
            (f"{title}: write-backs", s.get("writebacks", 0)),
            (f"{title}: rows from disk", s.get("rows_from_disk", 0)),
            (f"{title}: bytes from disk", human_bytes(s.get("bytes_from_disk", 0))),
            (f"{title}: bytes to device", human_bytes(s.get("bytes_to_device", 0))),
            (f"{title}: rows generated", s.get("rows_generated", 0)),
        ]
    print(fields(pairs))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(args.dir, steps=args.steps, force=args.force, as_json=args.json)


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from dpsn import __version__

    p = argparse.ArgumentParser(
        prog="dpsn",
        description="Inspect and maintain dpsn parameter stores.",
        epilog="Exit codes: 0 ok, 1 problem found, 2 usage error.",
    )
    p.add_argument("--version", action="version", version=f"dpsn {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, fn: Any, *, json_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return sp

    sp = add("create", "create an empty store", cmd_create)
    sp.add_argument("path")
    sp.add_argument("--rows", type=parse_count, required=True, help="virtual rows, e.g. 1e12")
    sp.add_argument("--dim", type=parse_count, required=True)
    sp.add_argument("--seed", type=parse_count, default=0)
    sp.add_argument("--generator", default="hashed_slices", help="generator kind")
    sp.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    sp.add_argument("--compressor", default="lz4", choices=["lz4", "zstd", "none"])

    sp = add("info", "spec, size and compression of a store", cmd_info)
    sp.add_argument("path")
    sp.add_argument("--at", help="a snapshot name or commit id (default: newest)")

    sp = add("log", "the commit log, newest first", cmd_log)
    sp.add_argument("path")

    sp = add(
        "inspect", "base and delta norms of rows, and the commit that last wrote each", cmd_inspect
    )
    sp.add_argument("path")
    sp.add_argument("rows", nargs="+", type=parse_count, metavar="ROW")
    sp.add_argument("--at", help="a snapshot name or commit id (default: newest)")

    sp = add(
        "verify", "re-read every segment and check its checksums (exit 1 on damage)", cmd_verify
    )
    sp.add_argument("path")

    sp = add("gc", "remove segments no commit at HEAD or snapshot references", cmd_gc)
    sp.add_argument("path")
    sp.add_argument("--dry-run", action="store_true", help="only report what would be removed")

    sp = add(
        "stats",
        "cache and I/O figures: the writer's at its last commit, or a replayed trace",
        cmd_stats,
    )
    sp.add_argument("path")
    sp.add_argument(
        "--replay",
        metavar="TRACE",
        help='ids to read through a fresh cache: a file (one batch per line) or "1,2,3"',
    )
    sp.add_argument("--cache-rows", type=parse_count, default=None)
    sp.add_argument("--policy", default="lru", help="lru, lfu, tinylfu (default lru)")

    sp = add("demo", "create a store, train a little, commit, reopen and inspect it", cmd_demo)
    sp.add_argument("dir", nargs="?", default="dpsn-demo", help="where (default ./dpsn-demo)")
    sp.add_argument("--steps", type=parse_count, default=200)
    sp.add_argument("--force", action="store_true", help="replace an existing store at DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dpsn.errors import DpsnError, InvalidIdsError

    try:
        return int(args.fn(args))
    except InvalidIdsError as e:
        print(f"dpsn {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DpsnError, OSError) as e:
        print(f"dpsn {args.command}: error: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except (ValueError, TypeError) as e:
        print(f"dpsn {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
