"""Every error dpsn raises on purpose.

Each kind derives from :class:`DpsnError` *and* from the builtin a caller would already catch
(``except ValueError`` still works for bad ids, ``except FileNotFoundError`` for a missing store),
the way zarr's ``NodeNotFoundError`` is also a ``FileNotFoundError``. Messages say what is wrong
and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "BaseCommitNotFoundError",
    "BaseMismatchError",
    "BatchTooLargeError",
    "CacheCapacityError",
    "CacheTooLargeError",
    "CorruptSegmentError",
    "CorruptStoreError",
    "DistributedError",
    "DpsnError",
    "FreshRouterWarning",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "InvalidDeltaError",
    "InvalidDeviceError",
    "InvalidIdsError",
    "InvalidSnapshotNameError",
    "LeaseWarning",
    "LifecycleError",
    "ModuleNotSavedError",
    "ReadOnlyError",
    "RowIdOutOfRangeError",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "SnapshotUnavailableError",
    "StoreExistsError",
    "StoreFullError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreReadError",
    "StoreVersionError",
    "StoreWriteError",
]


class DpsnError(Exception):
    """Base class of every error dpsn raises deliberately."""


class InvalidArgumentError(DpsnError, ValueError):
    """An argument is out of range or malformed (checked before anything is written)."""


class InvalidArgumentTypeError(DpsnError, TypeError):
    """An argument has the wrong type (checked before anything is written)."""


class InvalidDeviceError(InvalidArgumentError):
    """``device=`` names no device torch knows, or one this machine does not have."""


class CacheTooLargeError(InvalidArgumentError, MemoryError):
    """``cache_rows`` asks for a cache larger than the device's memory."""


class InvalidSnapshotNameError(InvalidArgumentError):
    """A snapshot name that cannot be stored (empty, too long, not UTF-8, '/', control
    characters, or all digits, which would read as a commit id)."""


class InvalidIdsError(DpsnError, ValueError):
    """Row ids that are not integers, have the wrong shape, or do not fit the call."""


class RowIdOutOfRangeError(InvalidIdsError, IndexError):
    """A row id is negative or not below the pool's ``rows``."""


class InvalidDeltaError(DpsnError, ValueError):
    """Deltas with the wrong shape, dtype or non-finite values (NaN/Inf)."""


class LifecycleError(DpsnError, ValueError):
    """A row lifecycle policy with invalid settings, or a lifecycle operation (``consolidate``)
    on a pool that has no lifecycle."""


class StoreNotFoundError(DpsnError, FileNotFoundError):
    """The path holds no dpsn store (no manifest), or a part of one is missing."""


class StoreExistsError(DpsnError, FileExistsError):
    """``create`` was pointed at a path that already holds something."""


class StoreVersionError(DpsnError):
    """The store was written by a newer (or foreign) format version this dpsn cannot read."""


class CorruptStoreError(DpsnError, OSError):
    """Store data failed an integrity check (checksum, size, structure)."""


class CorruptSegmentError(CorruptStoreError):
    """A delta segment failed its checksum or could not be decoded.

    ``segment`` names the segment and ``rows`` holds the row ids stored in the damaged chunk, so
    a caller can drop or rewrite exactly those rows.
    """

    def __init__(self, message: str, *, segment: str, rows: list[int] | None = None) -> None:
        super().__init__(message)
        self.segment = segment
        self.rows = rows or []


class StoreLockedError(DpsnError, BlockingIOError):
    """Another process (or another Pool in this process) holds the store's writer lock."""


class ReadOnlyError(DpsnError, PermissionError):
    """A write was attempted on a pool opened read-only (``mode="r"`` or a snapshot view)."""


class StoreFullError(DpsnError, OSError):
    """The disk (or a file-size limit) ran out during a commit; the store was left as it was."""


class StoreWriteError(DpsnError, OSError):
    """Writing to the store failed for a reason other than a full disk; ``errno`` and the
    message are the operating system's. The store was left as it was."""


class StoreReadError(CorruptStoreError):
    """A file of the store could not be read (an I/O error such as ``EIO``); ``errno`` and
    ``filename`` name it. A ``CorruptStoreError`` because what cannot be read cannot be trusted;
    reading changes nothing, so the store is as it was (retry once the device is healthy)."""


class SnapshotNotFoundError(DpsnError, LookupError):
    """No snapshot of that name and no commit with that id."""


class SnapshotExistsError(DpsnError, FileExistsError):
    """A snapshot of that name exists already: a refused write, not a usage error (delete it
    first, or choose another name)."""


class SnapshotUnavailableError(DpsnError, LookupError):
    """The commit is in the log but ``gc`` removed data it needs; pin snapshots to keep one."""


class BatchTooLargeError(InvalidIdsError, MemoryError):
    """A read asks for more rows at once than this machine's memory holds; split the ids."""


class CacheCapacityError(DpsnError, ValueError):
    """A batch needs more distinct rows than the device cache can hold at once."""


class DistributedError(DpsnError, RuntimeError):
    """A collective step of a sharded pool failed, or another rank reported an error in it
    (the other ranks raise this instead of waiting forever)."""


class ModuleNotSavedError(DpsnError, LookupError):
    """The store holds no saved configuration for the module asked for (commit the module
    with its own ``commit()`` first), or one of another kind."""


class FreshRouterWarning(UserWarning):
    """A ``PoolLayer`` was built with a new, random router on a store that holds a trained one:
    its outputs will not be the trained layer's. Use ``PoolLayer.from_store`` (or pass
    ``router=pool.load_router("router")``)."""


class LeaseWarning(UserWarning):
    """A reader could not write its lease (``readers/`` not writable: a read-only mount, a
    store only its writer may write to, a full disk) and reads without one: a gc in a writer
    does not see it and may remove the commit it reads. ``pool.info()["reader_lease"]`` is
    ``False`` for such a reader."""


class BaseCommitNotFoundError(SnapshotNotFoundError):
    """An overlay's base store no longer has (or never had) the commit the overlay reads; the
    overlay's rows cannot be served. Restore the base, or recreate the overlay over a commit it
    has."""


class BaseMismatchError(DpsnError, ValueError):
    """The store found at an overlay's base path is not the store the overlay was made over
    (another uuid), or does not fit it (rows, dim, dtype, seed)."""
