"""Training recipes and the schedule derived from the run's length (engine/recipe.py, issue 15)."""
import json
import math

import pytest
import torch

from conftest import TEST_MODELS, run
from linvision.engine import recipe as R
from linvision.engine.recipe import default_batch_size, resolve_schedule


@pytest.mark.parametrize("n, world, expect", [(4750, 1, 64), (50000, 1, 128), (8192, 1, 128), (8191, 1, 64),
                                              (2048, 1, 32), (1000, 1, 8), (500, 1, 8), (12, 1, 8), (4750, 4, 16),
                                              (500, 2, 8), (10 ** 7, 8, 16), (100000, 4, 32)])
def test_default_batch_size(n, world, expect):
    b = default_batch_size(n, world)
    assert b == expect
    g = b * world
    assert n // g >= R.MIN_STEPS_PER_EPOCH or b == 8 or g == 8 * world  # enough steps, or the floor
    if g < 128:
        assert n // (2 * g) < R.MIN_STEPS_PER_EPOCH  # halved only because the larger batch had too few steps


def test_auto_recipe_by_run_length():
    short = resolve_schedule({"epochs": 10}, 37)  # 370 steps
    assert (short["recipe"], short["total_steps"]) == ("short", 370) and "auto" in short["recipe_reason"]
    edge = resolve_schedule({"epochs": R.AUTO_SHORT_MAX_EPOCHS}, 10009)  # large data, few passes: short
    assert edge["recipe"] == "short"
    long = resolve_schedule({"epochs": R.AUTO_SHORT_MAX_EPOCHS + 1}, 4)
    assert long["recipe"] == "deit"
    assert resolve_schedule({"epochs": 300, "recipe": "short"}, 390)["recipe"] == "short"
    assert resolve_schedule({"epochs": 3, "recipe": "DEIT"}, 37)["recipe"] == "deit"
    with pytest.raises(ValueError, match="--recipe"):
        resolve_schedule({"epochs": 3, "recipe": "fast"}, 37)


@pytest.mark.parametrize("name", list(R.RECIPES))
@pytest.mark.parametrize("epochs, spe", [(1, 4), (3, 37), (10, 37), (30, 37), (300, 390)])
def test_schedule_follows_the_run(name, epochs, spe):
    rec = R.RECIPES[name]
    s = resolve_schedule({"epochs": epochs, "recipe": name}, spe)
    total = epochs * spe
    assert s["total_steps"] == total and s["given"] == []
    assert (s["lr"], s["drop_path"], s["smoothing"]) == (rec.peak_lr(None), rec.drop_path, rec.smoothing)
    assert s["opt"] == rec.optimizer(None) == "adamw"
    # warm-up: a fraction of the run, capped; never longer than the run
    assert s["warmup_epochs"] == pytest.approx(min(rec.warmup_epochs_max, rec.warmup_frac * epochs))
    assert s["warmup_epochs"] < epochs and s["warmup_steps"] == round(s["warmup_epochs"] * spe)
    # EMA: horizon 1 / (1 - decay) = ema_frac of the run's steps, within [0.9, cap]
    assert R.EMA_DECAY_MIN <= s["ema_decay"] <= rec.ema_decay_max
    horizon = 1 / (1 - s["ema_decay"])
    if R.EMA_DECAY_MIN < s["ema_decay"] < rec.ema_decay_max:
        assert horizon == pytest.approx(rec.ema_frac * total)
    assert s["ema_horizon_steps"] == pytest.approx(horizon, abs=0.06)
    assert horizon <= max(10.0, rec.ema_frac * total) + 1e-6  # never averages over more than its share of the run


def test_long_deit_run_is_the_old_recipe():
    """300 epochs on ImageNet-size data with --recipe deit: the old fixed defaults (2 warm-up epochs, EMA 0.998)."""
    s = resolve_schedule({"epochs": 300, "recipe": "deit"}, 10009)
    assert (s["lr"], s["warmup_epochs"], s["ema_decay"], s["drop_path"], s["smoothing"]) == (1e-3, 2.0, 0.998,
                                                                                             0.1, 0.1)


def test_given_values_win():
    given = {"epochs": 3, "lr": 5e-4, "warmup_epochs": 0.0, "ema_decay": 0.99, "drop_path": 0.2, "smoothing": 0.0,
             "opt": "sgd"}
    s = resolve_schedule(given, 37)
    assert {k: s[k] for k in R.DERIVED_KEYS} == {k: given[k] for k in R.DERIVED_KEYS}
    assert sorted(s["given"]) == sorted(R.DERIVED_KEYS)
    assert "(given)" in R.describe(s, 128)
    line = R.describe(resolve_schedule({"epochs": 3}, 37), 128)
    assert "recipe short" in line and "optimizer adamw" in line and "(given)" not in line and "EMA decay" in line


@pytest.mark.parametrize("model, linear", [("vrwkv_tiny", True), ("vir_tiny", True), ("vir2d_tiny", True),
                                           ("vrwkv6_tiny", True), ("test_vrwkv", True), ("vit_resnas_tiny", False),
                                           ("deit_tiny_patch16_224", False), ("resnet18", False), (None, False)])
def test_short_recipe_lr_by_token_mixer(model, linear):
    """short: 2e-3 for Vision-RWKV / ViR (linear token mixers), 1e-3 for softmax attention and the rest (README
    table: DeiT-T at 2e-3 lost 4.6 points at 10 epochs, at 1e-3 it equals the old defaults); deit: 1e-3 for all."""
    assert R.linear_mixer(model) is linear
    assert resolve_schedule({"epochs": 3, "model": model}, 74)["lr"] == (2e-3 if linear else 1e-3)
    assert resolve_schedule({"epochs": 3, "model": model, "recipe": "deit"}, 74)["lr"] == 1e-3
    assert resolve_schedule({"epochs": 3, "model": model, "lr": 3e-4}, 74)["lr"] == 3e-4  # given wins


@pytest.mark.parametrize("model, opt", [("vrwkv_tiny", "nadamw"), ("vrwkv_large", "nadamw"), ("test_vrwkv", "nadamw"),
                                        ("vrwkv6_tiny", "adamw"), ("vir_tiny", "adamw"), ("deit_tiny_patch16_224",
                                                                                          "adamw"), (None, "adamw")])
def test_short_recipe_optimizer_by_model(model, opt):
    """short: NAdamW for Vision-RWKV (README table: +1.8 points at 3 epochs over 3 seeds), AdamW for the others
    (ViR lost 2.3 points with NAdamW); deit: AdamW for all; a given --opt wins."""
    assert resolve_schedule({"epochs": 3, "model": model}, 74)["opt"] == opt
    assert resolve_schedule({"epochs": 3, "model": model, "recipe": "deit"}, 74)["opt"] == "adamw"
    assert resolve_schedule({"epochs": 3, "model": model, "opt": "sgd"}, 74)["opt"] == "sgd"


def test_ema_decay_formula():
    s = resolve_schedule({"epochs": 10, "recipe": "short"}, 37)
    assert s["ema_decay"] == pytest.approx(1 - 1 / 37)
    assert resolve_schedule({"epochs": 1}, 5)["ema_decay"] == R.EMA_DECAY_MIN  # tiny run: clamped
    assert math.isclose(resolve_schedule({"epochs": 100, "recipe": "deit"}, 1000)["ema_decay"], 0.998)


@pytest.fixture
def model():
    name = next(iter(TEST_MODELS))
    return name, TEST_MODELS[name]


def test_train_logs_and_records_the_schedule(model, tiny_data, tmp_path, capsys):
    name, margs = model
    out = tmp_path / "run"
    common = ["train", "--model", name, *margs, "--data", tiny_data, "--epochs", "2", "--workers", "0",
              "--threads", "1", "--max-steps", "1"]
    rc, _, err = run(capsys, *common, "--output", out)
    assert rc == 0 and "recipe short (auto: 2 epochs <= 20)" in err
    s = json.loads((out / "config.json").read_text())["schedule"]
    assert s["recipe"] == "short" and s["batch_size"] == 8  # 12 training images: the smallest default batch
    assert (s["opt"], s["lr"], s["drop_path"], s["given"]) == ("nadamw", R.RECIPES["short"].peak_lr(name), 0.0, [])
    groups = torch.load(out / "train_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert "amsgrad" not in groups[0]  # timm's NAdamW (torch's AdamW has an amsgrad flag)
    assert s["warmup_epochs"] == pytest.approx(0.2) and s["ema_decay"] == R.EMA_DECAY_MIN

    out2 = tmp_path / "run2"
    rc, _, _ = run(capsys, *common, "--output", out2, "--recipe", "deit", "--drop-path", "0.05", "--batch-size", "4")
    assert rc == 0
    s = json.loads((out2 / "config.json").read_text())["schedule"]
    assert (s["recipe"], s["opt"], s["lr"], s["drop_path"]) == ("deit", "adamw", 1e-3, 0.05)
    assert (s["batch_size"], s["given"]) == (4, ["drop_path"])
    assert "amsgrad" in torch.load(out2 / "train_state.pt", weights_only=True)["optimizer"]["param_groups"][0]
    # a resumed run keeps the recipe auto chose, even when its new length would choose another
    rc, _, _ = run(capsys, "train", "--resume", out, "--epochs", str(R.AUTO_SHORT_MAX_EPOCHS + 5), "--workers", "0",
                   "--threads", "1", "--max-steps", "1")
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["schedule"]["recipe"] == "short"


@pytest.mark.parametrize("name", list(R.RECIPES))
def test_recipe_constants_are_sane(name):
    r = R.RECIPES[name]
    assert 0 < r.warmup_frac < 1 and 0 < r.ema_frac <= 1 and R.EMA_DECAY_MIN <= r.ema_decay_max < 1
    assert math.isfinite(r.lr) and r.lr > 0
    assert r.lr_linear_mixer is None or (math.isfinite(r.lr_linear_mixer) and r.lr_linear_mixer > 0)


def test_docstring_examples():
    import doctest
    assert doctest.testmod(R).failed == 0
