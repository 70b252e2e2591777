"""Counts as people type them on a command line: 1000000, 1_000_000, 1e12, 10**12."""

from __future__ import annotations

import argparse
import re

MAX_COUNT = (1 << 64) - 1


def parse_count(text: str) -> int:
    """An integer count as people write it: 1000000, 1_000_000, 1e12 or 10**12 (0..2**64-1).

    The size is bounded before anything is computed, so ``10**20000000`` fails at once."""
    t = text.strip().replace("_", "")
    shown = text if len(text) <= 40 else text[:37] + "..."
    too_big = argparse.ArgumentTypeError(f"{shown!r} is too large (the most is 2**64-1)")
    m = re.fullmatch(r"(\d{1,25})\*\*(\d{1,25})", t)
    if m:
        base, exp = int(m.group(1)), int(m.group(2))
        if base > 1 and exp * (base.bit_length() - 1) > 64:
            raise too_big
        value = base**exp
    else:
        m = re.fullmatch(r"(\d+)(?:[eE](\d+))?", t)
        if not m:
            raise argparse.ArgumentTypeError(
                f"not a count: {shown!r} (try 1000000, 1e12 or 10**12)"
            )
        digits, exponent = m.group(1).lstrip("0") or "0", m.group(2) or "0"
        if digits == "0":  # zero times any power of ten: never computed (0e100000000)
            return 0
        exp = int(exponent.lstrip("0") or "0") if len(exponent.lstrip("0")) <= 3 else 10**3
        if len(digits) + exp > 20:
            raise too_big
        value = int(digits) * 10**exp
    if value > MAX_COUNT:
        raise too_big
    return value


def positive_count(text: str) -> int:
    value = parse_count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def row_id(text: str) -> int:
    """A row id as people write it (3, 1e11, 10**11): a count, named as a row id in errors."""
    try:
        return parse_count(text)
    except argparse.ArgumentTypeError as e:
        shown = text if len(text) <= 40 else text[:37] + "..."
        if "too large" in str(e):
            raise
        raise argparse.ArgumentTypeError(
            f"not a row id: {shown!r} (a row id is a number: 42, 1e11 or 10**11)"
        ) from None
