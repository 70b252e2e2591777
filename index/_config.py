"""Router configurations: one frozen dataclass per router kind.

Why: a router's shape is fixed by a dozen hyperparameters, and a store persists exactly them
(``save_router`` writes ``config_json(router.config())``; ``load_router`` builds the router from
them before reading any array, to know which shapes to expect). One object, built once and
validated where it is built, replaces keyword arguments passed down three constructors. Routers
still accept the same keywords (``ProductKeyRouter(d_in=64, num_rows=10**6, k=16)``) and build
their config from them.

A router resolves what "auto" or ``None`` stands for (``k_min=None`` -> ``k``, ``budget="auto"``
-> the signal it picks, ``d_key=None`` -> a width from ``d_in``, ``levels``/``nbits`` from the
pool size) and keeps the *resolved* config, so the persisted one rebuilds the same router even
if a later dpsn picks other defaults. Field names are persisted: never rename one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, Self

from ._errors import RouterConfigError

Backend = Literal["auto", "faiss", "torch"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RouterConfig:
    """What every router is built from.

    - ``d_in``: input width; ``num_rows``: rows routed over (up to 2**62);
    - ``k``: rows per input at most (``k_max``); ``k_min``: at least (``None``: ``k``);
    - ``budget``: the complexity signal spreading inputs over ``[k_min, k]`` (``"auto"``:
      ``"fixed"`` when ``k_min == k``, else the router's default; see ``_budget``);
    - ``temperature``: of the entropy signal; ``seed``: every random initialisation;
    - ``budget_cost``: price per row (loss units per row and input) that trains a learned
      budget against its compute (0: none; see ``_budget``).
    """

    d_in: int
    num_rows: int
    k: int
    k_min: int | None = None
    budget: str = "auto"
    temperature: float = 1.0
    seed: int = 0
    budget_cost: float = 0.0

    def with_(self, **changes: Any) -> Self:
        """A copy with ``changes`` (how routers record resolved values)."""
        return replace(self, **changes)

    @classmethod
    def from_json(cls, raw: Any) -> Self:
        """Rebuild a config from its persisted JSON object, refusing unknown or missing keys
        with a ``RouterConfigError`` (a store is untrusted input)."""
        if not isinstance(raw, dict):
            raise RouterConfigError(f"a router config must be a JSON object, got {raw!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise RouterConfigError(f"unknown {cls.__name__} fields: {unknown}")
        values = dict(raw)
        if "levels" in values and isinstance(values["levels"], list):
            values["levels"] = tuple(values["levels"])
        try:
            return cls(**values)
        except TypeError as e:
            raise RouterConfigError(f"bad {cls.__name__}: {e}") from e


@dataclass(frozen=True, kw_only=True, slots=True)
class ProductKeyConfig(RouterConfig):
    """:class:`ProductKeyRouter`: ``heads`` key sets of width ``d_key`` (``None``: from
    ``d_in``), batch norm on the query, and the search's memory bound ``max_elems``."""

    heads: int = 1
    d_key: int | None = None
    query_batchnorm: bool = False
    max_elems: int = 1 << 22


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionConfig(ProductKeyConfig):
    """The region routers: a beam of ``beam`` regions, the region score's weight against the
    local keys, the search backend, and when the online region state is re-indexed."""

    beam: int = 16
    region_weight: float = 16.0
    backend: Backend = "auto"
    refresh_every: int = 1000
    drift_tol: float = 0.1


@dataclass(frozen=True, kw_only=True, slots=True)
class VQConfig(RegionConfig):
    """:class:`VQRouter`: residual k-means ``levels`` (codebook sizes; ``None``: from the pool
    size), k-means iterations, EMA decay of the online codebooks."""

    levels: tuple[int, ...] | None = None
    niter: int = 20
    ema_decay: float = 0.99


@dataclass(frozen=True, kw_only=True, slots=True)
class LSHConfig(RegionConfig):
    """:class:`LSHRouter`: ``nbits`` sign bits (``None``: from the pool size) and the rate at
    which the per-bit thresholds track the inputs."""

    region_weight: float = 4.0
    nbits: int | None = None
    threshold_rate: float = 0.05


# Fields added after routers were first persisted, with the value a router saved before them
# means: omitted from the persisted form at that value, so an older router's config (and the
# digest its commit recorded) stays byte-identical.
_LATER_FIELDS: dict[str, Any] = {"budget_cost": 0.0}


def config_json(config: RouterConfig) -> dict[str, Any]:
    """The persisted form: plain JSON values (tuples become lists); fields added later are left
    out while they hold their old meaning (``_LATER_FIELDS``)."""
    out = asdict(config)
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in out.items()
        if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])
    }


def build_config(cls: type[RouterConfig], config: RouterConfig | None, kwargs: dict[str, Any]):
    """The config a router constructor was given: ``config`` or keyword arguments, not both."""
    if config is None:
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise RouterConfigError(f"bad router arguments: {e}") from e
    if kwargs:
        raise RouterConfigError(
            f"pass either a {cls.__name__} or keyword arguments, not both (got {sorted(kwargs)})"
        )
    if type(config) is not cls:  # a VQConfig is a ProductKeyConfig too, but not for this
        raise RouterConfigError(f"expected a {cls.__name__}, got {type(config).__name__}")
    return config
