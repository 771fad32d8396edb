"""scripts/recipe_sweep.py: the jobs file, the per-configuration summary, bad input, and (slow) a real sweep."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recipe_sweep.py"
_spec = importlib.util.spec_from_file_location("recipe_sweep", SCRIPT)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_read_jobs_parses_names_options_and_comments(tmp_path):
    f = tmp_path / "jobs.txt"
    f.write_text("# a comment\n\nbase_s0 | --seed 0\n  wu03_s1|--seed 1 --warmup-epochs 0.3  # shorter warm-up\n"
                 "plain |\n")
    assert sweep.read_jobs(f) == [("base_s0", "--seed 0"), ("wu03_s1", "--seed 1 --warmup-epochs 0.3"),
                                  ("plain", "")]


@pytest.mark.parametrize("text, message", [
    ("base_s0 --seed 0\n", "jobs.txt:1: expected 'NAME | train options'"),
    ("ok | --seed 0\nbad name | --seed 1\n", "jobs.txt:2: expected"),
    ("a | --seed 0\na | --seed 1\n", "jobs.txt:2: run name 'a' given twice"),
])
def test_read_jobs_rejects_malformed_lines(tmp_path, text, message):
    f = tmp_path / "jobs.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        sweep.read_jobs(f)


def test_main_bad_input_one_line_exit_2(tmp_path, capsys):
    assert sweep.main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.txt does not exist" in err and "\n" not in err
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a | --seed 0\n")
    assert sweep.main([str(jobs), "--out", str(tmp_path / "o"), "--parallel", "0"]) == 2
    assert "--parallel must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was started


def test_last_metrics_and_summary(tmp_path):
    run = tmp_path / "base_s0"
    run.mkdir()
    assert sweep.last_metrics(run) == {}
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "test_top1", "val_top1", "train_loss", "weights"])
        w.writeheader()
        w.writerow(dict(epoch=1, test_top1="30.0", val_top1="31.0", train_loss="2.0", weights="ema"))
        w.writerow(dict(epoch=2, test_top1="40.5", val_top1="41.0", train_loss="1.8", weights="raw"))
    m = sweep.last_metrics(run)
    assert (m["test_top1"], m["epochs"], m["weights"]) == ("40.5", "2", "raw")
    assert sweep.config_name("wu03_s12") == "wu03" and sweep.config_name("p4") == "p4"
    table = sweep.summarize([
        dict(name="base_s0", test_top1="40.5", val_top1="41.0"), dict(name="base_s1", test_top1="39.5",
                                                                       val_top1="43.0"),
        dict(name="wu03_s0", test_top1="42.0", val_top1=""), dict(name="broken_s0", test_top1=""),
    ]).splitlines()
    assert table[2] == "| base | 2 | 40.5 / 39.5 | 40.00 | 42.00 |"
    assert table[3] == "| wu03 | 1 | 42.0 | 42.00 | |"
    assert len(table) == 4  # a run without results is not a configuration row


@pytest.mark.slow
def test_sweep_runs_train_and_tabulates(tmp_path, capsys):
    """Two real (tiny) training runs side by side on CPU; results.csv holds their last metrics rows."""
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("tiny_s0 | --seed 0 --epochs 1 --max-steps 2 --train-subset 64 --no-ema\n"
                    "tiny_s1 | --seed 1 --epochs 1 --max-steps 2 --train-subset 64 --no-ema\n")
    out = tmp_path / "sweep"
    assert sweep.main([str(jobs), "--out", str(out), "--parallel", "2", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["name"] for r in rows) == ["tiny_s0", "tiny_s1"]
    for r in rows:
        assert r["rc"] == "0" and r["epochs"] == "1" and 0.0 <= float(r["test_top1"]) <= 100.0
        assert (out / "runs" / r["name"] / "model.safetensors").is_file()
    assert "| tiny | 2 |" in capsys.readouterr().out
