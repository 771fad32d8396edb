"""The README's Python examples run as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import linvision  # noqa: F401
import timm

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block(i, tmp_path, monkeypatch):
    block = BLOCKS[i]
    scope = {"__name__": "__readme__", "timm": timm, "torch": torch}
    if "pretrained_cfg_overlay" in block:
        # the weights-loading example names an official checkpoint: write one (official mmcls keys, .pth) first
        from test_models import _to_official_vrwkv
        name = re.search(r'file="([^"]+)"', block).group(1)
        src = timm.create_model("vrwkv_tiny").eval()
        torch.save({"state_dict": _to_official_vrwkv(src.state_dict())}, tmp_path / name)
        monkeypatch.chdir(tmp_path)
        exec(compile(block, f"README.md python block {i}", "exec"), scope)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(scope["model"].eval()(x), src(x))
        return
    exec(compile(block, f"README.md python block {i}", "exec"), scope)
