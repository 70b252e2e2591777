"""The store engine is its own package: torch-free, and its modules form no import cycle.

``dpsn.store`` is what the CLI's read commands and every maintenance path load; the row path
(``dpsn.tiers``) sits on top of it and never the other way round (issue 20)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "store"


def test_every_store_module_imports_without_torch():
    modules = sorted(f"dpsn.store.{p.stem}" for p in STORE.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import dpsn.store as s\n"
        "[getattr(s, n) for n in s.__all__]\n"
        "rowpath = ('torch.', 'dpsn.tiers', 'dpsn.pool', 'dpsn.index', 'dpsn.hypernet')\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(rowpath))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout


def _store_imports(path: Path) -> set[str]:
    """Sibling modules one store module imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("dpsn.store."):
                found.add(node.module.split(".")[2])
    return {m for m in found if (STORE / f"{m}.py").exists()}


def test_store_modules_form_no_import_cycle():
    graph = {p.stem: _store_imports(p) for p in STORE.glob("_*.py")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles in dpsn.store:\n" + "\n".join(cycles)


def test_tiers_holds_no_store_engine_module():
    engine = {p.stem for p in STORE.glob("_*.py")} - {"__init__"}
    assert not engine & {p.stem for p in (ROOT / "tiers").glob("_*.py")}
