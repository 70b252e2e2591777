"""Names users give to things kept in a store, checked in one place."""

from __future__ import annotations

import re

_ROUTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_router_name(name: object) -> str:
    """``name`` if it can name a router in a store (it becomes a directory name), else
    ``ValueError`` saying what is allowed."""
    if not isinstance(name, str) or not _ROUTER_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"router name {name!r} is invalid: use 1-64 of [A-Za-z0-9_.-], not '.' or '..'"
        )
    return name
