"""The row lifecycle policy's settings and their ranges, without torch.

``dpsn.Lifecycle`` (``pool/_lifecycle.py``) is the policy users build; a store keeps it as JSON
in every commit record. ``dpsn verify`` and ``dpsn info`` run without torch, yet a damaged or
hand-edited policy (``enter`` below ``exit``, a negative half-life) must be reported by them,
not first by the pool that adopts it. So the settings, their defaults and every range live here,
and ``Lifecycle`` checks itself with the same function.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

from dpsn.errors import CorruptStoreError, LifecycleError

from .usage_fields import SETTING_LIMIT

MAX_ENTER = 0.5  # a row used in more than half of its recent steps is always screened
MIN_ENTER = 1e-4  # homeostasis never lowers the entry threshold below this
MAX_REGIONS = 1 << 24

# Every setting and its default: ``dpsn.Lifecycle``'s fields (a test keeps the two equal).
LIFECYCLE_DEFAULTS: dict[str, Any] = {
    "enter": 0.2,
    "exit": 0.1,
    "min_uses": 8,
    "recent_weight": 0.5,
    "half_life": 200.0,
    "decay": 0.1,
    "prune_rms": 1e-3,
    "max_idle": 64,
    "warmup": 2,
    "inertia": 0.25,
    "update_half_life": 10.0,
    "regions": 1,
    "budget": None,
    "novelty_window": 8,
    "homeostasis": True,
    "target": (0.05, 0.5),
    "consolidate_every": 1,
}


def _number(value: Any, name: str, lo: float, hi: float, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise LifecycleError(f"Lifecycle.{name} must be {kind}, got {value!r}")
    if not (lo <= value <= hi) or (not integer and not math.isfinite(value)):
        raise LifecycleError(f"Lifecycle.{name} must be in [{lo}, {hi}], got {value!r}")


def check_lifecycle_settings(p: Any) -> None:
    """Raise ``LifecycleError`` naming the first setting of ``p`` (attributes named as in
    ``LIFECYCLE_DEFAULTS``; pairs as tuples) that is out of range."""
    _number(p.enter, "enter", MIN_ENTER, MAX_ENTER)
    _number(p.exit, "exit", 0.0, MAX_ENTER)
    if not p.exit < p.enter:
        raise LifecycleError(
            f"Lifecycle.exit ({p.exit}) must be below enter ({p.enter}): the gap between them "
            "is the hysteresis that keeps a row's phase from flickering"
        )
    _number(p.min_uses, "min_uses", 0, SETTING_LIMIT, integer=True)
    _number(p.recent_weight, "recent_weight", 0.0, 1.0)
    _number(p.half_life, "half_life", 1e-3, 1e12)
    _number(p.decay, "decay", 0.0, 0.999999)
    _number(p.prune_rms, "prune_rms", 0.0, 1e30)
    _number(p.max_idle, "max_idle", 1, SETTING_LIMIT, integer=True)
    _number(p.warmup, "warmup", 0, SETTING_LIMIT, integer=True)
    _number(p.inertia, "inertia", 0.0, 1e6)
    _number(p.update_half_life, "update_half_life", 1e-3, 1e12)
    _number(p.regions, "regions", 1, MAX_REGIONS, integer=True)
    _number(p.novelty_window, "novelty_window", 1, SETTING_LIMIT, integer=True)
    _number(p.consolidate_every, "consolidate_every", 0, SETTING_LIMIT, integer=True)
    if not isinstance(p.homeostasis, bool):
        raise LifecycleError(f"Lifecycle.homeostasis must be a bool, got {p.homeostasis!r}")
    if p.budget is not None:
        if not isinstance(p.budget, tuple) or len(p.budget) != 2:
            raise LifecycleError(f"Lifecycle.budget must be None or (a, b), got {p.budget!r}")
        _number(p.budget[0], "budget[0]", 0.0, 1e15)
        _number(p.budget[1], "budget[1]", 0.0, 1e15)
    if not isinstance(p.target, tuple) or len(p.target) != 2:
        raise LifecycleError(f"Lifecycle.target must be (low, high), got {p.target!r}")
    _number(p.target[0], "target[0]", 0.0, 1.0)
    _number(p.target[1], "target[1]", 0.0, 1.0)
    if not p.target[0] < p.target[1]:
        raise LifecycleError(f"Lifecycle.target must have low < high, got {p.target!r}")


def check_stored_policy(raw: Any) -> dict[str, Any]:
    """A policy read from a store (untrusted), every setting checked: the settings with the
    defaults filled in and pairs as tuples, or ``CorruptStoreError`` saying what is wrong."""
    if not isinstance(raw, dict):
        raise CorruptStoreError("the stored lifecycle policy is not a JSON object")
    unknown = sorted(str(k)[:64] for k in set(raw) - set(LIFECYCLE_DEFAULTS))
    if unknown:
        raise CorruptStoreError(
            f"the stored lifecycle policy has unknown settings {unknown[:8]}: written by a "
            "newer dpsn? Upgrade dpsn to open it."
        )
    settings = {**LIFECYCLE_DEFAULTS, **raw}
    for name in ("budget", "target"):
        if isinstance(settings[name], list):
            settings[name] = tuple(settings[name])
    try:
        check_lifecycle_settings(SimpleNamespace(**settings))
    except LifecycleError as e:
        raise CorruptStoreError(f"the stored lifecycle policy is invalid: {e}") from e
    return settings
