"""Integrity digests of what LMDB holds: one XXH64 per entry, summed per database.

Why a sum: a commit must update the digest of the row index in O(rows it writes), never
O(rows stored), and ``verify`` must recompute it in one cursor walk. A sum modulo 2**64 of one
XXH64 per ``(key, value)`` entry is both: a commit subtracts the hashes of the entries it
replaces or deletes and adds those of the entries it puts; the order of entries does not
matter, so a walk in any order (or in pieces) gives the same figure. It is an error-detecting
code against damage (a flipped byte, a lost or duplicated entry), not a MAC: whoever can write
the store can recompute it.

Entry hashes (persisted: never change them):

- ``rows``: XXH64 (seed 0) of the 32 bytes ``key (u64 BE) || value (<QQQ)``, computed for a
  whole column at once with numpy (the XXH64 ``len >= 32`` path with exactly one stripe);
- every other database: XXH64 (seed 0) of ``u32 LE len(key) || key || value`` (the length
  prefix keeps ``("ab", "c")`` and ``("a", "bc")`` apart), per entry with the ``xxhash``
  package (those databases hold one entry per commit, segment or snapshot).

JSON records also carry ``record_xxh64``: XXH64 of the record's canonical JSON (sorted keys, no
spaces) without that key, so a single record can be checked where it is read, without a walk.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xxhash

from dpsn.errors import CorruptStoreError

__all__ = [
    "RECORD_CHECK",
    "check_record",
    "entry_hash",
    "rows_hash",
    "rows_hash_sum",
    "seal_record",
    "xxh64_stripe",
]

_MASK = (1 << 64) - 1
_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_SEED_V1 = np.uint64((0x9E3779B185EBCA87 + 0xC2B2AE3D27D4EB4F) & _MASK)  # seed 0 + P1 + P2
_SEED_V4 = np.uint64((-0x9E3779B185EBCA87) & _MASK)  # seed 0 - P1
_CHUNK = 1 << 18  # entries per numpy pass: the scratch arrays stay in cache

RECORD_CHECK = "record_xxh64"  # the key of a JSON record's own checksum (never rename)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _round(acc: np.ndarray, lane: np.ndarray) -> np.ndarray:
    acc = acc + lane * _P2
    return _rotl(acc, 31) * _P1


def _merge(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    h = h ^ _round(np.zeros_like(v), v)
    return h * _P1 + _P4


def xxh64_stripe(lanes: np.ndarray) -> np.ndarray:
    """XXH64 (seed 0) of each row of ``lanes`` ``[n, 4]`` uint64, read as the 32 little-endian
    bytes of that row: ``xxhash.xxh64_intdigest(lanes[i].tobytes())`` for every ``i``."""
    lanes = np.asarray(lanes, dtype="<u8")
    out = np.empty(len(lanes), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in range(0, len(lanes), _CHUNK):
            part = lanes[a : a + _CHUNK]
            v1 = _round(np.full(len(part), _SEED_V1), part[:, 0])
            v2 = _round(np.full(len(part), _P2), part[:, 1])
            v3 = _round(np.zeros(len(part), dtype=np.uint64), part[:, 2])
            v4 = _round(np.full(len(part), _SEED_V4), part[:, 3])
            h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
            for v in (v1, v2, v3, v4):
                h = _merge(h, v)
            h = h + np.uint64(32)
            h ^= h >> np.uint64(33)
            h *= _P2
            h ^= h >> np.uint64(29)
            h *= _P3
            h ^= h >> np.uint64(32)
            out[a : a + len(part)] = h
    return out


def rows_hash(
    ids: np.ndarray, segment: np.ndarray, offset: np.ndarray, commit: np.ndarray
) -> np.ndarray:
    """The entry hash of each row of the ``rows`` database, from the columns of a row index."""
    lanes = np.empty((len(ids), 4), dtype="<u8")
    # the key is the id big-endian; as a little-endian lane that is the byte-swapped id
    lanes[:, 0] = np.asarray(ids, dtype=np.int64).astype(">u8").view("<u8")
    lanes[:, 1] = np.asarray(segment, dtype=np.int64).astype("<u8")
    lanes[:, 2] = np.asarray(offset, dtype=np.int64).astype("<u8")
    lanes[:, 3] = np.asarray(commit, dtype=np.int64).astype("<u8")
    return xxh64_stripe(lanes)


def rows_hash_raw(keys: bytes, values: bytes) -> np.ndarray:
    """The entry hashes of ``n`` joined 8-byte keys and 24-byte values, as a cursor walk of the
    ``rows`` database returns them."""
    n = len(keys) // 8
    lanes = np.empty((n, 4), dtype="<u8")
    lanes[:, 0] = np.frombuffer(keys, dtype="<u8", count=n)
    lanes[:, 1:] = np.frombuffer(values, dtype="<u8", count=3 * n).reshape(n, 3)
    return xxh64_stripe(lanes)


def rows_hash_sum(*columns: np.ndarray) -> int:
    """The sum modulo 2**64 of the entry hashes of a row index given as its four columns."""
    return int(rows_hash(*columns).sum(dtype=np.uint64))


def entry_hash(key: bytes, value: bytes) -> int:
    """The entry hash of one entry of a database other than ``rows``."""
    h = xxhash.xxh64(len(key).to_bytes(4, "little"))
    h.update(key)
    h.update(value)
    return h.intdigest()


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def seal_record(record: dict[str, Any]) -> bytes:
    """The bytes to store for a JSON record: canonical JSON with its own ``record_xxh64``."""
    body = {k: v for k, v in record.items() if k != RECORD_CHECK}
    return _canonical({**body, RECORD_CHECK: xxhash.xxh64_intdigest(_canonical(body))})


def check_record(raw: Any, what: str) -> bool:
    """Check a parsed JSON record's own checksum. True if it has one and it matches, False if
    it has none (written by an older dpsn); ``CorruptStoreError`` if it does not match."""
    if not isinstance(raw, dict):
        raise CorruptStoreError(f"the LMDB record of {what} is not a JSON object")
    if RECORD_CHECK not in raw:
        return False
    body = {k: v for k, v in raw.items() if k != RECORD_CHECK}
    try:
        ok = xxhash.xxh64_intdigest(_canonical(body)) == raw[RECORD_CHECK]
    except (TypeError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise CorruptStoreError(
            f"the LMDB record of {what} fails its checksum; the index is damaged: restore the "
            "store from a copy"
        )
    return True


class DbDigest:
    """The running digest of one database: its entry count and the sum of its entry hashes."""

    __slots__ = ("count", "total")

    def __init__(self, count: int = 0, total: int = 0) -> None:
        self.count = count
        self.total = total

    def add(self, h: int, n: int = 1) -> None:
        self.count += n
        self.total = (self.total + h) & _MASK

    def remove(self, h: int, n: int = 1) -> None:
        self.count -= n
        self.total = (self.total - h) & _MASK

    def to_json(self) -> list[int]:
        return [self.count, self.total]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DbDigest) and self.count == other.count and self.total == other.total
        )

    def __repr__(self) -> str:
        return f"{self.count} entries, sum {self.total:016x}"
