"""The LMDB records of a store: parsing them as untrusted input, and keeping their digests.

Every record read from a store is checked before use: JSON that parses (a damaged record may
be deep enough to exhaust the parser: that is damage too), its own ``record_xxh64`` when it has
one, and every field's type and range; failures are ``CorruptStoreError``, never a
``KeyError`` or ``TypeError`` from deep inside a read.

:class:`Writer` is the only way dpsn changes LMDB: it wraps one write transaction and keeps the
per-database digests (``_digest.py``) as the transaction puts and deletes entries, then stores
them under ``meta/digests`` with the transaction's id. A later reader whose transaction has the
same id knows the digests describe exactly what it sees.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb
import numpy as np

from dpsn.errors import CorruptStoreError

from ._digest import DbDigest, check_record, entry_hash, rows_hash_raw, seal_record
from ._format import (
    DB_COMMITS,
    DB_META,
    DB_ROWS,
    DB_SEGMENTS,
    DB_SNAPSHOTS,
    MAX_COMMIT_ID,
    META_DIGESTS,
    ROW_VALUE,
    SNAPSHOT_COLUMNS,
)
from ._lifecycle_policy import check_stored_policy
from .usage_fields import CLOCK_LIMIT

__all__ = [
    "DIGESTED_DBS",
    "Commit",
    "VerifyReport",
    "Writer",
    "compute_digests",
    "lifecycle_record",
    "parse_record",
    "read_u64",
    "snapshot_record",
    "stored_digests",
]

DIGESTED_DBS = (DB_META, DB_ROWS, DB_COMMITS, DB_SEGMENTS, DB_SNAPSHOTS)
_U64 = 1 << 64


def parse_record(raw: bytes | None, what: str) -> dict[str, Any]:
    """A JSON object record, its own checksum checked when it has one."""
    if raw is None:
        raise CorruptStoreError(f"the LMDB index lacks {what}")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptStoreError(f"the LMDB record of {what} is not valid JSON: {e}") from e
    check_record(value, what)
    return value


def read_u64(raw: bytes | None, what: str) -> int:
    if raw is None or len(raw) != 8:
        raise CorruptStoreError(f"the LMDB index lacks a valid {what}")
    return int.from_bytes(raw, "big")


def _is_int(v: Any, lo: int = 0, hi: int = _U64) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


@dataclass(frozen=True, slots=True)
class Commit:
    """One entry of the commit log (persisted as JSON in LMDB; never rename keys)."""

    id: int
    parent: int | None
    time: float
    message: str
    rows_written: int
    rows_dropped: int
    persisted_rows: int
    segment: int | None
    generator: int
    provenance: str
    # Runtime figures of the writer at commit time (cache hits, I/O); informational only.
    stats: dict[str, Any] | None = None
    # Routers saved with the store: name -> {"version": commit that wrote it, "digest": hex}.
    routers: dict[str, dict[str, Any]] | None = None
    # Sum mod 2**64 of the entry hashes of the row index at this commit (_digest.py); None in
    # commits written by a dpsn that did not keep it.
    index_digest: int | None = None
    # The row lifecycle as of this commit: its policy, clocks, thresholds and health figures
    # (checked by :func:`lifecycle_record`; dpsn.pool checks the policy's settings in full).
    # None: the store has no lifecycle (and the key is left out, as in format 1).
    lifecycle: dict[str, Any] | None = None
    # The rows no executor may update as of this commit (``_protected.py``): {"version": the
    # commit that wrote the set, "rows", "xxh64"}. None: none protected (the key is left out).
    protected: dict[str, Any] | None = None

    # Configurations of the modules built on this store (``PoolLayer``, ``PoolEmbedding``):
    # name -> a small JSON object their ``from_store`` rebuilds them from. None: none saved
    # (and the key is left out, so stores without modules keep their bytes).
    modules: dict[str, dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as stored (optional fields left out when empty)."""
        out = asdict(self)
        for key in ("index_digest", "lifecycle", "protected", "modules"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_json(cls, raw: Any) -> Commit:
        """Parse and check a commit record read from a store (``CorruptStoreError``)."""
        if not isinstance(raw, dict):
            raise CorruptStoreError("a commit record is not a JSON object")
        missing = [k for k in cls.__dataclass_fields__ if k not in raw and k not in _OPTIONAL]
        if missing:
            raise CorruptStoreError(f"a commit record is missing fields: {missing}")
        ok = (
            _is_int(raw["id"], 1, MAX_COMMIT_ID + 1)
            and (raw["parent"] is None or _is_int(raw["parent"], 1, MAX_COMMIT_ID + 1))
            and isinstance(raw["time"], int | float)
            and not isinstance(raw["time"], bool)
            and isinstance(raw["message"], str)
            and all(_is_int(raw[k]) for k in ("rows_written", "rows_dropped", "persisted_rows"))
            and (raw["segment"] is None or _is_int(raw["segment"], 1, MAX_COMMIT_ID + 1))
            and _is_int(raw["generator"], 1, MAX_COMMIT_ID + 1)
            and isinstance(raw["provenance"], str)
            and (raw.get("stats") is None or isinstance(raw["stats"], dict))
            and (raw.get("index_digest") is None or _is_int(raw["index_digest"]))
        )
        if ok and raw.get("lifecycle") is not None:
            try:
                lifecycle_record(raw["lifecycle"])
            except CorruptStoreError as e:
                raise CorruptStoreError(f"commit record {raw['id']}: {e}") from e
        if ok and raw.get("protected") is not None:
            from ._protected import check_protected_record

            try:
                check_protected_record(raw["protected"], _U64 - 1)
            except CorruptStoreError as e:
                raise CorruptStoreError(f"commit record {raw['id']}: {e}") from e
        routers = raw.get("routers")
        if routers is not None:
            ok = ok and isinstance(routers, dict)
            for name, r in routers.items() if isinstance(routers, dict) else ():
                ok = (
                    ok
                    and isinstance(name, str)
                    and isinstance(r, dict)
                    and _is_int(r.get("version"), 1, MAX_COMMIT_ID + 1)
                    and isinstance(r.get("digest"), str)
                )
        modules = raw.get("modules")
        if modules is not None:
            ok = (
                ok
                and isinstance(modules, dict)
                and all(isinstance(k, str) and isinstance(v, dict) for k, v in modules.items())
            )
        if not ok:
            raise CorruptStoreError(
                f"commit record {raw.get('id')!r} has a field of the wrong type or range"
            )
        return cls(**{k: raw.get(k) for k in cls.__dataclass_fields__})


_OPTIONAL = {"stats", "routers", "index_digest", "lifecycle", "protected", "modules"}
LIFECYCLE_FORMAT = 1  # of a commit's "lifecycle" object; never renumber
_LIFECYCLE_TOTALS = ("consolidations", "decayed", "pruned", "entered", "exited")
_MAX_CLOCK = CLOCK_LIMIT  # clocks are exact integers in the float64 usage column


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def lifecycle_record(raw: Any) -> dict[str, Any]:
    """Check the ``lifecycle`` object of a commit record (docs/format.md, "Row lifecycle"):
    its format, the clocks the ``usage`` columns refer to, the thresholds, the totals, and the
    shape of the health figures, and every setting of the policy against its range (without
    torch: ``_lifecycle_policy.py``, the check ``dpsn.Lifecycle`` runs too)."""
    ok = isinstance(raw, dict) and raw.get("format") == LIFECYCLE_FORMAT
    if not ok:
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise CorruptStoreError(
            f"its lifecycle record is not an object of format {LIFECYCLE_FORMAT} "
            f"(format {fmt!r}): written by a newer dpsn, or damaged"
        )
    policy, totals, health = raw.get("policy"), raw.get("totals", {}), raw.get("health", {})
    problems = []
    try:
        check_stored_policy(policy)
    except CorruptStoreError as e:
        problems.append(f"policy ({e})")
    for name in ("step", "epoch"):
        if not _is_int(raw.get(name), 0, _MAX_CLOCK):
            problems.append(name)
    for name in ("enter", "exit"):
        v = raw.get(name)
        if not (_is_number(v) and 0 <= v <= 1):
            problems.append(f"threshold {name}")
    if not (
        isinstance(totals, dict)
        and all(_is_int(totals.get(k, 0), 0, 1 << 63) for k in _LIFECYCLE_TOTALS)
    ):
        problems.append("totals")
    if not isinstance(health, dict):
        problems.append("health")
    if problems:
        raise CorruptStoreError(
            f"its lifecycle record has an invalid {', '.join(problems)}: the store is damaged "
            "or was not written by dpsn"
        )
    return raw


def snapshot_record(raw: Any, name: str) -> dict[str, Any]:
    """Check a snapshot record: ``{"commit", "time", "rows", "xxh64": {column: int}}``."""
    ok = (
        isinstance(raw, dict)
        and _is_int(raw.get("commit"), 1, MAX_COMMIT_ID + 1)
        and _is_int(raw.get("rows"), 0, 1 << 62)
        and isinstance(raw.get("xxh64"), dict)
        and set(raw["xxh64"]) == set(SNAPSHOT_COLUMNS)
        and all(_is_int(v) for v in raw["xxh64"].values())
    )
    if not ok:
        raise CorruptStoreError(f"the record of snapshot {name!r} is malformed")
    return raw


def generator_record(raw: Any, version: int) -> dict[str, dict[str, Any]]:
    """Check a generator record and return its arrays: ``{name: {"shape", "xxh64"}}``."""
    arrays = raw.get("arrays") if isinstance(raw, dict) else None
    ok = (
        isinstance(arrays, dict)
        and raw.get("version") == version
        and len(arrays) <= 4096
        and all(
            isinstance(name, str)
            and isinstance(a, dict)
            and isinstance(a.get("shape"), list)
            and len(a["shape"]) <= 8
            and all(_is_int(s, 0, 1 << 40) for s in a["shape"])
            and math.prod(a["shape"]) < 1 << 40
            and _is_int(a.get("xxh64"))
            for name, a in arrays.items()
        )
    )
    if not ok:
        raise CorruptStoreError(f"the record of generator version {version} is malformed")
    return arrays


@dataclass(slots=True)
class VerifyReport:
    """What ``verify`` found. ``ok`` is False as soon as one problem is listed; ``notes`` are
    facts that are not damage (an older store without digests, crash leftovers for gc)."""

    checked_segments: int = 0
    checked_chunks: int = 0
    checked_rows: int = 0
    problems: list[str] = field(default_factory=list)
    damaged_rows: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (what ``dpsn verify --json`` prints)."""
        return {
            "ok": self.ok,
            "checked_segments": self.checked_segments,
            "checked_chunks": self.checked_chunks,
            "checked_rows": self.checked_rows,
            "problems": self.problems,
            "damaged_rows": self.damaged_rows,
            "notes": self.notes,
        }


# -- digests ------------------------------------------------------------------------------------


def rows_digest_of(keys: bytes, values: bytes) -> DbDigest:
    """The digest of a ``rows`` database given as its joined keys and values."""
    n = len(keys) // 8
    if len(keys) != 8 * n or len(values) != ROW_VALUE.size * n:
        raise CorruptStoreError("the LMDB row index has malformed entries (key or value sizes)")
    return DbDigest(n, int(rows_hash_raw(keys, values).sum(dtype=np.uint64)))


def compute_digests(txn: lmdb.Transaction, dbs: dict[bytes, Any]) -> dict[bytes, DbDigest]:
    """Every database's digest, recomputed by walking it (O(entries); vectorized for rows)."""
    out = {}
    for name in DIGESTED_DBS:
        if name == DB_ROWS:
            keys = b"".join(txn.cursor(db=dbs[name]).iternext(keys=True, values=False))
            values = b"".join(txn.cursor(db=dbs[name]).iternext(keys=False, values=True))
            out[name] = rows_digest_of(keys, values)
            continue
        d = DbDigest()
        for k, v in txn.cursor(db=dbs[name]):
            if name == DB_META and k == META_DIGESTS:
                continue
            d.add(entry_hash(k, v))
        out[name] = d
    return out


def stored_digests(raw: bytes | None) -> tuple[int, dict[bytes, DbDigest]] | None:
    """``(txn, {db: digest})`` from the ``meta/digests`` record, None if there is none."""
    if raw is None:
        return None
    rec = parse_record(raw, "the index digests")
    dbs = rec.get("dbs")
    names = {n.decode() for n in DIGESTED_DBS}
    if (
        not _is_int(rec.get(DIGEST_TXN))
        or not isinstance(dbs, dict)
        or set(dbs) != names
        or not all(
            isinstance(v, list) and len(v) == 2 and _is_int(v[0]) and _is_int(v[1])
            for v in dbs.values()
        )
    ):
        raise CorruptStoreError("the LMDB record of the index digests is malformed")
    return rec[DIGEST_TXN], {n: DbDigest(*dbs[n.decode()]) for n in DIGESTED_DBS}


DIGEST_TXN = "txn"


class Writer:
    """One write transaction that keeps every database's digest (see the module doc).

    Create it inside the function given to ``Env.write`` (which may run it again on a bigger
    map): it reads the stored digests, recomputing them if they are missing (a store written
    by an older dpsn) or stale (a writer that did not keep them committed since); call
    :meth:`finish` last.
    """

    def __init__(self, txn: lmdb.Transaction, dbs: dict[bytes, Any]) -> None:
        self.txn = txn
        self.dbs = dbs
        stored = stored_digests(txn.get(META_DIGESTS, db=dbs[DB_META]))
        if stored is not None and stored[0] == txn.id() - 1:
            self.digests = stored[1]
        else:
            self.digests = compute_digests(txn, dbs)

    def put(self, db: bytes, key: bytes, value: bytes) -> None:
        handle = self.dbs[db]
        old = self.txn.get(key, db=handle)
        d = self.digests[db]
        if old is not None:
            d.remove(entry_hash(key, old))
        self.txn.put(key, value, db=handle)
        d.add(entry_hash(key, value))

    def put_record(self, db: bytes, key: bytes, record: dict[str, Any]) -> None:
        self.put(db, key, seal_record(record))

    def delete(self, db: bytes, key: bytes) -> None:
        handle = self.dbs[db]
        old = self.txn.get(key, db=handle)
        if old is None:
            return
        self.digests[db].remove(entry_hash(key, old))
        self.txn.delete(key, db=handle)

    def finish(self) -> None:
        record = {
            DIGEST_TXN: self.txn.id(),
            "dbs": {n.decode(): self.digests[n].to_json() for n in DIGESTED_DBS},
        }
        self.txn.put(META_DIGESTS, seal_record(record), db=self.dbs[DB_META])


def is_compaction(record: Commit) -> bool:
    """Whether a commit is a compaction (rewrites segments, changes no row)."""
    return isinstance(record.stats, dict) and isinstance(record.stats.get("compaction"), dict)
