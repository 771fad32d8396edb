"""Issue 16: checkpoint folders are untrusted input — model_args allow-list and ranges, the architecture checked
against the safetensors header on the meta device before any real allocation, dtype mismatches and non-finite
weights refused; each a one-line error, exit 2."""
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import make_dataset, run
from linvision import checkpoint
from linvision.cli import main
from linvision.errors import LinvisionError
from linvision.untrusted import check_model_args

FAST = ["--img-size", "32", "--patch-size", "8", "--epochs", "1", "--batch-size", "4", "--workers", "0",
        "--threads", "1", "--warmup-epochs", "0", "--max-steps", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    assert main(["train", "--model", "test_vrwkv", *FAST, "--data", str(make_dataset(root / "data")),
                 "--output", str(root / "run")]) == 0
    Image.new("RGB", (32, 32), (200, 40, 40)).save(root / "red.png")
    return root


@pytest.fixture
def ckpt(trained, tmp_path):
    return shutil.copytree(trained / "run", tmp_path / "ckpt")


def edit_config(ckpt, **model_args):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_args"] = {**cfg["model_args"], **model_args}
    (ckpt / "config.json").write_text(json.dumps(cfg))


def one_line(capsys, *argv):
    rc, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("linvision: error:"), err
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    ({"checkpoint_path": "/etc/passwd"}, "model_args 'checkpoint_path' not allowed for test_vrwkv"),
    ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "'pretrained_cfg_overlay' not allowed"),
    ({"img_size": 10 ** 9}, "model_args.img_size must be an integer or [H, W] in [1, 8192], got 1000000000"),
    ({"img_size": [32, -1]}, "model_args.img_size must be an integer or [H, W]"),
    ({"num_classes": "ten"}, "model_args.num_classes must be an integer in [0, 100000], got 'ten'"),
    ({"num_classes": True}, "model_args.num_classes must be an integer"),
    ({"drop_path_rate": float("nan")}, "model_args.drop_path_rate must be a number in [0.0, 1.0]"),
    ({"patch_size": 0}, "model_args.patch_size must be an integer in [1, 1024], got 0"),
    ({"arch": {"dims": [8]}}, "model_args 'arch' not allowed for test_vrwkv"),
    ({"post_norm": "yes"}, "model_args.post_norm must be a boolean, got 'yes'"),
    ({"depth": 10 ** 6}, "model_args.depth must be an integer in [1, 256], got 1000000"),
    ({"mode": "chunk"}, "model_args 'mode' not allowed for test_vrwkv"),
])
def test_model_args_outside_the_allow_list_or_range(ckpt, trained, capsys, monkeypatch, args, needle):
    edit_config(ckpt, **args)
    import timm
    called = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: called.append(k))
    msg = one_line(capsys, "predict", "--checkpoint", ckpt, trained / "red.png")
    assert needle in msg and "config.json" in msg, msg
    assert called == []  # refused before anything is built


def test_family_settings_are_built_on_meta_and_checked_by_the_model(ckpt, trained, capsys):
    edit_config(ckpt, wkv_variant="/etc/passwd")
    msg = one_line(capsys, "predict", "--checkpoint", ckpt, trained / "red.png")
    assert "cannot build test_vrwkv from" in msg and "wkv_variant" in msg, msg


def test_model_args_not_an_object(ckpt, trained, capsys):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_args"] = [1, 2]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "model_args must be an object, got list" in one_line(capsys, "eval", "--checkpoint", ckpt)


def test_resnas_arch_must_be_an_object_in_range(tmp_path):
    with pytest.raises(LinvisionError, match="model_args.arch must be an architecture object, got str"):
        check_model_args("vit_resnas_tiny", {"arch": "/etc/passwd"}, tmp_path / "config.json")
    huge = {"dims": [10 ** 7], "head_dims": [8], "heads": [[1]], "mlp": [[8]]}
    with pytest.raises(LinvisionError, match="model_args.arch out of range"):
        check_model_args("vit_resnas_tiny", {"arch": huge}, tmp_path / "config.json")
    ok = {"dims": [8], "head_dims": [8], "heads": [[1]], "mlp": [[8]]}
    assert check_model_args("test_resnas", {"arch": ok, "num_classes": 3}, "c") == {"arch": ok, "num_classes": 3}


def test_architecture_is_checked_against_the_header_on_the_meta_device_first(ckpt, trained, capsys, monkeypatch):
    edit_config(ckpt, num_classes=1000)  # a much bigger head than the weights hold
    import timm
    real, devices, loads = timm.create_model, [], []

    def spy(*a, **k):
        devices.append(str(torch.get_default_device()))
        return real(*a, **k)
    monkeypatch.setattr(timm, "create_model", spy)
    monkeypatch.setattr(checkpoint, "load_state_dict", lambda f: loads.append(f))
    msg = one_line(capsys, "eval", "--checkpoint", ckpt)
    assert "does not match model" in msg and "shape mismatch: head.weight (2, 64) vs model (1000, 64)" in msg, msg
    assert devices == ["meta"] and loads == []  # no real model, no tensor data read


def test_weights_of_another_dtype(ckpt, trained, capsys):
    sd = load_file(ckpt / "model.safetensors")
    save_file({k: v.double() if v.is_floating_point() else v for k, v in sd.items()}, ckpt / "model.safetensors")
    msg = one_line(capsys, "predict", "--checkpoint", ckpt, trained / "red.png")
    assert "dtype mismatch:" in msg and "F64 vs model float32" in msg, msg


def test_non_finite_weights(ckpt, trained, capsys):
    sd = load_file(ckpt / "model.safetensors")
    sd["head.weight"][0, 0] = float("nan")
    save_file(sd, ckpt / "model.safetensors")
    msg = one_line(capsys, "predict", "--checkpoint", ckpt, trained / "red.png")
    assert "holds non-finite weights (NaN/Inf) in head.weight" in msg, msg
