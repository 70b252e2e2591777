"""Checks of an LMDB data file that run before LMDB trusts it.

Why: LMDB maps ``data.mdb`` and follows the page numbers and offsets it finds there without
bounds checks, so a file cut short by an interrupted copy kills the process with SIGBUS, and a
flipped byte in a node's size can make it read past the end of the file (SIGBUS again) or
return another entry's bytes. A store is untrusted input: these checks turn such files into a
``CorruptStoreError`` before LMDB touches them.

1. :func:`read_meta` (before the file is mapped): both meta pages (pages 0 and 1) are read with
   ``pread`` and checked as LMDB itself does (``P_META`` flag, magic, version), plus what LMDB
   does not check: the page size is a power of two, transaction ``t`` lives in meta page
   ``t & 1`` (LMDB alternates them), the two transaction ids are consecutive, and the file holds
   every page up to the newer meta's ``last_pg``.
2. :func:`check_trees` (after the file is mapped, inside a read transaction, which pins the
   pages of that transaction so a writer in another process cannot recycle them meanwhile): a
   walk, with ``pread``, of every page reachable from the meta page of that transaction (the
   free-page tree, the main tree and every named database): page headers (own page number,
   type, ``lower``/``upper``), every node's offset and key/data sizes inside its page, overflow
   pages in range and of the right type, child pages in range and visited once, all leaves at
   the tree's depth, keys strictly increasing across the whole tree (so LMDB's binary searches
   find what a cursor walk sees), and free pages disjoint from reachable ones (a writer would
   otherwise overwrite live data). The walk reads each reachable page once: O(file size).

Layout (LMDB 0.9 on a 64-bit host, ``lmdb.h``/``mdb.c``; LMDB files are not portable across
word sizes or endianness, and dpsn runs on 64-bit little-endian hosts)::

    page header (16 bytes):  mp_pgno u64 | mp_pad u16 | mp_flags u16 | lower u16 | upper u16
                             (overflow pages: mp_pages u32 in place of lower/upper)
    meta (at byte 16):       magic u32 | version u32 | address u64 | mapsize u64 |
                             dbs[FREE], dbs[MAIN] (48 bytes each) | last_pg u64 | txnid u64
    MDB_db (48 bytes):       pad u32 (meta FREE: the page size) | flags u16 | depth u16 |
                             branch u64 | leaf u64 | overflow u64 | entries u64 | root u64
    node (8 bytes + key):    lo u16 | hi u16 | flags u16 | ksize u16 | key | data
                             leaf: data size lo | hi << 16 (F_BIGDATA: an 8-byte overflow pgno)
                             branch: child pgno lo | hi << 16 | flags << 32
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from dpsn.errors import CorruptStoreError

__all__ = ["FREE", "LmdbMeta", "check_trees", "read_meta"]

PAGE_HEADER = 16
META_MAGIC = 0xBEEFC0DE
META_VERSION = 1
P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
INVALID_PAGE = (1 << 64) - 1
# The largest map dpsn lets LMDB grow to (_lmdb.MAX_MAP_SIZE): a meta page naming a last page
# past it is damage, whatever the file's (possibly sparse) size, and bounds what the walk's
# page map costs.
MAX_FILE_BYTES = 1 << 44
MAX_DEPTH = 32  # a B+tree of 2**64 entries with >= 2 keys per page is shallower than this
_DB = struct.Struct("<IHHQQQQQ")  # MDB_db
_META = struct.Struct("<IIQQ48s48sQQ")  # MDB_meta from the magic on
_NODE = struct.Struct("<HHHH")
# LMDB's key comparison for named databases without flags is memcmp, shorter first on a tie:
# exactly Python's bytes ordering. The free database compares native (little-endian) integers.
_DB_FLAGS_ALLOWED = 0  # dpsn's databases use none of REVERSEKEY, DUPSORT, INTEGERKEY, ...
_FREE_DB_FLAGS = 0x08  # MDB_INTEGERKEY


@dataclass(frozen=True, slots=True)
class LmdbMeta:
    """The newer of the two meta pages, as LMDB will use it."""

    page_size: int
    txnid: int
    last_page: int
    map_size: int
    free_db: tuple[int, int, int]  # (flags, depth, root)
    main_db: tuple[int, int, int]
    file_size: int


def _damaged(path: Path, what: str) -> CorruptStoreError:
    return CorruptStoreError(
        f"{path} is damaged: {what}. The store's LMDB index cannot be used; restore the store "
        "from a copy (a copy interrupted part way leaves a file like this)."
    )


def _pread(fd: int, size: int, offset: int) -> bytes:
    out = b""
    while len(out) < size:
        piece = os.pread(fd, size - len(out), offset + len(out))
        if not piece:
            break
        out += piece
    return out


def _parse_meta(page: bytes) -> tuple[int, ...] | None:
    if len(page) < PAGE_HEADER + _META.size:
        return None
    flags = struct.unpack_from("<H", page, 10)[0]
    if not flags & P_META:
        return None
    return _META.unpack_from(page, PAGE_HEADER)


@overload
def read_meta(data_file: Path) -> LmdbMeta: ...
@overload
def read_meta(data_file: Path, txnid: int) -> LmdbMeta | None: ...


def read_meta(data_file: Path, txnid: int | None = None) -> LmdbMeta | None:
    """Check ``data.mdb``'s meta pages and size before anything maps it (see the module doc)
    and return the newer meta page; with ``txnid``, the meta page of that transaction, or None
    when neither page holds it any more (a writer moved on twice since)."""
    try:
        fd = os.open(data_file, os.O_RDONLY)
    except OSError as e:
        raise _damaged(data_file, f"it cannot be opened ({e})") from e
    try:
        size = os.fstat(fd).st_size
        first = _pread(fd, 4096, 0)
        meta0 = _parse_meta(first)
        if meta0 is None:
            what = "it is empty" if size == 0 else "its first page is not an LMDB meta page"
            raise _damaged(data_file, what)
        page_size = _DB.unpack(meta0[4])[0]
        if page_size < 512 or page_size > 1 << 16 or page_size & (page_size - 1):
            raise _damaged(data_file, f"its meta page gives page size {page_size}")
        meta1 = _parse_meta(_pread(fd, PAGE_HEADER + _META.size, page_size))
        if meta1 is None:
            raise _damaged(data_file, f"it is {size} bytes, too short for its two meta pages")
    finally:
        os.close(fd)
    metas = [meta0, meta1]
    for i, m in enumerate(metas):
        magic, version = m[0], m[1]
        if magic != META_MAGIC:
            raise _damaged(data_file, f"meta page {i} has magic {magic:#x}, not LMDB's")
        if version != META_VERSION:
            raise _damaged(data_file, f"meta page {i} has LMDB data version {version}")
        if _DB.unpack(m[4])[0] != page_size:
            raise _damaged(data_file, "its two meta pages disagree on the page size")
    t0, t1 = meta0[7], meta1[7]
    # Transaction t writes meta page t & 1, so the two hold consecutive ids (both 0 when new).
    if abs(t0 - t1) > 1 or (t0 and t0 & 1) or (t1 and not t1 & 1):
        raise _damaged(data_file, f"its meta pages hold transaction ids {t0} and {t1}")
    if txnid is None:
        m = metas[1 if t1 > t0 else 0]
    elif txnid in (t0, t1):
        m = metas[0 if txnid == t0 else 1]
    else:
        return None
    last_page = m[6]
    if last_page < 1 or last_page >= MAX_FILE_BYTES // page_size:
        raise _damaged(
            data_file,
            f"its meta page gives last page {last_page}: more than the {MAX_FILE_BYTES} bytes "
            "dpsn lets an index grow to",
        )
    need = (last_page + 1) * page_size
    if size < need:
        raise _damaged(
            data_file,
            f"it is {size} bytes but its newest transaction uses {need} "
            f"({last_page + 1} pages of {page_size} bytes): the file was cut short",
        )
    free, main = _DB.unpack(m[4]), _DB.unpack(m[5])
    return LmdbMeta(
        page_size=page_size,
        txnid=m[7],
        last_page=last_page,
        map_size=m[3],
        free_db=(free[1], free[2], free[7]),
        main_db=(main[1], main[2], main[7]),
        file_size=size,
    )


FREE = "\0free"  # how the walk names LMDB's free-page database
_BATCH = 2048  # pages read and checked per numpy pass (8 MiB at 4 KiB pages)
_TYPE_MASK = P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2


class _Walker:
    """One walk over the trees of one meta page; see :func:`check_trees`.

    A tree is walked level by level; each level is checked in batches of pages with numpy
    (headers, node offsets and sizes, child page numbers, key order), so the cost is a few
    array passes per batch, not Python work per entry. Keys are compared as big-endian integers
    when they are all 8 bytes long (row, commit and segment ids) and as ``bytes`` objects
    otherwise (the small databases)."""

    def __init__(self, fd: int, path: Path, meta: LmdbMeta) -> None:
        self.fd = fd
        self.path = path
        self.meta = meta
        self.psize = meta.page_size
        self.last = meta.last_page
        try:
            self.seen = np.zeros(meta.last_page + 1, dtype=bool)
        except MemoryError as e:  # a sparse file can say it has more pages than memory holds
            raise self.fail(
                f"its {meta.last_page + 1} pages are more than this machine can check"
            ) from e
        self.seen[:2] = True  # the meta pages
        self.free: list[np.ndarray] = []

    def fail(self, what: str) -> CorruptStoreError:
        return _damaged(self.path, what)

    only: frozenset[str] | None = None  # the named databases to walk (None: all)
    skip: frozenset[str] = frozenset()
    keys: dict[str, list[bytes]] | None = None  # walk only the paths to these keys

    def paths(self, name: str, flags: int, depth: int, root: int, keys: list[bytes]) -> None:
        """Check the pages LMDB visits to look ``keys`` up (root to leaf, each page fully),
        so a few lookups need not walk a whole database first."""
        if root == INVALID_PAGE or not keys:
            return
        if not 1 <= depth <= MAX_DEPTH or not 2 <= root <= self.last:
            raise self.fail(f"database {name!r} has depth {depth} and root page {root}")
        for key in sorted(set(keys)):
            pgno, lo, hi = root, None, None
            for d in range(depth):
                leaf = d == depth - 1
                child, c_lo, c_hi = self.level(
                    name,
                    flags,
                    np.array([pgno], dtype=np.int64),
                    [lo],
                    [hi],
                    leaf,
                    _LevelState(),
                )
                if leaf:
                    break
                # as LMDB's search: the last child whose separator is <= key (else the first)
                pick = 0
                for i in range(1, len(child)):
                    if c_lo[i] is not None and key >= c_lo[i]:
                        pick = i
                pgno, lo, hi = int(child[pick]), c_lo[pick], c_hi[pick]

    def wanted(self, name: str) -> bool:
        return name not in self.skip and (self.only is None or name in self.only)

    def page(self, pgno: int) -> bytes:
        data = _pread(self.fd, self.psize, pgno * self.psize)
        if len(data) != self.psize:
            raise self.fail(f"page {pgno} lies past the end of the file")
        return data

    def pages(self, pgnos: np.ndarray) -> np.ndarray:
        out = np.empty((len(pgnos), self.psize), dtype=np.uint8)
        for i, p in enumerate(pgnos.tolist()):
            data = _pread(self.fd, self.psize, p * self.psize)
            if len(data) != self.psize:
                raise self.fail(f"page {p} lies past the end of the file")
            out[i] = np.frombuffer(data, dtype=np.uint8)
        return out

    def claim(self, pages: np.ndarray, what: str) -> None:
        if len(pages) == 0:
            return
        if pages.min() < 2 or pages.max() > self.last:
            raise self.fail(f"{what} points at a page outside 2..{self.last}")
        ordered = np.sort(pages)
        if bool((ordered[1:] == ordered[:-1]).any()) or (
            self.keys is None and self.seen[pages].any()
        ):
            raise self.fail(f"{what}: a page is referenced twice")
        self.seen[pages] = True

    def tree(self, name: str, flags: int, depth: int, root: int) -> None:
        if root == INVALID_PAGE:
            if depth:
                raise self.fail(f"database {name!r} has depth {depth} but no root page")
            return
        if not 1 <= depth <= MAX_DEPTH:
            raise self.fail(f"database {name!r} has depth {depth}")
        if not 2 <= root <= self.last:
            raise self.fail(f"database {name!r} has its root at page {root}, outside the file")
        self.claim(np.array([root], dtype=np.int64), f"the root of database {name!r}")
        # A level: its pages in key order, and each page's key range [lo, hi) (None: open).
        pgnos = np.array([root], dtype=np.int64)
        lo: list[Any] = [None]
        hi: list[Any] = [None]
        for d in range(depth):
            leaf = d == depth - 1
            state = _LevelState()
            next_pg, next_lo, next_hi = [], [], []
            for a in range(0, len(pgnos), _BATCH):
                child, clo, chi = self.level(
                    name,
                    flags,
                    pgnos[a : a + _BATCH],
                    lo[a : a + _BATCH],
                    hi[a : a + _BATCH],
                    leaf,
                    state,
                )
                next_pg.append(child)
                next_lo += clo
                next_hi += chi
            if not leaf:
                pgnos = np.concatenate(next_pg)
                lo, hi = next_lo, next_hi

    def level(
        self,
        name: str,
        flags: int,
        pgnos: np.ndarray,
        lo: list[Any],
        hi: list[Any],
        leaf: bool,
        state: _LevelState,
    ) -> tuple[np.ndarray, list[Any], list[Any]]:
        where = f"database {name!r}"
        arr = self.pages(pgnos)
        m, psize = len(pgnos), self.psize
        head = arr[:, :16].copy()
        own = head[:, 0:8].view("<u8").ravel()
        pflags = head[:, 10:12].view("<u2").ravel()
        lower = head[:, 12:14].view("<u2").ravel().astype(np.int64)
        upper = head[:, 14:16].view("<u2").ravel().astype(np.int64)
        want = P_LEAF if leaf else P_BRANCH
        bad = (own != pgnos.astype(np.uint64)) | ((pflags & _TYPE_MASK) != want)
        bad |= (lower < PAGE_HEADER) | (lower > upper) | (upper > psize) | (lower & 1 == 1)
        nk = (lower - PAGE_HEADER) // 2
        bad |= nk < 1
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self.fail(
                f"page {int(pgnos[i])} of {where} has a bad header (number {int(own[i])}, "
                f"flags {int(pflags[i]):#x}, bounds {int(lower[i])}/{int(upper[i])})"
            )
        # flat gathers from the pages' 16-bit words (2-D fancy indexing is far slower)
        words = psize // 2
        u16 = arr.view("<u2").ravel()
        total = int(nk.sum())
        starts = np.cumsum(nk) - nk
        row = np.repeat(np.arange(m), nk)
        slot = np.arange(total) - np.repeat(starts, nk)  # node index within its page
        base = row * words
        ptr = u16[base + 8 + slot].astype(np.int64)
        bad = (ptr < upper[row]) | (ptr & 1 == 1) | (ptr + 8 > psize)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self.fail(
                f"page {int(pgnos[row[i]])} of {where} has a node at offset {int(ptr[i])}"
            )
        node = base + ptr // 2
        n_lo = u16[node].astype(np.int64)
        n_hi = u16[node + 1].astype(np.int64)
        n_flags = u16[node + 2].astype(np.int64)
        ksize = u16[node + 3].astype(np.int64)
        key_end = ptr + 8 + ksize
        bad = (ksize > 511) | (key_end > psize)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self.fail(f"page {int(pgnos[row[i]])} of {where} has a key of {int(ksize[i])} B")
        real = slot > 0 if not leaf else np.ones(total, dtype=bool)  # a branch's node 0: no key
        integer = bool(flags & _FREE_DB_FLAGS)
        if (ksize[real] == 8).all():
            raw = np.empty((total, 4), dtype="<u2")
            end = base + words - 1
            for w in range(4):
                raw[:, w] = u16[np.minimum(node + 4 + w, end)]
            cmp = raw.view("<u8" if integer else ">u8").ravel()

            def key(i: int) -> bytes:
                return raw[i].tobytes()

        elif integer:
            raise self.fail("the free-page database has keys that are not 8 bytes")
        else:
            cmp = np.empty(total, dtype=object)
            cmp[:] = [
                arr[r, p + 8 : p + 8 + k].tobytes()
                for r, p, k in zip(row.tolist(), ptr.tolist(), ksize.tolist(), strict=True)
            ]

            def key(i: int) -> bytes:
                return cmp[i]

        def order(b: bytes) -> Any:  # LMDB's comparison: memcmp, or integers for free pages
            return int.from_bytes(b, "little") if integer else b

        # key order: strictly increasing inside each page ...
        same_page = row[1:] == row[:-1]
        both = same_page & real[1:] & real[:-1]
        if (cmp[1:][both] <= cmp[:-1][both]).any():
            raise self.fail(f"{where} has keys out of order in a page")
        # ... and inside the range the parent gives each page (two comparisons per page)
        skip = 0 if leaf else 1
        for p in range(m):
            if nk[p] <= skip:
                continue
            k_first = order(key(int(starts[p]) + skip))
            k_last = order(key(int(starts[p] + nk[p]) - 1))
            low, high = lo[p], hi[p]
            below_low = low is not None and (
                k_first < order(low) if leaf else k_first <= order(low)
            )
            if below_low or (high is not None and k_last >= order(high)):
                raise self.fail(f"page {int(pgnos[p])} of {where} is in the wrong place")
        if leaf:
            if state.last is not None and not order(key(0)) > state.last:
                raise self.fail(f"{where} has keys out of order")
            state.last = order(key(total - 1))
            self.leaves(name, arr, pgnos, row, n_lo, n_hi, n_flags, key_end, key)
            return np.empty(0, dtype=np.int64), [], []
        child = n_lo | n_hi << 16 | n_flags << 32
        self.claim(child, f"a branch of {where}")
        is_last = np.r_[~same_page, True]
        child_lo: list[Any] = []
        child_hi: list[Any] = []
        for i, (r, s, e) in enumerate(
            zip(row.tolist(), slot.tolist(), is_last.tolist(), strict=True)
        ):
            child_lo.append(lo[r] if s == 0 else key(i))
            child_hi.append(hi[r] if e else key(i + 1))
        return child, child_lo, child_hi

    def leaves(
        self,
        name: str,
        arr: np.ndarray,
        pgnos: np.ndarray,
        row: np.ndarray,
        n_lo: np.ndarray,
        n_hi: np.ndarray,
        n_flags: np.ndarray,
        key_end: np.ndarray,
        key: Callable[[int], bytes],
    ) -> None:
        where = f"database {name!r}"
        dsize = n_lo | n_hi << 16
        big = (n_flags & F_BIGDATA) != 0
        want_sub = F_SUBDATA if name == "" else 0
        bad = ((n_flags & F_DUPDATA) != 0) | ((n_flags & F_SUBDATA) != want_sub)
        bad |= np.where(big, key_end + 8, key_end + dsize) > self.psize
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self.fail(
                f"page {int(pgnos[row[i]])} of {where} has a node of flags {int(n_flags[i])} "
                f"and {int(dsize[i])} bytes of data at offset {int(key_end[i])}, which does "
                "not fit its page"
            )
        values: dict[int, bytes] = {}
        for i in np.flatnonzero(big).tolist():
            r, e = int(row[i]), int(key_end[i])
            first = int(arr[r, e : e + 8].copy().view("<u8")[0])
            values[i] = self.overflow(name, first, int(dsize[i]))
        if name not in ("", FREE):
            return
        for i in range(len(row)):
            value = values.get(i)
            if value is None:
                r, e = int(row[i]), int(key_end[i])
                value = arr[r, e : e + int(dsize[i])].tobytes()
            if name == "":  # the main database: one MDB_db record per named database
                db = key(i)
                if len(value) != _DB.size:
                    raise self.fail(f"the record of database {db!r} has {len(value)} bytes")
                _pad, flags, depth, *_counts, root = _DB.unpack(value)
                if flags != _DB_FLAGS_ALLOWED:
                    raise self.fail(f"database {db!r} has flags {flags:#x}, which dpsn never sets")
                name_of = db.decode("utf-8", "replace")
                if self.keys is not None:
                    if name_of in self.keys:
                        self.paths(name_of, flags, depth, root, self.keys[name_of])
                elif self.wanted(name_of):
                    self.tree(name_of, flags, depth, root)
            else:
                if len(value) % 8 or len(value) < 8:
                    raise self.fail(f"a free-page list has {len(value)} bytes")
                ids = np.frombuffer(value, dtype="<u8")
                if int(ids[0]) != len(ids) - 1:
                    raise self.fail("a free-page list has the wrong length")
                self.free.append(ids[1:].astype(np.int64))

    def overflow(self, name: str, first: int, dsize: int) -> bytes:
        if not 2 <= first <= self.last:
            raise self.fail(f"database {name!r} has an overflow page {first} outside the file")
        head = self.page(first)
        own, _pad, pflags, pages = struct.unpack_from("<QHHI", head)
        if own != first or pflags & _TYPE_MASK != P_OVERFLOW or pages < 1:
            raise self.fail(f"overflow page {first} of database {name!r} has a bad header")
        if first + pages - 1 > self.last:  # before anything is sized by ``pages`` (a u32)
            raise self.fail(
                f"overflow page {first} of database {name!r} says it runs for {pages} pages, "
                "past the end of the file"
            )
        if dsize > pages * self.psize - PAGE_HEADER:
            raise self.fail(f"overflow page {first} of database {name!r} is too short")
        self.claim(
            np.arange(first, first + pages, dtype=np.int64), f"an overflow value of {name!r}"
        )
        if name not in ("", FREE):
            return b""  # only free lists and database records are needed here
        rest = _pread(self.fd, max(0, dsize - (self.psize - PAGE_HEADER)), (first + 1) * self.psize)
        return (head[PAGE_HEADER:] + rest)[:dsize]

    def check_free(self) -> None:
        if not self.free:
            return
        pages = np.concatenate(self.free)
        if len(pages) and (pages.min() < 2 or pages.max() > self.last):
            raise self.fail("the free-page list names pages outside the file")
        if self.seen[pages].any():
            raise self.fail("the free-page list names pages still in use")


class _LevelState:
    """What one level's batches pass on: the last key seen, for the order across pages."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: Any = None


def check_trees(
    data_file: Path,
    meta: LmdbMeta,
    *,
    only: set[str] | frozenset[str] | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
    keys: dict[str, list[bytes]] | None = None,
) -> np.ndarray:
    """Walk every page reachable from ``meta`` (see the module doc); ``CorruptStoreError`` on
    the first problem. The caller holds a read transaction of ``meta.txnid``. Returns the
    numbers of the pages walked (meta pages included).

    ``only`` / ``skip`` limit the walk to some named databases (the main tree, which holds
    their records, is always walked; ``FREE`` names the free-page tree). Free pages are checked
    against the pages in use only by a full walk. ``keys`` (``{database: [key, ...]}``) walks
    only the pages on the way to those keys in those databases."""
    fd = os.open(data_file, os.O_RDONLY)
    try:
        walker = _Walker(fd, data_file, meta)
        walker.only = None if only is None else frozenset(only)
        walker.skip = frozenset(skip)
        walker.keys = keys
        if keys is not None:
            walker.skip = walker.skip | {FREE}
        return _walk(walker)
    except (ValueError, IndexError, OverflowError, struct.error, UnicodeError) as e:
        # a malformed page this walk did not foresee: damage all the same, never a crash
        raise _damaged(data_file, f"its pages do not parse ({type(e).__name__}: {e})") from e
    finally:
        os.close(fd)


def _walk(walker: _Walker) -> np.ndarray:
    meta_free, meta_main = walker.meta.free_db, walker.meta.main_db
    flags, depth, root = meta_free
    if flags != _FREE_DB_FLAGS:
        raise walker.fail(f"the free-page database has flags {flags:#x}")
    if walker.wanted(FREE):
        walker.tree(FREE, flags, depth, root)
    flags, depth, root = meta_main
    if flags != _DB_FLAGS_ALLOWED:
        raise walker.fail(f"the main database has flags {flags:#x}")
    walker.tree("", flags, depth, root)
    if walker.only is None and not walker.skip and walker.keys is None:
        walker.check_free()
    return np.flatnonzero(walker.seen)
