"""Torch-free facts about overlays for ``dpsn info``: the chain of bases below a store (from
the manifests) and the overlays that pinned commits of a store (its ``overlay-<uuid>``
snapshots, the pin records ``dpsn.create(path, base=...)`` writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpsn.errors import DpsnError

from ._format import read_manifest

__all__ = ["OVERLAY_PIN_PREFIX", "base_chain", "overlay_pins"]

OVERLAY_PIN_PREFIX = "overlay-"  # snapshot names of overlay pins (never rename)
MAX_CHAIN = 64


def base_chain(root: Path) -> list[dict[str, Any]]:
    """The bases below the store at ``root``, nearest first: ``{"path", "uuid", "commit",
    "snapshot"}`` each, plus ``"missing": True`` where a base cannot be read (the walk stops
    there). Empty for a store that is no overlay."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    m = read_manifest(Path(root))
    while m.base is not None and m.base["path"] not in seen and len(chain) < MAX_CHAIN:
        link = dict(m.base)
        seen.add(link["path"])
        chain.append(link)
        try:
            m = read_manifest(Path(link["path"]))
        except (DpsnError, OSError):
            link["missing"] = True
            break
    return chain


def overlay_pins(snapshots: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Overlay uuid -> pinned commit, from a store's snapshot records."""
    return {
        name[len(OVERLAY_PIN_PREFIX) :]: int(rec["commit"])
        for name, rec in snapshots.items()
        if name.startswith(OVERLAY_PIN_PREFIX)
    }
