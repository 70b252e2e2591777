"""``dpsn push STORE URL``: publish a local store's newest commit to object storage."""

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
