"""``dpsn log`` and ``dpsn stats`` (and ``info``, ``verify``) on a levelled store's root.

Torch-free: the root files are read with ``dpsn.tiers.levels_format`` and each level store
with ``StoreFacts``. :func:`levelled` wraps a command so that a levelled root goes here and any
other path to the single-level command.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_PROBLEM = 0, 1


def levelled(
    single: Callable[[argparse.Namespace], int], root_command: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """``single`` for a single-level store, ``root_command`` for a levelled root."""

    @functools.wraps(single)
    def run(args: argparse.Namespace) -> int:
        from dpsn.store import levels as levels_format

        path = getattr(args, "path", None)
        if isinstance(path, str) and levels_format.is_levelled(path):
            return root_command(args)
        if getattr(args, "migrations", False):
            raise ValueError(f"{path} is not a levelled store: --migrations needs one")
        return single(args)

    return run


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def cmd_log(args: argparse.Namespace) -> int:
    """Root commits, newest first (``--migrations``: the migration records instead)."""
    from dpsn.store import levels as levels_format

    from ._format import table

    spec, log = levels_format.read_root(args.path)
    commits = log["commits"]
    snaps: dict[int, list[str]] = {}
    for name, commit in sorted(log["snapshots"].items()):
        snaps.setdefault(int(commit), []).append(name)
    if getattr(args, "migrations", False):
        recs = [{"commit": c["id"], **m} for c in commits for m in c.get("migrations", [])]
        if args.json:
            _print_json(recs)
            return EXIT_OK
        rows = [
            (
                r["commit"],
                r["from"],
                r["to"],
                r["rows"],
                r["bypasses"],
                r.get("completed", 0),
                r.get("conflicts", 0),
                r.get("backlog", 0),
                "-" if r["pressure"] is None else f"{r['pressure'][0]:.3g}..{r['pressure'][1]:.3g}",
            )
            for r in reversed(recs)
        ]
        headers = ["commit", "from", "to", "rows", "bypasses", "completed", "conflicts"]
        print(table([*headers, "backlog", "pressure"], rows))
        return EXIT_OK
    if args.json:
        _print_json([c | {"snapshots": snaps.get(c["id"], [])} for c in commits])
        return EXIT_OK
    names = [lv["name"] for lv in spec["levels"] if lv["persist"]]
    rows = [
        (
            c["id"],
            " ".join(f"{n}@{c['levels'][n]}" for n in names),
            sum(m["rows"] for m in c.get("migrations", [])),
            c["provenance"][:12],
            ",".join(snaps.get(c["id"], [])),
            c.get("message", ""),
        )
        for c in reversed(commits)
    ]
    print(table(["commit", "levels", "migrated", "provenance", "snapshots", "message"], rows))
    return EXIT_OK


def _level_facts(root: Path, name: str) -> dict[str, Any]:
    from dpsn.store import StoreFacts
    from dpsn.store import levels as levels_format

    with StoreFacts(root / levels_format.LEVELS_DIR / name) as facts:
        return facts.info()


def cmd_stats(args: argparse.Namespace) -> int:
    """Per level: rows and bytes on disk, and the health figures of the newest root commit;
    per channel: migrations and bypasses in all."""
    from dpsn.store import levels as levels_format

    from ._format import human_bytes, table

    root = Path(args.path)
    spec, log = levels_format.read_root(root)
    head = log["commits"][-1]
    health = head.get("health", {})
    levels: dict[str, Any] = {}
    for lv in spec["levels"]:
        entry: dict[str, Any] = {"persist": lv["persist"], **health.get(lv["name"], {})}
        if lv["persist"]:
            info = _level_facts(root, lv["name"])
            entry["persisted_rows"] = info["persisted_rows"]
            entry["bytes_on_disk"] = info["bytes_on_disk"]
            entry["commit"] = head["levels"][lv["name"]]
        levels[lv["name"]] = entry
    channels: dict[str, dict[str, int]] = {}
    for c in log["commits"]:
        for m in c.get("migrations", []):
            ch = channels.setdefault(f"{m['from']}->{m['to']}", {"rows": 0, "bypasses": 0})
            ch["rows"] += m["rows"]
            ch["bypasses"] += m["bypasses"]
    out = {"commit": head["id"], "model_id": spec["model_id"], "levels": levels}
    out["channels"] = channels
    if args.json:
        _print_json(out)
        return EXIT_OK

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    keys = ["screening_rate", "entropy_ratio", "migration_backlog", "conflict_rate"]
    rows = [
        (
            name,
            "yes" if e["persist"] else "context",
            fmt(e.get("persisted_rows")),
            human_bytes(e["bytes_on_disk"]) if "bytes_on_disk" in e else "-",
            *(fmt(e.get(k)) for k in keys),
            fmt(e.get("effective_inertia")),
        )
        for name, e in levels.items()
    ]
    print(f"root commit {head['id']}, model {spec['model_id']}")
    headers = ["level", "persisted", "rows", "on disk", "screening", "entropy", "backlog"]
    print(table([*headers, "conflicts", "inertia"], rows))
    if channels:
        print(
            table(
                ["channel", "migrated", "bypasses"],
                [(k, v["rows"], v["bypasses"]) for k, v in channels.items()],
            )
        )
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """The root's spec, its newest (or ``--at``) root commit, and each level store's size."""
    from dpsn.store import levels as levels_format

    from ._format import human_bytes, table

    root = Path(args.path)
    spec, log = levels_format.read_root(root)
    at = getattr(args, "at", None)
    if at is None:
        rec = log["commits"][-1]
    else:
        commit = log["snapshots"].get(at) if not str(at).isdigit() else int(at)
        if commit is None or not 1 <= int(commit) <= len(log["commits"]):
            raise ValueError(f"{root} has no snapshot or root commit {at!r}")
        rec = log["commits"][int(commit) - 1]
    levels = []
    for lv in spec["levels"]:
        entry = dict(lv)
        if lv["persist"]:
            info = _level_facts(root, lv["name"])
            entry.update(
                commit=rec["levels"][lv["name"]],
                persisted_rows=info["persisted_rows"],
                bytes_on_disk=info["bytes_on_disk"],
            )
        levels.append(entry)
    out = {
        "path": str(root),
        "format": spec["format"],
        "version": spec["version"],
        "rows": spec["rows"],
        "dim": spec["dim"],
        "dtype": spec["dtype"],
        "seed": spec["seed"],
        "model_id": spec["model_id"],
        "config": spec["config"],
        "commit": rec["id"],
        "provenance": rec["provenance"],
        "levels": levels,
        "migration": spec["migration"],
    }
    if args.json:
        _print_json(out)
        return EXIT_OK
    print(
        f"levelled store {root}: {spec['rows']} rows x {spec['dim']} {spec['dtype']}, seed "
        f"{spec['seed']}, model {spec['model_id']}, root commit {rec['id']} "
        f"(provenance {rec['provenance'][:16]})"
    )
    rows = [
        (
            e["name"],
            "yes" if e["persist"] else "context",
            e.get("commit", "-"),
            e.get("persisted_rows", "-"),
            human_bytes(e["bytes_on_disk"]) if "bytes_on_disk" in e else "-",
            e["inertia"],
            e["lr_scale"],
        )
        for e in levels
    ]
    print(table(["level", "persisted", "commit", "rows", "on disk", "inertia", "lr_scale"], rows))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Every level store's checks and the root provenance chain, recomputed."""
    from dpsn.store import PersistedStore
    from dpsn.store import levels as levels_format

    root = Path(args.path)
    problems = list(levels_format.verify_root(root))
    spec, _ = levels_format.read_root(root)
    for lv in spec["levels"]:
        if lv["persist"]:
            store = PersistedStore.open(
                root / levels_format.LEVELS_DIR / lv["name"], writable=False
            )
            try:
                problems += [f"level {lv['name']!r}: {p}" for p in store.verify().problems]
            finally:
                store.close()
    if args.json:
        _print_json({"ok": not problems, "problems": problems})
    else:
        print("ok" if not problems else "\n".join(problems))
    return EXIT_OK if not problems else EXIT_PROBLEM


def parse_level_list(text: str) -> list[Any]:
    """``--levels foundation,domain,task,context:memory``: names slowest first; a name with
    ``:memory`` is a context level (kept in memory, never committed)."""
    import dpsn

    names = [part.strip() for part in text.split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"--levels takes comma-separated level names, got {text!r}")
    out: list[Any] = []
    for n in names:
        name, _, kind = n.partition(":")
        if kind not in ("", "memory"):
            raise ValueError(f"--levels: {n!r}: the only level kind is ':memory' (a context level)")
        out.append(dpsn.Level(name, persist=not kind))
    return out


def create_or(single: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``dpsn create``: ``single`` without ``--levels``; a levelled root with it."""

    @functools.wraps(single)
    def run(args: argparse.Namespace) -> int:
        if getattr(args, "levels", None) is None:
            if getattr(args, "model_id", None) is not None:
                raise ValueError("--model-id needs --levels (it names a levelled store's model)")
            return single(args)
        import dpsn

        levels = parse_level_list(args.levels)
        with dpsn.create(
            args.path,
            rows=args.rows,
            dim=args.dim,
            seed=args.seed,
            generator=args.generator,
            dtype=args.dtype,
            compressor=args.compressor,
            cache_rows=0,
            levels=levels,
            model_id=args.model_id,
        ) as pool:
            info = {
                "path": str(pool.path),
                "rows": pool.rows,
                "dim": pool.dim,
                "seed": pool.seed,
                "levels": [lv.to_json() for lv in (pool.level_spec(n) for n in pool.levels)],
                "train_level": pool.train_level,
                "model_id": pool.model_id,
                "provenance": pool.provenance,
            }
        if args.json:
            _print_json(info)
        else:
            print(
                f"created levelled {args.path}: {args.rows} rows x {args.dim} ({args.dtype}), "
                f"levels {', '.join(lv.name for lv in levels)} (slowest first), "
                f"generator {args.generator}, seed {args.seed}"
            )
        return EXIT_OK

    return run
