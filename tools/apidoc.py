"""The API reference, generated from the docstrings with pdoc (``pip install -e ".[dev]"``):

    python -m dpsn.tools.apidoc docs/api      # writes docs/api/index.html and one page a module

It documents the public modules (``dpsn`` and ``dpsn.errors``, ``dpsn.pool``, ``dpsn.index``,
``dpsn.tiers``, ``dpsn.hypernet``) and first checks that every public name has a docstring:
the names each module exports in ``__all__`` (classes and functions), and the public methods
and properties of the classes ``dpsn`` itself exports. A missing one fails the build (exit 1)
and is named.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = ("dpsn", "dpsn.errors", "dpsn.pool", "dpsn.index", "dpsn.tiers", "dpsn.hypernet")


def _has_doc(obj: object) -> bool:
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        # a dataclass without a docstring gets its signature as one
        return bool(doc and doc.strip()) and not doc.startswith(f"{obj.__name__}(")
    return bool(inspect.getdoc(obj))


def missing_docstrings() -> list[str]:
    """Public names without a docstring (see the module docstring for which are checked)."""
    missing = []
    for name in MODULES:
        mod = importlib.import_module(name)
        if not (mod.__doc__ or "").strip():
            missing.append(name)
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not _has_doc(obj):
                missing.append(f"{name}.{attr}")
    import dpsn

    for attr in dpsn.__all__:
        cls = getattr(dpsn, attr)
        if not inspect.isclass(cls):
            continue
        for member, value in vars(cls).items():
            if member.startswith("_"):
                continue
            fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if inspect.isfunction(fn) and not inspect.getdoc(getattr(cls, member, None)):
                missing.append(f"dpsn.{attr}.{member}")
    return missing


def build(out: str | Path) -> Path:
    """Write the HTML reference into ``out``; returns its index page."""
    import pdoc
    import pdoc.render

    out = Path(out)
    pdoc.render.configure(docformat="restructuredtext", footer_text="dpsn")
    # dpsn.errors is a submodule of dpsn: pdoc documents it with its parent
    pdoc.pdoc(*(m for m in MODULES if m != "dpsn.errors"), output_directory=out)
    return out / "index.html"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "docs/api")
    missing = missing_docstrings()
    if missing:
        print(f"public names without a docstring: {', '.join(missing)}", file=sys.stderr)
        return 1
    index = build(out)
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
