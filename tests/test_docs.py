"""Every ```python block in docs/*.md runs: the blocks of one page share a namespace, top to bottom."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
PAGES = [p for p in DOCS if "```python" in p.read_text()]


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_doc_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.name} block {i} failed: {err!r}\n{code}") from err
