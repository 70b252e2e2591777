"""Checks and typed errors the store engine's parts share (the commit protocol, snapshots,
generator versions, maintenance): a caller's commit id, a row index's invariants and digest,
the typed error of a failed write. Apart so that those parts import it, never each other."""

from __future__ import annotations

import errno
import operator
from typing import Any

import numpy as np

from dpsn.errors import (
    CorruptStoreError,
    InvalidArgumentTypeError,
    SnapshotNotFoundError,
    StoreFullError,
    StoreWriteError,
)

from ._digest import rows_hash
from ._format import MAX_COMMIT_ID
from ._records import Commit
from ._rowindex import RowIndex

TMP = ".tmp-"  # marks a directory being written under a temporary name
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def full_error(e: OSError, what: str) -> StoreFullError:
    return StoreFullError(
        f"{what}: {e}. The store is unchanged; free space (or raise the file-size limit) "
        "and try again."
    )


def write_failed(e: OSError, what: str) -> StoreFullError | StoreWriteError:
    """The typed error of a failed write: ``StoreFullError`` for a full disk (or file-size
    limit or quota), else ``StoreWriteError`` with the OS error's ``errno``."""
    if e.errno in DISK_FULL:
        return full_error(e, what)
    err = StoreWriteError(f"{what}: {e}. The store is unchanged; fix the cause and try again.")
    err.errno = e.errno
    return err


def commit_key(commit: Any) -> int:
    """A commit id given by a caller, as an int in 1..2**63-1 (``SnapshotNotFoundError``)."""
    if isinstance(commit, bool):
        raise InvalidArgumentTypeError("a commit id is an int, not a bool")
    try:
        value = operator.index(commit)
    except TypeError:
        raise InvalidArgumentTypeError(
            f"a commit is named by a snapshot name or an int id, not {type(commit).__name__}"
        ) from None
    if not 1 <= value <= MAX_COMMIT_ID:
        raise SnapshotNotFoundError(f"no commit {value}: commit ids are positive, below 2**63")
    return value


def check_index(index: RowIndex, rows: int, head: int, where: str) -> None:
    """What must hold of any row index: ids strictly increasing and below ``rows``, segments
    and offsets in range, every commit at or before ``head``."""
    ids = index.ids
    bad = len(ids) and (
        ids[0] < 0
        or ids[-1] >= rows
        or bool(np.any(ids[1:] <= ids[:-1]))
        or int(index.segment.min()) < 1
        or int(index.offset.min()) < 0
        or int(index.commit.min()) < 2
        or int(index.commit.max()) > head
    )
    if bad:
        raise CorruptStoreError(
            f"{where} holds ids out of order or out of range, or entries that point nowhere; "
            "the index is damaged: restore the store from a copy"
        )


def check_digest(index: RowIndex, record: Commit, where: str) -> None:
    if record.index_digest is None:
        return
    got = int(rows_hash(index.ids, index.segment, index.offset, index.commit).sum(dtype=np.uint64))
    if got != record.index_digest:
        raise CorruptStoreError(
            f"{where} does not match the digest commit {record.id} recorded; the store is damaged"
        )
