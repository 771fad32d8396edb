"""Surviving a kill: recovery checkpoints inside an epoch, SIGKILL, exact resume; non-finite loss keeps the last good
checkpoint."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import make_dataset
from linvision.cli import main

MODEL = ["--model", "test_vrwkv", "--img-size", "32", "--patch-size", "8"]
STEPS_PER_EPOCH = 30
# 64 training images - 3 held out for the raw/EMA choice (--val-split 0.05) = 61, batch 2: 30 steps per epoch,
# 2 epochs. Drop-path 0.1 and EMA on, so the RNG streams and the EMA must be restored too for the weights to match
# bit for bit. Output is not a terminal: --log-interval 1 logs every step ("batch k/30"), which the kill test reads.
ARGS = [*MODEL, "--epochs", "2", "--batch-size", "2", "--lr", "2e-3", "--lr-base-size", "2", "--warmup-epochs", "0.5",
        "--drop-path", "0.1", "--threads", "1", "--save-every-steps", "4", "--log-interval", "1"]
NOVAL = ["--val-split", "0"]  # tiny_data: all 16 training images, 4 steps of 4 per epoch
DROP = ("img_per_s", "epoch_seconds")


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in DROP} for r in csv.DictReader(f)]


def read_checkpoints(out):
    """Load every checkpoint file present in ``out`` (each must be complete); returns the train state or None."""
    state = None
    for name in ("train_state.pt", "model.safetensors", "config.json"):
        try:
            if name == "train_state.pt":
                state = torch.load(out / name, map_location="cpu", weights_only=True)
            elif name == "model.safetensors":
                load_file(out / name)
            else:
                json.loads((out / name).read_text())
        except FileNotFoundError:
            continue
    return state


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, capsys):
    data = make_dataset(tmp_path / "ds", n_train=32, n_test=2)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert main(["train", *ARGS, "--data", str(data), "--workers", "0", "--output", str(ref)]) == 0

    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "linvision", "train", *ARGS, "--data", str(data), "--workers", "0",
                             "--output", str(out)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    observations, state, deadline = 0, None, time.monotonic() + 240

    def shown():  # the last step its progress log printed (a lower bound: the log may lag behind)
        log_text = (tmp_path / "killed.log").read_text()
        return max((int(n) for n in re.findall(rf"(\d+)/{STEPS_PER_EPOCH} ", log_text)), default=0)

    try:
        while True:  # poll: every checkpoint file must be readable whenever we look
            assert proc.poll() is None, "training ended before it could be killed: " + \
                (tmp_path / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no recovery checkpoint appeared"
            state = read_checkpoints(out)
            observations += 1
            # kill between two recovery checkpoints, so that some steps are lost and must be redone
            if state is not None and state["epoch"] == 0 and state["batch_in_epoch"] >= 4 and (
                    shown() >= state["batch_in_epoch"] + 2 or shown() >= STEPS_PER_EPOCH - 8):
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    after = read_checkpoints(out)  # still readable after the kill
    killed_at = after["step"]
    assert after["epoch"] == 0 and 0 < after["batch_in_epoch"] < STEPS_PER_EPOCH  # mid-epoch, before any eval
    assert not (out / "model.safetensors").exists()
    with capsys.disabled():
        print(f"\nkilled after step {shown()} (at least); recovery checkpoint at step {killed_at}: "
              f">= {shown() - killed_at} step(s) lost; {observations} polls, every checkpoint readable")

    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--workers", "1"]) == 0  # another worker count: must not matter
    err = capsys.readouterr().err
    assert f"resumed {out} at epoch 0 + {killed_at}/{STEPS_PER_EPOCH} batches, step {killed_at}" in err
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # temp files of the killed write: gone

    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    sa, sb = read_checkpoints(ref), read_checkpoints(out)
    assert sa["step"] == sb["step"] == 2 * STEPS_PER_EPOCH
    for part in ("model", "ema"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part
    for i, st in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][i][k]) for k, v in st.items()), "optimizer state"
    assert rows(ref) == rows(out)  # including the losses of the interrupted epoch


def test_recovery_checkpoint_at_the_last_batch_resumes_into_evaluation(tiny_data, tmp_path, capsys):
    """A checkpoint written after an epoch's last step (before its evaluation) resumes with evaluation only."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    common = [*MODEL, *NOVAL, "--data", str(tiny_data), "--batch-size", "4", "--epochs", "1", "--workers", "0",
              "--threads", "1", "--save-every-steps", "4"]
    assert main(["train", *common, "--output", str(ref)]) == 0
    assert main(["train", *common, "--output", str(out)]) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    mid = torch.load(ref / "train_state.pt", weights_only=True)
    # rebuild the recovery point as the run wrote it just before evaluating: epoch 0, all 4 batches done
    assert state["step"] == 4
    (out / "model.safetensors").unlink()
    (out / "metrics.csv").unlink()
    state.update(epoch=0, batch_in_epoch=4, history=[], best_top1=-1.0,
                 epoch_stats=[{"seen": 16, "loss_sum": 16 * 0.5, "correct": 8, "received": 16, "seconds": 1.0}])
    torch.save(state, out / "train_state.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    assert "4/4 batches" in capsys.readouterr().err
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.load(out / "train_state.pt")["step"] == mid["step"]
    assert rows(out)[0]["train_loss"] == "0.5" and rows(out)[0]["test_top1"] == rows(ref)[0]["test_top1"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, capsys):
    """An absurd learning rate blows the weights up; the loss of the next step is non-finite. The message names
    the step; every file written before is left byte for byte, and the run can go on from it."""
    out = tmp_path / "run"
    common = [*MODEL, *NOVAL, "--data", str(tiny_data), "--batch-size", "4", "--workers", "0", "--threads", "1"]
    assert main(["train", *common, "--epochs", "2", "--max-steps", "4", "--output", str(out)]) == 0  # epoch 1
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    # a new --epochs starts a new cosine schedule from the given --lr (1e30 x 4/128 per step from step 5 on)
    rc = main(["train", "--resume", str(out), "--epochs", "3", "--lr", "1e30", "--warmup-epochs", "0"])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("linvision: error:")]
    assert rc == 2 and len(line) == 1 and "Traceback" not in err, err
    assert re.search(r"non-finite loss \((nan|inf)\) at step 6 \(epoch 2\); training stopped, the last good "
                     r"checkpoint \(epoch 1\) is kept in ", line[0]), line[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["train", "--resume", str(out)]) == 0  # the kept checkpoint is good: training completes
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 8


def test_non_finite_loss_with_recovery_checkpoints(tiny_data, tmp_path, capsys):
    """With --save-every-steps 1 the last good checkpoint is the recovery point of the step before."""
    out = tmp_path / "run"
    rc = main(["train", *MODEL, "--data", str(tiny_data), "--batch-size", "4", "--workers", "0", "--threads", "1",
               "--lr", "1e30", "--warmup-epochs", "0", "--save-every-steps", "1", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite loss (nan) at step 2 (epoch 1); training stopped, the last good checkpoint " \
                       "(epoch 1 in progress, step 1) is kept in" in err, err
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(p.name for p in out.iterdir()) == ["train_state.pt"]


def test_non_finite_gradient_stops_before_the_optimizer_step(tiny_data, tmp_path, capsys, monkeypatch):
    """A finite loss whose backward overflows (as in float16) must not reach the weights."""
    import timm.loss

    class Overflow(torch.autograd.Function):
        forward = staticmethod(lambda ctx, x: x.view_as(x))
        backward = staticmethod(lambda ctx, g: g * float("inf"))  # inf, and nan where g == 0

    out = tmp_path / "run"
    common = [*MODEL, *NOVAL, "--data", str(tiny_data), "--batch-size", "4", "--workers", "0", "--threads", "1",
              "--clip-grad", "0"]
    assert main(["train", *common, "--epochs", "2", "--max-steps", "4", "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = timm.loss.LabelSmoothingCrossEntropy.forward
    monkeypatch.setattr(timm.loss.LabelSmoothingCrossEntropy, "forward",
                        lambda self, x, t: original(self, Overflow.apply(x), t))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--save-every-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "non-finite gradient norm (nan) at step 5 (epoch 2); training stopped, the last good checkpoint " \
           "(epoch 1) is kept in" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
