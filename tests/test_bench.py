"""`linvision bench`: specs, outputs, failure handling, FLOP counting and the ops suite, on tiny cases (no timing
assertions: the numbers only have to exist and be consistent)."""
from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

import linvision  # noqa: F401
from linvision import bench
from linvision.cli import main
from linvision.errors import LinvisionError

REQUIRED = {"model", "resolution", "batch_size", "mode", "img_per_s", "peak_mib", "gmacs"}


def _cfg(tmp_path, **kw):
    base = dict(iters=2, warmup=1, min_time=0.0, threads=1, isolate=False, progress=False, resolutions=[32],
                gemm_n=256)
    base.update(kw)
    return bench.BenchConfig(**base), tmp_path / "out"


@pytest.fixture
def runner(request):
    """Register a test runner for the duration of one test: ``runner(name, fn, supports_train=True)``."""
    added = []

    def add(name, fn, supports_train=True):
        bench.register_runner(name, supports_train)(fn)
        added.append(name)

    yield add
    for name in added:
        bench.RUNNERS.pop(name, None)


def test_parse_spec():
    s = bench.parse_spec("vir_tiny:mode=chunkwise, chunk_size=256")
    assert (s.arch, dict(s.kwargs), s.runner) == ("vir_tiny", {"mode": "chunkwise", "chunk_size": 256}, "default")
    assert s.text == "vir_tiny:mode=chunkwise,chunk_size=256"
    assert bench.parse_spec("deit_tiny_patch16_224").text == "deit_tiny_patch16_224"
    s = bench.parse_spec("vir_tiny:stream,chunk_size=8")
    assert (s.runner, dict(s.kwargs), s.text) == ("stream", {"chunk_size": 8}, "vir_tiny:chunk_size=8,stream")
    for bad in ("", ":mode=x", "vir_tiny:nosuchrunner", "vir_tiny:stream,default", "vir_tiny:1x=2"):
        with pytest.raises(LinvisionError):
            bench.parse_spec(bad)


def test_select_models():
    default = [s.text for s in bench.select_models(None)]
    assert default == list(bench.DEFAULT_MODELS)
    assert {"deit_tiny_patch16_224", "deit_small_patch16_224", "vrwkv_tiny", "vrwkv_small",
            "vir_small:mode=chunkwise,chunk_size=256", "vir_tiny:mode=parallel", "vir_tiny:mode=chunkwise,chunk_size=256",
            "vit_resnas_tiny"} <= set(default)
    sel = [s.text for s in bench.select_models(["vir_tiny*", "vrwkv_base"])]
    assert sel == ["vir_tiny:mode=parallel", "vir_tiny:mode=chunkwise,chunk_size=256", "vrwkv_base"]
    assert [s.text for s in bench.select_models(["vir_tiny:mode=recurrent*"], "vir")] == ["vir_tiny:mode=recurrent"]
    with pytest.raises(LinvisionError, match="matches none"):
        bench.select_models(["resnet*"])
    with pytest.raises(LinvisionError, match="unknown model"):
        bench.select_models(["no_such_model_xyz"])
    with pytest.raises(LinvisionError, match="preset"):
        bench.select_models(None, "nope")


def test_tiny_run_writes_csv_json_plots(tmp_path):
    cfg, out = _cfg(tmp_path, models=["deit_tiny_patch16_224:depth=1", "vir_tiny:depth=1", "vrwkv_tiny:depth=1"],
                    resolutions=[32, 64], mode="both")
    meta, records = bench.run_models(cfg, out)
    assert len(records) == 3 * 2 * 2 and all(r["status"] == "ok" for r in records), records
    data = json.loads((out / "bench.json").read_text())
    assert set(data) == {"meta", "records"} and len(data["records"]) == len(records)
    for key in ("cpu_model", "cpu_count", "torch", "timm", "threads", "dtype", "device", "gemm", "duration_s"):
        assert key in data["meta"], key
    assert data["meta"]["gemm"]["gflops"] > 0
    for r in data["records"]:
        assert REQUIRED <= set(r)
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and r["gmacs"] > 0 and r["params_m"] > 0
        assert r["peak_mib"] is not None and 0 < r["peak_frac"]
        assert r["gflops"] == pytest.approx(r["gflop_per_img_step"] * r["img_per_s"])
    # train-step FLOPs are forward + backward (about 3x the forward's 2 * MACs)
    for r in records:
        ratio = r["gflop_per_img_step"] / (2 * r["gmacs"])
        assert (2 < ratio < 4) if r["mode"] == "train" else ratio == pytest.approx(1)
    # speed-up over the DeiT of the same size (tiny), same resolution and mode; none for test_vir (no size)
    by = {(r["model"], r["resolution"], r["mode"]): r for r in records}
    v = by[("vir_tiny:depth=1", 64, "infer")]
    d = by[("deit_tiny_patch16_224:depth=1", 64, "infer")]
    assert v["speedup_vs_deit"] == pytest.approx(v["img_per_s"] / d["img_per_s"])
    assert by[("deit_tiny_patch16_224:depth=1", 32, "train")]["speedup_vs_deit"] == 1.0
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and REQUIRED <= set(rows[0])
    for mode in ("infer", "train"):
        for stem in ("throughput", "memory", "speedup"):
            png = out / f"{stem}_{mode}.png"
            assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    table = bench.markdown_table(records)
    assert table.count("\n") == len(records) + 1 and "`vir_tiny:depth=1`" in table


def test_failures_are_skipped_with_reason_and_the_run_continues(tmp_path, runner):
    def fake_oom(model, x):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return model(x)

    def always_oom(model, x):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes (simulated)")

    def broken(model, x):
        raise ValueError("simulated bug")

    runner("fake_oom", fake_oom)
    runner("always_oom", always_oom)
    runner("broken", broken)
    cfg, out = _cfg(tmp_path, models=["test_vir:fake_oom", "test_vir:always_oom", "test_vir:broken",
                                      "test_vir:stream", "test_vrwkv:stream", "test_vir"], batch_size=4,
                    resolutions=[32, 64])
    _, records = bench.run_models(cfg, out)
    by = {(r["model"], r["resolution"]): r for r in records}
    r = by[("test_vir:fake_oom", 32)]  # backed off 4 -> 2 -> 1
    assert r["status"] == "ok" and r["batch_size"] == 1 and len(r["attempts"]) == 2
    assert "out of memory" in r["attempts"][0]
    r = by[("test_vir:always_oom", 32)]
    assert r["status"] == "skipped" and r["batch_size"] == 1 and "out of memory" in r["reason"]
    r = by[("test_vir:always_oom", 64)]  # a larger resolution is not tried again
    assert r["status"] == "skipped" and r["reason"] == "already out of memory at 32px"
    r = by[("test_vir:broken", 32)]
    assert r["status"] == "failed" and "ValueError: simulated bug" in r["reason"]
    assert by[("test_vir:broken", 64)]["status"] == "failed"  # a failure does not block other resolutions
    r = by[("test_vrwkv:stream", 32)]
    assert r["status"] == "skipped" and "forward_stream" in r["reason"]
    r = by[("test_vir:stream", 32)]
    assert r["status"] == "skipped" and "one image at a time" in r["reason"]
    assert by[("test_vir", 64)]["status"] == "ok" and by[("test_vir", 64)]["batch_size"] == 4
    saved = json.loads((out / "bench.json").read_text())["records"]
    assert [r["status"] for r in saved] == [r["status"] for r in records]
    assert "**skipped**" in bench.markdown_table(records)


def test_runner_hook_chooses_the_forward(tmp_path, runner):
    calls = []

    def halves(model, x):
        calls.append(x.shape)
        return model(x[:, :, : x.shape[2] // 2])

    runner("top_half", halves, supports_train=False)
    cfg, out = _cfg(tmp_path, models=["test_vir:top_half"], mode="both", resolutions=[64])
    _, records = bench.run_models(cfg, out)
    infer, train = records
    assert infer["status"] == "ok" and calls and calls[0][2] == 64
    assert train["status"] == "skipped" and "does not support train" in train["reason"]
    # FLOPs are counted through the runner: half the image, about half the patch-embed + token MACs
    full = bench.model_flops("test_vir", 64)[0] / 2e9
    assert infer["gmacs"] < 0.75 * full


def test_isolated_subprocess_cases(tmp_path):
    """The default path: each case in a fresh process; a bad kwarg fails that case only; the budget kills."""
    cfg, out = _cfg(tmp_path, models=["test_vir", "test_vir:no_such_kwarg=1"], isolate=True)
    _, records = bench.run_models(cfg, out)
    ok, bad = records
    assert ok["status"] == "ok" and ok["memory_method"] == "rss_hwm_delta"
    # a fresh process: the peak covers at least the weights, and the absolute peak includes torch itself
    assert ok["weights_mib"] <= ok["peak_mib"] < ok["rss_peak_mib"]
    assert bad["status"] == "failed" and "no_such_kwarg" in bad["reason"]
    cfg, out = _cfg(tmp_path, models=["test_vir"], isolate=True, time_budget=0.5, resolutions=[32, 64])
    _, records = bench.run_models(cfg, out)
    assert records[0]["status"] == "skipped" and "time budget" in records[0]["reason"]
    assert records[1]["status"] == "skipped" and records[1]["reason"] == "already too slow at 32px"


def test_gmacs_deit_tiny_matches_published():
    """timm/fvcore list DeiT-T at 224 as 1.26 GMACs (attention matmuls included)."""
    fwd, step = bench.model_flops("deit_tiny_patch16_224", 224, train=True)
    assert fwd / 2e9 == pytest.approx(1.26, rel=0.02)
    assert 2.5 * fwd < step < 3.5 * fwd  # backward ~ 2x forward
    # CPU SDPA is counted through CUSTOM_FLOP_FORMULAS: without it the attention matmuls (~14 %) vanish
    from torch.utils.flop_counter import FlopCounterMode
    import timm
    m = timm.create_model("deit_tiny_patch16_224").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        m(torch.randn(1, 3, 224, 224))
    assert plain.get_total_flops() < 0.9 * fwd


def test_custom_op_flop_formula_counts_either_way(monkeypatch):
    """A Bi-WKV-like custom op is counted by its formula (29·B·T·C) whether or not a global formula exists."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    @torch.library.custom_op("linvision_bench_test::wkv", mutates_args=())
    def wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return linvision.ops.bi_wkv(w, u, k, v)

    @wkv.register_fake
    def _(w, u, k, v):
        return torch.empty_like(v)

    B, T, C = 2, 10, 6
    args = (torch.randn(C), torch.randn(C), torch.randn(B, T, C), torch.randn(B, T, C))
    op = torch.ops.linvision_bench_test.wkv

    def wkv_flop(w, u, k, v, out_shape=None, **kwargs) -> int:
        return 29 * k[0] * k[1] * k[2]  # the counter passes shapes

    assert bench.count_flops(lambda: op(*args)) == 0  # unknown op, inner ops hidden by the dispatcher
    monkeypatch.setitem(bench.CUSTOM_FLOP_FORMULAS, "linvision_bench_test::wkv", wkv_flop)
    assert bench.count_flops(lambda: op(*args)) == 29 * B * T * C
    monkeypatch.setitem(bench.CUSTOM_FLOP_FORMULAS, "no_such_namespace_xyz::op", wkv_flop)
    assert bench.count_flops(lambda: op(*args)) == 29 * B * T * C  # missing ops are ignored
    # a formula registered globally (as the op's own module would) wins over ours
    register_flop_formula(op)(lambda *a, out_shape=None, **k: 7)
    try:
        assert bench.count_flops(lambda: op(*args)) == 7
    finally:
        flop_registry.pop(op, None)
    # linvision's own Bi-WKV op registers its formula: 29 MACs = 58 FLOPs per token and channel
    assert bench.count_flops(lambda: linvision.ops.bi_wkv(*args)) == 58 * B * T * C


def test_ops_suite_tiny(tmp_path):
    cfg, out = _cfg(tmp_path, suite="ops", tokens=[8, 40], channels=64, heads=1, max_memory_mib=0.5)
    meta, records = bench.run_ops(cfg, out)
    assert [r["op"] for r in records] == [n for n in bench.OPS for _ in (8, 40)]
    by = {(r["op"], r["tokens"]): r for r in records}
    for name in ("bi_wkv", "sdpa", "linear", "retention_parallel", "retention_chunkwise"):
        for T in (8, 40):
            r = by[(name, T)]
            assert r["status"] == "ok" and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0, r
            assert r["fwdbwd_x_linear"] == pytest.approx(r["fwdbwd_ms"] / by[("linear", T)]["fwdbwd_ms"])
    assert by[("linear", 40)]["gflop_fwd"] == pytest.approx(2 * 40 * 64 * 64 / 1e9)
    # the O(T^2) reference is skipped past the memory limit, with the reason
    ref = by[("bi_wkv_ref", 40)]
    assert ref["status"] == "skipped" and "--max-memory-mib" in ref["reason"] and ref.get("fwd_ms") is None
    assert by[("bi_wkv_ref", 8)]["fwd_ms"] > 0
    data = json.loads((out / "ops.json").read_text())
    assert len(data["records"]) == len(records) and data["meta"]["channels"] == 64
    assert (out / "ops.csv").exists() and (out / "ops_time.png").read_bytes()[:4] == b"\x89PNG"
    assert "`bi_wkv_ref`" in bench.ops_markdown_table(records)


def test_cli_bench(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["bench", "--models", "test_vir", "test_vrwkv", "--resolutions", "32", "--iters", "1",
               "--no-isolate", "--threads", "1", "--profile", "--output", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| `test_vir` | 32 | 1 | infer |" in stdout and "results in" in stdout
    assert (out / "bench.csv").exists() and (out / "throughput_infer.png").exists()
    records = json.loads((out / "bench.json").read_text())["records"]
    assert all(r["profile_top"] and r["profile_top"][0]["self_ms"] > 0 for r in records)
    assert "### `test_vrwkv` 32px infer" in (out / "profile.md").read_text()
    assert main(["bench", "--models", "nope_xyz", "--output", str(out)]) == 2
    assert "unknown model 'nope_xyz'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--resolutions", "224,abc"])



def test_progress_is_one_line_per_case_off_a_terminal(tmp_path, capsys, monkeypatch):
    """Under a pipe or a log file (pytest's capture is not a terminal) no tqdm bar is drawn, only one stderr line
    per case; the bar needs both stdout and stderr to be terminals (and --progress, on by default)."""
    import io
    import sys

    from linvision.bench.suites import progress_enabled
    rc = main(["bench", "--models", "test_vir", "--resolutions", "32,48", "--iters", "1", "--no-isolate",
               "--no-flops", "--threads", "1", "--output", str(tmp_path / "cli")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err, err
    assert [ln.split(":")[1].strip() for ln in err.splitlines() if ln.startswith("linvision: test_vir ")] == \
        ["test_vir 32px infer b1", "test_vir 48px infer b1"]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress_enabled(bench.BenchConfig()) and not progress_enabled(bench.BenchConfig(progress=False))
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # e.g. `linvision bench > table.md`
    assert not progress_enabled(bench.BenchConfig())


def test_bench_modules_stay_small():
    """House rule for the bench package: every module under ~400 lines, every function under ~120."""
    import ast
    files = sorted(Path(bench.__file__).parent.glob("*.py"))
    assert {f.stem for f in files} >= {"__init__", "specs", "measure", "worker", "suites", "report", "cli"}
    for f in files:
        text = f.read_text()
        assert text.count("\n") <= 400, f.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 120, f"{f.name}: {node.name}"


def test_total_budget_skips_the_rest(tmp_path):
    cfg, out = _cfg(tmp_path, models=["test_vir"], resolutions=[32, 64], total_budget=1e-3)
    _, records = bench.run_models(cfg, out)
    assert [r["status"] for r in records] == ["skipped", "skipped"]
    assert all("--total-budget" in r["reason"] for r in records)
    assert json.loads((out / "bench.json").read_text())["meta"]["total_budget_s"] == 1e-3


def test_a_killed_worker_keeps_what_it_finished(tmp_path, monkeypatch):
    """Workers save partial results (an op's forward, a model's timing); a kill at the budget keeps them."""
    saved = []
    case = {"kind": "op", "op": "linear", "tokens": 8, "channels": 64, "heads": 1, "batch_size": 1, "device": "cpu",
            "threads": 1, "warmup": 1, "iters": 1, "min_time": 0.0, "flops": False, "budget": 60.0}
    case["deadline_wall"] = time.time() + 60
    r = bench.run_op_case(case, save_partial=lambda d: saved.append(dict(d)))
    assert len(saved) == 2 and "fwd_ms" in saved[0] and "fwdbwd_ms" not in saved[0] and r["fwdbwd_ms"] > 0

    def fake_run(cmd, **kw):  # the worker saved its forward, then ran past the budget
        Path(cmd[-1] + ".partial").write_text(json.dumps(saved[0]))
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(subprocess, "run", fake_run)
    r = bench.execute_case(case, isolate=True)
    assert r["status"] == "ok" and r["fwd_ms"] > 0 and "killed at the case time budget (60 s)" in r["reason"]


def test_export_suite_rows_for_both_backends(tmp_path, capsys):
    """``--suite export``: one onnxruntime and one eager row per (model, resolution), files written."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "exp"
    rc = main(["bench", "--suite", "export", "--models", "test_vir:mode=chunkwise", "--resolutions", "32",
               "--iters", "1", "--warmup", "0", "--threads", "1", "--output", str(out)])
    assert rc == 0
    records = json.loads((out / "export.json").read_text())["records"]
    assert sorted(r["backend"] for r in records) == ["eager", "onnxruntime"]
    assert all(r["model"] == "test_vir:mode=chunkwise" and r["img_size"] == 32 and r["ms"] > 0 for r in records)
    assert (out / "export.csv").exists()
    assert "| onnxruntime |" in capsys.readouterr().out
