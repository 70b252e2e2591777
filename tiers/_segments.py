"""Delta segments: immutable, compressed, checksummed column groups in Zarr.

A commit writes one segment: the sorted ids it wrote, their deltas (and any further per-row
columns: a row optimizer's state, the lifecycle's usage statistics), and the ids it dropped. A
segment is written once under a fresh name, fsynced, and only then made visible by the LMDB
commit, so a crash leaves at worst an unreferenced directory that ``gc`` removes. Zarr writes
several chunks non-atomically and never fsyncs (STORAGE-NOTES.md), which is why segments are
never rewritten in place.

Every chunk carries an XXH64 of its decoded bytes in the segment's LMDB record. Decoding a
damaged chunk may fail loudly or silently produce garbage, and a missing chunk file reads as the
fill value; the checksum catches all three, at every read and in ``verify``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import LocalStore

from dpsn.errors import CorruptSegmentError, StoreFullError

from ._format import (
    SEGMENT_DELTAS,
    SEGMENT_DROPS,
    SEGMENT_IDS,
    SEGMENT_STATE,
    SEGMENT_USAGE,
    SEGMENTS_GROUP,
    fsync_dir,
    fsync_tree,
    segment_name,
)

COMPRESSORS = ("lz4", "zstd", "none")
DROPS_CHUNK = 1 << 16


def _codecs(compressor: str, itemsize: int) -> Any:
    if compressor == "lz4":
        # Byte shuffle groups the float exponents together, the one part that compresses.
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize)
    if compressor == "zstd":
        return ZstdCodec(level=1)
    if compressor == "none":
        return None
    raise ValueError(f"unknown compressor {compressor!r}; choose one of {COMPRESSORS}")


def _checksums(data: np.ndarray, chunk: int) -> list[int]:
    flat = np.ascontiguousarray(data)
    return [xxhash.xxh64_intdigest(flat[i : i + chunk].data) for i in range(0, len(flat), chunk)]


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    """What the LMDB index knows about a segment (persisted as JSON; never rename keys)."""

    id: int
    commit: int
    rows: int
    drops: int
    dim: int
    chunk_rows: int
    checksums: dict[str, list[int]]
    raw_bytes: int
    stored_bytes: int
    state_width: int = 0
    usage_width: int = 0

    @property
    def name(self) -> str:
        return segment_name(self.id)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "commit": self.commit,
            "rows": self.rows,
            "drops": self.drops,
            "dim": self.dim,
            "chunk_rows": self.chunk_rows,
            "checksums": self.checksums,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "state_width": self.state_width,
            "usage_width": self.usage_width,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SegmentRecord:
        return cls(
            id=int(raw["id"]),
            commit=int(raw["commit"]),
            rows=int(raw["rows"]),
            drops=int(raw["drops"]),
            dim=int(raw["dim"]),
            chunk_rows=int(raw["chunk_rows"]),
            checksums={k: [int(c) for c in v] for k, v in raw["checksums"].items()},
            raw_bytes=int(raw["raw_bytes"]),
            stored_bytes=int(raw["stored_bytes"]),
            state_width=int(raw.get("state_width", 0)),
            usage_width=int(raw.get("usage_width", 0)),
        )


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class SegmentStore:
    """Reads and writes segments under ``<store>/data.zarr/segments``."""

    def __init__(self, zarr_root: Path, *, storage_dtype: np.dtype, compressor: str) -> None:
        self.root = zarr_root
        self.dir = zarr_root / SEGMENTS_GROUP
        self.storage_dtype = np.dtype(storage_dtype)
        self.compressor = compressor
        self._store = LocalStore(str(zarr_root))
        self._open: dict[int, dict[str, zarr.Array]] = {}

    # -- writing -------------------------------------------------------------------------------

    def write(
        self,
        segment_id: int,
        commit: int,
        ids: np.ndarray,
        deltas: np.ndarray,
        drops: np.ndarray,
        *,
        chunk_rows: int,
        state: np.ndarray | None = None,
        usage: np.ndarray | None = None,
    ) -> SegmentRecord:
        """Write a segment durably. The caller holds the writer lock and has not yet published
        ``segment_id`` in LMDB, so any directory of that name is a crashed commit's leftover."""
        name = segment_name(segment_id)
        path = self.dir / name
        if path.exists():
            shutil.rmtree(path)
        n, dim = deltas.shape
        root = zarr.open_group(self._store, mode="a", zarr_format=3)
        try:
            arrays = {
                SEGMENT_IDS: (ids.astype("<i8", copy=False), (chunk_rows,)),
                SEGMENT_DELTAS: (deltas.astype(self.storage_dtype, copy=False), (chunk_rows, dim)),
                SEGMENT_DROPS: (drops.astype("<i8", copy=False), (DROPS_CHUNK,)),
            }
            if state is not None and state.shape[1] > 0:
                arrays[SEGMENT_STATE] = (
                    state.astype("<f4", copy=False),
                    (chunk_rows, state.shape[1]),
                )
            if usage is not None and usage.shape[1] > 0:
                arrays[SEGMENT_USAGE] = (
                    usage.astype("<f8", copy=False),
                    (chunk_rows, usage.shape[1]),
                )
            checksums: dict[str, list[int]] = {}
            for key, (data, chunks) in arrays.items():
                arr = root.create_array(
                    f"{SEGMENTS_GROUP}/{name}/{key}",
                    shape=data.shape,
                    chunks=tuple(max(1, c) for c in chunks),
                    dtype=data.dtype,
                    compressors=_codecs(self.compressor, data.dtype.itemsize),
                    fill_value=0,
                )
                if data.size:
                    arr[...] = data
                checksums[key] = _checksums(data, chunks[0])
            fsync_tree(path)
            fsync_dir(self.dir)
            fsync_dir(self.root)
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)
            raise StoreFullError(
                f"could not write segment {name}: {e}. The store is unchanged; free space and "
                "commit again (staged rows are kept)."
            ) from e
        raw = sum(a[0].nbytes for a in arrays.values())
        return SegmentRecord(
            id=segment_id,
            commit=commit,
            rows=n,
            drops=len(drops),
            dim=dim,
            chunk_rows=chunk_rows,
            checksums=checksums,
            raw_bytes=raw,
            stored_bytes=dir_bytes(path),
            state_width=0 if state is None else int(state.shape[1]),
            usage_width=0 if usage is None else int(usage.shape[1]),
        )

    def remove(self, segment_id: int) -> int:
        path = self.dir / segment_name(segment_id)
        freed = dir_bytes(path) if path.exists() else 0
        self._open.pop(segment_id, None)
        shutil.rmtree(path, ignore_errors=True)
        return freed

    def on_disk(self) -> list[int]:
        """Ids of every segment directory present, referenced or not."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            try:
                out.append(int(p.name, 16))
            except ValueError:
                continue
        return sorted(out)

    # -- reading -------------------------------------------------------------------------------

    def _array(self, rec: SegmentRecord, key: str) -> zarr.Array:
        cached = self._open.setdefault(rec.id, {})
        arr = cached.get(key)
        if arr is None:
            try:
                arr = zarr.open_array(
                    self._store, path=f"{SEGMENTS_GROUP}/{rec.name}/{key}", mode="r"
                )
            except Exception as e:  # zarr raises several kinds for a missing or garbled node
                raise CorruptSegmentError(
                    f"segment {rec.name}: array {key!r} cannot be opened ({e}); "
                    "the segment is missing or damaged",
                    segment=rec.name,
                ) from e
            cached[key] = arr
        return arr

    def _read_span(self, rec: SegmentRecord, key: str, chunk_lo: int, chunk_hi: int) -> np.ndarray:
        """Read chunks [chunk_lo, chunk_hi) of one array and check each chunk's checksum."""
        arr = self._array(rec, key)
        step = rec.chunk_rows if key != SEGMENT_DROPS else DROPS_CHUNK
        lo, hi = chunk_lo * step, min(chunk_hi * step, arr.shape[0])
        expected = rec.checksums[key]
        try:
            data = np.ascontiguousarray(arr[lo:hi])
        except Exception as e:
            raise self._damage(rec, key, chunk_lo, chunk_hi, f"cannot be decoded ({e})") from e
        want_dtype, want_tail = {
            SEGMENT_DELTAS: (self.storage_dtype, (rec.dim,)),
            SEGMENT_STATE: (np.dtype("<f4"), (rec.state_width,)),
            SEGMENT_USAGE: (np.dtype("<f8"), (rec.usage_width,)),
        }.get(key, (np.dtype("<i8"), ()))
        if data.dtype != want_dtype or data.shape[1:] != want_tail:
            raise self._damage(rec, key, chunk_lo, chunk_hi, "has the wrong dtype or shape")
        for c in range(chunk_lo, chunk_hi):
            piece = data[(c - chunk_lo) * step : (c - chunk_lo + 1) * step]
            if c >= len(expected) or xxhash.xxh64_intdigest(piece.data) != expected[c]:
                raise self._damage(rec, key, c, c + 1, "fails its checksum")
        return data

    def _damage(
        self, rec: SegmentRecord, key: str, chunk_lo: int, chunk_hi: int, what: str
    ) -> CorruptSegmentError:
        rows: list[int] = []
        if key != SEGMENT_IDS:
            try:  # name the rows if the ids themselves are intact
                rows = self._read_span(rec, SEGMENT_IDS, chunk_lo, chunk_hi).tolist()
            except CorruptSegmentError:
                rows = []
        shown = ", ".join(map(str, rows[:8])) + (" ..." if len(rows) > 8 else "")
        return CorruptSegmentError(
            f"segment {rec.name}: {key} chunks {chunk_lo}..{chunk_hi - 1} {what}; "
            f"rows affected: [{shown}] ({len(rows)} rows). Run `dpsn verify` for the full list; "
            "`pool.drop(rows)` returns them to procedural.",
            segment=rec.name,
            rows=rows,
        )

    def read_column(self, rec: SegmentRecord, key: str) -> np.ndarray:
        n = rec.drops if key == SEGMENT_DROPS else rec.rows
        step = DROPS_CHUNK if key == SEGMENT_DROPS else rec.chunk_rows
        if n == 0:
            return np.empty((0,), dtype="<i8")
        return self._read_span(rec, key, 0, -(-n // step))

    def gather(
        self, rec: SegmentRecord, offsets: np.ndarray, key: str = SEGMENT_DELTAS
    ) -> np.ndarray:
        """Rows at sorted ``offsets`` of a segment's deltas (or state, or usage): whole chunks are
        read in contiguous runs (one zarr call per run, never per row) and sliced in numpy."""
        cr = rec.chunk_rows
        chunks = np.unique(offsets // cr)
        if key == SEGMENT_STATE:
            out = np.empty((len(offsets), rec.state_width), dtype="<f4")
        elif key == SEGMENT_USAGE:
            out = np.empty((len(offsets), rec.usage_width), dtype="<f8")
        else:
            out = np.empty((len(offsets), rec.dim), dtype=self.storage_dtype)
        for lo, hi in _runs(chunks):
            block = self._read_span(rec, key, lo, hi)
            a, b = np.searchsorted(offsets, [lo * cr, hi * cr])
            out[a:b] = block[offsets[a:b] - lo * cr]
        return out

    def iter_chunks(self, rec: SegmentRecord) -> Iterator[tuple[str, int]]:
        """Check every chunk of every column, yielding (column, chunk) as it goes (for verify)."""
        for key, sums in rec.checksums.items():
            for c in range(len(sums)):
                self._read_span(rec, key, c, c + 1)
                yield key, c


def _runs(sorted_chunks: np.ndarray) -> Iterator[tuple[int, int]]:
    """Split sorted chunk indices into [lo, hi) runs of consecutive chunks."""
    if len(sorted_chunks) == 0:
        return
    breaks = np.flatnonzero(np.diff(sorted_chunks) != 1) + 1
    for part in np.split(sorted_chunks, breaks):
        yield int(part[0]), int(part[-1]) + 1
