"""Where a pool's co-use statistics (``dpsn.tiers.CoUse``) live in its store: one file pair per
commit that saved them, beside the usage statistics' commit, under ``STORE/couse/``.

Format (no pickle; everything checked before use, as the rest of a store):

- ``<commit as 16 hex digits>.json``: ``{"format": 1, "arrays": [[name, dtype, length], ...],
  "sha256": hex}``, at most 64 KiB;
- ``<commit as 16 hex digits>.bin``: the arrays' little-endian bytes back to back, in that order;
  its size must be exactly what the JSON says and its SHA-256 must match before anything is
  parsed, and :meth:`CoUse.from_arrays` then checks the values.

Written before the commit's LMDB flip (temp file, fsync, rename, fsync of the directory), so a
commit that succeeds has its statistics; a leftover of a commit that failed is named for a
commit id that the next commit (which removes it first) reuses. A pool opened at commit ``c``
reads the newest file at or before ``c`` (compactions make commits that carry no statistics).
Only the newest two commits' statistics are kept (statistics are advice, not data: a pool
opened at an older commit starts without them); older files are deleted when new ones are
saved.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from dpsn.errors import CorruptStoreError
from dpsn.tiers import CoUse

DIR = "couse"
FORMAT = 1
_DTYPES = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}
_MAX_JSON = 64 << 10
_MAX_LEN = 1 << 27


def _name(commit: int) -> str:
    return f"{commit:016x}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def discard(root: Path, commit: int) -> None:
    """Remove a leftover for ``commit`` (of a commit attempt that failed)."""
    for suffix in (".json", ".bin"):
        (root / DIR / (_name(commit) + suffix)).unlink(missing_ok=True)


def save(root: Path, commit: int, sketch: CoUse, keep: set[int]) -> None:
    """Write ``sketch`` as the statistics of ``commit`` (about to be made); delete the files of
    other commits except those in ``keep`` and the newest before ``commit``."""
    folder = root / DIR
    folder.mkdir(exist_ok=True)
    arrays = sketch.to_arrays()
    parts, meta = [], []
    for name, arr in arrays.items():
        dt = "int64" if arr.dtype.kind == "i" else "float32"
        parts.append(np.ascontiguousarray(arr, dtype=_DTYPES[dt]).tobytes())
        meta.append([name, dt, len(arr)])
    blob = b"".join(parts)
    head = {"format": FORMAT, "arrays": meta, "sha256": hashlib.sha256(blob).hexdigest()}
    _write_atomic(folder / (_name(commit) + ".bin"), blob)
    _write_atomic(folder / (_name(commit) + ".json"), json.dumps(head).encode())
    _fsync_dir(folder)
    saved = _saved(folder)
    older = [c for c in saved if c < commit]
    newest_older = max(older) if older else None
    for c in saved:
        if c != commit and c not in keep and c != newest_older:
            discard(root, c)


def _saved(folder: Path) -> list[int]:
    out = []
    if not folder.is_dir():
        return out
    for p in folder.glob("*.json"):
        try:
            out.append(int(p.stem, 16))
        except ValueError:
            continue
    return sorted(out)


def load(root: Path, commit: int) -> CoUse | None:
    """The statistics saved at the newest commit at or before ``commit``, or None."""
    folder = root / DIR
    saved = [c for c in _saved(folder) if c <= commit]
    if not saved:
        return None
    name = _name(saved[-1])
    where = f"{folder / name}"

    def bad(why: str) -> CorruptStoreError:
        return CorruptStoreError(f"{where}: co-use statistics are damaged ({why}); delete them")

    jpath, bpath = folder / (name + ".json"), folder / (name + ".bin")
    try:
        if jpath.stat().st_size > _MAX_JSON:
            raise bad("header too large")
        head = json.loads(jpath.read_bytes())
    except (OSError, ValueError) as e:
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
            or item[1] not in _DTYPES
            or isinstance(item[2], bool)
            or not isinstance(item[2], int)
            or not 0 <= item[2] <= _MAX_LEN
        ):
            raise bad(f"bad array entry {item!r}")
        dt = _DTYPES[item[1]]
        layout.append((item[0], dt, item[2]))
        total += dt.itemsize * item[2]
    try:
        if bpath.stat().st_size != total:
            raise bad(f"data file holds {bpath.stat().st_size} bytes, header says {total}")
        blob = bpath.read_bytes()
    except OSError as e:
        raise bad(f"unreadable data: {e}") from e
    if hashlib.sha256(blob).hexdigest() != digest:
        raise bad("checksum mismatch")
    arrays, at = {}, 0
    for name_, dt, n in layout:
        arrays[name_] = np.frombuffer(blob, dtype=dt, count=n, offset=at).astype(
            dt.newbyteorder("=")
        )
        at += dt.itemsize * n
    return CoUse.from_arrays(arrays, where=where)
