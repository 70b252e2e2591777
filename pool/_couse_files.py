"""Where a pool's co-use statistics (``dpsn.tiers.CoUse``) live in its store: one file pair per
commit that saved them, beside the usage statistics' commit, under ``STORE/couse/``.

Format: ``dpsn.store.couse_file`` (no pickle; header, size and SHA-256 checked before anything
is parsed there, values by :meth:`CoUse.from_arrays`; ``verify`` checks the same files).

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
from dpsn.store import couse_file
from dpsn.tiers import CoUse

DIR = couse_file.DIR
FORMAT = couse_file.FORMAT
_DTYPES = couse_file.DTYPES


_name = couse_file.name
_saved = couse_file.saved
discard = couse_file.discard


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


def load(root: Path, commit: int, rows: int | None = None) -> CoUse | None:
    """The statistics saved at the newest commit at or before ``commit``, or None
    (``CorruptStoreError`` if they are damaged, or name ids past ``rows``: ``dpsn verify``
    reports it, ``dpsn repair`` deletes them)."""
    commits = [c for c in _saved(root / DIR) if c <= commit]
    if not commits:
        return None
    where = f"{root / DIR / _name(commits[-1])}"
    arrays = couse_file.read_arrays(root, commits[-1])
    problem = couse_file.check_arrays(arrays, rows)
    if problem is not None:
        raise CorruptStoreError(
            f"{where}: co-use statistics are damaged ({problem}); `dpsn repair` deletes them"
        )
    return CoUse.from_arrays(arrays, where=where)
