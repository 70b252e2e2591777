"""The README's Python blocks run, in order, in one namespace, as a newcomer would paste
them, in a fresh working directory; and its sh blocks name commands that exist."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(blocks("python")) >= 4


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks("python")):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block: the traceback's line numbers are within it
            raise AssertionError(f"README python block {i + 1} failed: {e!r}\n{code}") from e
    assert sorted(os.listdir(tmp_path)) == ["ffn0", "store", "tables"]
