"""No package of dpsn reaches into another's private modules (review of issue 14).

``dpsn.tiers``, ``dpsn.index``, ``dpsn.pool`` ... each export what the others use; a private
module (``_name``) of one package may change or move without the others noticing otherwise."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pool", "hypernet", "index", "tiers", "store", "tools")


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return names


def test_no_package_imports_another_packages_private_modules():
    bad = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module in _imported(ast.parse(path.read_text())):
                parts = module.split(".")
                if (
                    len(parts) >= 3
                    and parts[0] == "dpsn"
                    and parts[1] in PACKAGES
                    and parts[1] != package
                    and any(p.startswith("_") for p in parts[2:])
                ):
                    bad.append(f"{path.relative_to(ROOT)}: {module}")
    assert not bad, "\n".join(bad)
