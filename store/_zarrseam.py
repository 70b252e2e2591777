"""A zarr v3 store whose writes go through the file seam (``dpsn.store.fs``).

Apart from ``fs.py`` so that importing the seam does not import zarr (``dpsn info`` and the
other record-only commands never load it)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from pathlib import Path
from typing import Any

from zarr.storage import LocalStore

from .fs import FileSystem, write_file

__all__ = ["SeamStore"]


class SeamStore(LocalStore):
    """A zarr v3 ``LocalStore`` whose writes and deletes go through a :class:`FileSystem`.

    Reads are the ``LocalStore``'s own. A chunk is written to a temporary name and renamed
    into place (as ``LocalStore`` does), not fsynced: the engine fsyncs the whole array with
    :func:`fsync_tree` before it publishes it. Writes run in the event loop's thread, one
    after another, so the order of the operations a commit issues is the same on every run
    (a fault test counts on it)."""

    def __init__(self, root: Path | str, fs: FileSystem, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.fs = fs

    def with_read_only(self, read_only: bool = False) -> SeamStore:
        return type(self)(self.root, self.fs, read_only=read_only)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SeamStore) and self.root == other.root and self.fs is other.fs

    __hash__ = LocalStore.__hash__

    def _write_key(self, key: str, data: bytes | memoryview, *, exclusive: bool) -> None:
        path = Path(self.root) / key
        if not path.parent.is_dir():
            self.fs.mkdir(path.parent, parents=True, exist_ok=True)
        if exclusive and path.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(path))
        tmp = path.with_name(f".{path.name}.seam-tmp")
        write_file(self.fs, tmp, data, sync=False)
        try:
            self.fs.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.unlink(tmp, missing_ok=True)
            raise

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        self._write_key(key, value.as_buffer_like(), exclusive=exclusive)

    async def set_partial_values(self, key_start_values: Any) -> None:
        raise NotImplementedError("dpsn writes whole chunks only")

    async def delete(self, key: str) -> None:
        self._check_writable()
        path = Path(self.root) / key
        if path.is_dir():
            self.fs.rmtree(path)
        else:
            self.fs.unlink(path, missing_ok=True)
        await asyncio.sleep(0)
