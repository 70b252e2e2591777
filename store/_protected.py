"""Protected rows on disk: the set of rows no executor may update, kept with each commit.

Why a Zarr array and not JSON in the commit record: a protected set can hold millions of ids
(every SCREENED row of a model), and a commit record is read whole on every open. The set is
written once per change, as ``data.zarr/protected/<version:016x>/ids`` (int64, sorted, unique,
written under a temporary name, fsynced and renamed into place), and the commit record carries
``"protected": {"version", "rows", "xxh64"}``: the commit that wrote the array, its length and
the XXH64 of its little-endian bytes. Later commits that do not change the set carry the same
record forward, so the array is shared, as router versions are.

A reader checks the record's types, the array's metadata (``_zarrsafe``: bounded, allow-listed
codecs), its length, its checksum, and that the ids are sorted, unique and in range before any
id is used; damage is a ``CorruptStoreError``. Nothing here imports torch (``verify`` and gc
use it).

Compatibility: a dpsn that does not know the field ignores it (``Commit.from_json`` reads only
the fields it knows) and reads every row correctly; it would only let training update rows
this store protects. So the format version is unchanged.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zarr

from dpsn.errors import CorruptStoreError, StoreReadError

from ._format import MAX_COMMIT_ID, ZARR_DIR, fsync_dir, fsync_tree
from ._zarrsafe import read_array, read_array_meta
from ._zarrseam import SeamStore
from .fs import FileSystem
from .fs import current as current_fs

__all__ = [
    "PROTECTED_GROUP",
    "check_protected_record",
    "protected_dir",
    "protected_dirs",
    "read_protected",
    "verify_protected",
    "write_protected",
]

PROTECTED_GROUP = "protected"  # zarr path inside ZARR_DIR (never rename)
PROTECTED_IDS = "ids"  # int64 [n], sorted, unique (never rename)
_TMP = ".tmp-"


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def check_protected_record(raw: Any, rows: int) -> dict[str, int]:
    """A commit record's ``"protected"`` value, checked (``CorruptStoreError``)."""
    ok = (
        isinstance(raw, dict)
        and _is_int(raw.get("version"), 1, MAX_COMMIT_ID + 1)
        and _is_int(raw.get("rows"), 0, rows + 1)
        and _is_int(raw.get("xxh64"), 0, 1 << 64)
    )
    if not ok:
        raise CorruptStoreError(
            f"a commit's protected-rows record is malformed: {raw!r:.200}; the store is damaged"
        )
    return {"version": raw["version"], "rows": raw["rows"], "xxh64": raw["xxh64"]}


def protected_dir(root: Path, version: int) -> Path:
    """Where the protected set written by commit ``version`` lives."""
    return Path(root) / ZARR_DIR / PROTECTED_GROUP / f"{version:016x}"


def write_protected(
    root: Path, version: int, ids: np.ndarray, fs: FileSystem | None = None
) -> dict[str, int]:
    """Write sorted unique int64 ``ids`` as the protected set of commit ``version`` (durable
    before this returns; a leftover of a crashed commit with that id is replaced). Returns the
    record the commit stores. Raises ``OSError`` on a failed write, leaving nothing behind.
    Written through the file seam ``fs`` (``dpsn.store.fs``)."""
    fs = fs or current_fs()
    data = np.ascontiguousarray(ids, dtype="<i8")
    final = protected_dir(root, version)
    parent = final.parent
    if not parent.is_dir():
        fs.mkdir(parent, parents=True, exist_ok=True)
        fs.fsync_dir(parent.parent)
    tmp = parent / f"{final.name}{_TMP}{uuid.uuid4().hex[:12]}"
    try:
        arr = zarr.create_array(
            SeamStore(tmp / PROTECTED_IDS, fs),
            shape=data.shape,
            chunks=(max(1, min(len(data), 1 << 20)),),
            dtype="int64",
            fill_value=0,
            zarr_format=3,
        )
        if len(data):
            arr[...] = data
        fsync_tree(tmp, fs)
        if final.exists():
            fs.rmtree(final)
        fs.replace(tmp, final)
        fsync_dir(parent, fs)
    except BaseException:
        fs.rmtree(tmp, ignore_errors=True)
        raise
    return {"version": version, "rows": len(data), "xxh64": xxhash.xxh64_intdigest(data.data)}


def read_protected(
    root: Path, record: dict[str, Any], rows: int, fs: FileSystem | None = None
) -> np.ndarray:
    """The protected ids a commit's record names, checked in full (``CorruptStoreError``;
    ``StoreReadError`` when the device fails the read). Read through the file seam ``fs``."""
    rec = check_protected_record(record, rows)
    path = protected_dir(root, rec["version"]) / PROTECTED_IDS
    try:
        meta = read_array_meta(path, dtypes={"int64"}, shape=(rec["rows"],), fs=fs)
        data = np.ascontiguousarray(read_array(meta), dtype="<i8")
    except StoreReadError:
        raise
    except CorruptStoreError as e:
        raise CorruptStoreError(f"the protected rows of commit {rec['version']}: {e}") from e
    if xxhash.xxh64_intdigest(data.data) != rec["xxh64"]:
        raise CorruptStoreError(
            f"the protected rows written by commit {rec['version']} ({path}) fail their "
            "checksum; the store is damaged"
        )
    ids = data.astype(np.int64)
    if len(ids) and (ids[0] < 0 or ids[-1] >= rows or bool((np.diff(ids) <= 0).any())):
        raise CorruptStoreError(
            f"the protected rows written by commit {rec['version']} are not sorted, unique "
            f"ids below {rows}; the store is damaged"
        )
    return ids


def protected_dirs(root: Path, records: list[Any]) -> tuple[set[Path], list[Path]]:
    """``(kept, found)`` for gc: the directories the commit ``records`` use, and every
    protected-set directory present (temporaries of crashed commits included)."""
    keep = {
        protected_dir(root, r.protected["version"])
        for r in records
        if isinstance(getattr(r, "protected", None), dict) and "version" in r.protected
    }
    group = Path(root) / ZARR_DIR / PROTECTED_GROUP
    found = [p for p in group.iterdir() if p.is_dir()] if group.is_dir() else []
    return keep, found


def verify_protected(
    root: Path, records: list[Any], rows: int, fs: FileSystem | None = None
) -> list[str]:
    """Problems with the protected sets the commit ``records`` name (each set checked once)."""
    problems = []
    seen: set[int] = set()
    for r in records:
        raw = getattr(r, "protected", None)
        if raw is None:
            continue
        version = raw.get("version") if isinstance(raw, dict) else None
        if version in seen:
            continue
        seen.add(version)  # type: ignore[arg-type]
        try:
            read_protected(root, raw, rows, fs)
        except CorruptStoreError as e:
            problems.append(f"commit {r.id}: {e}")
    return problems
