"""Run files: the row index's sorted layers on disk, written by the writer and memory-mapped by
every opener (``_layered.py`` says why there are layers).

Layout: ``<store>/index.runs/`` holds ``runs.json`` (the runs in order, oldest first, the commit
they reflect, its index digest, the row count and rows per segment) and ``run-<n>.bin`` files:
a 64-byte header (magic, entry count), the entries (id, segment, offset, commit: four
little-endian int64 each, sorted by id) and the fences (every 128th id). ``np.memmap`` searches
them in place: the fences pick an id's 4 KiB page, so a lookup touches one page of the file and
the OS keeps in RAM only the pages lookups touch.

Runs are derived data; LMDB's row index stays the truth and every commit still writes it. An
opener uses runs only when ``runs.json`` names this store, a commit at or before HEAD and that
commit's index digest, and the replay of the commits since lands on HEAD's row count and digest;
anything else (missing, stale, foreign, unreadable) and it reads LMDB as before, and a writer
writes the set anew. ``dpsn verify`` checks each run's checksum and the runs against LMDB. Writes
follow the commit protocol: files written and fsynced under temporary names and renamed, then
``runs.json`` replaced, then files it no longer names removed (a reader that mapped one keeps
it until it closes).
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

from ._format import fsync_dir
from ._layered import LayeredIndex
from ._rowindex import FENCE_STEP, RowIndex, merge_newest

RUNS_DIR = "index.runs"
RUNS_MANIFEST = "runs.json"
RUNS_FORMAT = 1
_MAGIC = b"DPSNRUN1"
_HEADER = 64
_COLUMNS = 4
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


def read_runset(root: Path, uuid: str) -> RunSet | None:
    """The run set of the store ``uuid`` at ``root``; ``None`` when there is none."""
    path = runs_dir(root) / RUNS_MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunsUnusableError(f"{path} cannot be read: {e}") from e
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise RunsUnusableError(f"{path} is not JSON") from e
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


def open_run(path: Path, entries: int) -> RowIndex:
    """A run file as a ``RowIndex`` of memory-mapped columns (nothing read but the header;
    the OS told to read pages as touched, without read-ahead: lookups land at random)."""
    want = _HEADER + 8 * (_COLUMNS * entries + _fence_count(entries))
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise RunsUnusableError(f"{path} cannot be read: {e}") from e
    if size != want or header[:8] != _MAGIC or int.from_bytes(header[8:16], "little") != entries:
        raise RunsUnusableError(f"{path} is not a run of {entries} entries")
    if not entries:
        return RowIndex.empty()
    flat = np.memmap(path, dtype="<i8", mode="r", offset=_HEADER)
    mm = getattr(flat, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    rows = flat[: _COLUMNS * entries].reshape(entries, _COLUMNS)
    return RowIndex(
        ids=rows[:, 0],
        segment=rows[:, 1],
        offset=rows[:, 2],
        commit=rows[:, 3],
        fences=flat[_COLUMNS * entries :],
    )


def open_layers(root: Path, runset: RunSet) -> tuple[RowIndex, ...]:
    return tuple(open_run(runs_dir(root) / name, n) for name, n, _ in runset.files)


def run_checksum(path: Path) -> int:
    """xxh64 of a run file, read in blocks (what ``dpsn verify`` compares with ``runs.json``)."""
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.intdigest()


def check_run_files(root: Path, runset: RunSet) -> None:
    """Every run file read whole against its checksum in ``runs.json`` (``RunsUnusableError``
    naming the first that fails): what a writer's open and ``dpsn verify`` run."""
    for name, _, want in runset.files:
        try:
            ok = run_checksum(runs_dir(root) / name) == want
        except OSError as e:
            raise RunsUnusableError(f"run file {name} cannot be read: {e}") from e
        if not ok:
            raise RunsUnusableError(f"run file {name} does not match runs.json")


# -- writing ---------------------------------------------------------------------------------


def _write_run(folder: Path, name: str, layer: RowIndex) -> int:
    """Entries row by row (id, segment, offset, commit: 32 bytes, so a 4 KiB page holds
    ``FENCE_STEP`` of them), then the fences (every ``FENCE_STEP``-th id)."""
    n = len(layer)
    header = bytearray(_HEADER)
    header[:8] = _MAGIC
    header[8:16] = n.to_bytes(8, "little")
    h = xxhash.xxh64(bytes(header))
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        for lo in range(0, n, 1 << 20):  # bounded buffers at any size
            hi = min(n, lo + (1 << 20))
            rows = np.empty((hi - lo, _COLUMNS), dtype="<i8")
            for c, col in enumerate((layer.ids, layer.segment, layer.offset, layer.commit)):
                rows[:, c] = col[lo:hi]
            data = rows.tobytes()
            h.update(data)
            f.write(data)
        fences = np.ascontiguousarray(layer.ids[::FENCE_STEP], dtype="<i8").tobytes()
        h.update(fences)
        f.write(fences)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / name)
    return h.intdigest()


def _next_name(folder: Path) -> int:
    numbers = [int(p.name[4:20], 16) for p in folder.iterdir() if _NAME.fullmatch(p.name)]
    return max(numbers, default=0) + 1


def save(
    root: Path, uuid: str, index: LayeredIndex, commit: int, digest: int | None
) -> LayeredIndex:
    """Write the overlay of ``index`` (at ``commit``, whose index digest is ``digest``) as a
    run, merge runs by size, replace ``runs.json``; the same rows, now on mapped files."""
    folder = runs_dir(root)
    folder.mkdir(exist_ok=True)
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
    known = {name: h for name, _, h in _current_files(root, uuid)}
    for i, layer in enumerate(layers):
        if names[i] is None or names[i] not in known:
            names[i] = f"run-{seq:016x}.bin"
            seq += 1
            sums[names[i]] = _write_run(folder, names[i], layer)
        else:
            sums[names[i]] = known[names[i]]
    fsync_dir(folder)
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
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / RUNS_MANIFEST)
    fsync_dir(folder)
    remove_unnamed(root, set(names))
    mapped = tuple(open_run(folder / n, len(x)) for n, x in zip(names, layers, strict=True))
    return index.with_layers(mapped, tuple(names), commit)


def _current_files(root: Path, uuid: str) -> tuple[tuple[str, int, int], ...]:
    try:
        runset = read_runset(root, uuid)
    except RunsUnusableError:
        return ()
    return runset.files if runset is not None else ()


def remove_unnamed(root: Path, keep: set[str]) -> None:
    """Remove run files and temporaries that ``runs.json`` does not name (writer only)."""
    folder = runs_dir(root)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name != RUNS_MANIFEST and p.name not in keep:
            p.unlink(missing_ok=True)


def discard(root: Path) -> None:
    """Forget the run set (an opener then reads LMDB): when it no longer matches the store."""
    (runs_dir(root) / RUNS_MANIFEST).unlink(missing_ok=True)
    remove_unnamed(root, set())


# -- policy ----------------------------------------------------------------------------------


def maintain(
    root: Path, uuid: str, index: LayeredIndex, commit: int, digest: int | None
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
    return save(root, uuid, index, commit, digest)
