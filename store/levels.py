"""The levelled store's root files, torch-free (``dpsn.tiers.levels_format``).

A levelled store (``dpsn.pool``'s levels) is a directory with one ordinary store per persisted
level under ``levels/<name>/``, the spec ``dpsn-levels.json`` and the root commit log
``dpsn-levels-log.json``. Both files are canonical JSON (sorted keys, no spaces) sealed with a
``"checksum": "sha256:<hex>"`` of the rest, and replaced whole (temporary file, fsync, rename,
directory fsync). The layout is documented in docs/format.md ("Levelled stores"). This module
reads and checks them for the pool and for the torch-free ``dpsn`` commands.

Every read and write here goes through the file seam (``dpsn.store.fs``): the root files, the
migration-state arrays (written through a seam-routed zarr store) and their pruning. Each
function takes ``fs=`` (default: the current file system, :func:`dpsn.store.fs.using`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from dpsn.errors import CorruptStoreError, StoreNotFoundError

from .fs import FileSystem, write_file
from .fs import current as current_fs

LEVELS_FILE = "dpsn-levels.json"
LOG_FILE = "dpsn-levels-log.json"
LEVELS_DIR = "levels"
FORMAT_NAME = "dpsn-levels"
FORMAT_VERSION = 1  # never renumber


def canonical(obj: Any) -> bytes:
    """The bytes that checksums and provenance hashes are taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return {**body, "checksum": "sha256:" + hashlib.sha256(canonical(body)).hexdigest()}


MAX_ROOT_BYTES = 1 << 26  # a root file (the log grows a record a commit)


def read_sealed(path: Path, fs: FileSystem | None = None) -> dict[str, Any]:
    """A root file, its checksum checked (``CorruptStoreError`` if it fails; a device's read
    fault is ``StoreReadError`` naming it)."""
    from ._files import read_regular

    try:
        raw = json.loads(read_regular(path, MAX_ROOT_BYTES, str(path), fs))
    except FileNotFoundError:
        raise StoreNotFoundError(f"{path} does not exist") from None
    except CorruptStoreError:
        raise
    except (OSError, ValueError) as e:
        raise CorruptStoreError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("checksum"), str):
        raise CorruptStoreError(f"{path} has no checksum")
    if seal(raw)["checksum"] != raw["checksum"]:
        raise CorruptStoreError(f"{path}: checksum mismatch (the file was changed or damaged)")
    return raw


def write_atomic(path: Path, obj: dict[str, Any], fs: FileSystem | None = None) -> None:
    """Write ``obj`` sealed to ``path``: a temporary file, fsynced, renamed over ``path``, and
    the directory fsynced, through the file seam ``fs`` (``dpsn.store.fs``; the current one by
    default). A crash leaves the old file or the new one, never a mix."""
    fs = fs or current_fs()
    data = canonical(seal(obj))
    tmp = path.parent / f"{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        write_file(fs, tmp, data, sync=True)
        try:
            fs.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.unlink(tmp, missing_ok=True)
            raise
        fs.fsync_dir(path.parent)
    except OSError as e:
        raise _typed(e, f"could not write {path}") from e


def _typed(e: OSError, what: str) -> OSError:
    """A failed write as ``StoreFullError``/``StoreWriteError`` (a dpsn error kept as it is)."""
    from dpsn.errors import DpsnError

    from ._checks import write_failed

    return e if isinstance(e, DpsnError) else write_failed(e, what)


def provenance(parent: str, spec: dict[str, Any], levels: dict[str, str], extra: Any) -> str:
    """A root commit's provenance: sha256 over its parent's, the model id and config (``spec``),
    every persisted level's commit provenance (``levels``: name -> hex) and the commit's
    migration records (``extra``)."""
    body = {"parent": parent, "spec": spec, "levels": levels, "migrations": extra}
    return hashlib.sha256(canonical(body)).hexdigest()


def spec_of(root: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_id": root["model_id"],
        "config": root["config"],
        "uuid": root["uuid"],
        "levels": root["levels"],
        "migration": root["migration"],
    }


def is_levelled(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the root of a levelled store."""
    return (Path(path) / LEVELS_FILE).is_file()


def first_level(root: str | os.PathLike[str]) -> Path:
    """The store of a levelled root's slowest persisted level (its manifest holds the spec
    and generator every level shares)."""
    spec = read_sealed(Path(root) / LEVELS_FILE)
    name = next(lv["name"] for lv in spec["levels"] if lv["persist"])
    return Path(root) / LEVELS_DIR / name


def read_root(
    root: str | os.PathLike[str], fs: FileSystem | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checked spec and root log of a levelled store."""
    root = Path(root)
    spec = read_sealed(root / LEVELS_FILE, fs)
    if spec.get("format") != FORMAT_NAME:
        raise CorruptStoreError(f"{root / LEVELS_FILE} is not a dpsn levels file")
    return spec, read_sealed(root / LOG_FILE, fs)


def verify_root(root: Path) -> list[str]:
    """Problems of a levelled root: checksums of its files, and the provenance chain
    recomputed from the level stores' commit records. Torch-free reads of the level stores."""
    problems: list[str] = []
    try:
        spec = read_sealed(root / LEVELS_FILE)
        log = read_sealed(root / LOG_FILE)
    except (CorruptStoreError, StoreNotFoundError) as e:
        return [str(e)]
    from ._persisted import PersistedStore  # zarr, no torch

    stores: dict[str, PersistedStore] = {}
    try:
        for raw in spec["levels"]:
            if raw["persist"]:
                stores[raw["name"]] = PersistedStore.open(
                    root / LEVELS_DIR / raw["name"], writable=False
                )
        parent = ""
        for i, rec in enumerate(log["commits"], start=1):
            if rec["id"] != i or rec["parent"] != (i - 1 or None):
                problems.append(f"root commit {i}: id/parent out of sequence")
            prov: dict[str, str] = {}
            for name, store in stores.items():
                commit = rec["levels"].get(name)
                try:
                    prov[name] = store.commit_record(int(commit)).provenance
                except Exception as e:
                    problems.append(f"root commit {i}: level {name!r} commit {commit}: {e}")
                    prov[name] = "?"
            want = provenance(parent, spec_of(spec), prov, rec.get("migrations", []))
            if want != rec["provenance"]:
                problems.append(
                    f"root commit {i}: provenance {rec['provenance'][:16]}... does not match "
                    f"the recomputed {want[:16]}... (the root log or a level was changed)"
                )
            parent = rec["provenance"]
        for name, commit in log["snapshots"].items():
            if not 1 <= int(commit) <= len(log["commits"]):
                problems.append(f"snapshot {name!r} names a missing root commit {commit}")
    finally:
        for store in stores.values():
            store.close()
    return problems


# -- migration state (windows, signatures, streaks, hand-offs) -----------------------------------

STATE_DIR = "state"  # never rename: root/state/<root commit:016x>/{i8,f4,u1}
STATE_KEEP = 2  # the newest root commits whose state is kept (a reader racing a writer's prune)
_STATE_DTYPES = {"i8": np.dtype("<i8"), "f4": np.dtype("<f4"), "u1": np.dtype("u1")}
_MAX_PARTS = 4096
_MAX_STATE_ELEMS = 1 << 36


def state_dir(root: Path, commit: int) -> Path:
    """Where root commit ``commit``'s migration state lives."""
    return Path(root) / STATE_DIR / f"{commit:016x}"


def write_state(
    root: Path, commit: int, parts: dict[str, np.ndarray], fs: FileSystem | None = None
) -> dict[str, Any]:
    """Write the migration state of root commit ``commit`` (durable before this returns; a
    leftover of a crashed commit with that id is replaced) and return the record the root
    commit stores.

    ``parts`` maps a name to an int64, float32 or uint8 array of at most two axes. Why packed:
    a state is a few dozen small arrays per commit, and a Zarr array costs a directory and a
    few files; packing by type writes three arrays whatever the number of levels. The record
    names each part's type, offset and shape, and the XXH64 of each packed array's
    little-endian bytes; the root log that holds it is sealed. Written through the file seam
    ``fs`` (the current one by default)."""
    import zarr  # the torch-free read commands never write: zarr is imported when used

    from ._format import fsync_dir, fsync_tree
    from ._zarrseam import SeamStore

    fs = fs or current_fs()
    packed: dict[str, list[np.ndarray]] = {k: [] for k in _STATE_DTYPES}
    offsets = dict.fromkeys(_STATE_DTYPES, 0)
    index: dict[str, list[Any]] = {}
    for name, arr in parts.items():
        kind = next(
            (k for k, dt in _STATE_DTYPES.items() if arr.dtype == dt.newbyteorder("=")), None
        )
        if kind is None or arr.ndim > 2:
            raise TypeError(f"state part {name!r}: {arr.dtype} [{arr.ndim} axes] is not storable")
        flat = np.ascontiguousarray(arr, dtype=_STATE_DTYPES[kind]).reshape(-1)
        index[name] = [kind, offsets[kind], list(arr.shape)]
        packed[kind].append(flat)
        offsets[kind] += flat.size
    final = state_dir(root, commit)
    if not final.parent.is_dir():
        try:
            fs.mkdir(final.parent, parents=True, exist_ok=True)
            fsync_dir(final.parent.parent, fs)
        except OSError as e:
            raise _typed(e, f"could not make {final.parent}") from e
    tmp = final.parent / f"{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    sums: dict[str, int] = {}
    try:
        for kind, dt in _STATE_DTYPES.items():
            data = np.concatenate(packed[kind]) if packed[kind] else np.zeros(0, dt)
            data = np.ascontiguousarray(data, dtype=dt)
            arr = zarr.create_array(
                SeamStore(tmp / kind, fs),
                shape=data.shape,
                chunks=(max(1, min(len(data), 1 << 22)),),
                dtype=str(dt.newbyteorder("=")),
                fill_value=0,
                zarr_format=3,
            )
            if len(data):
                arr[...] = data
            sums[kind] = xxhash.xxh64_intdigest(data.data)
        fsync_tree(tmp, fs)
        if final.exists():
            fs.rmtree(final)
        fs.replace(tmp, final)
        fsync_dir(final.parent, fs)
    except BaseException as e:
        with contextlib.suppress(OSError):
            fs.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _typed(e, f"could not write the migration state {final}") from e
        raise
    return {"commit": commit, "sizes": offsets, "xxh64": sums, "parts": index}


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def read_state(root: Path, record: Any, fs: FileSystem | None = None) -> dict[str, np.ndarray]:
    """The parts a root commit's ``"state"`` record names, read as untrusted input: the record's
    types and bounds, each packed array's metadata (allow-listed codecs, bounded chunks), length
    and checksum, and every part inside its array, all checked before anything is returned;
    damage is a ``CorruptStoreError`` that names it. (The values' meaning is checked by the
    pool that restores them.) Read through the file seam ``fs``; a device's read fault is
    ``StoreReadError`` naming the file."""
    from dpsn.errors import StoreReadError

    from ._zarrsafe import read_array, read_array_meta  # when used (numcodecs)

    def bad(what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{root}: the migration state of a root commit {what}")

    if not isinstance(record, dict) or not _is_int(record.get("commit"), 1, 1 << 63):
        raise bad(f"has a malformed record {record!r:.200}")
    commit = record["commit"]
    sizes, sums, index = record.get("sizes"), record.get("xxh64"), record.get("parts")
    if not (isinstance(sizes, dict) and isinstance(sums, dict) and isinstance(index, dict)):
        raise bad(f"{commit}: sizes, xxh64 and parts must be objects")
    if set(sizes) != set(_STATE_DTYPES) or set(sums) != set(_STATE_DTYPES):
        raise bad(f"{commit}: sizes and xxh64 must name exactly {sorted(_STATE_DTYPES)}")
    if len(index) > _MAX_PARTS:
        raise bad(f"{commit}: names {len(index)} parts (at most {_MAX_PARTS})")
    packed: dict[str, np.ndarray] = {}
    for kind, dt in _STATE_DTYPES.items():
        n, digest = sizes[kind], sums[kind]
        if not _is_int(n, 0, _MAX_STATE_ELEMS) or not _is_int(digest, 0, 1 << 64):
            raise bad(f"{commit}: array {kind} has a bad size or checksum")
        path = state_dir(root, commit) / kind
        try:
            meta = read_array_meta(path, dtypes={str(dt.newbyteorder("="))}, shape=(n,), fs=fs)
            data = np.ascontiguousarray(read_array(meta), dtype=dt)
        except StoreReadError:
            raise
        except CorruptStoreError as e:
            raise bad(f"{commit}: {e}") from e
        if xxhash.xxh64_intdigest(data.data) != digest:
            raise bad(f"{commit}: array {path} fails its checksum (damaged or changed)")
        packed[kind] = data.astype(dt.newbyteorder("="), copy=False)
    out: dict[str, np.ndarray] = {}
    for name, entry in index.items():
        ok = isinstance(entry, list) and len(entry) == 3 and entry[0] in _STATE_DTYPES
        ok = ok and isinstance(entry[2], list) and 1 <= len(entry[2]) <= 2
        ok = ok and all(_is_int(s, 0, _MAX_STATE_ELEMS) for s in (entry[1:2] + entry[2]))
        if not ok:
            raise bad(f"{commit}: part {name!r:.64} has a malformed entry {entry!r:.200}")
        kind, off, shape = entry
        size = int(np.prod(shape, dtype=np.int64))
        if off + size > len(packed[kind]):
            raise bad(f"{commit}: part {name!r:.64} runs past the end of array {kind}")
        out[name] = packed[kind][off : off + size].reshape(shape)
    return out


def prune_states(root: Path, head: int, fs: FileSystem | None = None) -> None:
    """Remove state directories other than the newest :data:`STATE_KEEP` root commits' (and
    leftovers of crashed writes). Best effort: a state is advice for the next consolidation
    of a writer that opens at that commit, and only the newest is ever opened for writing."""
    group = Path(root) / STATE_DIR
    if not group.is_dir():
        return
    keep = {state_dir(root, c).name for c in range(max(1, head - STATE_KEEP + 1), head + 1)}
    fs = fs or current_fs()
    for child in group.iterdir():
        if child.name not in keep:
            with contextlib.suppress(OSError):
                fs.rmtree(child, ignore_errors=True)
