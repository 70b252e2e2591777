"""The store's maintenance policy: how much history to keep, and when to compact.

Why a record in LMDB and not in the manifest: the manifest is written once and its digest is
part of commit 1's provenance, while a policy is set at create and changed later. The record
lives under ``meta/maintenance`` (canonical JSON with ``record_xxh64``, like every record) and
is read by ``gc`` and by the compaction that may follow a commit; each call may override it.

- ``keep_last``: keep the newest N commits reconstructible (compaction commits not counted);
- ``keep_within``: keep every commit younger than this many seconds;
- HEAD and every named snapshot are always kept; with neither limit set only they are (what
  ``gc`` always did). A commit is kept when either limit keeps it.
- ``compact_above``: after a commit, compact when the segments' stored bytes exceed this many
  times the live bytes (``None``: never automatically); ``compact_min_bytes``: not before the
  segments hold this many bytes (small stores are all metadata, and compacting them buys
  nothing).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from dpsn.errors import CorruptStoreError, InvalidArgumentError

__all__ = ["META_MAINTENANCE", "MaintenancePolicy", "parse_duration"]

META_MAINTENANCE = b"maintenance"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNSET: Any = object()


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise InvalidArgumentError("a duration is a number of seconds or a string like '7d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if not m:
            raise InvalidArgumentError(
                f"duration {value!r} is not understood: use a number and a unit among "
                "s, m, h, d, w (for example 7d or 12h)"
            )
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise InvalidArgumentError(
            f"a duration is a number of seconds or a string like '7d', not {type(value).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgumentError(f"a duration must be finite and not negative, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class MaintenancePolicy:
    """Retention and compaction settings of a store (persisted; never rename the keys)."""

    keep_last: int | None = None
    keep_within: float | None = None  # seconds
    compact_above: float | None = 1.5
    compact_min_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        kl, kw = self.keep_last, self.keep_within
        if kl is not None and (isinstance(kl, bool) or not isinstance(kl, int) or kl < 1):
            raise InvalidArgumentError(f"keep_last must be a positive int or None, got {kl!r}")
        if kw is not None and (
            isinstance(kw, bool)
            or not isinstance(kw, int | float)
            or not math.isfinite(kw)
            or kw < 0
        ):
            raise InvalidArgumentError(
                f"keep_within must be a number of seconds (>= 0) or None, got {kw!r}"
            )
        ca = self.compact_above
        if ca is not None and (
            isinstance(ca, bool) or not isinstance(ca, int | float) or not 1.0 < ca < 1e9
        ):
            raise InvalidArgumentError(
                f"compact_above must be a number above 1 (stored / live bytes) or None, got {ca!r}"
            )
        mb = self.compact_min_bytes
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 0:
            raise InvalidArgumentError(f"compact_min_bytes must be an int >= 0, got {mb!r}")

    def with_(
        self,
        *,
        keep_last: Any = _UNSET,
        keep_within: Any = _UNSET,
        compact_above: Any = _UNSET,
        compact_min_bytes: Any = _UNSET,
    ) -> MaintenancePolicy:
        """This policy with the given settings changed (``keep_within`` may be ``'7d'``)."""
        changes: dict[str, Any] = {}
        if keep_last is not _UNSET:
            changes["keep_last"] = keep_last
        if keep_within is not _UNSET:
            changes["keep_within"] = None if keep_within is None else parse_duration(keep_within)
        if compact_above is not _UNSET:
            changes["compact_above"] = compact_above
        if compact_min_bytes is not _UNSET:
            changes["compact_min_bytes"] = compact_min_bytes
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The policy as the store records it (plain JSON values)."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> MaintenancePolicy:
        """The policy a store recorded; a damaged record is a ``CorruptStoreError``."""
        if not isinstance(raw, dict):
            raise CorruptStoreError("the maintenance policy record is not a JSON object")
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        try:
            return cls(**fields)
        except InvalidArgumentError as e:
            raise CorruptStoreError(f"the maintenance policy record is malformed: {e}") from e
