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

import errno
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from dpsn.errors import (
    CorruptSegmentError,
    CorruptStoreError,
    StoreFullError,
    StoreReadError,
    StoreWriteError,
)

from ._format import (
    COMPRESSOR_NAMES,
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
from ._zarrsafe import ArrayMeta, chunk_paths, read_array_meta, read_chunks
from ._zarrseam import SeamStore
from .fs import FileSystem
from .fs import current as current_fs
from .remote import chunk_reader
from .usage_fields import WIDTH as USAGE_WIDTH

COMPRESSORS = COMPRESSOR_NAMES
DROPS_CHUNK = 1 << 16
# What each manifest compressor writes, as the codec after ``bytes`` (the read allow-list).
_CODEC_OF = {"lz4": "blosc", "zstd": "zstd", "none": None}
_U64 = 1 << 64
_MAX_DIM = 1 << 20


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
    # Format 4: rows in co-use order (a placed compaction), not by id. Written only when true,
    # so every other record keeps its bytes.
    placed: bool = False

    @property
    def name(self) -> str:
        return segment_name(self.id)

    def to_json(self) -> dict[str, Any]:
        out = {
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
        }
        if self.usage_width:  # a store without a lifecycle keeps format 1's records exactly
            out["usage_width"] = self.usage_width
        if self.placed:
            out["placed"] = True
        return out

    @classmethod
    def from_json(cls, raw: Any) -> SegmentRecord:
        """Parse a record read from a store: every field is checked (type, range, and the
        number of checksums against the rows they cover), ``CorruptStoreError`` otherwise."""
        if not isinstance(raw, dict):
            raise CorruptStoreError("a segment record is not a JSON object")

        def number(name: str, lo: int, hi: int, default: int | None = None) -> int:
            v = raw.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
                raise CorruptStoreError(f"a segment record has {name}={v!r}")
            return v

        rows = number("rows", 0, 1 << 62)
        drops = number("drops", 0, 1 << 62)
        chunk_rows = number("chunk_rows", 1, 1 << 40)
        state_width = number("state_width", 0, _MAX_DIM + 1, 0)
        # Usage statistics have a fixed set of fields (usage_fields.WIDTH); a record naming
        # another width was not written by a dpsn that reads it.
        usage_width = number("usage_width", 0, USAGE_WIDTH + 1, 0)
        if usage_width not in (0, USAGE_WIDTH):
            raise CorruptStoreError(f"a segment record has usage_width={usage_width!r}")
        placed = raw.get("placed", False)
        if not isinstance(placed, bool):
            raise CorruptStoreError(f"a segment record has placed={placed!r}")
        sums = raw.get("checksums")
        want = {
            SEGMENT_IDS: -(-rows // chunk_rows),
            SEGMENT_DELTAS: -(-rows // chunk_rows),
            SEGMENT_DROPS: -(-drops // DROPS_CHUNK),
        }
        if state_width:
            want[SEGMENT_STATE] = -(-rows // chunk_rows)
        if usage_width:
            want[SEGMENT_USAGE] = -(-rows // chunk_rows)
        if (
            not isinstance(sums, dict)
            or set(sums) != set(want)
            or not all(
                isinstance(v, list)
                and len(v) == want[k]
                and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < _U64 for c in v)
                for k, v in sums.items()
            )
        ):
            raise CorruptStoreError(
                "a segment record's checksums do not cover its columns (one per chunk)"
            )
        return cls(
            id=number("id", 1, 1 << 63),
            commit=number("commit", 1, 1 << 63),
            rows=rows,
            drops=drops,
            dim=number("dim", 1, _MAX_DIM + 1),
            chunk_rows=chunk_rows,
            checksums={k: list(v) for k, v in sums.items()},
            raw_bytes=number("raw_bytes", 0, _U64),
            stored_bytes=number("stored_bytes", 0, _U64),
            state_width=state_width,
            usage_width=usage_width,
            placed=placed,
        )


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class SegmentStore:
    """Reads and writes segments under ``<store>/data.zarr/segments``."""

    def __init__(
        self,
        zarr_root: Path,
        *,
        storage_dtype: np.dtype,
        compressor: str,
        fs: FileSystem | None = None,
    ) -> None:
        self.root = zarr_root
        self.fs = fs or current_fs()
        self.dir = zarr_root / SEGMENTS_GROUP
        self.storage_dtype = np.dtype(storage_dtype)
        self.compressor = compressor
        self._store = SeamStore(zarr_root, self.fs)
        self._open: dict[int, dict[str, ArrayMeta]] = {}
        # A published commit checked out from a bucket reads its chunks through the disk cache.
        self._chunk_reader = chunk_reader(zarr_root)  # holds the checkout until close()

    def close(self) -> None:
        """Release what the reader holds (a checked-out published commit's hold); idempotent."""
        if self._chunk_reader is not None:
            self._chunk_reader.release()

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
        placed: bool = False,
    ) -> SegmentRecord:
        """Write a segment durably (``placed``: ``ids`` are in a co-use order, not sorted).
        The caller holds the writer lock and has not yet published ``segment_id`` in LMDB, so
        any directory of that name is a crashed commit's leftover."""
        name = segment_name(segment_id)
        path = self.dir / name
        if path.exists():
            self.fs.rmtree(path)
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
            fsync_tree(path, self.fs)
            fsync_dir(self.dir, self.fs)
            fsync_dir(self.root, self.fs)
        except OSError as e:
            self.fs.rmtree(path, ignore_errors=True)
            if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                err = StoreWriteError(
                    f"could not write segment {name}: {e}. The store is unchanged; fix the "
                    "cause and commit again (staged rows are kept)."
                )
                err.errno = e.errno
                raise err from e
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
            placed=placed,
        )

    def remove(self, segment_id: int) -> int:
        path = self.dir / segment_name(segment_id)
        freed = dir_bytes(path) if path.exists() else 0
        self._open.pop(segment_id, None)
        self.fs.rmtree(path, ignore_errors=True)
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

    def _array(self, rec: SegmentRecord, key: str) -> ArrayMeta:
        """The checked metadata of one column: dtype, shape and chunks as the record says,
        codecs as the manifest says (nothing else decodes a segment)."""
        cached = self._open.setdefault(rec.id, {})
        meta = cached.get(key)
        if meta is None:
            n = rec.drops if key == SEGMENT_DROPS else rec.rows
            tail = {
                SEGMENT_DELTAS: (rec.dim,),
                SEGMENT_STATE: (rec.state_width,),
                SEGMENT_USAGE: (rec.usage_width,),
            }.get(key, ())
            step = DROPS_CHUNK if key == SEGMENT_DROPS else rec.chunk_rows
            dtype = {
                SEGMENT_DELTAS: self.storage_dtype,
                SEGMENT_STATE: np.dtype("<f4"),
                SEGMENT_USAGE: np.dtype("<f8"),
            }.get(key, np.dtype("<i8"))
            codec = _CODEC_OF.get(self.compressor)
            try:
                meta = read_array_meta(
                    self.dir / rec.name / key,
                    shape=(n, *tail),
                    codecs=frozenset({"bytes"} | ({codec} if codec else set())),
                    fs=self.fs,
                )
                if (
                    meta.chunks != (max(1, step), *tail)
                    or meta.compressor != codec
                    or meta.dtype != dtype
                ):
                    raise CorruptStoreError(
                        f"its chunks {list(meta.chunks)}, dtype {meta.dtype} or compressor "
                        f"{meta.compressor} differ from the record and the manifest"
                    )
            except StoreReadError:
                raise  # the device failed a read: not damage to report rows of
            except CorruptStoreError as e:
                raise CorruptSegmentError(
                    f"segment {rec.name}: array {key!r} cannot be opened ({e}); "
                    "the segment is missing or damaged",
                    segment=rec.name,
                ) from e
            if self._chunk_reader is not None:
                meta = replace(meta, reader=self._chunk_reader)
            cached[key] = meta
        return meta

    def _read_span(self, rec: SegmentRecord, key: str, chunk_lo: int, chunk_hi: int) -> np.ndarray:
        """Read chunks [chunk_lo, chunk_hi) of one array, checking each chunk's checksum as it
        is read: a damaged or hostile chunk (or a missing one, which reads as zeros) fails before
        the next is decoded, so what is held in memory past a check is one chunk. The output is
        allocated up front but only written with checked chunks (its pages are touched as
        they are filled)."""
        meta = self._array(rec, key)
        step = meta.chunks[0]
        expected = rec.checksums[key]
        if not 0 <= chunk_lo <= chunk_hi <= len(expected):
            raise self._damage(rec, key, chunk_lo, chunk_hi, "lie outside the segment")
        n = meta.shape[0]
        lo_row, hi_row = chunk_lo * step, min(chunk_hi * step, n)
        out = np.empty(
            (max(0, hi_row - lo_row), *meta.shape[1:]), dtype=meta.dtype.newbyteorder("=")
        )
        for c in range(chunk_lo, chunk_hi):
            try:
                piece = read_chunks(meta, c, c + 1)
            except StoreReadError:
                raise
            except CorruptStoreError as e:
                raise self._damage(rec, key, c, c + 1, f"cannot be decoded ({e})") from e
            if xxhash.xxh64_intdigest(piece.data) != expected[c]:
                raise self._damage(rec, key, c, c + 1, "fails its checksum")
            a = c * step - lo_row
            out[a : a + len(piece)] = piece
        return out

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
        elif key == SEGMENT_IDS:
            out = np.empty((len(offsets),), dtype="<i8")
        else:
            out = np.empty((len(offsets), rec.dim), dtype=self.storage_dtype)
        if self._chunk_reader is not None and len(chunks) > 1:  # a bucket: fetch them at once
            self._chunk_reader.prefetch(chunk_paths(self._array(rec, key), chunks.tolist()))
        for lo, hi in _runs(chunks):
            block = self._read_span(rec, key, lo, hi)
            a, b = np.searchsorted(offsets, [lo * cr, hi * cr])
            out[a:b] = block[offsets[a:b] - lo * cr]
        return out

    def damaged_chunks(self, rec: SegmentRecord) -> list[CorruptSegmentError]:
        """Every chunk of every column of ``rec`` that fails its checks, each as the error a
        read of it raises (its ``rows`` name the rows it holds, when the ids are readable):
        ``dpsn repair`` drops exactly those rows."""
        found = []
        for key, sums in rec.checksums.items():
            for c in range(len(sums)):
                try:
                    self._read_span(rec, key, c, c + 1)
                except CorruptSegmentError as e:
                    found.append(e)
        return found

    def iter_chunks(self, rec: SegmentRecord) -> Iterator[tuple[str, int, int, np.ndarray]]:
        """Check every chunk of every column, yielding (column, chunk, its first row, its
        values) as it goes (for verify)."""
        for key, sums in rec.checksums.items():
            step = self._array(rec, key).chunks[0]
            for c in range(len(sums)):
                yield key, c, c * step, self._read_span(rec, key, c, c + 1)


def _runs(sorted_chunks: np.ndarray) -> Iterator[tuple[int, int]]:
    """Split sorted chunk indices into [lo, hi) runs of consecutive chunks."""
    if len(sorted_chunks) == 0:
        return
    breaks = np.flatnonzero(np.diff(sorted_chunks) != 1) + 1
    for part in np.split(sorted_chunks, breaks):
        yield int(part[0]), int(part[-1]) + 1
