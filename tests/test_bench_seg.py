"""`linvision bench --suite seg`: segmentation models (backbone + UPerNet-64) at H x W sizes, on tiny backbones and
sizes (no timing assertions: the numbers only have to exist and be consistent)."""
from __future__ import annotations

import csv
import json

import pytest

import linvision  # noqa: F401
from linvision import bench
from linvision.cli import main
from linvision.engine.segmentation import build_seg_model
from linvision.errors import LinvisionError

# Tiny stand-ins: linvision's test models and the two references (DeiT-T, Swin-T) by their timm names, narrowed by
# kwargs (the ratio columns pick the references by architecture name).
DEIT = "deit_tiny_patch16_224:depth=1,embed_dim=48,num_heads=1"
SWIN = "swin_tiny_patch4_window7_224:embed_dim=24"
SIZES = "90x120,45x60"  # non-square; given unsorted


def _cfg(**kw):
    base = dict(suite="seg", seg_sizes=SIZES, iters=1, warmup=1, min_time=0.0, threads=1, batch_size=1,
                isolate=False, progress=False, gemm_n=256)
    base.update(kw)
    return bench.BenchConfig(**base)


def test_parse_sizes():
    assert bench.parse_sizes(None) == [(360, 480), (720, 960), (1440, 1920)] == list(bench.SEG_SIZES)
    assert bench.parse_sizes("720x960, 360X480,64,360x480") == [(64, 64), (360, 480), (720, 960)]
    for bad in ("360by480", "0x480", "360x", "-1x2", ",", "360x480x2"):
        with pytest.raises(LinvisionError, match="--seg-sizes"):
            bench.parse_sizes(bad)


def test_seg_suite_tiny(tmp_path):
    out = tmp_path / "seg"
    meta, records = bench.run_seg(_cfg(models=["test_vrwkv", "test_vir", DEIT, SWIN]), out)
    assert [(r["model"], r["resolution"]) for r in records] == [
        (m, s) for m in ("test_vrwkv", "test_vir", DEIT, SWIN) for s in ("45x60", "90x120")]
    assert meta["suite"] == "seg" and meta["num_classes"] == 11 and meta["decoder"] == "upernet"
    for r in records:
        assert r["status"] == "ok", r
        assert r["img_per_s"] > 0 and r["peak_mib"] is not None and r["peak_mib"] >= 0 and r["gmacs"] > 0
        assert r["batch_size"] == 1 and r["pixels"] == r["height"] * r["width"]
        assert r["speedup_vs_deit"] > 0 and r["memory_vs_deit"] is not None and r["speedup_vs_swin"] > 0
        assert r["deit_ref"] == DEIT and r["swin_ref"] == SWIN
    by = {(r["model"], r["resolution"]): r for r in records}
    for s in ("45x60", "90x120"):
        assert by[(DEIT, s)]["speedup_vs_deit"] == 1.0 == by[(SWIN, s)]["speedup_vs_swin"]
        v = by[("test_vir", s)]
        assert v["speedup_vs_deit"] == pytest.approx(v["img_per_s"] / by[(DEIT, s)]["img_per_s"])
        assert v["speedup_vs_swin"] == pytest.approx(v["img_per_s"] / by[(SWIN, s)]["img_per_s"])
    # the FLOPs grow with the pixel count (4x the pixels: more than 2x the MACs for every backbone)
    for m in ("test_vrwkv", "test_vir", DEIT, SWIN):
        assert by[(m, "90x120")]["gmacs"] > 2 * by[(m, "45x60")]["gmacs"]
    # the benchmarked model is the one `linvision segment train --backbone test_vrwkv` builds (same parameters)
    ref = build_seg_model({"backbone": "test_vrwkv", "decoder": "upernet", "decoder_channels": 64, "num_classes": 11})
    assert by[("test_vrwkv", "45x60")]["params_m"] == pytest.approx(sum(p.numel() for p in ref.parameters()) / 1e6)
    rows = list(csv.DictReader((out / "seg.csv").open()))
    assert len(rows) == 8 and {"height", "width", "speedup_vs_deit", "memory_vs_deit", "speedup_vs_swin"} <= set(rows[0])
    assert all(row["speedup_vs_swin"] and row["memory_vs_deit"] for row in rows)
    assert json.loads((out / "seg.json").read_text())["records"][0]["height"] == 45
    for png in ("seg_throughput_infer.png", "seg_memory_infer.png", "seg_speedup_infer.png"):
        assert (out / png).stat().st_size > 0
    table = bench.seg_markdown_table(records)
    assert "× Swin-T img/s" in table and f"| `{DEIT}` | 45x60 | 1 | infer |" in table


def test_seg_suite_isolated_both_modes(tmp_path):
    """The subprocess path (the default) and a train step (pixel-wise cross-entropy) on a non-square size (batch 2:
    UPerNet's pooling branch has BatchNorm on 1x1 maps, which cannot train on one image)."""
    meta, records = bench.run_seg(_cfg(models=["test_vir"], seg_sizes="45x60", isolate=True, mode="both",
                                       batch_size=2, time_budget=120.0), tmp_path / "iso")
    assert [(r["mode"], r["status"]) for r in records] == [("infer", "ok"), ("train", "ok")], records
    assert all(r["img_per_s"] > 0 and r["peak_mib"] >= 0 and r["memory_method"] == "rss_hwm_delta"
               and r["batch_size"] == 2 for r in records)
    train = records[1]
    assert train["gflop_per_img_step"] > 2 * train["gmacs"]  # forward + backward counted
    assert (tmp_path / "iso" / "seg_throughput_train.png").exists()


def test_cli_seg(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["bench", "--suite", "seg", "--models", "test_vir", "--seg-sizes", "45x60", "--iters", "1",
               "--no-isolate", "--threads", "1", "--no-flops", "--profile", "--output", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| `test_vir` | 45x60 | 1 | infer |" in stdout and (out / "seg.csv").exists()
    assert "### `test_vir` 45x60 infer" in (out / "seg_profile.md").read_text()
    for argv, msg in ((["--seg-sizes", "360by480"], "--seg-sizes: bad size '360by480'"),
                      (["--seg-sizes", "0x10"], "--seg-sizes: bad size '0x10'"),
                      (["--resolutions", "224"], "--resolutions is for --suite models"),
                      (["--num-classes", "0"], "--num-classes must be positive"),
                      (["--models", "resnet*"], "matches none of the suite's models")):
        rc = main(["bench", "--suite", "seg", *argv, "--output", str(out / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("linvision: error: ") and msg in err[0], err
    assert not (out / "bad").exists()
