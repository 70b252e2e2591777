"""The ``dpsn`` commands, one function each: ``cmd_NAME(args) -> exit code``.

Commands that only read records (``info``, ``log``, ``stats`` without ``--replay``,
``inspect --no-base``, ``verify``, ``gc``, ``snapshot``) import neither torch nor the
generator; the others import ``dpsn`` (and with it torch) inside the function.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ._counts import parse_count

EXIT_OK, EXIT_PROBLEM = 0, 1
# The cache's built-in eviction policies. Listed here so that `dpsn stats` can check a name
# without importing torch; tests/test_cli.py holds it equal to dpsn.tiers.policies().
POLICIES = ("lfu", "lru", "tinylfu")


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _progress(total: int | None, desc: str, unit: str = "seg") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False)


def _when(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


# -- commands: create ---------------------------------------------------------------------------


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
        cache_rows=0,
    ):
        pass
    from dpsn.store import StoreFacts

    with StoreFacts(args.path) as facts:
        info = facts.info()
    if args.json:
        _print_json(info)
    else:
        print(
            f"created {args.path}: {args.rows} rows x {args.dim} ({args.dtype}), "
            f"generator {args.generator}, seed {args.seed}"
        )
    return EXIT_OK


# -- commands that read records only -----------------------------------------------------------


def _info_lines(info: dict[str, Any]) -> str:
    from ._format import fields, human_bytes, human_count
    from ._overlay import overlay_fields

    gen = info["generator"]
    head = " (HEAD)" if info["commit"] == info["head"] else f" (HEAD is {info['head']})"
    about = "" if info["live_bytes_exact"] else "about "
    return fields(
        [
            ("path", info["path"]),
            ("format", f"dpsn-store v{info['format_version']}"),
            ("rows", f"{info['rows']} ({human_count(info['rows'])} virtual)"),
            ("dim", info["dim"]),
            ("dtype", info["dtype"]),
            ("seed", info["seed"]),
            (
                "generator",
                f"{gen['kind']} {json.dumps(gen['config'], sort_keys=True)} "
                f"({human_count(gen['parameters'])} parameters, version {gen['version']})",
            ),
            ("virtual parameters", f"{human_count(info['virtual_parameters'])} (rows x dim)"),
            ("commit", f"{info['commit']} of {info['commits']}{head}"),
            ("snapshots", info["snapshots"]),
            *overlay_fields(info),
            ("persisted rows", f"{info['persisted_rows']} (rows with a delta at this commit)"),
            ("segments", f"{info['segments']} ({info['row_versions']} row versions)"),
            ("raw", human_bytes(info["segment_bytes_raw"])),
            ("stored", human_bytes(info["segment_bytes_stored"])),
            (
                "ratio",
                "-"
                if info["compression_ratio"] is None
                else f"{info['compression_ratio']:.3f} (raw / stored)",
            ),
            ("live", about + human_bytes(info["live_bytes"])),
            ("garbage", human_bytes(info["garbage_bytes"])),
            (
                "leftovers",
                f"{human_bytes(info['leftover_bytes'])} in {info['leftover_segments']} "
                "segment(s) of interrupted commits",
            ),
            ("on disk", human_bytes(info["bytes_on_disk"])),
            ("row index", _runs_line(info.get("index_runs"))),
            ("space amplification", _amp(info["space_amplification"], "stored / live")),
            (
                "write amplification",
                _amp(info["write_amplification"], "written / written by commits")
                + f", {info['compactions']} compaction(s)",
            ),
        ]
    )


def _runs_line(runs: dict[str, Any] | None) -> str:
    from ._format import human_bytes

    if runs is None:
        return "in LMDB (read whole at open)"
    return (
        f"{runs['runs']} run file(s), {runs['entries']} entries as of commit {runs['commit']}, "
        f"{human_bytes(runs['bytes'])} (mapped at open)"
    )


def _amp(value: float | None, what: str) -> str:
    return "-" if value is None else f"{value:.2f}x ({what})"


def cmd_info(args: argparse.Namespace) -> int:
    from dpsn.store import StoreFacts

    with StoreFacts(args.path) as facts:
        info = facts.info(at=args.at)
    if args.json:
        _print_json(info)
    else:
        print(_info_lines(info))
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    from dpsn.store import StoreFacts

    from ._format import table

    with StoreFacts(args.path) as facts:
        commits = facts.log()
        snaps = facts.snapshots()
    by_commit: dict[int, list[str]] = {}
    for name, rec in sorted(snaps.items()):
        by_commit.setdefault(int(rec["commit"]), []).append(name)
    if args.json:
        _print_json([c | {"snapshots": by_commit.get(c["id"], [])} for c in commits])
        return EXIT_OK
    rows = [
        (
            c["id"],
            _when(c["time"]),
            c["rows_written"],
            c["rows_dropped"],
            c["persisted_rows"],
            str(c.get("provenance", ""))[:12],
            ",".join(by_commit.get(c["id"], [])),
            c.get("message", ""),
        )
        for c in reversed(commits)
    ]
    headers = ["commit", "time", "written", "dropped", "persisted", "provenance", "snapshots"]
    print(table([*headers, "message"], rows))
    return EXIT_OK


def _rows_arg(values: list[int], rows: int) -> None:
    from dpsn.errors import RowIdOutOfRangeError

    for r in values:
        if r >= rows:
            raise RowIdOutOfRangeError(
                f"row id {r} is out of range: this store has ids 0..{rows - 1}"
            )


def _delta_norms(path: str, ids: list[int], at: str | None) -> tuple[int, list[float], list[int]]:
    """Norms of the committed deltas of ``ids`` and the commit that wrote each (0: none), read
    without torch: LMDB gets at HEAD, the persisted tier's index for a past commit."""
    import numpy as np

    from dpsn.store import PersistedStore, RowIndex, StoreFacts, pending_decay

    with StoreFacts(path) as facts:
        _rows_arg(ids, facts.manifest.rows)
        commit = facts.resolve(at)
        head, where = facts.row_locations(ids)
        lifecycle = facts.commit(commit).get("lifecycle")
    store = PersistedStore.open(Path(path), writable=False)
    try:
        if commit == head:
            found = sorted(where)
            index = RowIndex(
                ids=np.array(found, dtype=np.int64),
                segment=np.array([where[i][0] for i in found], dtype=np.int64),
                offset=np.array([where[i][1] for i in found], dtype=np.int64),
                commit=np.array([where[i][2] for i in found], dtype=np.int64),
            )
        else:
            index = store.load_index(commit)
        query = np.array(ids, dtype=np.int64)
        width = 10 if lifecycle is not None else 0  # the usage column (docs/format.md)
        mask, values, _, usage = store.read_deltas(index, query, usage_width=width)
        pos, present = index.find(query)
    finally:
        store.close()
    if values.dtype == np.uint16:  # bfloat16 bit patterns: the high half of a float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    norms = np.zeros(len(ids))
    norms[mask] = np.linalg.norm(values.astype(np.float64), axis=1)
    norms[mask] *= pending_decay(usage, lifecycle)  # a FREE row's delta decays lazily
    commits = np.where(present, index.commit[pos] if len(index) else 0, 0)
    return commit, norms.tolist(), [int(c) for c in commits]


def cmd_inspect(args: argparse.Namespace) -> int:
    from ._format import table

    if args.no_base:
        _, deltas, commits = _delta_norms(args.path, args.rows, args.at)
        out = [
            {
                "row": int(r),
                "delta_norm": float(d),
                "persisted": bool(c),
                "last_commit": int(c) if c else None,
            }
            for r, d, c in zip(args.rows, deltas, commits, strict=True)
        ]
        headers = ["row", "delta_norm", "last_commit"]
    else:
        import torch

        import dpsn

        with dpsn.open(args.path, at=args.at, cache_rows=0) as pool:
            ids = torch.tensor(args.rows, dtype=torch.int64)
            base = pool.base(ids).float()
            delta = pool.delta(ids).float()
            commits = pool.row_commits(ids).tolist()
        out = [
            {
                "row": int(r),
                "base_norm": float(b.norm()),
                "delta_norm": float(d.norm()),
                "row_norm": float((b + d).norm()),
                "persisted": bool(c),
                "last_commit": int(c) if c else None,
            }
            for r, b, d, c in zip(args.rows, base, delta, commits, strict=True)
        ]
        headers = ["row", "base_norm", "delta_norm", "row_norm", "last_commit"]
    if args.json:
        _print_json(out)
    else:
        cells = [
            [o[h] if h != "last_commit" else (o[h] or "procedural") for h in headers] for o in out
        ]
        print(table(headers, cells))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from dpsn.errors import DpsnError
    from dpsn.store import PersistedStore

    from ._messages import cli_message

    store = PersistedStore.open(Path(args.path), writable=False)
    try:
        try:  # only the progress bar's total: verify itself reports what is damaged
            total: int | None = len(store.segment_records())
        except DpsnError:
            total = None
        with _progress(total, "verify") as bar:
            report = store.verify(progress=bar.update)
    finally:
        store.close()
    # The tier's messages suggest `dpsn verify` to readers that hit damage; here it is running.
    report.problems = [
        re.sub(r"\s*Run `dpsn verify` for the full list;?", "", p) for p in report.problems
    ]
    report.problems = [
        cli_message(Exception(p), command="verify", path=args.path) for p in report.problems
    ]
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
        if report.damaged_rows:
            shown = " ".join(map(str, report.damaged_rows[:8]))
            more = " ..." if len(report.damaged_rows) > 8 else ""
            print(
                f"damaged rows: {len(report.damaged_rows)} ({shown}{more}); `dpsn repair "
                f"{args.path}` drops the ones HEAD reads, moves the intact rows out of the "
                "damaged segments and removes them (verify is clean after it unless a snapshot "
                "pins them)"
            )
    return EXIT_OK if report.ok else EXIT_PROBLEM


def cmd_gc(args: argparse.Namespace) -> int:
    from dpsn.store import PersistedStore, remote

    if remote.is_url(args.path):  # a bucket's published store (tools/_remote.py)
        from ._remote import cmd_gc_url

        return cmd_gc_url(args)

    from ._format import human_bytes

    # A dry run changes nothing: it needs no writer lock, so it answers while a writer works.
    store = PersistedStore.open(Path(args.path), writable=not args.dry_run)
    try:
        with _progress(0, "gc") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            retention = {
                k: getattr(args, k)
                for k in ("keep_last", "keep_within")
                if getattr(args, k, None) is not None
            }
            result = store.gc(dry_run=args.dry_run, progress=progress, **retention)
        if args.dry_run:  # what removing them would free (the tier counts it only when it does)
            from dpsn.store import tree_bytes

            seg_dir = store.root / "data.zarr" / "segments"
            doomed = result["removed_segments"] + result["orphan_segments"]
            result["freed_bytes"] = sum(tree_bytes(seg_dir / f"{s:016x}") for s in doomed) + sum(
                tree_bytes(store.root / p) for p in result.get("stale_versions", [])
            )
    finally:
        store.close()
    if args.json:
        _print_json(result)
    else:
        verb, freed = ("would remove", "would free") if args.dry_run else ("removed", "freed")
        print(
            f"{verb} {len(result['removed_segments'])} unreferenced segment(s), "
            f"{len(result['orphan_segments'])} leftover(s) of interrupted commits, "
            f"{result['partial_files']} partial file(s), "
            f"{len(result.get('stale_versions', []))} old generator/router version(s); "
            f"{freed} {human_bytes(result['freed_bytes'])}; commits from {result['kept_from']} "
            "on stay rebuildable"
        )
        if result.get("deferred"):
            print("files left for the next gc: a reader opened the store meanwhile")
        for line in _pinned_lines(result.get("pinned"), args.path):
            print(line)
    return EXIT_OK


def _pinned_lines(pinned: list[dict[str, Any]] | None, path: str) -> list[str]:
    """What keeps segments HEAD does not read (gc's ``"pinned"``), and how to let them go."""
    from ._format import human_bytes

    lines = []
    for p in pinned or ():
        how = ""
        if p["by"].startswith("snapshot "):
            name = p["by"].split("'")[1] if "'" in p["by"] else "NAME"
            how = f"; `dpsn snapshot {path} --delete {name}` releases them"
        elif p["by"].startswith("retention window"):
            how = f"; `dpsn gc {path} --keep-last 1` (or `dpsn policy`) narrows it"
        lines.append(
            f"kept by {p['by']}: {p['segments']} segment(s), "
            f"{human_bytes(p['stored_bytes'])} stored{how}"
        )
    return lines


def cmd_compact(args: argparse.Namespace) -> int:
    from dpsn.store import PersistedStore

    from ._format import human_bytes

    store = PersistedStore.open(Path(args.path), writable=True)
    try:
        with _progress(0, "compact", unit="row") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            result = store.compact(progress=progress).to_json()
    finally:
        store.close()
    if args.json:
        _print_json(result)
        return EXIT_OK
    b, a = result["before"], result["after"]
    if not result["commits"]:
        print(f"nothing to compact: space amplification {_amp(b['space_amplification'], '')}")
        return EXIT_OK
    freed = (result["gc"] or {}).get("freed_bytes", 0)
    print(
        f"moved {result['rows_moved']} live rows of {len(result['source_segments'])} segment(s) "
        f"into {len(result['new_segments'])} (commit(s) {', '.join(map(str, result['commits']))}); "
        f"wrote {human_bytes(result['bytes_written'])}, gc freed {human_bytes(freed)}\n"
        f"space amplification {_amp(b['space_amplification'], 'before')} -> "
        f"{_amp(a['space_amplification'], 'after')}; write amplification "
        f"{_amp(a['write_amplification'], 'so far')}"
    )
    for line in _pinned_lines((result["gc"] or {}).get("pinned"), args.path):
        print(line)
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    from dpsn.store import PersistedStore, read_policy, write_policy

    names = ("keep_last", "keep_within", "compact_above", "compact_min_bytes")
    changes = {k: getattr(args, k) for k in names if hasattr(args, k)}
    store = PersistedStore.open(Path(args.path), writable=bool(changes))
    try:
        policy = read_policy(store)
        if changes:
            policy = policy.with_(**changes)
            write_policy(store, policy)
    finally:
        store.close()
    out = policy.to_json()
    if args.json:
        _print_json(out)
    else:
        from ._format import fields, human_bytes, human_duration

        shown = dict(out)
        if shown.get("keep_within") is not None:
            shown["keep_within"] = human_duration(shown["keep_within"])
        if shown.get("compact_min_bytes") is not None:
            shown["compact_min_bytes"] = human_bytes(shown["compact_min_bytes"])
        print(fields([(k.replace("_", " "), "-" if v is None else v) for k, v in shown.items()]))
    return EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    from dpsn.errors import SnapshotExistsError
    from dpsn.store import PersistedStore

    store = PersistedStore.open(Path(args.path), writable=True)
    try:
        if args.delete:
            commit = store.snapshots().get(args.name, {}).get("commit")
            store.unpin(args.name)
        else:
            head = store.head()
            if args.name in store.snapshots():
                raise SnapshotExistsError(
                    f"snapshot {args.name!r} exists already (commit "
                    f"{store.snapshots()[args.name]['commit']}); choose another name, or "
                    f"`dpsn snapshot {args.path} --delete {args.name}` first"
                )
            store.pin(args.name, head)
    finally:
        store.close()
    if args.delete:
        if args.json:
            _print_json({"deleted": args.name, "commit": commit})
        else:
            print(
                f"deleted snapshot {args.name!r} (commit {commit}) of {args.path}; "
                f"`dpsn gc {args.path}` frees what only it kept"
            )
        return EXIT_OK
    if args.json:
        _print_json({"snapshot": args.name, "commit": head})
    else:
        print(
            f"pinned commit {head} of {args.path} as {args.name!r} (open it with --at {args.name})"
        )
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    from ._repair import repair

    result = repair(args.path)
    if args.json:
        _print_json(result)
        return EXIT_OK if result["verify_ok"] else EXIT_PROBLEM
    if not result["damaged_segments"]:
        print(f"{args.path}: no damaged segment; nothing to repair")
        return EXIT_OK
    print(
        f"{args.path}: {result['damaged_segments']} damaged segment(s); dropped "
        f"{result['rows_dropped']} row(s) HEAD read from damaged chunks (procedural again), "
        f"moved {result['rows_moved']} intact row(s) out, kept only HEAD's history"
    )
    for name in result["pinned_by_snapshots"]:
        print(
            f"snapshot {name!r} still pins a damaged segment: `dpsn snapshot {args.path} "
            f"--delete {name}`, then `dpsn gc {args.path}`"
        )
    if result["verify_ok"]:
        print("verify: ok")
        return EXIT_OK
    for p in result.get("problems", []):
        print(f"  - {p}")
    return EXIT_PROBLEM


def cmd_drop(args: argparse.Namespace) -> int:
    import dpsn

    with dpsn.open(args.path, mode="r+", cache_rows=0) as pool:
        _rows_arg(args.rows, pool.rows)
        pool.drop(args.rows)
        c = pool.commit(args.message or f"drop {len(set(args.rows))} row(s)")
    if args.json:
        _print_json(c.to_json())
    else:
        print(f"commit {c.id}: dropped {c.rows_dropped} row(s); they are procedural again")
    return EXIT_OK


# -- stats ---------------------------------------------------------------------------------------


_INLINE_TRACE = re.compile(r"[\d\s,_eE*]+")


def _parse_trace(spec: str) -> list[list[int]]:
    """Batches of ids: ``-`` (stdin) or a file, one batch per line; or one inline batch
    ``"1,2,3"``. Anything that is not plainly a list of numbers is taken for a file name."""
    if spec == "-":
        lines, where = sys.stdin.read().splitlines(), "stdin"
    elif _INLINE_TRACE.fullmatch(spec) and not Path(spec).is_file():
        lines, where = [spec], "--replay"
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"--replay {spec}: no such file")
        if not path.is_file():
            raise IsADirectoryError(f"--replay {spec}: not a file")
        lines, where = path.read_text().splitlines(), spec
    batches = []
    for n, line in enumerate(lines, 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        try:
            batches.append([parse_count(p) for p in parts])
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{where}: line {n}: {e}") from None
    if not batches:
        raise ValueError(f"{where}: no ids to replay")
    return batches


def _lifecycle_fields(lc: dict[str, Any], human_bytes: Any) -> list[tuple[str, Any]]:
    """The row lifecycle's health for ``dpsn stats`` (see ``dpsn.tiers.lifecycle_health``)."""
    regions = lc.get("regions") or {}
    band = lc.get("target_band") or ["-", "-"]
    rate = lc.get("screening_rate")
    enter, exit_ = lc.get("enter"), lc.get("exit")
    return [
        (
            "lifecycle: screened / free / held rows",
            f"{lc['screened_rows']} / {lc['free_rows']} / {lc['held_rows']}",
        ),
        (
            "lifecycle: screened / free bytes",
            f"{human_bytes(lc['screened_bytes'])} / {human_bytes(lc['free_bytes'])}",
        ),
        (
            "lifecycle: screening rate",
            f"{'-' if rate is None else f'{rate:.3f}'} (target {band[0]}..{band[1]})",
        ),
        (
            "lifecycle: enter / exit",
            "-" if enter is None or exit_ is None else f"{enter:.4g} / {exit_:.4g}",
        ),
        ("lifecycle: consolidations", lc["consolidations"]),
        ("lifecycle: decays / prunes", f"{lc['decayed_rows']} / {lc['pruned_rows']}"),
        (
            "lifecycle: regions with rows",
            f"{regions.get('with_rows', 0)} of {regions.get('count', '-')}, "
            f"at most {regions.get('rows_max', 0)} rows, "
            f"{regions.get('over_budget', 0)} over budget",
        ),
        ("lifecycle: health", "ok" if lc["ok"] else "; ".join(lc["flags"])),
    ]


def cmd_stats(args: argparse.Namespace) -> int:
    from dpsn.store import StoreFacts, lifecycle_health

    from ._format import fields, human_bytes

    if args.policy not in POLICIES:  # even without --replay: a typo is an error
        raise ValueError(f"unknown eviction policy {args.policy!r}; known: {', '.join(POLICIES)}")
    batches = _parse_trace(args.replay) if args.replay else None
    with StoreFacts(args.path) as facts:
        info = facts.info()
        last = facts.last_writer_stats()
        lifecycle = lifecycle_health(facts.commit(facts.head()).get("lifecycle"))
    writer = last[1] if last else None
    keys = (
        "persisted_rows",
        "segments",
        "bytes_on_disk",
        "compression_ratio",
        "garbage_bytes",
        "space_amplification",
        "write_amplification",
        "compactions",
    )
    out: dict[str, Any] = {
        "store": {k: info[k] for k in keys},
        "writer": writer,
        "writer_commit": last[0] if last else None,
        "lifecycle": lifecycle,  # as of HEAD's commit record; None without a lifecycle
    }
    if batches is not None:
        import dpsn

        with dpsn.open(args.path, cache_rows=args.cache_rows, policy=args.policy) as pool:
            for batch in batches:
                pool.read(batch)
            out["replay"] = pool.stats() | {"batches": len(batches)}
    if args.json:
        _print_json(out)
        return EXIT_OK
    ratio = info["compression_ratio"]
    pairs: list[tuple[str, Any]] = [
        ("persisted rows", info["persisted_rows"]),
        ("segments", info["segments"]),
        ("on disk", human_bytes(info["bytes_on_disk"])),
        ("ratio", "-" if ratio is None else f"{ratio:.3f} (raw / stored)"),
        ("garbage", human_bytes(info["garbage_bytes"])),
        ("space amplification", _amp(info["space_amplification"], "stored / live")),
        ("write amplification", _amp(info["write_amplification"], "compaction included")),
    ]
    if lifecycle:
        pairs += _lifecycle_fields(lifecycle, human_bytes)
    title_writer = f"writer (commit {last[0]})" if last else "writer"
    for title, s in ((title_writer, writer), ("replay", out.get("replay"))):
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
    if not writer:
        pairs.append(("writer", "no commit recorded cache figures"))
    print(fields(pairs))
    return EXIT_OK


# -- export / import ---------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from ._format import human_bytes
    from ._transfer import export_rows

    result = export_rows(
        args.path,
        args.out,
        rows_spec=args.rows,
        deltas_only=args.deltas_only,
        at=args.at,
        force=args.force,
    )
    if args.json:
        _print_json(result)
    else:
        print(
            f"wrote {result['out']}: {result['rows']} {result['values']} x {result['dim']} "
            f"({result['dtype']}) of commit {result['commit']}, {human_bytes(result['bytes'])}, "
            f"tensors 'ids' and 'weight'"
        )
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from ._transfer import import_table

    result = import_table(
        args.table,
        args.store,
        tensor=args.tensor,
        ids_name=args.ids,
        rows=args.rows,
        dtype=args.dtype,
        generator=args.generator,
        seed=args.seed,
        compressor=args.compressor,
        commit_rows=args.commit_rows,
    )
    if args.json:
        _print_json(result)
    else:
        where = "at the table's ids" if result["placed_by_ids"] else "as rows 0..n-1"
        print(
            f"imported {result['rows_imported']} rows x {result['dim']} ({result['dtype']}) "
            f"from {result['table']} ({result['tensor']}) {where} into {result['store']} "
            f"({result['rows']} rows, generator {result['generator']}, "
            f"{result['commits']} commit(s))"
        )
        if result["rows_not_exact"]:
            print(
                f"note: {result['rows_not_exact']} rows read back up to "
                f"{result['max_abs_error']:.3g} off the table (rounding of base + delta with "
                f"generator {result['generator']}); --generator zeros imports bit for bit"
            )
    return EXIT_OK


# -- demo and bench ------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(args.dir, steps=args.steps, force=args.force, as_json=args.json)
