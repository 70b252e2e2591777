"""Where a benchmark's results go and what they record about the code that made them:
torch-free, so the CLI benchmarks (``dpsn bench scaling|cli``) can use it without importing
torch in their parent process."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path


def default_out() -> Path:
    """Where results go unless ``--out`` says otherwise: ``./bench-results`` under the working
    directory (or ``$DPSN_BENCH_OUT``), never the checkout's own folders."""
    return Path(os.environ.get("DPSN_BENCH_OUT") or Path.cwd() / "bench-results")


def add_out_argument(ap: argparse.ArgumentParser) -> None:
    """``--out DIR``: where the JSON (and plots) of this run go."""
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the results (default ./bench-results, or $DPSN_BENCH_OUT)",
    )


def stamped(out: Path | None, name: str, suffix: str = ".json") -> Path:
    """``OUT/NAME-YYYYmmddTHHMMSSZ.SUFFIX``: one file per run, so a run never overwrites the
    last; OUT is created."""
    out = Path(out) if out is not None else default_out()
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}{suffix}"


def git_commit() -> str | None:
    """The commit of the checkout the benchmarks run from (``+dirty`` with local changes), or
    None outside a git checkout."""
    here = str(Path(__file__).resolve().parent)
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    """dpsn's and torch's installed versions and the git commit, for a result's record."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"dpsn": version("dpsn"), "torch": version("torch"), "git_commit": git_commit()}
