"""Names users give to things kept in a store, checked in one place."""

from __future__ import annotations

import re
from typing import Any

from dpsn.errors import InvalidSnapshotNameError

_ROUTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_router_name(name: object) -> str:
    """``name`` if it can name a router in a store (it becomes a directory name), else
    ``ValueError`` saying what is allowed."""
    if not isinstance(name, str) or not _ROUTER_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"router name {name!r} is invalid: use 1-64 of [A-Za-z0-9_.-], not '.' or '..'"
        )
    return name


def check_snapshot_name(name: Any) -> str:
    """A snapshot name that can be stored and read back (``InvalidSnapshotNameError``)."""
    if not isinstance(name, str):
        raise InvalidSnapshotNameError(f"a snapshot name is a str, not {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidSnapshotNameError(
            f"snapshot name {name!r} cannot be stored: it is not valid Unicode ({e.reason})"
        ) from None
    if (
        not raw
        or len(raw) > 200
        or "/" in name
        or name.isdigit()
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise InvalidSnapshotNameError(
            f"snapshot name {name!r} is invalid: use 1-200 bytes of UTF-8, no '/', no control "
            "characters, not all digits (a number names a commit)"
        )
    return name
