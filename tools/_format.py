"""Plain-text tables for the CLI: aligned, no colour, safe to pipe."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def human_bytes(n: float | None) -> str:
    """``n`` bytes in binary units as the CLI prints them (``"1.5 MiB"``); ``"-"`` for None
    (a size nobody measured)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def fields(pairs: Iterable[tuple[str, Any]]) -> str:
    pairs = [(k, cell(v)) for k, v in pairs]
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


_UNITS = (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def human_duration(seconds: float) -> str:
    """Seconds as a duration the way it is written on the command line (``1d``, ``12h``,
    ``90m``): the largest unit that divides it exactly, else seconds."""
    if seconds and float(seconds).is_integer():
        for unit, size in _UNITS:
            if int(seconds) % size == 0:
                return f"{int(seconds) // size}{unit}"
    return f"{seconds:g}s"
