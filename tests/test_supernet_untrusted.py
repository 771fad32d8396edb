"""A super-network run folder is input too: ``load_supernet`` checks config.json before building anything."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import linvision  # noqa: F401
from linvision.errors import LinvisionError
from linvision.nas.space import get_space
from linvision.nas.supernet import ResNASSuperNet
from linvision.nas.train import load_supernet


@pytest.fixture
def run(tmp_path):
    net = ResNASSuperNet(get_space("test"), img_size=56, num_classes=3)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    config = {"model": "resnas_supernet", "supernet": True, "space": "test", "img_size": 56, "num_classes": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, net, config


def test_round_trip(run):
    d, net, _ = run
    loaded, _ = load_supernet(d)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


@pytest.mark.parametrize("key,value,msg", [
    ("space", "/etc/passwd", "space must be one of"),
    ("img_size", 10 ** 9, "img_size must be a multiple of 56"),
    ("img_size", 60, "img_size must be a multiple of 56"),
    ("num_classes", "3", "num_classes must be an integer"),
    ("num_classes", 7, "does not match"),
])
def test_bad_config_is_one_line_error(run, key, value, msg):
    d, _, config = run
    (d / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(LinvisionError, match=msg) as e:
        load_supernet(d)
    assert "\n" not in str(e.value)


def test_non_finite_weights_refused(run):
    d, net, _ = run
    sd = {k: v.contiguous().clone() for k, v in net.state_dict().items()}
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name].view(-1)[0] = float("nan")
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(LinvisionError, match="non-finite"):
        load_supernet(d)
