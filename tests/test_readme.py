"""The README's Python examples run as written (every ```python block that does not need external files)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if "pretrained=True" not in b]  # the weights-loading example names a user's file


def test_readme_has_examples():
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize("i", range(len(RUNNABLE)))
def test_readme_python_block(i):
    exec(compile(RUNNABLE[i], f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
