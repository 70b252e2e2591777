"""Shared helpers for the benchmarks: timing, tables, JSON output.

Results go under ``--out`` (default ``./bench-results`` in the working directory, never into the
checkout), one file per run, named by the benchmark and the UTC time, so a run never
overwrites the last; each records the dpsn and torch versions and the git commit it ran on.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dpsn.bench._provenance import add_out_argument, default_out, stamped, versions

__all__ = [
    "RESULTS",
    "add_out_argument",
    "best_of",
    "default_out",
    "machine",
    "print_table",
    "write_json",
]

RESULTS = Path(__file__).parent / "results"  # where the figures the docs cite were written


def best_of(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    """Best wall time of ``repeat`` runs (seconds): the least disturbed by a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        **versions(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in body:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``payload`` with the machine, versions and commit to ``out`` (default
    :func:`default_out`) as ``NAME-YYYYmmddTHHMMSSZ.json``; returns the path."""
    path = stamped(out, name)
    payload = {"machine": machine(), "time": time.time(), **payload}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    print(f"\nwrote {path}")
    return path
