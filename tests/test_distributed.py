"""Data-parallel training: 2 CPU processes under torchrun (gloo) against 1 process with the same global batch.

Tolerance. The two runs see the same images, with the same augmentation (seeded per sample by the sampler) in
the same global batches, from the same initial weights, at the same learning rate. They differ only in float32
summation order: DDP averages two half-batch gradients (each a mean over 4 images) where one process takes the
mean over 8, so gradients differ by a few ulps (~1e-7 relative) per step, which Adam (m / sqrt(v)) may amplify for
coordinates with tiny gradients. After 4 AdamW steps at lr 1e-2 (each step moves a weight by up to ~lr) the
largest weight change is 0.025 and the largest difference between the runs 1.3e-6 (5e-5 of it; measured here,
torch 2.13 CPU). We allow 1e-3 of the largest change: 20x headroom for other CPUs' kernels, yet far below what any
real difference makes (a wrong shard, batch, learning rate or a missing gradient all-reduce changes the updates
by O(lr), i.e. O(1) relative). Losses and accuracies are compared to 1e-4 (they are printed to 5 digits).
"""
import csv
import os
import subprocess
import sys

import pytest
import torch

from linvision.checkpoint import load_train_state
from linvision.cli import main
from linvision.data import SeededSampler

MODEL = ["--model", "test_vrwkv", "--img-size", "32", "--patch-size", "8"]
# tiny_data: 16 training images; global batch 8 -> 2 steps per epoch, 4 steps in all. No drop-path and no mixup:
# their masks come from per-rank RNG streams, so they could not match a single process.
COMMON = [*MODEL, "--epochs", "2", "--warmup-epochs", "0", "--lr", "1e-2", "--lr-base-size", "8", "--drop-path", "0",
          "--workers", "0", "--threads", "1", "--save-every-steps", "1", "--val-split", "0"]


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def initial_weights():
    from timm.utils import random_seed
    from linvision.engine import create_model
    random_seed(0)
    return create_model("test_vrwkv", 2, 32, 8)[0].state_dict()


def test_two_processes_match_one_with_the_same_global_batch(tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *COMMON, "--data", str(tiny_data), "--batch-size", "8", "--output", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "linvision", "train", *COMMON, "--data", str(tiny_data), "--batch-size", "4",
                           "--output", str(two)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1  # only rank 0 reports
    assert "2 process(es) on cpu, global batch 8: peak lr 0.01" in proc.stderr

    # only rank 0 wrote, and it wrote everything
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    s1, s2 = load_train_state(one), load_train_state(two)
    assert (s1["world_size"], s2["world_size"]) == (1, 2) and s1["step"] == s2["step"] == 4
    r0, r1 = s2["rng_per_rank"]  # per-rank seeding: each rank has its own RNG stream, and both were saved
    assert not torch.equal(r0["torch"], r1["torch"])

    # metrics are reduced over ranks: the same numbers as one process (train loss = mean over all 16 images)
    for a, b in zip(rows(one), rows(two), strict=True):
        assert (a["epoch"], a["step"], a["test_top1"], a["train_acc"]) == (b["epoch"], b["step"], b["test_top1"],
                                                                          b["train_acc"])
        assert a["weights"] == b["weights"] == "ema"  # no validation data (--val-split 0): EMA kept, not chosen
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= 1e-4
        assert abs(float(a["test_loss"]) - float(b["test_loss"])) <= 1e-4

    w0 = initial_weights()
    d1 = {k: s1["model"][k] - w0[k] for k in w0}
    d2 = {k: s2["model"][k] - w0[k] for k in w0}
    scale = max(v.abs().max().item() for v in d1.values())
    diff = max((d1[k] - d2[k]).abs().max().item() for k in w0)
    assert scale > 1e-2, "training did not move the weights; the comparison would be empty"
    print(f"DDP vs 1 process: largest weight change {scale:.3g}, largest difference {diff:.3g}")
    assert diff <= 1e-3 * scale, f"weight changes differ by {diff:.3g} (largest change {scale:.3g})"
    for k in s1["ema"]:
        torch.testing.assert_close(s1["ema"][k], s2["ema"][k], rtol=0, atol=1e-3 * scale)


def test_sampler_shards_are_the_single_process_batches():
    """Batch k of the ranks together is batch k of one process with a num_replicas-times larger batch."""
    full = list(SeededSampler(range(20), seed=3))
    for w in (2, 4):
        shards = [list(SeededSampler(range(20), seed=3, num_replicas=w, rank=r)) for r in range(w)]
        assert all(len(s) == 20 // w for s in shards)
        b = 2  # per-rank batch
        for k in range(20 // (w * b)):
            together = sorted(p for s in shards for p in s[k * b:(k + 1) * b])
            assert together == sorted(full[k * w * b:(k + 1) * w * b])
    odd = [list(SeededSampler(range(5), num_replicas=2, rank=r)) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 3  # padded like DistributedSampler, so every rank takes the same steps
    s = SeededSampler(range(20), seed=3, num_replicas=2, rank=1)
    s.set_epoch(0, start=4)
    assert list(s) == full[1::2][4:] and len(s) == 6


def test_resume_with_another_number_of_processes_is_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *MODEL, "--data", str(tiny_data), "--batch-size", "4", "--epochs", "2", "--workers", "0",
                 "--threads", "1", "--max-steps", "3", "--output", str(out)]) == 0
    capsys.readouterr()
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["world_size"] = 2  # as if written by a 2-process run
    torch.save(state, out / "train_state.pt")
    before = (out / "train_state.pt").read_bytes()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "with 1 process(es): it was trained with 2" in err and "Traceback" not in err
    assert (out / "train_state.pt").read_bytes() == before


@pytest.mark.parametrize("given,expected", [("128", 0.01 * 4 / 128), ("4", 0.01)])
def test_lr_is_linear_in_the_global_batch(tiny_data, tmp_path, given, expected, capsys):
    """--lr is the peak lr at a global batch of --lr-base-size (default 128): the scheduler's base lr scales."""
    out = tmp_path / "run"
    assert main(["train", *MODEL, "--data", str(tiny_data), "--batch-size", "4", "--epochs", "1", "--workers", "0",
                 "--threads", "1", "--max-steps", "1", "--lr", "0.01", "--lr-base-size", given, "--output",
                 str(out)]) == 0
    base = load_train_state(out)["scheduler"]["base_values"]  # one per parameter group
    assert base and all(v == pytest.approx(expected, rel=1e-12) for v in base)


# --------------------------------------------------------------------------------------------------- super-network
# Super-network on uneven shards: 2 classes x 12 training images, 2 held out for the search -> 22 training images,
# not a multiple of the global batch 8 (nor of 2 x 4). Each rank's padded share is 11 images -> 2 full batches of 4
# (the last 3 dropped on both ranks); one process takes 22 -> 2 full batches of 8 (the last 6 dropped): the same
# 16 images in the same 2 global batches. The sub-networks are drawn per step from (seed, step), the same on every
# rank, and the image at global position p runs sub-network p mod (archs per step x processes), so both runs train
# the same sub-networks on the same images.
# BatchNorm: the ViT-ResNAS stem has BatchNorm layers, which under DDP normalize over each rank's 4 images, not
# the global 8 (SyncBatchNorm, which the loop uses on CUDA, has no CPU implementation). That is a property of
# DDP, not of the loop, and it makes the runs differ by design (measured: train loss 0.839 vs 0.840 after one
# step; L2 of the weight-change difference 19 % of the change after 4 steps). To compare the loop itself, both
# runs here use BatchNorm with its (initial) running statistics, i.e. a fixed affine map; then the runs differ
# only in float32 summation order, and the tolerance is the classification test's: 1e-3 of the largest weight
# change (measured: change 0.139, difference 1.1e-5, i.e. 8e-5 of it); losses to 1e-4. No drop-path (per-rank
# RNG streams); choice warm-up 0.5 rewires only at epoch 0, on the
# identical initial weights.
SN = ["supernet", "train", "--space", "test", "--holdout", "2", "--workers", "0", "--threads", "1", "--epochs", "2",
      "--choice-warmup-epochs", "0.5", "--warmup-epochs", "0", "--lr", "1e-2", "--drop-path", "0",
      "--save-every-steps", "1"]
FROZEN_BN = """import sys
import torch.nn.functional as F

_batch_norm = F.batch_norm


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    # BatchNorm with its running statistics, in training too (see test_distributed.py)
    return _batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)


F.batch_norm = batch_norm
if __name__ == "__main__":
    from linvision.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def test_supernet_two_processes_on_uneven_shards_match_one(tmp_path, capsys, monkeypatch):
    from conftest import make_dataset
    from linvision.nas.space import get_space
    from linvision.nas.supernet import ResNASSuperNet
    script = tmp_path / "frozen_bn.py"
    script.write_text(FROZEN_BN)
    import torch.nn.functional as F
    original = F.batch_norm
    exec(compile(FROZEN_BN, str(script), "exec"), {"__name__": "frozen_bn"})  # patches F.batch_norm
    patched, F.batch_norm = F.batch_norm, original
    monkeypatch.setattr(F, "batch_norm", patched)  # undone after the test
    data = make_dataset(tmp_path / "ds", n_train=12, n_test=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*SN, "--data", str(data), "--batch-size", "8", "--archs-per-step", "4", "--output", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *SN, "--data", str(data), "--batch-size", "4", "--archs-per-step", "2",
                           "--output", str(two)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1 and "22 train / 2 held-out images, 2 steps/epoch x 2 rank(s)" in proc.stderr
    s1, s2 = load_train_state(one), load_train_state(two)
    assert (s1["world_size"], s2["world_size"]) == (1, 2) and s1["step"] == s2["step"] == 4
    for a, b in zip(rows(one), rows(two), strict=True):
        assert (a["epoch"], a["step"], a["train_acc"], a["holdout_top1_largest"]) == \
               (b["epoch"], b["step"], b["train_acc"], b["holdout_top1_largest"])
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= 1e-4

    from timm.utils import random_seed
    random_seed(0)
    w0 = ResNASSuperNet(get_space("test"), img_size=56, num_classes=2).state_dict()
    w0 = {k: v for k, v in w0.items() if v.is_floating_point()}
    d1 = {k: s1["model"][k] - w0[k] for k in w0}
    d2 = {k: s2["model"][k] - w0[k] for k in w0}
    scale = max(v.abs().max().item() for v in d1.values())
    diff = max((d1[k] - d2[k]).abs().max().item() for k in w0)
    assert scale > 1e-2, "training did not move the weights; the comparison would be empty"
    with capsys.disabled():
        print(f"\nsuper-network DDP vs 1 process: largest weight change {scale:.3g}, largest difference {diff:.3g}")
    assert diff <= 1e-3 * scale, f"weight changes differ by {diff:.3g} (largest change {scale:.3g})"

    # the super-network's resume checks the number of processes too
    capsys.readouterr()
    assert main(["supernet", "train", "--resume", str(two), "--epochs", "3"]) == 2
    assert "with 1 process(es): it was trained with 2" in capsys.readouterr().err


def test_supernet_shards_take_the_same_number_of_steps(tiny_data):
    """15 images, 2 ranks, batch 4: the padded shards give both ranks 2 steps (slicing without padding gave 8 and
    7 images, i.e. 2 and 1 steps: a DDP hang)."""
    from linvision.data import build_train_loader
    from linvision.engine import model_data_config
    dc = model_data_config("test_vrwkv", 32, True)
    lens = [len(build_train_loader(tiny_data, dc, 4, num_workers=0, indices=range(15), num_replicas=2, rank=r))
            for r in range(2)]
    assert lens == [2, 2]


@pytest.mark.slow  # ~45 s on 2 busy CPU cores (two torchrun processes)
def test_segmentation_two_processes_report_whole_split_metrics(tmp_path, capsys):
    """`segment train` under torchrun (2 gloo processes): every val/test image is evaluated once over the ranks
    and the confusion matrices and loss sums are reduced, so the mIoU / pixel accuracy / loss in metrics.csv are
    exactly those of the saved weights evaluated by one process."""
    import json

    from test_segment_cli import FAST, MODEL, make_seg_data
    data = make_seg_data(tmp_path / "seg", n=(8, 3, 5))  # odd val/test sizes: uneven shards
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "linvision", "segment", "train", "--data", str(data), *MODEL, *FAST,
                           "--batch-size", "2", "--epochs", "1", "--drop-path", "0", "--output", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1 and load_train_state(out)["world_size"] == 2
    row = rows(out)[-1]
    assert json.loads((out / "config.json").read_text())["metrics"]["n"] == 5  # all test images, both shards
    for split in ("val", "test"):
        rc = main(["segment", "eval", "--checkpoint", str(out), "--split", split, "--json", "--workers", "0",
                   "--threads", "1"])
        m = json.loads(capsys.readouterr().out)
        assert rc == 0 and m["n"] == (3 if split == "val" else 5)
        assert abs(m["miou"] - float(row[f"{split}_miou"])) <= 1e-3, split
        assert abs(m["acc"] - float(row[f"{split}_acc"])) <= 1e-3, split
        assert abs(m["loss"] - float(row[f"{split}_loss"])) <= 1e-4, split
