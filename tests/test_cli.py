"""CLI: train / eval / predict / resume on a tiny generated data set, and one-line errors.

The models trained here come from ``conftest.TEST_MODELS``.
"""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEST_MODELS, run
from linvision.cli import MAIN_JOB, main, train_args

FAST = ["--epochs", "2", "--batch-size", "4", "--workers", "0", "--warmup-epochs", "1", "--threads", "1"]


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train(capsys, model, data, out, *extra):
    name, args = model
    return run(capsys, "train", "--model", name, *args, "--data", data, "--output", out, *FAST, *extra)


@pytest.fixture(scope="module", params=list(TEST_MODELS))
def checkpoint(request, tmp_path_factory, tiny_data):
    """A run folder trained for 2 steps (module-wide, read-only for tests)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["train", "--model", request.param, *TEST_MODELS[request.param], "--data", str(tiny_data),
                 "--output", str(out), *FAST, "--max-steps", "2"]) == 0
    return out


def test_train_eval_predict_resume(test_model, tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    rc, stdout, _ = train(capsys, test_model, tiny_data, out, "--max-steps", "3")
    assert rc == 0 and "test top-1" in stdout
    for f in ("model.safetensors", "config.json", "train_state.pt", "metrics.csv", "curves.png"):
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == test_model[0] and config["class_names"] == ["blue", "red"]
    assert (config["epoch"], config["step"]) == (1, 3) and len(rows(out)) == 1

    # eval --json through the real entry point: stdout is exactly one JSON object
    proc = subprocess.run([sys.executable, "-m", "linvision", "eval", "--checkpoint", out, "--data", tiny_data,
                           "--json", "--workers", "0", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["loss"] > 0 and res["n"] == 8
    assert set(res["per_class"]) == {"blue", "red"}

    rc, stdout, _ = run(capsys, "predict", "--checkpoint", out, "--json", "--top-k", "2",
                        tiny_data / "test" / "red" / "000.jpg", tiny_data / "test" / "blue" / "001.jpg")
    preds = json.loads(stdout)["results"]
    assert rc == 0 and len(preds) == 2 and preds[0]["image"].endswith("000.jpg")
    assert {p["class"] for p in preds[1]["predictions"]} == {"blue", "red"}
    assert abs(sum(p["prob"] for p in preds[0]["predictions"]) - 1) < 1e-4

    # a non-finite loss stops with a message naming the step and keeps the last good checkpoint
    weights, state = (out / "model.safetensors").read_bytes(), (out / "train_state.pt").read_bytes()
    import timm.loss
    monkeypatch.setattr(timm.loss.LabelSmoothingCrossEntropy, "forward", lambda self, x, t: x.sum() * float("nan"))
    rc, _, err = run(capsys, "train", "--resume", out, "--workers", "0")
    assert rc == 2 and "non-finite loss" in err and "step 4" in err and "checkpoint (epoch 1)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()[-1]) > 20
    assert (out / "model.safetensors").read_bytes() == weights and (out / "train_state.pt").read_bytes() == state
    monkeypatch.undo()

    rc, _, _ = run(capsys, "train", "--resume", out, "--workers", "0")
    config = json.loads((out / "config.json").read_text())
    # 16 training images - 2 held out for the raw/EMA choice (--val-split 0.05, at least 1 per class) = 14: 3 steps
    assert rc == 0 and (config["epoch"], config["step"]) == (2, 6) and [r["epoch"] for r in rows(out)] == ["1", "2"]
    rc, stdout, _ = run(capsys, "train", "--resume", out)  # already complete: nothing to do
    assert rc == 0 and "epoch 2" in stdout


def test_resume_matches_uninterrupted_run(test_model, tiny_data, tmp_path, capsys):
    """Stopping at the end of epoch 1 and resuming gives bit-identical weights and metrics to one straight run."""
    assert train(capsys, test_model, tiny_data, tmp_path / "a")[0] == 0
    assert train(capsys, test_model, tiny_data, tmp_path / "b", "--max-steps", "3")[0] == 0  # 14 images / 4
    assert json.loads((tmp_path / "b" / "config.json").read_text())["epoch"] == 1
    assert run(capsys, "train", "--resume", tmp_path / "b", "--workers", "0")[0] == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("img_per_s", "epoch_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "a")] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "b")]


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("linvision: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]


def test_unknown_model(tiny_data, capsys):
    rc, _, err = run(capsys, "train", "--model", "deit_tiny_patch16", "--data", tiny_data)
    one_line_error(rc, err, "unknown model 'deit_tiny_patch16'", "deit_tiny_patch16_224")


def test_missing_paths(tmp_path, capsys, checkpoint):
    one_line_error(*run(capsys, "train", "--data", tmp_path / "nope", "--model", "resnet18")[::2], "nope")
    one_line_error(*run(capsys, "eval", "--checkpoint", tmp_path / "gone")[::2], "gone")
    one_line_error(*run(capsys, "eval", "--checkpoint", checkpoint, "--data", tmp_path / "nodata")[::2], "nodata")
    one_line_error(*run(capsys, "predict", "--checkpoint", checkpoint, tmp_path / "x.jpg")[::2], "x.jpg")


def test_predict_non_image(tmp_path, capsys, checkpoint):
    bad = tmp_path / "photo.jpg"
    bad.write_text("this is text")
    one_line_error(*run(capsys, "predict", "--checkpoint", checkpoint, bad)[::2], "cannot decode", "photo.jpg")


def test_bad_checkpoints(tmp_path, capsys, checkpoint):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    config = json.loads((ck / "config.json").read_text())
    config["model_args"]["num_classes"] = 3
    (ck / "config.json").write_text(json.dumps(config))
    rc, _, err = run(capsys, "eval", "--checkpoint", ck)
    one_line_error(rc, err, "model.safetensors", "does not match", "shape mismatch")
    (ck / "model.safetensors").write_bytes(b"\x00" * 100)
    one_line_error(*run(capsys, "eval", "--checkpoint", ck)[::2], "model.safetensors", "not a valid safetensors")


def test_debug_shows_traceback(tmp_path):
    from linvision.errors import LinvisionError
    with pytest.raises(LinvisionError, match="does not exist"):
        main(["eval", "--checkpoint", str(tmp_path / "gone"), "--debug"])


def test_resume_guards(tmp_path, capsys, checkpoint):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir)
    one_line_error(*run(capsys, "train", "--resume", run_dir, "--img-size", "64")[::2], "cannot resume", "--img-size")
    name = json.loads((run_dir / "config.json").read_text())["model"]
    one_line_error(*run(capsys, "train", "--model", name, "--output", run_dir)[::2], "already holds a run")


def test_train_args_merge(tmp_path, checkpoint):
    assert vars(train_args({}))["model"] == MAIN_JOB["model"]
    assert train_args({}).output.startswith(os.path.join("runs", MAIN_JOB["model"]))
    a = train_args({"resume": str(checkpoint), "epochs": 9})
    stored = torch.load(checkpoint / "train_state.pt", weights_only=True)["args"]
    assert a.model == stored["model"] and a.batch_size == 4 and a.epochs == 9 and a.output == str(checkpoint)


def test_help_has_examples(capsys):
    for cmd in ("train", "eval", "predict"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and "examples:" in capsys.readouterr().out


def test_checkpoint_files_tied_weights_and_atomicity(tmp_path):
    from linvision.checkpoint import load_state_dict, load_train_state, save_model, save_train_state
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5))
    model[1].weight = model[0].weight  # tied: safetensors refuses shared storage unless handled
    save_model(tmp_path, model, {"model": "none", "model_args": {}})
    sd = load_state_dict(tmp_path / "model.safetensors")
    assert torch.equal(sd["0.weight"], sd["1.weight"]) and json.loads((tmp_path / "config.json").read_text())
    save_train_state(tmp_path, {"epoch": 3, "rng": torch.get_rng_state(), "args": {"lr": 1e-3, "data": None}})
    assert load_train_state(tmp_path)["epoch"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
    assert oct((tmp_path / "config.json").stat().st_mode & 0o777) != "0o600"
