"""The levelled store's root files, torch-free (``dpsn.tiers.levels_format``).

A levelled store (``dpsn.pool``'s levels) is a directory with one ordinary store per persisted
level under ``levels/<name>/``, the spec ``dpsn-levels.json`` and the root commit log
``dpsn-levels-log.json``. Both files are canonical JSON (sorted keys, no spaces) sealed with a
``"checksum": "sha256:<hex>"`` of the rest, and replaced whole (temporary file, fsync, rename,
directory fsync). The layout is documented in docs/format.md ("Levelled stores"). This module
reads and checks them for the pool and for the torch-free ``dpsn`` commands.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

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


def read_sealed(path: Path) -> dict[str, Any]:
    """A root file, its checksum checked (``CorruptStoreError`` if it fails)."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StoreNotFoundError(f"{path} does not exist") from None
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
    write_file(fs, tmp, data, sync=True)
    try:
        fs.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.unlink(tmp, missing_ok=True)
        raise
    fs.fsync_dir(path.parent)


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


def read_root(root: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checked spec and root log of a levelled store."""
    root = Path(root)
    spec = read_sealed(root / LEVELS_FILE)
    if spec.get("format") != FORMAT_NAME:
        raise CorruptStoreError(f"{root / LEVELS_FILE} is not a dpsn levels file")
    return spec, read_sealed(root / LOG_FILE)


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
