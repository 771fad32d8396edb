"""``linvision segment train | eval | predict`` on a tiny generated data set: run folder, rebuild from config.json,
eval metrics (whole and sliding-window), predictions, resume, backbone weights from a classification run, and
one-line errors for bad data (also when raised inside a DataLoader worker)."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run
from linvision.checkpoint import save_model
from linvision.engine.segmentation import load_seg_model
from linvision.errors import LinvisionError, user_message

H, W, K = 40, 56, 3
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 220]], np.uint8)  # class k's image colour
MODEL = ["--backbone", "test_vrwkv", "--patch-size", "8", "--decoder-channels", "32"]
FAST = ["--crop-size", "32", "48", "--batch-size", "4", "--workers", "0", "--threads", "1", "--warmup-epochs", "0"]


def make_seg_data(root: Path, n=(8, 4, 4), seed=0) -> Path:
    """``root/{train,val,test}``: 40x56 PNGs whose mask is the class of each pixel's colour (two random
    rectangles of classes 1 and 2 on class 0, colour noise ±20) with a 2x5 corner of ignore (255) pixels."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val", "test"), n):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            m = np.zeros((H, W), np.uint8)
            for k in (1, 2):
                y, x = rng.integers(0, H - 10), rng.integers(0, W - 10)
                m[y:y + rng.integers(6, 16), x:x + rng.integers(6, 20)] = k
            img = (COLOURS[m].astype(np.int16) + rng.integers(-20, 21, (H, W, 3))).clip(0, 255).astype(np.uint8)
            m[:2, :5] = 255
            Image.fromarray(img).save(root / split / "images" / f"{split}{i}.png")
            Image.fromarray(m).save(root / split / "masks" / f"{split}{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["bg", "red", "blue"], "ignore_index": 255}))
    return root


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    return make_seg_data(tmp_path_factory.mktemp("segdata") / "seg")


@pytest.fixture(scope="module")
def seg_run(seg_data, tmp_path_factory):
    """A 2-epoch run folder (module-wide, read-only for tests)."""
    from linvision.cli import main
    out = tmp_path_factory.mktemp("segrun") / "run"
    assert main(["segment", "train", "--data", str(seg_data), *MODEL, *FAST, "--epochs", "2", "--lr", "2e-3",
                 "--output", str(out)]) == 0
    return out


def test_train_writes_run_folder_and_config_rebuilds_model(seg_run, seg_data):
    for f in ("model.safetensors", "config.json", "train_state.pt", "metrics.csv", "curves.png"):
        assert (seg_run / f).is_file(), f
    c = json.loads((seg_run / "config.json").read_text())
    assert c["task"] == "segmentation" and c["backbone"] == "test_vrwkv" and c["decoder"] == "upernet"
    assert (c["decoder_channels"], c["num_classes"], c["ignore_index"]) == (32, K, 255)
    assert c["class_names"] == ["bg", "red", "blue"] and len(c["palette"]) == K
    assert c["backbone_args"]["patch_size"] == 8 and c["crop_size"] == [32, 48] and c["epoch"] == 2
    assert c["model_choice"]["split"] == "val" and c["metrics"]["split"] == "test"
    assert "architecture" not in c  # not a timm classifier folder
    r = rows(seg_run)
    assert [x["epoch"] for x in r] == ["1", "2"] and all(x["val_miou"] and x["test_miou"] for x in r)
    assert float(r[1]["train_loss"]) < float(r[0]["train_loss"])  # it learns (deterministic on CPU)
    assert 0 <= float(r[1]["test_miou"]) <= 100 and r[1]["weights"] == "raw"
    model, config = load_seg_model(seg_run)
    assert not model.training and config["num_classes"] == K
    assert model(torch.zeros(1, 3, H, W)).shape == (1, K, H, W)


def test_eval_json_whole_and_slide(seg_run, seg_data, capsys):
    rc, out, _ = run(capsys, "segment", "eval", "--checkpoint", seg_run, "--json", "--workers", "0", "--threads", "1")
    assert rc == 0
    m = json.loads(out)
    assert {"miou", "acc", "macc", "loss", "n", "iou", "class_acc", "split", "inference"} <= set(m)
    assert m["n"] == 4 and m["split"] == "test" and set(m["iou"]) == {"bg", "red", "blue"}
    assert 0 <= m["miou"] <= 100 and 0 <= m["acc"] <= 100
    cfg_m = json.loads((seg_run / "config.json").read_text())["metrics"]
    assert m["miou"] == pytest.approx(cfg_m["miou"], abs=1e-3)  # the kept weights' test report
    # one window covering the whole image is whole-image inference
    rc, out, _ = run(capsys, "segment", "eval", "--checkpoint", seg_run, "--json", "--workers", "0",
                     "--threads", "1", "--inference", "slide", "--window", H, W, "--stride", H, W)
    assert rc == 0 and json.loads(out)["miou"] == pytest.approx(m["miou"], abs=1e-3)
    rc, out, _ = run(capsys, "segment", "eval", "--checkpoint", seg_run, "--split", "val", "--workers", "0",
                     "--threads", "1", "--inference", "slide", "--window", "24", "32", "--stride", "16", "16")
    assert rc == 0 and "mIoU" in out and "val/" in out and out.count("IoU") == 1 + K


def test_predict_writes_mask_and_overlay(seg_run, seg_data, tmp_path, capsys):
    imgs = [seg_data / "test" / "images" / f"test{i}.png" for i in (0, 1)]
    rc, out, _ = run(capsys, "segment", "predict", "--checkpoint", seg_run, *imgs, "--output", tmp_path / "p",
                     "--json", "--threads", "1")
    assert rc == 0
    res = json.loads(out)["results"]
    assert [Path(r["image"]).name for r in res] == ["test0.png", "test1.png"]
    for i in (0, 1):
        mask = Image.open(tmp_path / "p" / f"test{i}_mask.png")
        assert mask.size == (W, H) and mask.mode == "P" and np.array(mask).max() < K
        assert Image.open(tmp_path / "p" / f"test{i}_overlay.png").size == (2 * W + 4, H)
    model, _ = load_seg_model(seg_run)
    from linvision.segmentation import SegmentationDataset, build_seg_transform
    x, _ = SegmentationDataset(seg_data, "test", build_seg_transform(False))[0]
    with torch.no_grad():
        assert np.array_equal(np.array(Image.open(tmp_path / "p" / "test0_mask.png")),
                              model(x[None])[0].argmax(0).numpy())
    rc, _, err = run(capsys, "segment", "predict", "--checkpoint", seg_run, tmp_path / "nope.png",
                     "--output", tmp_path / "p", "--threads", "1")
    assert rc == 2 and err.strip().count("\n") == 0 and "image not found" in err


def test_resume_finished_run_extends_or_refuses(seg_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(seg_run, out)
    rc, stdout, _ = run(capsys, "segment", "train", "--resume", out, "--workers", "0", "--threads", "1")
    assert rc == 0 and "epoch 2, step 4" in stdout and len(rows(out)) == 2  # nothing left to train
    rc, _, err = run(capsys, "segment", "train", "--resume", out, "--decoder", "fpn")
    assert rc == 2 and "decoder" in err and err.strip().count("\n") == 0
    rc, _, err = run(capsys, "segment", "train", "--data", seg_run.parent, *MODEL, "--output", out)
    assert rc == 2 and "already holds a run" in err
    rc, stdout, _ = run(capsys, "segment", "train", "--resume", out, "--epochs", "3", "--workers", "0")
    assert rc == 0 and "epoch 3, step 6" in stdout and [x["epoch"] for x in rows(out)] == ["1", "2", "3"]
    rc, _, err = run(capsys, "eval", "--checkpoint", out, "--threads", "1")  # a classifier command on a seg. run
    assert rc == 2 and "segment eval" in err


def test_backbone_checkpoint_from_a_classification_run(seg_data, tmp_path, capsys):
    import timm
    torch.manual_seed(1)
    args = {"num_classes": 2, "img_size": 32, "patch_size": 8}
    cls = timm.create_model("test_vrwkv", **args)
    save_model(tmp_path / "cls", cls, {"model": "test_vrwkv", "model_args": args, "class_names": ["a", "b"]})
    out = tmp_path / "seg"
    rc, _, err = run(capsys, "segment", "train", "--data", seg_data, "--backbone", "test_vrwkv",
                     "--backbone-checkpoint", tmp_path / "cls", "--decoder-channels", "32", *FAST, "--epochs", "1",
                     "--max-steps", "1", "--lr", "0", "--warmup-lr", "0", "--min-lr", "0", "--output", out)
    assert rc == 0 and "backbone weights from" in err
    model, c = load_seg_model(out)
    assert c["backbone_args"]["img_size"] == 32 and c["backbone_args"]["patch_size"] == 8
    enc, ref = model.encoder.model.state_dict(), cls.state_dict()
    shared = [k for k in enc if k in ref]
    assert len(shared) > 10 and all(torch.equal(enc[k], ref[k]) for k in shared)  # lr 0: unchanged
    rc, _, err = run(capsys, "segment", "train", "--data", seg_data, "--backbone", "test_vir",
                     "--backbone-checkpoint", tmp_path / "cls", *FAST, "--output", tmp_path / "x")
    assert rc == 2 and "holds 'test_vrwkv'" in err


def test_backbone_checkpoint_from_a_weights_file(seg_data, tmp_path, capsys):
    """A weights file goes through timm's pretrained loading (the model's checkpoint_filter_fn)."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(2)
    ref = timm.create_model("test_vrwkv", patch_size=8).state_dict()
    save_file({k: v.contiguous() for k, v in ref.items()}, tmp_path / "w.safetensors")
    rc, _, err = run(capsys, "segment", "train", "--data", seg_data, *MODEL, "--backbone-checkpoint",
                     tmp_path / "w.safetensors", *FAST, "--epochs", "1", "--max-steps", "1", "--lr", "0",
                     "--warmup-lr", "0", "--min-lr", "0", "--no-test", "--output", tmp_path / "seg")
    assert rc == 0, err
    enc = load_seg_model(tmp_path / "seg")[0].encoder.model.state_dict()
    assert all(torch.equal(enc[k], ref[k]) for k in enc)
    (tmp_path / "w.txt").write_text("x")
    rc, _, err = run(capsys, "segment", "train", "--data", seg_data, *MODEL, "--backbone-checkpoint",
                     tmp_path / "w.txt", *FAST, "--output", tmp_path / "seg2")
    assert rc == 2 and "expected a run folder or a .safetensors" in err


def _break(root: Path, case: str) -> str:
    """Damage a copy of the data set; returns a phrase the one-line error must contain."""
    if case == "size":
        Image.fromarray(np.zeros((H, W - 8), np.uint8)).save(root / "val" / "masks" / "val1.png")
        return "but its image"
    if case == "missing":
        (root / "train" / "masks" / "train2.png").unlink()
        return "has no mask"
    if case == "value":
        f = root / "train" / "masks" / "train3.png"
        m = np.array(Image.open(f))
        m[5, 5] = 7
        Image.fromarray(m).save(f)
        return "has value 7 outside the 3 classes"
    for f in (root / "test" / "images").iterdir():
        f.unlink()
    for f in (root / "test" / "masks").iterdir():
        f.unlink()
    return "empty split"


@pytest.mark.parametrize("case", ["size", "missing", "value", "empty"])
def test_bad_data_is_one_line_exit_2(seg_data, tmp_path, capsys, case):
    root = tmp_path / "bad"
    shutil.copytree(seg_data, root)
    phrase = _break(root, case)
    # --workers 1: the out-of-range value is found inside a DataLoader worker and must still be one line
    rc, _, err = run(capsys, "segment", "train", "--data", root, *MODEL, *FAST, "--workers", "1", "--epochs", "1",
                     "--output", tmp_path / "out")
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(errors) == 1 and phrase in errors[0], err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert not (tmp_path / "out" / "train_state.pt").exists()


def test_user_message_unwraps_dataloader_worker_errors():
    inner = "mask /d/m.png has value 7 outside the 3 classes"
    wrapped = LinvisionError("Caught LinvisionError in DataLoader worker process 0.\nOriginal Traceback (most "
                             "recent call last):\n  File \"x.py\", line 1, in f\n    raise LinvisionError(msg)\n"
                             f"linvision.errors.LinvisionError: {inner}\n")
    assert user_message(wrapped) == inner
    assert user_message(LinvisionError("a\nb")) == "a; b"


CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CAMVID.is_file(), reason="needs ../shared/data/camvid.tar.gz")
def test_camvid_demo_script_smoke(tmp_path):
    """scripts/camvid_demo.sh end to end on CamVid with tiny settings (test_vrwkv, 2 steps); slow because it
    resizes the data set, evaluates the val and test images and starts five Python processes."""
    import os
    import subprocess

    import linvision
    script = Path(__file__).resolve().parents[1] / "scripts" / "camvid_demo.sh"
    src = str(Path(linvision.__file__).resolve().parents[1])
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "DATA": str(CAMVID),
           "OUT": str(out), "BACKBONE": "test_vrwkv", "BACKBONE_ARGS": "--patch-size 8", "CHANNELS": "32",
           "CROP": "64 96", "EPOCHS": "1", "BATCH": "4", "PREDICT": "2", "EXTRA": "--workers 0 --threads 1",
           "TRAIN_EXTRA": "--max-steps 2", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "test_metrics.json").read_text())
    assert m["n"] == 233 and len(m["iou"]) == 11 and "sky" in m["iou"] and "test mIoU" in res.stdout
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "0001TP_008550_mask.png", "0001TP_008550_overlay.png", "0001TP_008580_mask.png", "0001TP_008580_overlay.png"]
    for f in (out / "predictions").glob("*_mask.png"):
        assert Image.open(f).size == (240, 180)  # the demo's half-resolution copy
    assert json.loads((out / "run" / "config.json").read_text())["validation"]["n"] == 101


def test_no_val_split_holds_out_train_images(seg_data, tmp_path, capsys):
    root = tmp_path / "noval"
    shutil.copytree(seg_data, root)
    shutil.rmtree(root / "val")
    out = tmp_path / "run"
    rc, stdout, err = run(capsys, "segment", "train", "--data", root, *MODEL, "--decoder", "fpn", *FAST, "--epochs",
                          "1", "--max-steps", "1", "--val-split", "3", "--no-test", "--output", out)
    assert rc == 0 and "3 validation images (held out of train/)" in err and "6 steps" not in err
    c = json.loads((out / "config.json").read_text())
    assert c["validation"] == {"source": "held out of train/", "val_split": 3.0, "seed": 0, "n": 3}
    assert c["decoder"] == "fpn" and c["model_choice"]["split"] == "val" and rows(out)[0]["val_miou"]
    assert "5 train images" in err  # 8 - 3 held out
    assert rows(out)[0]["test_miou"] == "" and c["metrics"]["split"] == "val" and "val mIoU" in stdout  # --no-test
