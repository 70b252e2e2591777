"""``dpsn push STORE URL``: publish a local store's newest commit to object storage; and
``dpsn gc URL``: remove what a bucket's published store no longer needs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``push`` (called by ``cli.build_parser``)."""
    sp = add(
        "push",
        "publish a store's newest commit (or a sharded root's newest global commit) to object "
        "storage (s3://bucket/prefix); readers then open the URL. Credentials come from the "
        "environment (AWS_ACCESS_KEY_ID, ...)",
        cmd_push,
    )
    sp.add_argument("path")
    sp.add_argument("url")
    sp.add_argument(
        "--endpoint-url", help="an S3-compatible server's endpoint (MinIO, Ceph, moto, ...)"
    )


def cmd_push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dpsn.store import PersistedStore, remote
    from dpsn.store import shards as layout

    options: dict[str, Any] = {}
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    if layout.is_sharded(args.path):  # every shard, then the global record, HEAD last
        from dpsn.distributed import publish

        out = publish(args.path, args.url, options)
        if args.json:
            from ._commands import _print_json

            _print_json(out)
        else:
            print(
                f"{args.path}: global commit {out['global_commit']} ({len(out['shards'])} "
                f"shards) published to {args.url} ({out['objects_uploaded']} objects, "
                f"{out['bytes_uploaded']} bytes uploaded)"
            )
        return 0
    store = PersistedStore.open(Path(args.path), writable=True)  # no commit while it uploads
    try:
        out = remote.publish(store, args.url, options)
    finally:
        store.close()
    if args.json:
        from ._commands import _print_json

        _print_json(out)
    else:
        print(
            f"{args.path}: commit {out['commit']} published to {args.url} "
            f"({out['objects_uploaded']} objects, {out['bytes_uploaded']} bytes uploaded)"
        )
    return 0


def cmd_gc_url(args: argparse.Namespace) -> int:
    """``dpsn gc s3://...``: :func:`dpsn.store.remote.gc` (from ``cmd_gc``)."""
    from dpsn.store import remote

    from ._format import human_bytes

    options: dict[str, Any] = {}
    if getattr(args, "endpoint_url", None):
        options["endpoint_url"] = args.endpoint_url
    grace = getattr(args, "grace", None)
    out = remote.gc(
        args.path,
        options,
        keep_last=getattr(args, "keep_last", None),
        keep_within=getattr(args, "keep_within", None),
        grace=remote.GC_GRACE_S if grace is None else grace,
        dry_run=args.dry_run,
    )
    if args.json:
        from ._commands import _print_json

        _print_json(out)
    else:
        verb = "would remove" if args.dry_run else "removed"
        kind = "global" if "shards" in out else "published"  # a sharded root's: global commits
        print(
            f"{args.path}: {verb} {len(out['removed_commits'])} {kind} commit(s) and "
            f"{out['removed_objects']} object(s) ({human_bytes(out['freed_bytes'])}); kept "
            f"{kind} commits {out['kept_commits']} (HEAD {out['head']}), "
            f"{out['young_objects_kept']} unreferenced object(s) younger than the grace period"
            + (
                "; HEAD moved during the run, no object removed: run it again"
                if out.get("head_moved")
                else ""
            )
        )
    return 0
