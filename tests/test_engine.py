"""The engine's one loop: model choice on validation data (never on the test split), the validation sources,
and progress without a terminal."""
import csv
import json
import shutil

from conftest import make_dataset, run
from linvision.data import holdout_split

MODEL = ["--model", "test_vrwkv", "--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--epochs", "1",
         "--workers", "0", "--threads", "1"]


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_holdout_split_is_seeded_class_balanced_and_keeps_one_per_class():
    targets = [0] * 10 + [1] * 10
    kept, held = holdout_split(targets, 0.05, seed=0, min_per_class=True)  # round(1.0) = 1 -> 1 per class
    assert sorted(targets[i] for i in held) == [0, 1] and sorted(kept + held) == list(range(20))
    assert holdout_split(targets, 0.05, seed=0, min_per_class=True) == (kept, held)
    assert holdout_split(targets, 0.05, seed=1, min_per_class=True) != (kept, held)
    assert len(holdout_split(targets, 0.05)[1]) == 1  # the super-network's --holdout: exactly as asked
    assert len(holdout_split(targets, 3)[1]) == 3  # a count
    assert len(holdout_split([0] * 19 + [1], 0.1, min_per_class=True)[1]) == 2  # a 1-image class: no minimum


def test_raw_or_ema_is_chosen_on_held_out_training_images(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", *MODEL, "--data", tiny_data, "--output", out)
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    # 16 training images, --val-split 0.05 -> round(0.8) = 1, raised to 1 per class = 2 held out (seed 0)
    assert config["validation"] == {"source": "held out of train/", "val_split": 0.05, "seed": 0, "n": 2}
    choice = config["model_choice"]
    assert choice["split"] == "val" and set(choice["scores"]) == {"raw", "ema"}
    assert choice["weights"] == max(choice["scores"], key=lambda k: (choice["scores"][k], k == "raw"))
    assert config["weights"] == choice["weights"] and config["metrics"]["n"] == 8  # test: reported, all 8 images
    (r,) = rows(out)
    assert r["weights"] == choice["weights"] and r["val_top1"] == r[f"val_top1_{r['weights']}"]
    assert {"val_top1_raw", "val_top1_ema", "test_top1"} <= set(r) and "test_top1_raw" not in r
    assert f"kept the {choice['weights']} weights (" in err and choice["reason"] in err
    assert choice["reason"] == ("equal val top1: raw kept" if len(set(choice["scores"].values())) == 1 else
                                "higher val top1")
    assert "model choice: raw/EMA weights by top-1 on 2 validation images (held out of train/)" in err
    assert "14 train / 8 test images" in err
    # not a terminal: no tqdm bar (each refresh would be a carriage-return line), one line per epoch
    assert "\r" not in err and sum(line.startswith("epoch 1/1 step 3:") for line in err.splitlines()) == 1


def test_val_folder_is_used_for_choice_and_none_keeps_ema(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds", n_train=8, n_test=4)
    extra = make_dataset(tmp_path / "extra", n_train=1, n_test=3)
    shutil.copytree(extra / "test", data / "val")  # 2 x 3 validation images next to test/
    out = tmp_path / "val"
    rc, _, err = run(capsys, "train", *MODEL, "--data", data, "--output", out)
    config = json.loads((out / "config.json").read_text())
    assert rc == 0 and config["validation"] == {"source": "val/ split", "n": 6}
    assert config["model_choice"]["split"] == "val" and config["metrics"]["n"] == 8  # test/ stays the report
    assert "16 train / 8 test images" in err  # nothing held out of train/

    out = tmp_path / "none"
    rc, _, err = run(capsys, "train", *MODEL, "--data", tmp_path / "extra", "--val-split", "0", "--output", out)
    config = json.loads((out / "config.json").read_text())
    assert rc == 0 and config["weights"] == "ema" and config["model_choice"]["split"] is None
    assert "no validation data" in config["model_choice"]["reason"] and rows(out)[0]["val_top1"] == ""


def test_supernet_resumes_inside_an_epoch_bit_for_bit(tiny_data, tmp_path, capsys, monkeypatch):
    """The super-network gets the loop's recovery checkpoints: a run stopped after step 4 (inside epoch 2 of 3
    steps each) and resumed equals the uninterrupted run exactly (sub-networks drawn from (seed, step))."""
    import pytest
    import torch
    from safetensors.torch import load_file
    from linvision.nas.train import SupernetTask
    sn = ["supernet", "train", "--space", "test", "--batch-size", "4", "--archs-per-step", "2", "--holdout", "4",
          "--workers", "0", "--threads", "1", "--choice-warmup-epochs", "1", "--warmup-epochs", "0.5", "--epochs", "2",
          "--save-every-steps", "2", "--data", tiny_data]
    assert run(capsys, *sn, "--output", tmp_path / "ref")[0] == 0
    step = SupernetTask.train_step

    def killed_at_step_5(self, net, batch, info):
        if info.step == 4:
            raise RuntimeError("killed")
        return step(self, net, batch, info)

    monkeypatch.setattr(SupernetTask, "train_step", killed_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        run(capsys, *sn, "--output", tmp_path / "b")
    monkeypatch.undo()
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 1, 4)
    rc, _, err = run(capsys, "supernet", "train", "--resume", tmp_path / "b", "--workers", "0")
    assert rc == 0 and "at epoch 1 + 1/3 batches, step 4" in err
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("img_per_s", "epoch_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "ref")] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "b")]
