"""Store facts from the manifest and the LMDB records alone: no torch, no zarr, no generator.

Why a module of its own: ``dpsn info``, ``log`` and ``stats`` are asked often and should answer
at once. Building a ``Pool`` to print a few numbers cost seconds (importing torch, rebuilding
the generator, loading the whole row index); everything those commands print is already in the
manifest and in the commit, segment, snapshot and generator records. So this module reads only
those, and its cost grows with the number of commits and segments, never with the number of
persisted rows (it does not scan the ``rows`` database: the commit record holds the count).

Size figures (the same names in ``dpsn info``, its ``--json`` and ``Pool.info()``):

- ``raw``: bytes of every recorded segment's arrays uncompressed (deltas, per-row state,
  ids, drop lists): ``segment_bytes_raw``;
- ``stored``: the same arrays as they lie on disk, compressed: ``segment_bytes_stored``;
- ``ratio``: raw / stored (``compression_ratio``), over the same segments;
- ``live``: the raw bytes of the row versions the commit reads (its persisted rows' deltas,
  state and ids): ``live_bytes``;
- ``garbage``: raw bytes HEAD no longer reads (superseded or dropped row versions, drop
  lists): ``raw - live at HEAD`` (``garbage_bytes``). Snapshots may still need part of it, and
  ``gc`` frees whole segments only: ``dpsn gc --dry-run`` says what it would free now;
- ``leftovers``: segment directories no record references (interrupted commits), which ``gc``
  removes;
- ``on disk``: every file of the store directory (``bytes_on_disk``);
- ``space amplification``: ``stored`` / live bytes at HEAD; ``write amplification``: bytes
  commits and compactions wrote / bytes commits wrote (``_compact.py``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import xxhash

from dpsn.errors import (
    CorruptStoreError,
    SnapshotNotFoundError,
    StoreNotFoundError,
    StoreVersionError,
)

from ._compact import META_GROWTH, growth_counters
from ._digest import RECORD_CHECK
from ._format import (
    DB_COMMITS,
    DB_META,
    DB_ROWS,
    DB_SEGMENTS,
    DB_SNAPSHOTS,
    FORMAT_VERSION,
    LMDB_DIR,
    META_FORMAT,
    META_HEAD,
    ROW_VALUE,
    SEGMENTS_GROUP,
    ZARR_DIR,
    Manifest,
    read_manifest,
    u64_key,
)
from ._leases import READERS_DIR
from ._lmdb import Env, acquire_env, release_env
from ._overlay_facts import base_chain, overlay_pins
from ._records import Commit, generator_record, parse_record, read_u64, snapshot_record
from ._runs import RUNS_DIR, RunsUnusableError, read_runset

__all__ = ["DTYPE_BYTES", "StoreFacts", "tree_bytes"]

# Bytes per element of each pool dtype as stored (bfloat16 goes to disk as uint16).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ID_BYTES = 8  # a segment's ids column: int64 per row
_STATE_BYTES = 4  # per-row state: float32
_USAGE_BYTES = 8  # per-row usage statistics (a row lifecycle's): float64
_GENERATOR_PREFIX = b"generator/"


def _size(record: dict[str, Any], key: str, what: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CorruptStoreError(f"the record of {what} has no valid {key!r}")
    return value


def tree_bytes(path: Path, shallow: Path | None = None) -> int:
    """Bytes of every regular file below ``path`` (symlinks are not followed); below the
    directory ``shallow``, only the files directly in it."""
    total = 0
    stack = [str(path)]
    flat = str(shallow) if shallow is not None else None
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(here))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if here != flat:
                    stack.append(e.path)
            elif e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_size
    return total


_SIZE_KEYS = (
    "id",
    "commit",
    "rows",
    "drops",
    "raw_bytes",
    "stored_bytes",
    "state_width",
    "usage_width",
)
_OPTIONAL = ("state_width", "usage_width")  # absent from records written before they existed
_SIZE_FIELD = re.compile(
    rb'"(id|commit|rows|drops|raw_bytes|stored_bytes|state_width|usage_width)"'
    rb"\s*:\s*(\d{1,20})\s*[,}]"
)
_SEAL = re.compile(rb'"' + RECORD_CHECK.encode() + rb'":(\d{1,20})(,?)')


def _sealed_intact(raw: bytes) -> bool:
    """Whether ``raw`` is a sealed record whose checksum matches, checked on its bytes.

    A sealed record is canonical JSON, so its body as the writer hashed it is ``raw`` without
    the ``record_xxh64`` entry: hashing that needs no parse. False means "not shown intact this
    way" (no seal, another layout, or damage): the caller then parses the record in full."""
    seals = _SEAL.findall(raw)
    if len(seals) != 1:
        return False
    m = _SEAL.search(raw)
    assert m is not None
    start, end = m.span()
    if not m.group(2) and raw[start - 1 : start] == b",":
        start -= 1  # the last key: the comma before it goes
    return xxhash.xxh64_intdigest(raw[:start] + raw[end:]) == int(m.group(1))


def _segment_sizes(raw: bytes) -> dict[str, int]:
    """The size fields of a segment record.

    Most of a record is its per-chunk checksums, which ``info`` does not need; a regex over the
    top-level integer fields skips parsing them (5-10x faster, which is what keeps ``dpsn info``
    quick on stores of thousands of commits). Anything unexpected (a field missing or given
    twice, another layout) falls back to parsing the whole record as JSON, with validation."""
    found = _SIZE_FIELD.findall(raw)
    keys = [k.decode() for k, _ in found]
    # Every field found once, and the optional ones found wherever the record names them.
    if (
        _sealed_intact(raw)
        and len(keys) == len(set(keys))
        and set(_SIZE_KEYS) - set(_OPTIONAL) <= set(keys)
        and all((k in keys) == (f'"{k}"'.encode() in raw) for k in _OPTIONAL)
    ):
        sizes = {k: int(v) for k, v in zip(keys, (v for _, v in found), strict=True)}
        for k in _OPTIONAL:
            sizes.setdefault(k, 0)
        return sizes
    rec = parse_record(raw, "a segment")
    sid = _size(rec, "id", "a segment")
    what = f"segment {sid:016x}"
    sizes = {k: _size(rec, k, what) for k in _SIZE_KEYS if k not in _OPTIONAL}
    for k in _OPTIONAL:
        sizes[k] = _size(rec, k, what) if k in rec else 0
    return sizes


class StoreFacts:
    """A read-only view of a store's records. Open, ask, close (or use ``with``).

    Validates what it reads the way the persisted tier does (a store is untrusted input):
    malformed records raise :class:`~dpsn.errors.CorruptStoreError`.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root)
        if self.manifest.dtype not in DTYPE_BYTES:
            raise CorruptStoreError(
                f"{self.root}: dtype {self.manifest.dtype!r} is not one dpsn stores; "
                f"known: {', '.join(DTYPE_BYTES)}"
            )
        if not (self.root / ZARR_DIR).is_dir():
            raise StoreNotFoundError(
                f"{self.root} is damaged: its Zarr group {ZARR_DIR} is missing"
            )
        self._env: Env | None = acquire_env(self.root / LMDB_DIR)
        try:
            self.format_version = version = self._read(
                lambda txn, dbs: read_u64(txn.get(META_FORMAT, db=dbs[DB_META]), "format version")
            )
            if version > FORMAT_VERSION:
                raise StoreVersionError(
                    f"{self.root}: the index has format version {version}; this dpsn reads up "
                    f"to {FORMAT_VERSION}. Upgrade dpsn."
                )
        except BaseException:
            self.close()
            raise

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._env is not None:
            release_env(self._env)
            self._env = None

    def __enter__(self) -> StoreFacts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, fn: Any) -> Any:
        env = self._env
        if env is None:
            raise ValueError(f"{self.root}: these store facts are closed")
        return env.read(lambda txn: fn(txn, env.dbs))

    # -- records -------------------------------------------------------------------------------

    def head(self) -> int:
        return self._read(lambda txn, dbs: read_u64(txn.get(META_HEAD, db=dbs[DB_META]), "head"))

    def commit(self, commit: int) -> dict[str, Any]:
        """The commit record (the keys of ``dpsn.tiers.Commit``), validated."""
        raw = self._read(lambda txn, dbs: txn.get(u64_key(commit), db=dbs[DB_COMMITS]))
        if raw is None:
            raise SnapshotNotFoundError(f"no commit {commit} in {self.root}")
        return self._check_commit(u64_key(commit), raw)

    def _check_commit(self, key: bytes, raw: bytes) -> dict[str, Any]:
        """The record as stored, checked as the persisted tier checks it (its checksum, every
        field, and its id against its key)."""
        cid = int.from_bytes(key, "big") if len(key) == 8 else -1
        try:
            rec = parse_record(raw, f"commit {cid}")
            if Commit.from_json(rec).id != cid:
                raise CorruptStoreError(f"the record stored as commit {cid} says it is {rec['id']}")
        except CorruptStoreError as e:
            raise CorruptStoreError(f"{self.root}: {e}") from e
        return rec

    def log(self) -> list[dict[str, Any]]:
        """Every commit record, oldest first."""
        items = self._read(lambda txn, dbs: list(txn.cursor(db=dbs[DB_COMMITS])))
        return [self._check_commit(k, v) for k, v in items]

    def commit_count(self) -> int:
        return int(self._read(lambda txn, dbs: txn.stat(dbs[DB_COMMITS])["entries"]))

    def snapshots(self) -> dict[str, dict[str, Any]]:
        """Snapshot name -> record (``commit``, ``time``, ``rows``, ...)."""
        items = self._read(lambda txn, dbs: list(txn.cursor(db=dbs[DB_SNAPSHOTS])))
        out = {}
        for k, v in items:
            name = k.decode("utf-8", "replace")
            try:
                out[name] = snapshot_record(parse_record(v, f"snapshot {name!r}"), name)
            except CorruptStoreError as e:
                raise CorruptStoreError(f"{self.root}: {e}") from e
        return out

    def segments(self) -> dict[int, dict[str, Any]]:
        """Segment id -> the sizes of its record (rows, drops, raw and stored bytes, state)."""
        values = self._read(lambda txn, dbs: [v for _, v in txn.cursor(db=dbs[DB_SEGMENTS])])
        out = {}
        for v in values:
            sizes = _segment_sizes(v)
            out[sizes["id"]] = sizes
        return out

    def generator_parameters(self, version: int) -> int:
        """Parameters of a generator version, from the shapes its record lists."""
        raw = self._read(
            lambda txn, dbs: txn.get(_GENERATOR_PREFIX + u64_key(version), db=dbs[DB_META])
        )
        what = f"generator version {version}"
        try:
            arrays = generator_record(parse_record(raw, what), version)
        except CorruptStoreError as e:
            raise CorruptStoreError(f"{self.root}: {e}") from e
        total = 0
        for meta in arrays.values():
            shape = meta["shape"]
            total += math.prod(shape)
        return total

    def resolve(self, at: str | int | None) -> int:
        """A commit id from a snapshot name, a commit id (int or digits) or None (HEAD)."""
        if at is None:
            return self.head()
        snaps = self.snapshots()
        if isinstance(at, str):
            if at in snaps:
                return int(snaps[at]["commit"])
            if not at.isdigit():
                known = ", ".join(sorted(snaps)) or "none"
                raise SnapshotNotFoundError(
                    f"no snapshot named {at!r} in {self.root} (snapshots: {known}); "
                    "give a snapshot name or a commit id"
                )
            at = int(at)
        if isinstance(at, bool) or not isinstance(at, int):
            raise TypeError(f"a snapshot name or a commit id, not {type(at).__name__}")
        head = self.head()
        if not 1 <= at <= head:
            raise SnapshotNotFoundError(f"no commit {at} in {self.root} (commits 1..{head})")
        self.commit(at)  # raises if the record is missing
        return at

    def row_locations(self, ids: list[int]) -> tuple[int, dict[int, tuple[int, int, int]]]:
        """HEAD and, for each of ``ids`` that has a delta there, (segment, offset, commit), read
        in one transaction. One LMDB get per id: meant for a handful of ids (``dpsn inspect``),
        not for a batch of a training step."""

        def get(txn: Any, dbs: Any) -> tuple[int, dict[int, tuple[int, int, int]]]:
            head = read_u64(txn.get(META_HEAD, db=dbs[DB_META]), "head")
            out = {}
            for i in set(ids):
                raw = txn.get(u64_key(i), db=dbs[DB_ROWS])
                if raw is None:
                    continue
                if len(raw) != ROW_VALUE.size:
                    raise CorruptStoreError(f"{self.root}: the index entry of row {i} is malformed")
                out[i] = ROW_VALUE.unpack(raw)
            return head, out

        env = self._env
        if env is None:
            raise ValueError(f"{self.root}: these store facts are closed")
        # the pages on the way to these rows are checked first: a damaged one is an error
        keys = {"rows": [u64_key(i) for i in set(ids)]}
        return env.read_walked(lambda txn: get(txn, env.dbs), keys=keys)

    def last_writer_stats(self) -> tuple[int, dict[str, Any]] | None:
        """The newest commit that recorded its writer's cache/I-O figures, and those figures.
        Commits whose writer read no rows (maintenance: ``dpsn drop``, ``repair``, ``import``,
        compaction) are passed over, so they do not hide the training writer's figures."""

        def scan(txn: Any, dbs: Any) -> tuple[int, dict[str, Any]] | None:
            cur = txn.cursor(db=dbs[DB_COMMITS])
            if not cur.last():
                return None
            while True:
                rec = self._check_commit(cur.key(), cur.value())
                stats = rec.get("stats")
                if isinstance(stats, dict) and "compaction" not in stats and _did_work(stats):
                    return int(rec["id"]), rec["stats"]
                if not cur.prev():
                    return None

        return self._read(scan)

    # -- the summary ---------------------------------------------------------------------------

    def info(self, at: str | int | None = None) -> dict[str, Any]:
        """What ``dpsn info`` prints; see the module docstring for the size figures."""
        m = self.manifest
        head = self.head()
        commit = self.resolve(at)
        record = self.commit(commit)
        head_record = record if commit == head else self.commit(head)
        segments = self.segments()
        raw = sum(s["raw_bytes"] for s in segments.values())
        stored = sum(s["stored_bytes"] for s in segments.values())
        widths = {(s["state_width"], s["usage_width"]) for s in segments.values() if s["rows"]}
        # Per persisted row: its id, delta, state and usage statistics. Exact when every segment
        # holding rows has the same state and usage widths (always, unless row state or a
        # lifecycle was switched on mid-life); else the newest segment's widths are taken and
        # the figure is marked approximate.
        width = usage = 0
        if widths:
            newest = max((sid for sid, s in segments.items() if s["rows"]), default=None)
            if newest is not None:
                width, usage = segments[newest]["state_width"], segments[newest]["usage_width"]
        per_row = (
            _ID_BYTES + m.dim * DTYPE_BYTES[m.dtype] + _STATE_BYTES * width + _USAGE_BYTES * usage
        )
        live = record["persisted_rows"] * per_row
        live_head = head_record["persisted_rows"] * per_row
        leftover_dirs = self._leftover_segment_dirs(segments)
        leftover_bytes = sum(tree_bytes(d) for d in leftover_dirs)
        growth = self._read(lambda txn, dbs: txn.get(META_GROWTH, db=dbs[DB_META]))
        counters = growth_counters(growth)
        written = counters["commit_bytes"]
        return {
            "path": str(self.root),
            "format_version": max(m.format_version, self.format_version),
            "rows": m.rows,
            "dim": m.dim,
            "dtype": m.dtype,
            "seed": m.seed,
            "generator": {
                "kind": m.generator.get("kind"),
                "config": m.generator.get("config"),
                "version": record["generator"],
                "parameters": self.generator_parameters(record["generator"]),
            },
            "virtual_parameters": m.rows * m.dim,
            "commit": commit,
            "head": head,
            "commits": self.commit_count(),
            "snapshots": len(self.snapshots()),
            "base_chain": base_chain(self.root),
            "overlays": overlay_pins(self.snapshots()),
            "persisted_rows": record["persisted_rows"],
            "delta_bytes_raw": record["persisted_rows"] * m.dim * DTYPE_BYTES[m.dtype],
            "segments": len(segments),
            "row_versions": sum(s["rows"] for s in segments.values()),
            "segment_bytes_raw": raw,
            "segment_bytes_stored": stored,
            "compression_ratio": (raw / stored) if stored else None,
            "live_bytes": live,
            "live_bytes_exact": len(widths) <= 1,
            "garbage_bytes": max(0, raw - live_head),
            # Stored bytes of every segment over HEAD's live raw bytes (_compact.py).
            "space_amplification": (stored / live_head) if live_head else None,
            "commit_bytes_written": written,
            "compaction_bytes_written": counters["compaction_bytes"],
            "write_amplification": (written + counters["compaction_bytes"]) / written
            if written
            else None,
            "compactions": counters["compactions"],
            "index_runs": self._index_runs(),
            "leftover_segments": len(leftover_dirs),
            "leftover_bytes": leftover_bytes,
            # Segments as their records say (their size when written, which verify checks);
            # everything else measured. Walking every chunk file of every segment would make
            # info grow with the store.
            # (readers' lease files aside: they come and go with readers)
            "bytes_on_disk": tree_bytes(self.root, shallow=self.root / ZARR_DIR / SEGMENTS_GROUP)
            - tree_bytes(self.root / READERS_DIR)
            + stored
            + leftover_bytes,
        }

    def _index_runs(self) -> dict[str, Any] | None:
        """The row index's run files (``_runs.py``) as ``runs.json`` names them; ``None``
        when there are none (a small store: openers read LMDB) or they cannot be used."""
        try:
            runset = read_runset(self.root, self.manifest.uuid)
        except RunsUnusableError:
            return None
        if runset is None:
            return None
        return {
            "runs": len(runset.files),
            "entries": sum(n for _, n, _ in runset.files),
            "commit": runset.commit,
            "bytes": tree_bytes(self.root / RUNS_DIR),
        }

    def _leftover_segment_dirs(self, segments: dict[int, Any]) -> list[Path]:
        seg_dir = self.root / ZARR_DIR / SEGMENTS_GROUP
        try:
            entries = list(os.scandir(seg_dir))
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            try:
                sid = int(e.name, 16)
            except ValueError:
                continue
            if e.is_dir(follow_symlinks=False) and sid not in segments:
                out.append(Path(e.path))
        return out


_WORK = (
    "lookups",
    "hits",
    "misses",
    "rows_generated",
    "rows_from_disk",
    "rows_updated",
    "writebacks",
)


def _did_work(stats: dict[str, Any]) -> bool:
    """Whether a writer's figures show it read or wrote rows (not a maintenance commit)."""
    return any(isinstance(stats.get(k), int | float) and stats.get(k) for k in _WORK)
