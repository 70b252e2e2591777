"""The ``dpsn`` command line.

Exit codes scripts can trust: 0 ok, 1 a problem was found (a failed verify, a missing or damaged
store, a refused write, any other failure), 2 a usage error (bad arguments), 130 interrupted.
Read commands take ``--json`` and then print exactly one JSON document on stdout. Progress bars
go to stderr and only on a terminal. A failure prints one line on stderr saying why, never a
traceback (``--debug`` or ``DPSN_DEBUG=1`` shows it). A closed pipe (``dpsn log S | head``)
ends quietly.

Commands that only read records (``info``, ``log``, ``stats`` without ``--replay``,
``inspect --no-base``, ``verify``, ``gc``, ``snapshot``) never import torch or build the
generator: they answer from the manifest and the LMDB records (``dpsn.store``, torch-free),
and read Zarr segments only where they must look at deltas.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Sequence

from . import _commands as c
from . import _levels as lv
from . import _remote, _sharded
from ._counts import parse_count, positive_count, row_id
from ._levels import levelled

__all__ = ["build_parser", "main", "parse_count", "positive_count"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_PIPE = 128 + 13  # what a shell reports for a command ended by SIGPIPE
BENCHMARKS = {
    "scaling": "memory and speed from 10^6 to 10^12 parameters vs a dense table; LM quality "
    "as the pool grows",
    "cli": "how fast the read-only commands answer, against the old Pool-based path",
}
SIZE_HELP = """\
sizes (info, stats):
  raw        bytes of every segment's arrays uncompressed (deltas, row state, ids, drop lists)
  stored     the same arrays as they lie on disk, compressed
  ratio      raw / stored
  live       raw bytes of the row versions the shown commit reads
             (its persisted rows x (8 B id + dim x dtype bytes + row state))
  garbage    raw bytes HEAD no longer reads: superseded or dropped row versions, drop lists.
             gc frees whole segments only; `dpsn gc --dry-run` says what it would free now
  leftovers  segment directories no record names (interrupted commits); gc removes them
  on disk    every file of the store directory (index, generator, routers, segments)
"""


def _none_or(parse: Callable[[str], object]) -> Callable[[str], object]:
    def f(text: str) -> object:
        if text.lower() == "none":
            return None
        try:
            return parse(text)
        except (ValueError, ArithmeticError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return f


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError(f"{text!r} is not a positive count")
    return n


def _seconds(text: str) -> float:
    from dpsn.store import parse_duration

    return parse_duration(text)


def _above_one(text: str) -> float:
    x = float(text)
    if not 1.0 < x < 1e9:
        raise ValueError(f"{text!r}: give a ratio above 1")
    return x


_keep_last = _none_or(_positive)
_duration = _none_or(_seconds)
_ratio = _none_or(_above_one)


def run_bench(argv: Sequence[str]) -> int:
    """``dpsn bench NAME [ARGS...]``: run a benchmark of ``bench/`` with its own arguments."""
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<10} {text}" for name, text in BENCHMARKS.items()]
        print(
            "usage: dpsn bench NAME [ARGS...]   (dpsn bench NAME --help for its options)\n\n"
            "benchmarks:\n" + "\n".join(lines)
        )
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], list(argv[1:])
    if name not in BENCHMARKS:
        print(
            f"dpsn bench: error: no benchmark {name!r}; known: {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    import importlib

    try:
        module = importlib.import_module(f"dpsn.bench.{name}")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"the benchmarks are not installed with this dpsn ({e}); install from a source "
            "checkout: pip install -e '.[bench]'"
        ) from None
    result = module.main(rest)
    return result if isinstance(result, int) else EXIT_OK


# -- parser --------------------------------------------------------------------------------------


def _generator_kinds() -> list[tuple[str, str]]:
    """Kinds from hypernet's registry with the first line of each class's docstring. Imports
    torch, so it is only called when ``create`` or ``import`` is being parsed."""
    from dpsn.hypernet import GENERATORS

    out = []
    for kind, cls in sorted(GENERATORS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append((kind, doc[0].rstrip(".").replace("``", "") if doc else ""))
    return out


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` (the first word of argv) says whether the generator kinds must
    be listed (create, import), which costs importing torch."""
    from dpsn import __version__

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of a failure (also DPSN_DEBUG=1)",
    )
    p = argparse.ArgumentParser(
        prog="dpsn",
        description="Inspect and maintain dpsn parameter stores.",
        epilog="Exit codes: 0 ok, 1 problem found, 2 usage error. `dpsn bench --help` lists the "
        "benchmarks.",
        parents=[debug],
    )
    p.add_argument("--version", action="version", version=f"dpsn {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        help_: str,
        fn: Callable[[argparse.Namespace], int],
        *,
        json_flag: bool = True,
        epilog: str | None = None,
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=epilog,
            parents=[debug],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.set_defaults(fn=fn)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return sp

    needs_kinds = command in ("create", "import")
    kinds = _generator_kinds() if needs_kinds else []
    kinds_epilog = (
        "generator kinds:\n" + "\n".join(f"  {k:<14} {d}" for k, d in kinds) if kinds else None
    )
    kind_names = [k for k, _ in kinds] or None

    sp = add("create", "create an empty store", lv.create_or(c.cmd_create), epilog=kinds_epilog)
    sp.add_argument("path")
    sp.add_argument("--rows", type=positive_count, required=True, help="virtual rows, e.g. 1e12")
    sp.add_argument("--dim", type=positive_count, required=True, help="row width")
    sp.add_argument("--seed", type=parse_count, default=0, help="pool seed (default 0)")
    sp.add_argument(
        "--generator",
        default="hashed_slices",
        choices=kind_names,
        metavar="KIND",
        help="how base rows are made (default hashed_slices; kinds below)",
    )
    sp.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    sp.add_argument("--compressor", default="lz4", choices=["lz4", "zstd", "none"])
    sp.add_argument(
        "--levels",
        metavar="NAMES",
        help="a levelled store: level names, slowest first, e.g. foundation,domain,task "
        "(name:memory: a context level, never committed)",
    )
    sp.add_argument("--model-id", help="a levelled store's model id (joins its provenance)")

    sp = add(
        "info",
        "spec, size and compression of a store",
        levelled(c.cmd_info, lv.cmd_info),
        epilog=SIZE_HELP,
    )
    sp.add_argument("path")
    sp.add_argument("--at", help="a snapshot name or commit id (default: HEAD, the newest)")

    sp = add("log", "the commit log, newest first", levelled(c.cmd_log, lv.cmd_log))
    sp.add_argument("path")
    sp.add_argument("--migrations", action="store_true", help="a levelled store's migrations")

    sp = add(
        "inspect",
        "base and delta norms of rows, and the commit that last wrote each",
        c.cmd_inspect,
    )
    sp.add_argument("path")
    sp.add_argument("rows", nargs="+", type=row_id, metavar="ROW")
    sp.add_argument("--at", help="a snapshot name or commit id (default: HEAD)")
    sp.add_argument(
        "--no-base",
        action="store_true",
        help="only the committed deltas: skips the generator (and torch), answers at once",
    )

    sp = add(
        "verify",
        "re-read every segment and check its checksums (exit 1 on damage)",
        levelled(c.cmd_verify, lv.cmd_verify),
    )
    sp.add_argument("path")

    sp = add(
        "gc",
        "remove what no kept commit needs (HEAD, snapshots, the retention window, what live "
        "readers hold), and crash leftovers",
        c.cmd_gc,
    )
    sp.add_argument("path")
    sp.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    sp.add_argument(
        "--keep-last",
        type=_keep_last,
        metavar="N",
        help="keep the newest N commits rebuildable (this run only; `dpsn policy` sets it)",
    )
    sp.add_argument(
        "--keep-within",
        type=_duration,
        metavar="AGE",
        help="keep commits younger than AGE, e.g. 7d, 12h, 30m (this run only)",
    )
    sp.add_argument(  # gc of a bucket (PATH an s3:// URL): tools/_remote.py
        "--endpoint-url", help="for a URL: an S3-compatible server's endpoint (MinIO, moto, ...)"
    )
    sp.add_argument(
        "--grace",
        type=_duration,
        metavar="AGE",
        help="for a URL: keep unreferenced objects younger than AGE (default 1h: a publish "
        "may be uploading them)",
    )

    sp = add(
        "compact",
        "rewrite the live rows of sparsely live segments into dense ones (a commit that "
        "changes no row), then gc",
        c.cmd_compact,
    )
    sp.add_argument("path")

    sp = add(
        "policy",
        "show or change the store's retention and compaction policy",
        c.cmd_policy,
    )
    sp.add_argument("path")
    sp.add_argument("--keep-last", type=_keep_last, metavar="N|none", default=argparse.SUPPRESS)
    sp.add_argument("--keep-within", type=_duration, metavar="AGE|none", default=argparse.SUPPRESS)
    sp.add_argument(
        "--compact-above",
        type=_ratio,
        metavar="X|none",
        default=argparse.SUPPRESS,
        help="compact after a commit when stored bytes exceed X times the live bytes",
    )
    sp.add_argument(
        "--compact-min-bytes",
        type=parse_count,
        metavar="B",
        default=argparse.SUPPRESS,
        help="never compact automatically below this many stored bytes",
    )

    sp = add(
        "snapshot", "pin HEAD under a name, so that gc keeps it (or delete one)", c.cmd_snapshot
    )
    sp.add_argument("path")
    sp.add_argument("name")
    sp.add_argument(
        "--delete", action="store_true", help="delete the snapshot NAME (gc then frees its bytes)"
    )

    sp = add(
        "repair",
        "drop the rows of damaged chunks that HEAD reads, move intact rows out of damaged "
        "segments, gc them, and verify (what `dpsn verify` advises)",
        c.cmd_repair,
    )
    sp.add_argument("path")

    sp = add("drop", "return rows to procedural (delete their deltas) in a new commit", c.cmd_drop)
    sp.add_argument("path")
    sp.add_argument("rows", nargs="+", type=row_id, metavar="ROW")
    sp.add_argument("-m", "--message", default=None, help="commit message")

    sp = add(
        "stats",
        "cache and I/O figures (the writer's at its last commit, or a replayed trace) and the "
        "row lifecycle's health (a levelled store: per level health and migrations)",
        levelled(c.cmd_stats, lv.cmd_stats),
        epilog=SIZE_HELP,
    )
    sp.add_argument("path")
    sp.add_argument(
        "--replay",
        metavar="TRACE",
        help="ids to read through a fresh cache: a file (one batch per line), - for stdin, "
        'or "1,2,3"',
    )
    sp.add_argument("--cache-rows", type=parse_count, default=None)
    sp.add_argument("--policy", default="lru", help=f"{', '.join(c.POLICIES)} (default lru)")

    sp = add(
        "export",
        "write rows (base + delta, or deltas only) to a safetensors file, in chunks",
        c.cmd_export,
        epilog="The file holds 'ids' (int64 [n]) and 'weight' ([n, dim], the store's dtype).\n"
        "ROWS: all | persisted | ids and ranges A:B (half-open), comma-separated.\n"
        "Default: all rows (persisted ones with --deltas-only).",
    )
    sp.add_argument("path")
    sp.add_argument("out", metavar="OUT.safetensors")
    sp.add_argument("--rows", metavar="ROWS", help="which rows (see below)")
    sp.add_argument("--deltas-only", action="store_true", help="the learned deltas, not rows")
    sp.add_argument("--at", help="a snapshot name or commit id (default: HEAD)")
    sp.add_argument("--force", action="store_true", help="replace OUT if it exists")

    sp = add(
        "import",
        "build a store from a dense table (.safetensors or .npy), in chunks",
        c.cmd_import,
        epilog="Rows read back bit for bit with the default generator 'zeros' (base rows of\n"
        "-0.0, so the delta is the row). A safetensors table with an int64 'ids' tensor\n"
        "(what dpsn export writes) puts each row at its id.\n\n" + (kinds_epilog or ""),
    )
    sp.add_argument("table", metavar="TABLE")
    sp.add_argument("store", metavar="OUT_STORE")
    sp.add_argument("--tensor", help="the table's name in a safetensors file (default: weight)")
    sp.add_argument("--ids", help="a 1-D int64 tensor of row ids (default: 'ids' if present)")
    sp.add_argument(
        "--rows", type=positive_count, help="virtual rows of the store (default: the table's)"
    )
    sp.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="store dtype (default: the table's; needed to convert float64)",
    )
    sp.add_argument(
        "--generator",
        default="zeros",
        choices=kind_names,
        metavar="KIND",
        help="base rows (default zeros: exact)",
    )
    sp.add_argument("--seed", type=parse_count, default=0)
    sp.add_argument("--compressor", default="lz4", choices=["lz4", "zstd", "none"])
    sp.add_argument(
        "--commit-rows", type=positive_count, default=None, help="rows per commit (~256 MiB)"
    )

    sp = add(
        "demo",
        "create a store, train a little, commit, reopen and inspect it",
        c.cmd_demo,
    )
    sp.add_argument("dir", nargs="?", default="dpsn-demo", help="where (default ./dpsn-demo)")
    sp.add_argument("--steps", type=positive_count, default=200, help="training steps (>= 1)")
    sp.add_argument("--force", action="store_true", help="replace an existing store at DIR")

    _sharded.add_commands(add)  # reshard (tools/_sharded.py)
    _remote.add_commands(add)  # push (tools/_remote.py)
    from ._overlay import add_overlay_commands

    add_overlay_commands(lambda name, help_, fn: add(name, help_, fn, json_flag=False))
    sub.add_parser("bench", help="run a benchmark: dpsn bench NAME [ARGS...] (dpsn bench --help)")
    return p


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _store_path(args: argparse.Namespace) -> str | None:
    for key in ("path", "store", "dir"):
        value = getattr(args, key, None)
        if isinstance(value, str):
            return value
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("DPSN_DEBUG", "") not in ("", "0")
    command = _command_of(argv)
    args = None
    try:
        if command == "bench":
            at = argv.index("bench")
            debug = debug or "--debug" in argv[:at]
            return _finish(run_bench(argv[at + 1 :]))
        parser = build_parser(command)
        args = parser.parse_args(argv)
        debug = debug or getattr(args, "debug", False)
        return _finish(int(_sharded.route(args)(args)))  # a sharded root's info/log/verify
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        print("dpsn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as e:
        if debug:
            raise
        return _report(e, command or "dpsn", _store_path(args) if args else None)


def _finish(code: int) -> int:
    """Flush stdout inside the try: a reader that went away shows up here, not at exit."""
    sys.stdout.flush()
    return code


def _closed_pipe() -> int:
    # The reader went away (`dpsn log S | head`): stop quietly, like a C tool ended by SIGPIPE.
    # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE


def _report(e: BaseException, command: str, path: str | None) -> int:
    from dpsn.errors import (
        DpsnError,
        InvalidArgumentError,
        InvalidArgumentTypeError,
        InvalidIdsError,
    )

    from ._messages import cli_message

    text = cli_message(e, command=command, path=path)
    if isinstance(e, (InvalidIdsError, InvalidArgumentError, InvalidArgumentTypeError)):
        code = EXIT_USAGE
    elif isinstance(e, (DpsnError, OSError)):
        code = EXIT_PROBLEM
    elif isinstance(e, (ValueError, TypeError)):
        code = EXIT_USAGE
    elif isinstance(e, MemoryError):
        text, code = "out of memory", EXIT_PROBLEM
    else:  # a bug or something unforeseen: say what, and how to see more
        text = f"{type(e).__name__}: {text} (run with --debug or DPSN_DEBUG=1 for the traceback)"
        code = EXIT_PROBLEM
    text = re.sub(r"\s*\n\s*", " ", text.strip())  # one line, whatever the error held
    with contextlib.suppress(BrokenPipeError):
        print(f"dpsn {command}: error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
