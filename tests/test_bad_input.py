"""Every bad input of issue 7, one test each: a one-line error naming the file or argument, exit status 2, no
traceback (unless --debug), and nothing written before damaged; or, where the input is usable (odd image modes,
small images, stray or corrupt files inside a data set), a run that succeeds and says what it skipped."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import make_dataset, run
from linvision.cli import main

MODEL = ["--img-size", "32", "--patch-size", "8"]
FAST = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--threads", "1", "--warmup-epochs", "0"]


def snapshot(root):
    """Every file (its bytes) and folder under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "<dir>") for p in sorted(root.rglob("*"))}


def one_line_error(capsys, *argv, needles=(), unchanged=None):
    """Run ``linvision *argv``, expect a one-line error containing ``needles``; ``unchanged``: a folder whose
    contents must be the same afterwards. Returns the message."""
    before = snapshot(unchanged) if unchanged else None
    rc, out, err = run(capsys, *argv)
    lines = [x for x in err.splitlines() if x.startswith("linvision: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    assert out == ""
    if unchanged:
        assert snapshot(unchanged) == before, "an error changed files written before"
    return lines[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """``{model: run folder}`` for test_vrwkv and test_vir, trained 1 step (read-only; copy before changing)."""
    root = tmp_path_factory.mktemp("bad_input")
    data = make_dataset(root / "data")
    runs = {}
    for name in ("test_vrwkv", "test_vir"):
        runs[name] = root / name
        assert main(["train", "--model", name, *MODEL, "--data", str(data), *FAST, "--max-steps", "1",
                     "--output", str(runs[name])]) == 0
    return runs


@pytest.fixture
def ckpt(ckpts, tmp_path):
    """A private copy of the test_vrwkv run folder."""
    return shutil.copytree(ckpts["test_vrwkv"], tmp_path / "ckpt")


def train_cmd(data, out, *extra):
    return ["train", "--model", "test_vrwkv", *MODEL, "--data", data, *FAST, "--output", out, *extra]


# --------------------------------------------------------------------------------------------------- data paths
def test_data_path_that_does_not_exist(tmp_path, capsys):
    one_line_error(capsys, *train_cmd(tmp_path / "nowhere", tmp_path / "out"), unchanged=tmp_path,
                   needles=["data path does not exist", "nowhere"])


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, *train_cmd(tmp_path / "empty", tmp_path / "out"), unchanged=tmp_path,
                   needles=["no train/ or test/ (or val/) split folder in", "empty"])


def test_data_folder_without_class_folders(tmp_path, capsys):
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "test").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "flat" / "train" / "a.jpg")  # images, but not in class folders
    one_line_error(capsys, *train_cmd(tmp_path / "flat", tmp_path / "out"), unchanged=tmp_path,
                   needles=["no class folders in", os.path.join("flat", "train"), "<class>/<image>"])


# --------------------------------------------------------------------------------------------------- image files
def test_non_image_file_inside_a_data_set_is_skipped_with_a_warning(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    (data / "train" / "red" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipped 1 non-image file\(s\) in .*train, e.g. .*notes.txt"):
        rc, _, err = run(capsys, *train_cmd(data, tmp_path / "out"))
    assert rc == 0 and "14 train / 8 test images (1 non-image file(s) skipped)" in err, err  # 2 held out: --val-split


def test_non_image_file_given_to_predict(ckpt, tmp_path, capsys):
    (tmp_path / "photo.jpg").write_text("this is text")
    one_line_error(capsys, "predict", "--checkpoint", ckpt, tmp_path / "photo.jpg", unchanged=tmp_path,
                   needles=["cannot decode image", "photo.jpg", "not an image"])


def _damage(folder):
    """Truncate one JPEG and overwrite another with garbage; returns both paths."""
    a, b = sorted(folder.glob("*.jpg"))[:2]
    a.write_bytes(a.read_bytes()[:300])
    b.write_bytes(b"\xff\xd8\xff\xe0 corrupt")
    return a, b


def test_truncated_and_corrupt_jpegs_inside_a_data_set_are_skipped_and_counted(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    bad = [*_damage(data / "train" / "red"), *_damage(data / "test" / "blue")]
    with pytest.warns(UserWarning) as warned:  # all 16 training images trained on (none held out), 4 steps of 4
        rc, _, err = run(capsys, *train_cmd(data, tmp_path / "out"), "--val-split", "0")
    assert rc == 0, err
    messages = [str(w.message) for w in warned]
    for p in bad:
        assert any(m.startswith(f"skipping unreadable image {p}: ") for m in messages), (p, messages)
    assert "2 unreadable image(s) skipped" in err  # the training epoch's summary line
    assert "2 unreadable test image(s) skipped" in err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["metrics"]["n"] == 6  # 8 test images - 2
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        rc, out, err = run(capsys, "eval", "--checkpoint", tmp_path / "out", "--data", data, "--workers", "0")
    assert rc == 0 and "(6 images" in out and "2 unreadable image(s) skipped" in err, (out, err)


def test_truncated_jpeg_given_to_predict(ckpt, tmp_path, capsys):
    img = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(img)
    img.write_bytes(img.read_bytes()[:400])
    one_line_error(capsys, "predict", "--checkpoint", ckpt, img, unchanged=tmp_path,
                   needles=["cannot decode image", "cut.jpg", "corrupt or truncated image file"])


def _odd_modes(folder):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    rgba = np.dstack([(g * 255).astype(np.uint8)] * 3 + [np.full((32, 32), 128, np.uint8)])
    images = {"gray.png": Image.fromarray((g * 255).astype(np.uint8), "L"), "rgba.png": Image.fromarray(rgba, "RGBA"),
              "cmyk.jpg": Image.new("CMYK", (32, 32), (0, 255, 255, 0)),
              "sixteen.png": Image.fromarray((g * 65535).astype(np.uint16))}
    for name, im in images.items():
        im.save(folder / name)
    return [folder / n for n in images]


def test_grayscale_rgba_cmyk_and_16_bit_images_are_converted(ckpt, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    files = _odd_modes(data / "train" / "red") + _odd_modes(data / "test" / "blue")
    assert {Image.open(f).mode for f in files} == {"L", "RGBA", "CMYK", "I;16"}
    rc, _, err = run(capsys, *train_cmd(data, tmp_path / "out"))
    assert rc == 0 and "unreadable" not in err, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["metrics"]["n"] == 12  # all test images
    rc, out, err = run(capsys, "predict", "--checkpoint", ckpt, "--json", *files[:4])
    assert rc == 0, err
    assert [r["image"] for r in json.loads(out)["results"]] == [str(f) for f in files[:4]]


def test_images_smaller_than_the_model_input_are_upscaled(ckpt, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", size=8)  # 8x8 images, model input 32x32
    rc, _, err = run(capsys, *train_cmd(data, tmp_path / "out"))
    assert rc == 0 and "unreadable" not in err, err
    Image.new("RGB", (5, 7), (200, 40, 40)).save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match="tiny.png is 5x7, smaller than the model input 32x32; upscaled"):
        rc, out, err = run(capsys, "predict", "--checkpoint", ckpt, tmp_path / "tiny.png")
    assert rc == 0 and out.startswith(str(tmp_path / "tiny.png"))


# --------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_from_another_model(ckpts, ckpt, tmp_path, capsys):
    shutil.copy(ckpts["test_vir"] / "model.safetensors", ckpt / "model.safetensors")  # ViR weights, VRWKV config
    msg = one_line_error(capsys, "eval", "--checkpoint", ckpt, unchanged=tmp_path,
                         needles=["model.safetensors", "does not match model", "missing keys:", "unexpected keys:"])
    assert "norm_pre.weight" in msg and "blocks.0.ls1.gamma" in msg, msg  # names keys of both models
    assert msg.endswith("(the weights of another model?)")


def test_checkpoint_with_missing_keys(ckpt, tmp_path, capsys):
    sd = load_file(ckpt / "model.safetensors")
    del sd["head.weight"], sd["blocks.1.norm1.weight"]
    save_file(sd, ckpt / "model.safetensors")
    msg = one_line_error(capsys, "predict", "--checkpoint", ckpt, tmp_path / "ckpt" / "config.json",
                         unchanged=tmp_path, needles=["missing keys:", "head.weight", "blocks.1.norm1.weight"])
    assert "unexpected" not in msg


def test_weights_that_are_not_a_safetensors_file(ckpt, tmp_path, capsys):
    torch.save(torch.load(ckpt / "train_state.pt", weights_only=True)["model"], ckpt / "model.safetensors")  # a zip
    one_line_error(capsys, "eval", "--checkpoint", ckpt, unchanged=tmp_path,
                   needles=["model.safetensors", "is not a valid safetensors file"])


def test_train_state_that_is_not_a_torch_zip_file(ckpt, tmp_path, capsys):
    (ckpt / "train_state.pt").write_bytes(b"\x80\x04 not a checkpoint" * 20)
    one_line_error(capsys, "train", "--resume", ckpt, unchanged=tmp_path,
                   needles=["cannot read training state", "train_state.pt", "not a PyTorch zip checkpoint"])


def test_train_state_holding_arbitrary_objects(ckpt, tmp_path, capsys):
    torch.save({"epoch": 1, "args": {}, "evil": shutil.rmtree}, ckpt / "train_state.pt")  # refused, never run
    one_line_error(capsys, "train", "--resume", ckpt, unchanged=tmp_path,
                   needles=["cannot read training state", "train_state.pt",
                            "safe loading (weights_only) refuses: shutil.rmtree"])


# --------------------------------------------------------------------------------------------------- arguments
def test_img_size_not_divisible_by_the_patch(tiny_data, tmp_path, capsys):
    one_line_error(capsys, "train", "--model", "test_vrwkv", "--data", tiny_data, *FAST, "--img-size", "30",
                   "--patch-size", "8", "--output", tmp_path / "out", unchanged=tmp_path,
                   needles=["--img-size 30 is not divisible by --patch-size 8", "24 or 32"])


def test_resume_folder_without_training_state(ckpt, tmp_path, capsys):
    (ckpt / "train_state.pt").unlink()  # e.g. a folder holding only exported weights
    one_line_error(capsys, "train", "--resume", ckpt, unchanged=tmp_path,
                   needles=["cannot resume: no train_state.pt in", "ckpt"])
    one_line_error(capsys, "train", "--resume", tmp_path / "never", unchanged=tmp_path,
                   needles=["cannot resume:", "never", "does not exist"])


def test_output_that_cannot_be_written(tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("a file where a folder should be")
    one_line_error(capsys, *train_cmd(tiny_data, tmp_path / "file" / "run"), unchanged=tmp_path,
                   needles=["cannot write to --output", os.path.join("file", "run"), "Not a directory"])
    one_line_error(capsys, *train_cmd(tiny_data, tmp_path / "file"), unchanged=tmp_path,
                   needles=["--output", "is a file, not a folder"])
    if os.geteuid() != 0:  # root writes anywhere; the case above covers it there
        (tmp_path / "ro").mkdir(mode=0o555)
        one_line_error(capsys, *train_cmd(tiny_data, tmp_path / "ro" / "run"), unchanged=tmp_path,
                       needles=["cannot write to --output", "Permission denied"])


@pytest.mark.parametrize("option,value,message", [
    ("--batch-size", "0", "--batch-size must be positive (got 0)"),
    ("--save-every-steps", "-1", "--save-every-steps must not be negative (got -1)"),
    ("--lr", "inf", "--lr must be a finite number (got inf)"),
])
def test_numeric_options_out_of_range(tiny_data, tmp_path, capsys, option, value, message):
    one_line_error(capsys, *train_cmd(tiny_data, tmp_path / "out", option, value), unchanged=tmp_path,
                   needles=[message])


# --------------------------------------------------------------------------------------------------- entry point
def test_errors_through_the_real_entry_point_show_a_traceback_only_with_debug(tmp_path):
    cmd = [sys.executable, "-m", "linvision", "train", "--data", str(tmp_path / "nowhere"), "--output",
           str(tmp_path / "out")]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.strip().splitlines() == [f"linvision: error: data path does not exist: {tmp_path / 'nowhere'}"]
    assert not (tmp_path / "out").exists()
    from linvision.errors import LinvisionError
    with pytest.raises(LinvisionError, match="data path does not exist"):  # --debug: the exception propagates
        main(cmd[3:] + ["--debug"])
