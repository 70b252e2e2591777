"""The ``dpsn`` command line (``dpsn.tools.cli``) and the pieces of it other code reuses.

:func:`run_demo` is what ``dpsn demo`` runs (bench/cli.py times it); :func:`human_bytes` is how
the CLI prints sizes, so benchmark tables print them the same way. Both load on first use: the
CLI's read commands import this package and must not import torch (the demo does).
"""

from __future__ import annotations

from typing import Any

from ._format import human_bytes

__all__ = ["human_bytes", "run_demo"]


def __getattr__(name: str) -> Any:
    if name == "run_demo":
        from ._demo import run_demo

        return run_demo
    raise AttributeError(f"module 'dpsn.tools' has no attribute {name!r}")
