"""Reading Zarr v3 arrays of an untrusted store with bounded memory.

Why not ``zarr.open_array(...)[...]``: zarr trusts the array's ``zarr.json`` (any registered
codec decodes the chunks, however large they say they are) and decodes a chunk fully before
anything can look at its size, so a crafted Blosc or Zstd chunk can claim gigabytes. dpsn only
ever writes a few layouts, so it reads them itself:

- ``zarr.json`` (at most 1 MiB) must be a Zarr v3 array with a regular chunk grid, the default
  chunk key encoding (``c/0/1``), no storage transformers, a plain numeric data type, a numeric
  fill value, and codecs from an allow-list: ``bytes`` (little- or big-endian), then at most one
  of ``blosc`` and ``zstd``. The caller says which dtype, rank, shape and codecs it expects.
- A chunk file may be at most ``2 x`` its decoded size plus 64 KiB; the decoded size a Blosc or
  Zstd header declares must equal the chunk's size (``prod(chunk_shape) x itemsize``) before
  anything is decoded, and decoding goes into a buffer of exactly that size, so no chunk can
  make the reader allocate more than the metadata said (and the caller bounded that).
- A missing chunk reads as the fill value, as in zarr (dpsn's checksums tell damage apart).

Nothing here imports torch: ``verify`` and the CLI use it too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numcodecs.blosc as _blosc
import numcodecs.zstd as _zstd
import numpy as np

from dpsn.errors import CorruptStoreError

from ._files import NotRegularFileError, open_regular, pread_regular
from .fs import FileSystem

__all__ = ["ArrayMeta", "read_array", "read_array_meta", "read_chunks"]

MAX_META_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 30  # decoded size of one chunk
MAX_CHUNKS = 1 << 24
ALL_CODECS = frozenset({"bytes", "blosc", "zstd"})
_DTYPES = {
    "bool": "?",
    "int8": "i1",
    "int16": "i2",
    "int32": "i4",
    "int64": "i8",
    "uint8": "u1",
    "uint16": "u2",
    "uint32": "u4",
    "uint64": "u8",
    "float16": "f2",
    "float32": "f4",
    "float64": "f8",
}
_ZSTD_MAGIC = 0xFD2FB528


@dataclass(frozen=True, slots=True)
class ArrayMeta:
    """What ``zarr.json`` of an array says, checked."""

    path: Path
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype  # with the byte order of the ``bytes`` codec
    compressor: str | None  # "blosc", "zstd" or None
    fill_value: Any
    # Where chunk bytes come from when not from files under ``path``: a published commit's
    # read-through cache (``remote.chunk_reader``); None (no such chunk) reads as the fill value.
    reader: Callable[[Path, int], bytes | None] | None = field(default=None, compare=False)
    # The file seam chunk files are read through (the store's; None: the current one).
    fs: FileSystem | None = field(default=None, compare=False)

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.chunks) * self.dtype.itemsize

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks, strict=True))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _bad(path: Path, what: str) -> CorruptStoreError:
    return CorruptStoreError(
        f"zarr array {path} {what}; the store is damaged or was not written by dpsn"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_array_meta(
    path: Path,
    *,
    dtypes: set[str] | None = None,
    ndim: int | None = None,
    shape: tuple[int, ...] | None = None,
    codecs: frozenset[str] = ALL_CODECS,
    max_bytes: int | None = None,
    fs: FileSystem | None = None,
) -> ArrayMeta:
    """Read and check ``path/zarr.json``; every expectation given must hold. ``fs``: the file
    seam to read it and the array's chunks through (the store's; default the current one); an
    I/O error is ``StoreReadError`` naming the file."""
    meta_file = Path(path) / "zarr.json"
    try:
        fd, size = open_regular(meta_file, fs=fs)  # a FIFO or a device: refused, never read
        try:
            if size > MAX_META_BYTES:
                raise _bad(path, f"has a zarr.json over {MAX_META_BYTES} bytes")
            raw_bytes = pread_regular(fd, MAX_META_BYTES + 1, 0, meta_file, fs=fs)
        finally:
            os.close(fd)
    except FileNotFoundError as e:
        raise _bad(path, "is missing") from e
    except NotRegularFileError as e:
        raise _bad(path, f"has a zarr.json that is not a regular file ({e})") from e
    except CorruptStoreError:
        raise
    except OSError as e:
        raise _bad(path, f"cannot be read ({e})") from e
    if len(raw_bytes) > MAX_META_BYTES:
        raise _bad(path, f"has a zarr.json over {MAX_META_BYTES} bytes")
    try:
        raw = json.loads(raw_bytes)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"has a zarr.json that is not valid JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("zarr_format") != 3 or raw.get("node_type") != "array":
        raise _bad(path, "is not a Zarr v3 array")
    data_type = raw.get("data_type")
    if data_type not in _DTYPES or (dtypes is not None and data_type not in dtypes):
        raise _bad(path, f"has data type {data_type!r}")
    arr_shape = raw.get("shape")
    grid = raw.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
    if (
        not isinstance(arr_shape, list)
        or not all(_is_int(s) and 0 <= s < 1 << 62 for s in arr_shape)
        or not isinstance(grid, dict)
        or grid.get("name") != "regular"
        or not isinstance(chunks, list)
        or len(chunks) != len(arr_shape)
        or not all(_is_int(c) and 1 <= c < 1 << 62 for c in chunks)
    ):
        raise _bad(path, "has a malformed shape or chunk grid")
    enc = raw.get("chunk_key_encoding")
    if (
        not isinstance(enc, dict)
        or enc.get("name") != "default"
        or (enc.get("configuration") or {}).get("separator", "/") != "/"
    ):
        raise _bad(path, "has a chunk key encoding dpsn does not write")
    if raw.get("storage_transformers") not in (None, []):
        raise _bad(path, "has storage transformers")
    if ndim is not None and len(arr_shape) != ndim:
        raise _bad(path, f"has {len(arr_shape)} dimensions, not {ndim}")
    if shape is not None and tuple(arr_shape) != tuple(shape):
        raise _bad(path, f"has shape {arr_shape}, not {list(shape)}")
    pipeline = raw.get("codecs")
    if not isinstance(pipeline, list) or not 1 <= len(pipeline) <= 2:
        raise _bad(path, "has a malformed codec list")
    names = []
    for c in pipeline:
        name = c.get("name") if isinstance(c, dict) else None
        if name not in codecs:
            raise _bad(path, f"uses codec {name!r}; allowed: {sorted(codecs)}")
        names.append(name)
    if names[0] != "bytes" or "bytes" in names[1:]:
        raise _bad(path, f"has codecs {names}; dpsn writes 'bytes' then one compressor")
    endian = (pipeline[0].get("configuration") or {}).get("endian", "little")
    if endian not in ("little", "big"):
        raise _bad(path, f"has byte order {endian!r}")
    dtype = np.dtype(("<" if endian == "little" else ">") + _DTYPES[data_type])
    compressor = names[1] if len(names) == 2 else None
    if compressor == "blosc":
        cname = (pipeline[1].get("configuration") or {}).get("cname")
        if cname not in ("lz4", "lz4hc", "zstd", "blosclz", "zlib"):
            raise _bad(path, f"uses blosc compressor {cname!r}")
    fill = raw.get("fill_value")
    if isinstance(fill, str) and fill in ("NaN", "Infinity", "-Infinity") and dtype.kind == "f":
        fill = float(fill.replace("Infinity", "inf"))
    if not isinstance(fill, int | float | bool):
        raise _bad(path, f"has fill value {fill!r}")
    out = ArrayMeta(
        path=Path(path),
        shape=tuple(arr_shape),
        chunks=tuple(chunks),
        dtype=dtype,
        compressor=compressor,
        fill_value=fill,
        fs=fs,
    )
    if out.chunk_bytes > MAX_CHUNK_BYTES:
        raise _bad(path, f"has chunks of {out.chunk_bytes} bytes (at most {MAX_CHUNK_BYTES})")
    if math.prod(out.grid) > MAX_CHUNKS:
        raise _bad(path, f"has {math.prod(out.grid)} chunks (at most {MAX_CHUNKS})")
    if max_bytes is not None and out.nbytes > max_bytes:
        raise _bad(path, f"holds {out.nbytes} bytes, more than the {max_bytes} expected")
    return out


def _zstd_content_size(buf: bytes) -> int | None:
    """The Frame_Content_Size of a Zstandard frame header (RFC 8878 3.1.1), None if absent."""
    if len(buf) < 6 or int.from_bytes(buf[:4], "little") != _ZSTD_MAGIC:
        return None
    fhd = buf[4]
    single = (fhd >> 5) & 1
    fcs_flag = fhd >> 6
    dict_size = (0, 1, 2, 4)[fhd & 3]
    pos = 5 + (0 if single else 1) + dict_size
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(buf) < pos + size:
        return None
    value = int.from_bytes(buf[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def _decode(meta: ArrayMeta, key: str, data: bytes) -> np.ndarray:
    want = meta.chunk_bytes
    where = f"{meta.path}/{key}"
    if meta.compressor == "blosc":
        try:
            nbytes, cbytes, _block = _blosc._cbuffer_sizes(data)
        except Exception as e:  # numcodecs raises several kinds for a short header
            raise CorruptStoreError(f"chunk {where} has no valid Blosc header ({e})") from e
        if nbytes != want or cbytes != len(data):
            raise CorruptStoreError(
                f"chunk {where} says it holds {nbytes} bytes in {cbytes}, but the chunk has "
                f"{want} bytes in {len(data)}; it is damaged"
            )
        out = np.empty(want, dtype=np.uint8)
        try:
            _blosc.decompress(data, out)
        except Exception as e:
            raise CorruptStoreError(f"chunk {where} cannot be decoded ({e})") from e
    elif meta.compressor == "zstd":
        size = _zstd_content_size(data)
        if size != want:
            raise CorruptStoreError(
                f"chunk {where} says it holds {size} bytes, but the chunk has {want}; it is damaged"
            )
        out = np.empty(want, dtype=np.uint8)
        try:
            _zstd.decompress(data, out)
        except Exception as e:
            raise CorruptStoreError(f"chunk {where} cannot be decoded ({e})") from e
    else:
        if len(data) != want:
            raise CorruptStoreError(f"chunk {where} has {len(data)} bytes, not {want}")
        out = np.frombuffer(data, dtype=np.uint8)
    return out.view(meta.dtype).reshape(meta.chunks)


def _read_chunk(meta: ArrayMeta, index: tuple[int, ...]) -> np.ndarray:
    key = "c/" + "/".join(map(str, index)) if index else "c"
    path = meta.path / key
    limit = 2 * meta.chunk_bytes + (64 << 10)
    if meta.reader is not None:
        got = meta.reader(path, limit)
        if got is None:
            return np.full(meta.chunks, meta.fill_value, dtype=meta.dtype)
        return _decode(meta, key, got)
    try:
        fd, size = open_regular(path, f"chunk {path}", meta.fs)  # a FIFO: refused
        try:
            if size > limit:
                raise CorruptStoreError(
                    f"chunk {path} is larger than any chunk of its array can be"
                )
            data = pread_regular(fd, limit + 1, 0, path, f"chunk {path}", meta.fs)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return np.full(meta.chunks, meta.fill_value, dtype=meta.dtype)
    except NotADirectoryError as e:
        raise CorruptStoreError(f"chunk {path} is not a file") from e
    except CorruptStoreError:
        raise
    except OSError as e:
        raise CorruptStoreError(f"chunk {path} cannot be read ({e})") from e
    if len(data) > limit:
        raise CorruptStoreError(f"chunk {path} is larger than any chunk of its array can be")
    return _decode(meta, key, data)


def chunk_paths(meta: ArrayMeta, chunks: list[int]) -> list[Path]:
    """The files of ``chunks`` along axis 0 of an array chunked only along axis 0 (the keys
    ``read_chunks`` reads): for a reader that fetches them ahead (``ArrayMeta.reader``)."""
    zeros = "/0" * (len(meta.shape) - 1)
    return [meta.path / f"c/{c}{zeros}" for c in chunks]


def read_chunks(meta: ArrayMeta, lo: int, hi: int) -> np.ndarray:
    """Rows of chunks ``[lo, hi)`` along axis 0 of an array chunked only along axis 0 (its
    other axes in one chunk), trimmed to the array's length, in native byte order."""
    if any(c < s for c, s in zip(meta.chunks[1:], meta.shape[1:], strict=True)):
        raise _bad(meta.path, "is chunked along more than its first axis")
    step = meta.chunks[0] if meta.shape else 1
    n = meta.shape[0] if meta.shape else 1
    lo_row, hi_row = lo * step, min(hi * step, n)
    out = np.empty((max(0, hi_row - lo_row), *meta.shape[1:]), dtype=meta.dtype.newbyteorder("="))
    zeros = (0,) * (len(meta.shape) - 1)
    for c in range(lo, hi):
        a = c * step - lo_row
        b = min(a + step, len(out))
        if b <= a:
            break
        chunk = _read_chunk(meta, (c, *zeros))
        out[a:b] = chunk[(slice(0, b - a), *(slice(0, s) for s in meta.shape[1:]))]
    return out


def read_array(meta: ArrayMeta) -> np.ndarray:
    """The whole array (any regular chunking), in native byte order."""
    out = np.empty(meta.shape, dtype=meta.dtype.newbyteorder("="))
    if out.size == 0:
        return out
    for index in np.ndindex(*meta.grid):
        chunk = _read_chunk(meta, index)
        region = tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(index, meta.chunks, meta.shape, strict=True)
        )
        out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
    return out


def array_dir(root: Path, path: str) -> Path:
    """``root/path`` for a zarr path inside the store, refusing anything that leaves it."""
    parts = path.split("/")
    if any(p in ("", ".", "..") or os.sep in p for p in parts):
        raise CorruptStoreError(f"zarr path {path!r} is not a plain path inside the store")
    return Path(root).joinpath(*parts)
