"""Modules that reopen with their store: the configuration a ``PoolLayer`` or
``PoolEmbedding`` was built with is saved in the store's commit record (JSON, beside the
router's own arrays), and ``from_store`` builds the same module again from it.

Nothing here is pickled or ``torch.load``-ed: a configuration is a small JSON object whose
fields are checked one by one before a module is built from it (a store is untrusted input),
and the router comes back through ``pool.load_router``, digest-checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpsn.errors import CorruptStoreError, ModuleNotSavedError
from dpsn.tiers import ROW_OPTIMIZERS, RowOptimizer, make_row_optimizer

MODULE = "module"  # the name a module's configuration is saved under (one module per pool)
ROUTER = "router"  # the name PoolLayer saves its router under
CONFIG_FORMAT = 1  # of the saved configuration; never renumber


def optimizer_config(opt: RowOptimizer) -> dict[str, Any]:
    """A row optimizer's settings as JSON, or an error for one that cannot be rebuilt."""
    if ROW_OPTIMIZERS.get(opt.name) is not type(opt):
        raise TypeError(
            f"cannot save a module whose row optimizer is {type(opt).__name__}: only "
            f"{sorted(ROW_OPTIMIZERS)} can be rebuilt from a store"
        )
    return opt.config()


def optimizer_from(raw: Any) -> RowOptimizer:
    """Rebuild a row optimizer from its saved settings (``CorruptStoreError`` if damaged)."""
    if not isinstance(raw, dict) or raw.get("name") not in ROW_OPTIMIZERS:
        raise CorruptStoreError(f"the saved module's row optimizer is not one dpsn knows: {raw!r}")
    kwargs = {k: v for k, v in raw.items() if k != "name"}
    if "betas" in kwargs and isinstance(kwargs["betas"], list):
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        return make_row_optimizer(raw["name"], **kwargs)
    except (TypeError, ValueError) as e:
        raise CorruptStoreError(f"the saved module's row optimizer is invalid: {e}") from e


def saved_config(pool: Any, kind: str) -> dict[str, Any]:
    """The configuration of a ``kind`` module saved at the pool's commit."""
    config = pool.modules().get(MODULE)
    if config is None:
        raise ModuleNotSavedError(
            f"{pool.path} holds no saved module at commit {pool.head}: build the module, "
            f"train it and call its commit() (a {kind} saves its configuration there)"
        )
    if config.get("kind") != kind:
        raise ModuleNotSavedError(
            f"{pool.path} holds a saved {config.get('kind')!r}, not a {kind}: use "
            f"dpsn.{config.get('kind')}.from_store"
        )
    if config.get("format") != CONFIG_FORMAT:
        raise CorruptStoreError(
            f"the saved {kind} configuration has format {config.get('format')!r}, not "
            f"{CONFIG_FORMAT}: written by a newer dpsn, or damaged"
        )
    return config


def field(config: dict[str, Any], name: str, types: type | tuple[type, ...]) -> Any:
    """One checked field of a saved configuration."""
    value = config.get(name)
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise CorruptStoreError(
            f"the saved {config.get('kind')} configuration's {name!r} is {value!r}: damaged"
        )
    return value


def open_source(source: Any, mode: str, open_kwargs: dict[str, Any]) -> Any:
    """The pool ``source`` names: a ``Pool`` as it is, or a store path opened in ``mode``."""
    from ._pool import Pool

    if isinstance(source, Pool):
        if open_kwargs:
            raise TypeError(f"open options {sorted(open_kwargs)} need a path, not an open Pool")
        return source
    if not isinstance(source, str | Path):
        raise TypeError(f"from_store takes a store path or a dpsn.Pool, not {type(source)}")
    from ._api import open as open_pool

    return open_pool(source, mode, **open_kwargs)
