"""``dpsn export`` and ``dpsn import``: rows to and from safetensors / ``.npy`` tables, in chunks.

Export writes one safetensors file with two tensors: ``ids`` (int64 ``[n]``, sorted, unique)
and ``weight`` (``[n, dim]`` in the pool dtype: rows ``base + delta``, or the deltas alone),
plus ``__metadata__`` naming the source store and commit. An export of every row has
``ids == arange(rows)`` and ``weight`` loads straight into ``nn.Embedding``.

The file is written by this module, not by ``safetensors.save_file``, because that one wants
every tensor in memory at once; the layout (8-byte little-endian header size, JSON header
padded with spaces to 8 bytes, then the tensors' bytes back to back) is small and the
library reads it back in the tests. Reading goes through ``safetensors.safe_open``, whose
slices are memory-mapped, and ``np.load(mmap_mode="r", allow_pickle=False)``: a table is never
loaded whole, and a pickled ``.npy`` is refused.

Import makes a new store of the table's shape and dtype whose generator is ``zeros`` (base
rows of ``-0.0``), so every imported row reads back bit for bit (``hypernet/_zeros.py`` says
why ``-0.0``). With another generator the delta is ``row - base`` in float32, which rounding
can leave a few ulps off; the import counts such rows and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpsn.errors import (
    DpsnError,
    InvalidDeltaError,
    StoreExistsError,
    StoreFullError,
    StoreWriteError,
)
from dpsn.store import file_kind

EXPORT_FORMAT = "dpsn-export"
EXPORT_VERSION = "1"
CHUNK_BYTES = 32 << 20  # rows moved per step: ~32 MiB, whatever the width
# safetensors dtype names of what a store holds, and back
_ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_FROM_ST = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_NPY_DTYPE = {np.dtype("<f4"): "float32", np.dtype("<f2"): "float16", np.dtype("<f8"): "float64"}


class TransferError(DpsnError, ValueError):
    """A table or a row selection dpsn cannot move (wrong shape, dtype, content)."""


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="row",
        unit_scale=True,
        file=sys.stderr,
        disable=None,
        leave=False,
    )


def chunk_rows_for(dim: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


# -- row selections ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Sorted, disjoint, half-open id ranges, or an explicit sorted array of ids."""

    ranges: tuple[tuple[int, int], ...] = ()
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        if self.ids is not None:
            return len(self.ids)
        return sum(b - a for a, b in self.ranges)

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        if self.ids is not None:
            for a in range(0, len(self.ids), size):
                yield self.ids[a : a + size]
            return
        buf: list[np.ndarray] = []
        have = 0
        for a, b in self.ranges:
            while a < b:
                take = min(b - a, size - have)
                buf.append(np.arange(a, a + take, dtype=np.int64))
                have += take
                a += take
                if have == size:
                    yield np.concatenate(buf)
                    buf, have = [], 0
        if buf:
            yield np.concatenate(buf)


def parse_selection(spec: str, rows: int, persisted: Any) -> Selection:
    """``all``, ``persisted``, or a comma list of ids and ``A:B`` ranges (half-open; ``A:``
    runs to the end). ``persisted()`` is called only when asked for, and returns sorted ids."""
    from ._counts import parse_count

    s = spec.strip()
    if s == "all":
        return Selection(ranges=((0, rows),))
    if s == "persisted":
        return Selection(ids=np.asarray(persisted(), dtype=np.int64))
    ranges = []
    for item in s.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            if ":" in item:
                lo, _, hi = item.partition(":")
                a = parse_count(lo) if lo.strip() else 0
                b = parse_count(hi) if hi.strip() else rows
            else:
                a = parse_count(item)
                b = a + 1
        except Exception as e:
            raise TransferError(
                f"--rows {spec}: {item!r} is not an id or a range A:B ({e})"
            ) from None
        if not 0 <= a < b <= rows:
            raise TransferError(
                f"--rows {spec}: {item!r} is empty or outside the store's ids 0..{rows - 1}"
            )
        ranges.append((a, b))
    if not ranges:
        raise TransferError(f"--rows {spec!r} selects no rows")
    ranges.sort()
    merged = [ranges[0]]
    for a, b in ranges[1:]:
        if a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return Selection(ranges=tuple(merged))


# -- safetensors writing -------------------------------------------------------------------------


class SafetensorsWriter:
    """Writes tensors of known shapes into one safetensors file, each filled in row chunks.

    The file appears under its name only when :meth:`finish` succeeds (temp file, fsync,
    rename); :meth:`abort` removes the temp file.
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, tuple[str, tuple[int, ...], int]],
        metadata: dict[str, str],
    ) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        header: dict[str, Any] = {"__metadata__": metadata}
        self.offsets: dict[str, int] = {}
        self.row_bytes: dict[str, int] = {}
        at = 0
        for name, (dtype, shape, itemsize) in tensors.items():
            size = int(np.prod(shape, dtype=object)) * itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + size]}
            self.offsets[name] = at
            self.row_bytes[name] = size // shape[0] if shape[0] else 0
            at += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = self.data_start + at
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
        except BaseException:
            self.abort()
            raise

    def write_rows(self, name: str, first_row: int, data: bytes | memoryview) -> None:
        pos = self.data_start + self.offsets[name] + first_row * self.row_bytes[name]
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def finish(self) -> None:
        os.ftruncate(self.fd, self.total)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


# -- export ------------------------------------------------------------------------------------


def export_rows(
    store: str,
    out: str,
    *,
    rows_spec: str | None,
    deltas_only: bool,
    at: str | None,
    force: bool,
) -> dict[str, Any]:
    import torch

    import dpsn
    from dpsn.store import PersistedStore, read_manifest
    from dpsn.store import levels as levels_format

    out_path = Path(out)
    try:
        mode = os.lstat(out_path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        # --force replaces a file, never a FIFO, a device node, a socket or a link
        raise TransferError(
            f"{out_path} is {file_kind(mode)}, not a regular file; export writes only to a "
            "regular file or a new name"
        )
    if mode is not None and not stat.S_ISDIR(mode) and not force:
        raise StoreExistsError(f"{out_path} exists; pass --force to replace it, or pick another")
    if out_path.is_dir():
        raise TransferError(f"{out_path} is a directory; give a file name such as rows.safetensors")
    if not out_path.resolve().parent.is_dir():
        raise FileNotFoundError(f"{out_path.parent}: no such directory (create it first)")
    spec = rows_spec or ("persisted" if deltas_only else "all")
    levelled = levels_format.is_levelled(store)  # a levelled root: rows sum every level
    with dpsn.open(store, at=at, cache_rows=0) as pool:
        commit = pool.head

        def persisted() -> np.ndarray:
            if levelled:
                return pool.persisted_ids()
            ps = PersistedStore.open(Path(store), writable=False)
            try:
                return ps.load_index(commit).ids
            finally:
                ps.close()

        sel = parse_selection(spec, pool.rows, persisted)
        n, dim = len(sel), pool.dim
        dtype_name = str(pool.dtype).removeprefix("torch.")
        itemsize = pool.dtype.itemsize
        need = n * (8 + dim * itemsize)
        free = shutil.disk_usage(out_path.resolve().parent).free
        if need > free:
            from ._format import human_bytes, human_count

            raise TransferError(
                f"--rows {spec} selects {human_count(n)} rows x {dim} "
                f"({human_bytes(need)}), more than the {human_bytes(free)} free at "
                f"{out_path.resolve().parent}; pick fewer rows (e.g. --rows persisted or "
                "--rows 0:1000000)"
            )
        m = read_manifest(levels_format.first_level(store) if levelled else Path(store))
        metadata = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "values": "deltas" if deltas_only else "rows",
            "source": str(Path(store).resolve()),
            "commit": str(commit),
            "rows": str(pool.rows),
            "dim": str(dim),
            "dtype": dtype_name,
            "seed": str(pool.seed),
        }
        metadata["uuid"] = pool.uuid if levelled else m.uuid
        metadata["generator"] = json.dumps(m.generator, sort_keys=True)
        writer = SafetensorsWriter(
            out_path,
            {"ids": ("I64", (n,), 8), "weight": (_ST_DTYPE[dtype_name], (n, dim), itemsize)},
            metadata,
        )
        started = time.perf_counter()
        try:
            done = 0
            bar = _progress(n, "export")
            with bar:
                for ids in sel.chunks(chunk_rows_for(dim, itemsize)):
                    t = torch.from_numpy(ids)
                    values = pool.delta(t) if deltas_only else pool.read(t)
                    values = values.contiguous().cpu()
                    if values.dtype == torch.bfloat16:
                        values = values.view(torch.int16)
                    writer.write_rows("ids", done, ids.astype("<i8").data)
                    writer.write_rows("weight", done, values.numpy().data)
                    done += len(ids)
                    bar.update(len(ids))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    return {
        "store": str(store),
        "out": str(out_path),
        "commit": commit,
        "values": metadata["values"],
        "rows": n,
        "dim": dim,
        "dtype": dtype_name,
        "bytes": writer.total,
        "seconds": time.perf_counter() - started,
    }


# -- reading tables ----------------------------------------------------------------------------


@dataclass
class Table:
    """A 2-D table of rows read in slices, and (optionally) the row ids to place them at."""

    path: Path
    shape: tuple[int, int]
    dtype: str  # float32 / float16 / bfloat16 / float64
    name: str
    ids: np.ndarray | None
    metadata: dict[str, str]
    _slice: Any

    def rows(self, a: int, b: int) -> Any:
        """Rows ``a:b`` as a torch tensor in the table's dtype."""
        import torch

        out = self._slice[a:b]
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(np.array(out, copy=True))  # a read-only mmap slice
        return out


# A table's safetensors header names one or two tensors and a little metadata: a few KiB.
# Bounded before safetensors parses it (an 80 MB header cost 1.36 GB of memory to refuse).
MAX_SAFETENSORS_HEADER = 1 << 24


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if not (len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1):
        return False
    size = int.from_bytes(head[:8], "little")
    if size > MAX_SAFETENSORS_HEADER:
        raise TransferError(
            f"{path}: its safetensors header is {size} bytes, over the {MAX_SAFETENSORS_HEADER} "
            "a table's can be (a table holds one or two tensors); it is damaged or not a table"
        )
    return True


def open_table(path: Path, tensor: str | None, ids_name: str | None) -> Table:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if not stat.S_ISREG(mode):
        raise TransferError(f"{path} is {file_kind(mode)}, not a file holding a table")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        return _open_npy(path)
    if path.suffix == ".npz":
        raise TransferError(f"{path} is an .npz archive; save the table itself with np.save")
    if _is_safetensors(path):
        return _open_safetensors(path, tensor, ids_name)
    from ._torchfile import is_torch_file, open_torch_table

    if is_torch_file(path, magic):
        return open_torch_table(path, tensor, ids_name)
    raise TransferError(
        f"{path} is neither a .safetensors file, a .npy array nor a torch.save file; save the "
        "table with safetensors (save_file({'weight': emb.weight})), np.save or torch.save"
    )


def _open_npy(path: Path) -> Table:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "max_header_size" in str(e):  # numpy's wording mentions allow_pickle: not one
            raise TransferError(
                f"{path}: its .npy header is longer than numpy reads safely (10000 bytes); "
                "the file is damaged or not a plain array: save it again with np.save"
            ) from None
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise TransferError(
                f"{path} holds Python objects (a pickle); dpsn never loads pickles from files. "
                "Save the table as a plain float array: np.save(path, table.astype('float32'))"
            ) from None
        raise TransferError(f"{path} is not a readable .npy array: {e}") from None
    if arr.dtype.hasobject:
        raise TransferError(f"{path} holds Python objects; dpsn never loads pickles")
    dtype = _NPY_DTYPE.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
    _check_shape(path, tuple(arr.shape), dtype or str(arr.dtype))
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return Table(path, tuple(arr.shape), dtype or str(arr.dtype), "array", None, {}, arr)


def _open_safetensors(path: Path, tensor: str | None, ids_name: str | None) -> Table:
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise TransferError(f"{path} is not a valid safetensors file: {e}") from None
    names = list(f.keys())
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    dtypes = {k: f.get_slice(k).get_dtype() for k in names}
    if tensor is None:
        two_d = [k for k in names if len(shapes[k]) == 2]
        if "weight" in names:
            tensor = "weight"
        elif len(two_d) == 1:
            tensor = two_d[0]
        elif not names:
            raise TransferError(f"{path} holds no tensors")
        else:
            listed = ", ".join(f"{k} {list(shapes[k])}" for k in (two_d or names))
            raise TransferError(
                f"{path} holds several tensors ({listed}); pick the table with --tensor NAME"
            )
    if tensor not in names:
        raise TransferError(f"{path} has no tensor {tensor!r}; it holds: {', '.join(names)}")
    dtype = _FROM_ST.get(dtypes[tensor], dtypes[tensor])
    _check_shape(path, shapes[tensor], dtype, name=tensor)
    ids = None
    want_ids = ids_name if ids_name is not None else ("ids" if "ids" in names else None)
    if want_ids is not None and want_ids != "":
        if want_ids not in names:
            raise TransferError(f"{path} has no tensor {want_ids!r} for --ids")
        if dtypes[want_ids] != "I64" or shapes[want_ids] != (shapes[tensor][0],):
            raise TransferError(
                f"{path}: ids tensor {want_ids!r} must be int64 of shape ({shapes[tensor][0]},), "
                f"not {dtypes[want_ids]} {list(shapes[want_ids])}"
            )
        ids = f.get_slice(want_ids)[:].numpy()
        if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0):
            raise TransferError(f"{path}: ids tensor {want_ids!r} must be sorted, unique, >= 0")
    return Table(
        path, shapes[tensor], dtype, tensor, ids, dict(f.metadata() or {}), f.get_slice(tensor)
    )


def _check_shape(path: Path, shape: tuple[int, ...], dtype: str, name: str = "array") -> None:
    what = f"{path}" + (f" ({name})" if name != "array" else "")
    if len(shape) != 2:
        raise TransferError(
            f"{what} has shape {list(shape)}; a table of rows is 2-D [rows, dim]"
            + (" (reshape it to [n, 1] for one value a row)" if len(shape) == 1 else "")
        )
    if shape[0] < 1 or shape[1] < 1:
        raise TransferError(f"{what} is empty (shape {list(shape)})")
    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise TransferError(
            f"{what} has dtype {dtype}; a store holds float32, float16 or bfloat16 rows. "
            "Convert the table to one of those first"
        )


# -- import ------------------------------------------------------------------------------------


def import_table(
    table_path: str,
    out: str,
    *,
    tensor: str | None,
    ids_name: str | None,
    rows: int | None,
    dtype: str | None,
    generator: str,
    seed: int,
    compressor: str,
    commit_rows: int | None,
) -> dict[str, Any]:
    import torch

    import dpsn

    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise StoreExistsError(f"{out_path} exists and is not empty; pick a new path for the store")
    table = open_table(Path(table_path), tensor, ids_name)
    n, dim = table.shape
    if table.dtype == "float64" and dtype is None:
        raise TransferError(
            f"{table.path} holds float64 rows; a store holds float32, float16 or bfloat16. "
            "Pass --dtype float32 to convert (each value is rounded once)"
        )
    pool_dtype = dtype or table.dtype
    if rows is None:
        meta_rows = table.metadata.get("rows") if table.ids is not None else None
        if meta_rows and meta_rows.isdigit() and len(meta_rows) > 20:
            raise TransferError(
                f"{table.path}: its metadata says rows={meta_rows[:20]}... ({len(meta_rows)} "
                "digits), more than any store holds (2**64); give --rows"
            )
        rows = int(meta_rows) if meta_rows and meta_rows.isdigit() else None
        if rows is None:
            rows = int(table.ids[-1]) + 1 if table.ids is not None else n
    if table.ids is not None and len(table.ids) and int(table.ids[-1]) >= rows:
        raise TransferError(
            f"the table places a row at id {int(table.ids[-1])}, past --rows {rows}"
        )
    if table.ids is None and rows < n:
        raise TransferError(f"--rows {rows} is smaller than the table's {n} rows")
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[pool_dtype]
    step = chunk_rows_for(dim, max(itemsize, 4))
    commit_rows = commit_rows or max(step, (256 << 20) // (dim * itemsize))
    exact = generator == "zeros"
    inexact, max_err, commits = 0, 0.0, 0
    started = time.perf_counter()
    existed = out_path.exists()
    created = False
    try:
        pool = dpsn.create(
            out_path,
            rows=rows,
            dim=dim,
            seed=seed,
            generator=generator,
            dtype=pool_dtype,
            compressor=compressor,
            cache_rows=0,
        )
        created = True
        with pool:
            bar = _progress(n, "import")
            staged_since = 0
            with bar:
                for a in range(0, n, step):
                    b = min(n, a + step)
                    chunk = table.rows(a, b).to(getattr(torch, pool_dtype))
                    ids = (
                        torch.from_numpy(np.ascontiguousarray(table.ids[a:b]))
                        if table.ids is not None
                        else torch.arange(a, b, dtype=torch.int64)
                    )
                    finite = torch.isfinite(chunk).all(dim=1)
                    if not bool(finite.all()):
                        bad = a + int(torch.nonzero(~finite)[0, 0])
                        raise InvalidDeltaError(
                            f"row {bad} of {table.path} holds NaN or Inf (after conversion to "
                            f"{pool_dtype}); a store holds finite values only. Nothing was created"
                        )
                    if exact:
                        deltas = chunk
                    else:
                        base = pool.base(ids).float()
                        deltas = (chunk.float() - base).to(chunk.dtype)
                        back = (base + deltas.float()).to(chunk.dtype)
                        diff = back.view(-1) != chunk.view(-1)
                        if bool(diff.any()):
                            bad_rows = (back != chunk).any(dim=1)
                            inexact += int(bad_rows.sum())
                            err = (back.float() - chunk.float()).abs().max()
                            max_err = max(max_err, float(err))
                    pool.write(ids, deltas)
                    staged_since += b - a
                    if staged_since >= commit_rows or b == n:
                        pool.commit(
                            f"import {table.path.name}: table rows {a + b - staged_since}..{b - 1}"
                        )
                        commits += 1
                        staged_since = 0
                    bar.update(b - a)
    except BaseException as e:
        # Leave nothing half-made behind (an empty directory stays as it was), even what a
        # create that failed part-way wrote, or what zarr's event loop finished writing after
        # the error: a retry must find OUT as it was.
        if created or not existed or not any(out_path.iterdir()):
            _remove_all(out_path, keep_dir=existed)
        if isinstance(e, StoreFullError | StoreWriteError):
            raise type(e)(
                f"the import into {out_path} failed: {e.args[0].split('. The store')[0]}. "
                f"Nothing was kept ({out_path} was removed); free space and import again"
            ) from e
        raise
    return {
        "table": str(table.path),
        "tensor": table.name,
        "store": str(out_path),
        "rows_imported": n,
        "rows": rows,
        "dim": dim,
        "dtype": pool_dtype,
        "table_dtype": table.dtype,
        "generator": generator,
        "placed_by_ids": table.ids is not None,
        "commits": commits,
        "rows_not_exact": inexact,
        "max_abs_error": max_err,
        "seconds": time.perf_counter() - started,
    }


def _remove_all(path: Path, *, keep_dir: bool) -> None:
    """Remove what an interrupted import wrote at ``path``. zarr writes chunks from its own
    event loop thread, which may still finish a write after the error reached us: remove, wait
    for that loop to go idle, and remove again until nothing comes back."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        _settle_zarr()
        if not path.exists():
            break
    if keep_dir:
        path.mkdir(exist_ok=True)


def _settle_zarr() -> None:
    """Let zarr's background event loop run what it still holds (up to ~0.1 s)."""
    try:
        from zarr.core.sync import _get_loop

        loop = _get_loop()
    except Exception:  # another zarr layout: fall back to a short pause
        time.sleep(0.05)
        return
    import asyncio

    async def _drain() -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=0.1)

    try:
        asyncio.run_coroutine_threadsafe(_drain(), loop).result(timeout=1.0)
    except Exception:
        time.sleep(0.05)
