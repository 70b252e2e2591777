"""``dpsn overlay``: overlay stores from the command line, and their lines in ``dpsn info``.

``dpsn overlay create BASE NEW [--at SNAP]`` makes NEW an overlay of BASE at snapshot or commit
SNAP (default: BASE's HEAD, pinned in BASE as ``overlay-<uuid>``); see docs/overlays.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

__all__ = ["add_overlay_commands", "overlay_fields"]


def cmd_overlay_create(args: argparse.Namespace) -> int:
    import dpsn

    at: str | int | None = args.at
    if isinstance(at, str) and at.isdigit():
        at = int(at)
    pool = dpsn.create(args.new, base=args.base, base_at=at)
    try:
        info = {"path": str(pool.path), "uuid": pool.uuid, "base": pool.base_store}
    finally:
        pool.close()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        base = info["base"]
        print(
            f"created overlay {info['path']} over {base['path']} at commit {base['commit']} "
            f"(pinned by snapshot {base['snapshot']!r})"
        )
    return 0


def add_overlay_commands(
    add: Callable[..., argparse.ArgumentParser],
) -> None:
    """Register ``dpsn overlay create`` with the CLI's ``add(name, help, fn)``."""
    sp = add("overlay", "overlay stores: dpsn overlay create BASE NEW [--at SNAP]", _no_action)
    sub = sp.add_subparsers(dest="overlay_command", required=True, metavar="ACTION")
    cp = sub.add_parser(
        "create",
        help="create NEW, an overlay of BASE (its rows: BASE's at SNAP + its own deltas)",
    )
    cp.set_defaults(fn=cmd_overlay_create)
    cp.add_argument("base", help="the base store (never written, except for its pin record)")
    cp.add_argument("new", help="the overlay store to create (a new or empty directory)")
    cp.add_argument("--at", help="a snapshot name or commit id of BASE (default: its HEAD)")
    cp.add_argument("--json", action="store_true", help="print JSON")


def _no_action(args: argparse.Namespace) -> int:  # argparse requires an ACTION first
    return 2


def overlay_fields(info: dict[str, Any]) -> list[tuple[str, Any]]:
    """``dpsn info`` lines: the chain of bases below the store and the overlays pinning it."""
    out: list[tuple[str, Any]] = []
    for depth, link in enumerate(info.get("base_chain") or []):
        missing = " (missing)" if link.get("missing") else ""
        out.append(
            (
                "overlay of" if depth == 0 else "  then of",
                f"{link['path']} at commit {link['commit']} "
                f"(snapshot {link['snapshot']!r}){missing}",
            )
        )
    overlays = info.get("overlays") or {}
    if overlays:
        pins = ", ".join(f"{u[:12]}@{c}" for u, c in sorted(overlays.items()))
        out.append(("overlays", f"{len(overlays)} pinned ({pins})"))
    return out
