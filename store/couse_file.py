"""Reading and checking the co-use statistics files of a store (``STORE/couse/``), without
torch: the pool loads them through :func:`read_arrays` (then ``dpsn.tiers.CoUse.from_arrays``),
``verify`` checks every one with :func:`check_arrays`, and ``dpsn repair`` deletes a damaged
one with :func:`discard` (statistics are advice: a pool without them starts a fresh sketch).

Format (docs/format.md, "Co-use statistics"; written by ``dpsn.pool``'s ``_couse_files``):

- ``<commit as 16 hex digits>.json``: ``{"format": 1, "arrays": [[name, dtype, length], ...],
  "sha256": hex}``, at most 64 KiB;
- ``<commit as 16 hex digits>.bin``: the arrays' little-endian bytes back to back, in that order;
  its size must be exactly what the JSON says and its SHA-256 must match before anything is
  parsed. Arrays: ``a``, ``b`` (int64 row ids, ``a < b``), ``count`` (float32, finite, > 0),
  ``groups_seen`` and ``slots`` (int64, one value each).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dpsn.errors import CorruptStoreError

from ._files import read_regular

__all__ = ["DIR", "FORMAT", "check_arrays", "discard", "name", "read_arrays", "saved"]

DIR = "couse"
FORMAT = 1  # never renumber
DTYPES = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}
MAX_JSON = 64 << 10
MAX_LEN = 1 << 27
MAX_SLOTS = 1 << 26
_NEED = {"a": "int64", "b": "int64", "count": "float32", "groups_seen": "int64", "slots": "int64"}


def name(commit: int) -> str:
    return f"{commit:016x}"


def saved(folder: Path) -> list[int]:
    """The commits whose statistics ``folder`` holds (by their ``.json`` files), ascending."""
    out = []
    if not folder.is_dir():
        return out
    for p in folder.glob("*.json"):
        try:
            out.append(int(p.stem, 16))
        except ValueError:
            continue
    return sorted(out)


def discard(root: Path, commit: int) -> None:
    """Remove ``commit``'s statistics (both files)."""
    for suffix in (".json", ".bin"):
        (root / DIR / (name(commit) + suffix)).unlink(missing_ok=True)


def read_arrays(root: Path, commit: int) -> dict[str, np.ndarray]:
    """The arrays of ``commit``'s statistics, their header, size and SHA-256 checked (not
    their values: :func:`check_arrays`). ``CorruptStoreError`` names what is wrong."""
    folder = root / DIR
    where = f"{folder / name(commit)}"

    def bad(why: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"{where}: co-use statistics are damaged ({why}); `dpsn repair` deletes them"
        )

    jpath, bpath = folder / (name(commit) + ".json"), folder / (name(commit) + ".bin")
    try:
        head = json.loads(read_regular(jpath, MAX_JSON, "co-use statistics header"))
    except (OSError, ValueError, CorruptStoreError) as e:
        raise bad(f"unreadable header: {e}") from e
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise bad("unknown format")
    spec = head.get("arrays")
    digest = head.get("sha256")
    if not isinstance(spec, list) or not isinstance(digest, str):
        raise bad("header without arrays or digest")
    total = 0
    layout = []
    for item in spec:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or item[1] not in DTYPES
            or isinstance(item[2], bool)
            or not isinstance(item[2], int)
            or not 0 <= item[2] <= MAX_LEN
        ):
            raise bad(f"bad array entry {item!r:.200}")
        dt = DTYPES[item[1]]
        layout.append((item[0], dt, item[2]))
        total += dt.itemsize * item[2]
    try:
        blob = read_regular(bpath, total + 1, "co-use statistics data")
    except (OSError, CorruptStoreError) as e:
        raise bad(f"unreadable data: {e}") from e
    if len(blob) != total:
        raise bad(f"data file holds {len(blob)} bytes, header says {total}")
    if hashlib.sha256(blob).hexdigest() != digest:
        raise bad("checksum mismatch")
    arrays, at = {}, 0
    for n_, dt, count in layout:
        arrays[n_] = np.frombuffer(blob, dtype=dt, count=count, offset=at).astype(
            dt.newbyteorder("=")
        )
        at += dt.itemsize * count
    return arrays


def check_arrays(arrays: dict[str, np.ndarray], rows: int | None = None) -> str | None:
    """What is wrong with a sketch's arrays, or None: every array present, 1-D, of its dtype;
    ``slots`` in range; ``a``, ``b``, ``count`` of one length, at most ``slots``; pairs
    ``0 <= a < b`` (``< rows`` where given: ids in the pool's range); counts finite and > 0;
    ``groups_seen`` non-negative."""
    for key, dt in _NEED.items():
        arr = arrays.get(key)
        if not isinstance(arr, np.ndarray) or arr.dtype != DTYPES[dt] or arr.ndim != 1:
            return f"{key} missing or not a 1-D {dt} array"
    if len(arrays["slots"]) != 1 or not 16 <= int(arrays["slots"][0]) <= MAX_SLOTS:
        return f"slots {arrays['slots'][:1].tolist()} out of range"
    slots = int(arrays["slots"][0])
    if len(arrays["groups_seen"]) > 1 or bool((arrays["groups_seen"] < 0).any()):
        return "groups_seen is not one non-negative count"
    a, b, c = arrays["a"], arrays["b"], arrays["count"]
    if not len(a) == len(b) == len(c) or len(a) > slots:
        return "pair arrays of different lengths or more pairs than slots"
    if len(a) and (bool((a < 0).any()) or bool((b <= a).any())):
        return "a pair that is not (a < b) of row ids"
    if len(a) and rows is not None and int(b.max()) >= rows:
        return f"a row id {int(b.max())} outside the pool's {rows} rows"
    if len(c) and not bool(np.isfinite(c).all()):
        return "a non-finite count"
    if len(c) and bool((c <= 0).any()):
        return "a non-positive count"
    return None


def drop_damaged(root: Path, rows: int) -> list[int]:
    """Delete every damaged statistics file pair (what ``dpsn repair`` does: they are advice,
    and a pool cannot open over them); the commits whose statistics were deleted."""
    dropped = []
    for commit in saved(root / DIR):
        try:
            problem = check_arrays(read_arrays(root, commit), rows)
        except CorruptStoreError:
            problem = "unreadable"
        if problem is not None:
            discard(root, commit)
            dropped.append(commit)
    return dropped
