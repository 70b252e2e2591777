"""Row lifecycle health from a commit record, without torch.

Every commit of a store with a row lifecycle carries a ``lifecycle`` JSON object (docs/format.md):
the policy, the clocks, the thresholds, running totals, and the health figures of the last
consolidation. :func:`lifecycle_health` turns it into the figures ``pool.stats()["lifecycle"]``
reports, so a command that only reads records (``dpsn stats``) shows the same numbers as a
writer does, without importing torch. The record is untrusted: anything malformed reads as
missing (0, None or empty), never as an exception.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpsn.errors import CorruptStoreError

from .usage_fields import CLOCK_LIMIT, EPOCH, FREE, PHASE

_COUNTS = ("screened_rows", "free_rows", "held_rows", "screened_bytes", "free_bytes")
_TOTALS = {
    "consolidations": "consolidations",
    "decayed_rows": "decayed",
    "pruned_rows": "pruned",
    "entered_rows": "entered",
    "exited_rows": "exited",
}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _float(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def lifecycle_health(record: Any) -> dict[str, Any] | None:
    """The health figures of a commit record's ``lifecycle`` object (None: no lifecycle).

    Keys: ``step``, ``epoch`` (the clocks), ``enter``, ``exit`` (thresholds now),
    ``screened_rows``, ``free_rows``, ``held_rows`` (in memory, in their warm-up),
    ``screened_bytes``, ``free_bytes`` (raw bytes of persisted rows: delta, optimizer state,
    statistics), ``screening_rate`` and ``target_band``, the running totals
    ``consolidations``, ``decayed_rows`` (row decays), ``pruned_rows``, ``entered_rows``,
    ``exited_rows``, ``regions`` (count, rows per region, the largest ones, how many were over
    budget), ``flags`` (figures out of band, in words) and ``ok`` (no flags). Phase and region
    figures are as of the last consolidation.
    """
    if not isinstance(record, dict):
        return None
    health = _dict(record.get("health"))
    totals = _dict(record.get("totals"))
    policy = _dict(record.get("policy"))
    band = policy.get("target")
    flags = health.get("flags")
    flags = [f for f in flags if isinstance(f, str)] if isinstance(flags, list) else []
    out: dict[str, Any] = {
        "step": _int(record.get("step")),
        "epoch": _int(record.get("epoch")),
        "enter": _float(record.get("enter")),
        "exit": _float(record.get("exit")),
    }
    out.update({k: _int(health.get(k)) for k in _COUNTS})
    out["screening_rate"] = _float(health.get("screening_rate"))
    out["target_band"] = list(band) if isinstance(band, list) else None
    out.update({k: _int(totals.get(v)) for k, v in _TOTALS.items()})
    out["regions"] = _dict(health.get("regions"))
    out["flags"] = flags
    out["ok"] = not flags
    return out


def pending_decay(usage: np.ndarray, record: Any) -> np.ndarray:
    """``[n]`` float64: what multiplies stored deltas to give their values at a commit whose
    ``lifecycle`` record is ``record`` (docs/format.md: a FREE row's value is
    ``stored * (1 - decay) ** max(0, epoch - EPOCH)``), for rows whose ``usage`` rows are given
    (``[n, 10]``; NaN rows: written before the lifecycle, FREE with EPOCH 0). All 1 without a
    lifecycle. ``dpsn.pool`` computes the same values with torch; this is for readers without
    it (``dpsn inspect --no-base``)."""
    if record is None:
        return np.ones(len(usage))
    policy = record.get("policy") if isinstance(record, dict) else None
    decay = policy.get("decay") if isinstance(policy, dict) else None
    epoch = record.get("epoch") if isinstance(record, dict) else None
    if (
        isinstance(decay, bool)
        or not isinstance(decay, int | float)
        or not 0 <= decay < 1
        or isinstance(epoch, bool)
        or not isinstance(epoch, int)
        or not 0 <= epoch < CLOCK_LIMIT
    ):
        raise CorruptStoreError("the commit's lifecycle record has no valid decay and epoch")
    if len(usage) == 0:
        return np.ones(0)
    legacy = np.isnan(usage[:, PHASE])
    start = np.where(legacy, 0.0, usage[:, EPOCH])
    free = legacy | (usage[:, PHASE] == FREE)
    k = np.maximum(epoch - start, 0.0)
    return np.where(free, np.power(1.0 - float(decay), k), 1.0)
