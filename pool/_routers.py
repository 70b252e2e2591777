"""Routers kept with a store: registered once, written at every commit in which they changed,
and read back digest-checked."""

from __future__ import annotations

from typing import Any

from torch import nn

from dpsn.errors import CorruptStoreError, SnapshotNotFoundError
from dpsn.store import PersistedStore, check_router_name


class RouterShelf:
    """The routers a writer saves with its commits, by name."""

    def __init__(self, store: PersistedStore) -> None:
        self._store = store
        self._routers: dict[str, nn.Module] = {}

    def add(self, name: str, router: nn.Module) -> None:
        from dpsn.index import Router

        if not isinstance(router, Router):
            raise TypeError(f"save_router takes a dpsn.index Router, not {type(router).__name__}")
        self._routers[check_router_name(name)] = router

    def write_changed(self, head: int, version: int) -> dict[str, str]:
        """Write every registered router whose digest differs from the one saved at ``head``
        as version ``version`` (the commit about to be made); their digests, by name."""
        if not self._routers:
            return {}
        from dpsn.index import router_digest, save_router

        known = self.saved(head)
        written = {}
        for name, router in self._routers.items():
            digest = router_digest(router)
            if known.get(name, {}).get("digest") == digest:
                continue  # unchanged since it was last saved
            group = self._store.router_group(name, version, write=True)
            written[name] = save_router(router, group)
            self._store.sync_router(name, version)
        return written

    def saved(self, commit: int) -> dict[str, dict[str, Any]]:
        """Routers saved as of ``commit``: name -> {"version", "digest"}."""
        return dict(self._store.commit_record(commit).routers or {})

    def load(self, name: str, commit: int) -> nn.Module:
        from dpsn.index import load_router, router_digest

        record = self.saved(commit).get(name)
        if record is None:
            raise SnapshotNotFoundError(
                f"no router named {name!r} at commit {commit}; saved: {sorted(self.saved(commit))}"
            )
        router = load_router(self._store.router_group(name, record["version"], write=False))
        if router_digest(router) != record["digest"]:
            raise CorruptStoreError(
                f"router {name!r} does not match the digest its commit recorded; "
                "the store is damaged"
            )
        return router
