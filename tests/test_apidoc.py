"""The API reference builds with pdoc, and every public name has a docstring."""

import pytest

from dpsn.tools import apidoc


def test_every_public_name_has_a_docstring():
    assert apidoc.missing_docstrings() == []


@pytest.mark.slow
def test_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    assert apidoc.main([str(tmp_path / "api")]) == 0
    pages = {p.relative_to(tmp_path / "api").as_posix() for p in (tmp_path / "api").rglob("*.html")}
    for page in (
        "index.html",
        "dpsn.html",
        "dpsn/pool.html",
        "dpsn/errors.html",
        "dpsn/tiers.html",
    ):
        assert page in pages
    pool_page = (tmp_path / "api" / "dpsn" / "pool.html").read_text()
    assert "PoolEmbeddingCollection" in pool_page and "from_store" in pool_page


def test_a_missing_docstring_is_named(monkeypatch):
    import dpsn.pool

    def undocumented():
        pass

    monkeypatch.setattr(dpsn.pool, "undocumented", undocumented, raising=False)
    monkeypatch.setattr(dpsn.pool, "__all__", [*dpsn.pool.__all__, "undocumented"])
    assert apidoc.missing_docstrings() == ["dpsn.pool.undocumented"]
    assert apidoc.main(["/nonexistent/never-written"]) == 1
