"""Run files: the row index's sorted layers on disk, written by the writer and memory-mapped by
every opener (``_layered.py`` says why there are layers).

Layout: ``<store>/index.runs/`` holds ``runs.json`` (the runs in order, oldest first, the commit
they reflect, its index digest, the row count and rows per segment, and ``record_xxh64``, the
XXH64 of the rest as canonical JSON, checked by every opener) and ``run-<n>.bin`` files:
a 64-byte header (magic, entry count, XXH64 of the tail, XXH64 of these 24 bytes), the entries
(id, segment, offset, commit: four little-endian int64 each, sorted by id), the fences (every
128th id) and one checksum per block of 128 entries (the "block sums"). ``np.memmap`` searches
them in place: the fences pick an id's 4 KiB block, so a lookup touches one block of the file
and the OS keeps in RAM only the blocks lookups touch. An opener reads the header and the tail
(fences and block sums, 1/256 of the file) and checks them; each block of entries is checked
against its sum the first time a lookup touches it (``RowIndex.check_blocks``), so a damaged
entry is never used: the lookup raises ``RowBlockError`` and the index falls back to LMDB.

Runs are derived data; LMDB's row index stays the truth and every commit still writes it. An
opener uses runs only when ``runs.json`` names this store, a commit at or before HEAD and that
commit's index digest, and the replay of the commits since lands on HEAD's row count and digest;
anything else (missing, stale, foreign, unreadable, a checksum that fails) and it reads LMDB as
before, and a writer writes the set anew. What ``gc`` deletes is never decided from these files
(``_retention.py`` reads HEAD's segments from LMDB). ``dpsn verify`` checks each run's checksum
and every field of the runs and ``runs.json`` against LMDB. Writes follow the commit protocol:
files written and fsynced under temporary names and renamed, then ``runs.json`` replaced, then
files it no longer names removed (a reader that mapped one keeps it until it closes).
"""

from __future__ import annotations

import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ._digest import RECORD_CHECK, seal_record
from ._files import SizeGuard, open_regular, pread_regular, read_regular
from ._layered import LayeredIndex
from ._rowindex import FENCE_STEP, RowBlockError, RowIndex, block_sums, merge_newest
from .fs import FileSystem, creating, write_all, write_file
from .fs import current as current_fs

__all__ = ["RowBlockError"]  # re-exported: what a damaged block raises

RUNS_DIR = "index.runs"
RUNS_MANIFEST = "runs.json"
RUNS_FORMAT = 2  # 2: runs.json sealed, block sums in run files (format-1 sets are not used)
_MAGIC = b"DPSNRUN2"
_HEADER = 64
_COLUMNS = 4
# runs.json: a few dozen bytes per run and per segment with live rows.
MAX_MANIFEST_BYTES = 1 << 26
_NAME = re.compile(r"run-[0-9a-f]{16}\.bin")

# Below this many rows the whole index stays in memory and an open reads LMDB (a few ms).
RUN_MIN_ROWS = 1 << 16
# The overlay becomes a run at this many entries, or after this many commits (an opener
# replays at most that many commits from their segments).
FLUSH_ROWS = 1 << 15
FLUSH_COMMITS = 16
# A run is merged into the one below it once it holds a quarter of its entries; never more
# than this many runs (a lookup searches each).
MERGE_RATIO = 4
MAX_RUNS = 8


class RunsUnusableError(Exception):
    """The run set cannot be used (the reason is the message); the caller reads LMDB."""


@dataclass(frozen=True)
class RunSet:
    """What ``runs.json`` says."""

    commit: int
    digest: int | None
    count: int
    newest: int
    live: dict[int, int]
    files: tuple[tuple[str, int, int], ...]  # (name, entries, xxh64 of the file)


def runs_dir(root: Path) -> Path:
    return root / RUNS_DIR


# -- reading ---------------------------------------------------------------------------------


def read_runset(root: Path, uuid: str, fs: FileSystem | None = None) -> RunSet | None:
    """The run set of the store ``uuid`` at ``root``; ``None`` when there is none. Read
    through the file seam ``fs`` (the current one by default), as are the run files below."""
    path = runs_dir(root) / RUNS_MANIFEST
    try:
        raw = read_regular(path, MAX_MANIFEST_BYTES, fs=fs)
    except FileNotFoundError:
        return None
    except OSError as e:  # a FIFO, a device, too big, unreadable
        raise RunsUnusableError(f"{path} cannot be read: {e}") from e
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise RunsUnusableError(f"{path} is not JSON") from e
    if isinstance(doc, dict) and doc.get("format") == RUNS_FORMAT:
        body = {k: v for k, v in doc.items() if k != RECORD_CHECK}
        try:
            sealed = seal_record(body) == raw
        except (TypeError, ValueError, RecursionError):
            sealed = False
        if not sealed:
            raise RunsUnusableError(f"{path} fails its checksum (record_xxh64): it is damaged")
    return _parse(doc, uuid, path)


def _int(value: Any, low: int = 0, high: int = 2**63) -> int:
    if type(value) is not int or not low <= value < high:
        raise ValueError(f"{value!r} is not an integer >= {low}")
    return value


def _parse(doc: Any, uuid: str, path: Path) -> RunSet:
    try:
        if not isinstance(doc, dict) or doc.get("format") != RUNS_FORMAT:
            raise ValueError(f"not a format-{RUNS_FORMAT} run set")
        if doc.get("store") != uuid:
            raise ValueError("it belongs to another store")
        digest = doc.get("digest")
        live_raw, files_raw = doc.get("live"), doc.get("runs")
        if not isinstance(live_raw, list) or not isinstance(files_raw, list) or not files_raw:
            raise ValueError("live or runs is not a list")
        live = {}
        for item in live_raw:
            if not isinstance(item, list) or len(item) != 2:
                raise ValueError("a live entry is not [segment, rows]")
            live[_int(item[0], 1)] = _int(item[1], 1)
        files = []
        for item in files_raw:
            if not isinstance(item, dict) or not isinstance(item.get("file"), str):
                raise ValueError("a run entry has no file")
            if not _NAME.fullmatch(item["file"]) or not isinstance(item.get("xxh64"), str):
                raise ValueError(f"a run is named {item['file'][:80]!r}")
            files.append((item["file"], _int(item.get("rows")), int(item["xxh64"], 16)))
        return RunSet(
            commit=_int(doc.get("commit"), 1),
            digest=None if digest is None else _int(digest, 0, 2**64),
            count=_int(doc.get("count")),
            newest=_int(doc.get("newest")),
            live=live,
            files=tuple(files),
        )
    except (ValueError, TypeError) as e:
        raise RunsUnusableError(f"{path}: {e}") from e


def _fence_count(entries: int) -> int:
    return -(-entries // FENCE_STEP)


def _header(entries: int, tail: bytes) -> bytes:
    head = _MAGIC + entries.to_bytes(8, "little") + xxhash.xxh64_digest(tail)[::-1]
    return (head + xxhash.xxh64_digest(head)[::-1]).ljust(_HEADER, b"\0")


def run_size(entries: int) -> int:
    """The size of a run file of ``entries`` entries (header, entries, fences, block sums)."""
    return _HEADER + 8 * (_COLUMNS * entries + 2 * _fence_count(entries))


def open_run(path: Path, entries: int, fs: FileSystem | None = None) -> RowIndex:
    """A run file as a ``RowIndex`` of memory-mapped columns: the header and the tail (fences
    and block sums) read and checked, the entries mapped and checked block by block as lookups
    first touch them; the OS told to read pages as touched, without read-ahead (lookups land at
    random). A file of any other size, type or content is ``RunsUnusableError``."""
    fences = _fence_count(entries)
    want = run_size(entries)
    try:
        fd, size = open_regular(path, fs=fs)
    except OSError as e:
        raise RunsUnusableError(f"{path} cannot be read: {e}") from e
    guard = SizeGuard(fd, want)  # closes fd when the index goes
    try:
        header = pread_regular(fd, _HEADER, 0, path, fs=fs)
        tail_at = _HEADER + 8 * _COLUMNS * entries
        tail = pread_regular(fd, 16 * fences, tail_at, path, fs=fs) if size == want else b""
    except OSError as e:
        raise RunsUnusableError(f"{path} cannot be read: {e}") from e
    if (
        size != want
        or len(header) != _HEADER
        or len(tail) != 16 * fences
        or header != _header(entries, tail)
    ):
        raise RunsUnusableError(f"{path} is not an intact run of {entries} entries")
    if not entries:
        return RowIndex.empty()
    # Mapped through the descriptor checked above (not the path: a file renamed in between
    # would be another file).
    with open(fd, "rb", closefd=False) as f:
        flat = np.memmap(f, dtype="<i8", mode="r", offset=_HEADER, shape=(_COLUMNS * entries,))
    mm = getattr(flat, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    rows = flat.reshape(entries, _COLUMNS)
    tail_words = np.frombuffer(tail, dtype="<i8")
    return RowIndex(
        ids=rows[:, 0],
        segment=rows[:, 1],
        offset=rows[:, 2],
        commit=rows[:, 3],
        fences=tail_words[:fences].copy(),
        sums=tail_words[fences:].view("<u8").copy(),
        checked=np.zeros(fences, dtype=bool),
        source=str(path),
        guard=guard,
    )


def open_layers(root: Path, runset: RunSet, fs: FileSystem | None = None) -> tuple[RowIndex, ...]:
    return tuple(open_run(runs_dir(root) / name, n, fs) for name, n, _ in runset.files)


def run_checksum(path: Path, fs: FileSystem | None = None) -> int:
    """xxh64 of a run file past its header (which checks itself), read in blocks: what
    ``dpsn verify`` and a writer's open compare with ``runs.json``."""
    h = xxhash.xxh64()
    fd, size = open_regular(path, fs=fs)
    try:
        done = _HEADER
        while done < size:  # never past the size seen at open (a link to /dev/zero: size 0)
            block = pread_regular(fd, min(1 << 22, size - done), done, path, fs=fs)
            if not block:
                break
            h.update(block)
            done += len(block)
    finally:
        os.close(fd)
    return h.intdigest()


def check_run_files(root: Path, runset: RunSet, fs: FileSystem | None = None) -> None:
    """Every run file read whole against its checksum in ``runs.json`` (``RunsUnusableError``
    naming the first that fails): what a writer's open and ``dpsn verify`` run."""
    for name, entries, want in runset.files:
        try:
            path = runs_dir(root) / name
            open_run(path, entries, fs)  # the header and the tail
            ok = run_checksum(path, fs) == want
        except OSError as e:
            raise RunsUnusableError(f"run file {name} cannot be read: {e}") from e
        if not ok:
            raise RunsUnusableError(f"run file {name} does not match runs.json")


# -- writing ---------------------------------------------------------------------------------


def _write_run(folder: Path, name: str, layer: RowIndex, fs: FileSystem) -> int:
    """Entries row by row (id, segment, offset, commit: 32 bytes, so a 4 KiB page holds
    ``FENCE_STEP`` of them), then the fences (every ``FENCE_STEP``-th id), then the block
    sums; the header (which checks the tail) is written last, at the front."""
    n = len(layer)
    tmp = folder / f".{name}.tmp"
    sums = []
    h = xxhash.xxh64()  # of all but the header (which checks itself): what runs.json keeps
    with creating(fs, tmp) as f:
        write_all(f, bytes(_HEADER))
        step = (1 << 20) // FENCE_STEP * FENCE_STEP  # whole blocks per buffer, bounded at any size
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            rows = np.empty((hi - lo, _COLUMNS), dtype="<i8")
            for c, col in enumerate((layer.ids, layer.segment, layer.offset, layer.commit)):
                rows[:, c] = col[lo:hi]
            sums.append(block_sums(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]))
            data = rows.tobytes()
            h.update(data)
            write_all(f, data)
        fences = np.ascontiguousarray(layer.ids[::FENCE_STEP], dtype="<i8").tobytes()
        all_sums = np.concatenate(sums) if sums else np.empty(0, dtype="<u8")
        tail = fences + np.ascontiguousarray(all_sums, dtype="<u8").tobytes()
        h.update(tail)
        write_all(f, tail)
        f.seek(0)
        write_all(f, _header(n, tail))
        f.fsync()
    fs.replace(tmp, folder / name)
    return h.intdigest()


def _next_name(folder: Path) -> int:
    numbers = [int(p.name[4:20], 16) for p in folder.iterdir() if _NAME.fullmatch(p.name)]
    return max(numbers, default=0) + 1


def save(
    root: Path,
    uuid: str,
    index: LayeredIndex,
    commit: int,
    digest: int | None,
    fs: FileSystem | None = None,
) -> LayeredIndex:
    """Write the overlay of ``index`` (at ``commit``, whose index digest is ``digest``) as a
    run, merge runs by size, replace ``runs.json``; the same rows, now on mapped files.
    Written through the file seam ``fs`` (``dpsn.store.fs``)."""
    fs = fs or current_fs()
    folder = runs_dir(root)
    if not folder.is_dir():
        fs.mkdir(folder, exist_ok=True)
        fs.fsync_dir(folder.parent)
    layers = list(index.layers)
    names = list(index.runs)
    if len(index.overlay):
        layers.append(index.overlay)
        names.append(None)
    while len(layers) >= 2 and (
        len(layers[-1]) * MERGE_RATIO >= len(layers[-2]) or len(layers) > MAX_RUNS
    ):
        bottom = len(layers) == 2
        merged = merge_newest(layers[-2:], keep_tombstones=not bottom)
        layers[-2:] = [merged]
        names[-2:] = [None]
    seq = _next_name(folder)
    sums = {}
    known = {name: h for name, _, h in _current_files(root, uuid, fs)}
    for i, layer in enumerate(layers):
        if names[i] is None or names[i] not in known:
            names[i] = f"run-{seq:016x}.bin"
            seq += 1
            sums[names[i]] = _write_run(folder, names[i], layer, fs)
        else:
            sums[names[i]] = known[names[i]]
    fs.fsync_dir(folder)
    doc = {
        "format": RUNS_FORMAT,
        "store": uuid,
        "commit": commit,
        "digest": digest,
        "count": index.count,
        "newest": index.newest,
        "live": [[s, c] for s, c in sorted(index.live.items())],
        "runs": [
            {"file": n, "rows": len(x), "xxh64": f"{sums[n]:016x}"}
            for n, x in zip(names, layers, strict=True)
        ],
    }
    tmp = folder / f".{RUNS_MANIFEST}.tmp"
    write_file(fs, tmp, seal_record(doc), sync=True)
    fs.replace(tmp, folder / RUNS_MANIFEST)
    fs.fsync_dir(folder)
    remove_unnamed(root, set(names), fs)
    mapped = tuple(open_run(folder / n, len(x), fs) for n, x in zip(names, layers, strict=True))
    return index.with_layers(mapped, tuple(names), commit)


def _current_files(
    root: Path, uuid: str, fs: FileSystem | None = None
) -> tuple[tuple[str, int, int], ...]:
    try:
        runset = read_runset(root, uuid, fs)
    except RunsUnusableError:
        return ()
    return runset.files if runset is not None else ()


def remove_unnamed(root: Path, keep: set[str], fs: FileSystem | None = None) -> None:
    """Remove run files and temporaries that ``runs.json`` does not name (writer only)."""
    fs = fs or current_fs()
    folder = runs_dir(root)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name != RUNS_MANIFEST and p.name not in keep:
            fs.unlink(p, missing_ok=True)


def discard(root: Path, fs: FileSystem | None = None) -> None:
    """Forget the run set (an opener then reads LMDB): when it no longer matches the store."""
    fs = fs or current_fs()
    fs.unlink(runs_dir(root) / RUNS_MANIFEST, missing_ok=True)
    remove_unnamed(root, set(), fs)


# -- policy ----------------------------------------------------------------------------------


def maintain(
    root: Path,
    uuid: str,
    index: LayeredIndex,
    commit: int,
    digest: int | None,
    fs: FileSystem | None = None,
) -> LayeredIndex:
    """After a commit (writer): fold a small store's overlay in memory, or write runs when the
    overlay is big or old enough. The commit is durable already; a failure here leaves the
    rows in memory and the old run set (which an opener then replays forward from)."""
    on_disk = any(r is not None for r in index.runs)
    if not on_disk and index.count < RUN_MIN_ROWS:
        bottom = index.layers[-1] if index.layers else RowIndex.empty()
        if len(index.layers) > 1 or len(index.overlay) > max(1024, len(bottom) // 4):
            flat = index.flat()
            return index.with_layers((flat,), (None,), commit)
        return index
    due = not on_disk or len(index.overlay) >= FLUSH_ROWS or index.since >= FLUSH_COMMITS
    if not due:
        return index
    return save(root, uuid, index, commit, digest, fs)
