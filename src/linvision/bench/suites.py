"""The two suites of ``linvision bench``: ``models`` (specs × resolutions × modes) and ``ops`` (token mixers ×
token counts). Each writes its JSON/CSV after every case and its plots at the end."""
from __future__ import annotations

import fnmatch
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import LinvisionError
from .measure import gemm_peak_gflops, machine_info, proc_meminfo_mib
from .report import profile_markdown, size_label, write_model_plots, write_op_plots, write_results
from .specs import OPS, PRESETS, select_models
from .worker import execute_case, run_with_backoff

__all__ = ["BenchConfig", "RECORD_FIELDS", "OP_FIELDS", "progress_enabled", "add_speedups", "run_models",
           "run_model_cases", "size_label", "run_ops"]


@dataclass
class BenchConfig:
    """Settings of one ``linvision bench`` run (the CLI options; see ``linvision bench --help``)."""

    suite: str = "models"
    preset: str = "default"
    models: Optional[List[str]] = None
    resolutions: Optional[List[int]] = None
    batch_size: int = 1
    mode: str = "infer"
    dtype: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    device: str = "cpu"
    threads: Optional[int] = None
    output: Optional[str] = None
    time_budget: float = 120.0
    total_budget: Optional[float] = None  # None: the preset's; 0: unlimited
    warmup: int = 1
    iters: Optional[int] = None
    min_time: float = 2.0
    isolate: bool = True
    flops: bool = True
    profile: bool = False
    progress: bool = True
    # ops suite
    ops: Optional[List[str]] = None
    tokens: List[int] = field(default_factory=lambda: [196, 1024, 4096, 16384])
    channels: int = 192
    heads: int = 3
    max_memory_mib: Optional[float] = None
    gemm_n: Optional[int] = None  # matrix size of the GEMM-peak measurement [2048 on CPU, 8192 on CUDA]
    # seg suite
    seg_sizes: Optional[str] = None  # "HxW,HxW,..." [linvision.bench.seg.SEG_SIZES]
    num_classes: int = 11
    decoder: str = "upernet"
    decoder_channels: int = 64


RECORD_FIELDS = ["model", "arch", "runner", "kwargs", "resolution", "batch_size", "mode", "dtype", "status",
                 "reason", "img_per_s", "ms_per_step", "ms_min", "ms_max", "iters", "warmup", "peak_mib",
                 "rss_peak_mib", "baseline_mib", "reserved_peak_mib", "weights_mib", "params_m", "gmacs",
                 "gflop_per_img_step", "gflops", "peak_frac", "speedup_vs_deit", "deit_ref", "memory_method",
                 "case_s", "attempts"]


def progress_enabled(cfg: BenchConfig) -> bool:
    """Whether to draw the tqdm progress bar: ``cfg.progress`` and both stdout and stderr are terminals. Otherwise
    (a log file, a pipe, CI) there is no bar, and the run's only progress output is the one line per case that
    ``log`` gets (on stderr from the CLI)."""
    return bool(cfg.progress) and all(getattr(f, "isatty", lambda: False)() for f in (sys.stdout, sys.stderr))


def _progress(cases: List[Any], desc: str, cfg: BenchConfig):
    from tqdm.auto import tqdm
    return tqdm(cases, desc=desc, unit="case", file=sys.stderr, disable=not progress_enabled(cfg), dynamic_ncols=True)


def _check_config(cfg: BenchConfig) -> None:
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise LinvisionError(f"--device: expected cpu or cuda, got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise LinvisionError("--device cuda: no CUDA device available")
    if cfg.batch_size < 1:
        raise LinvisionError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.time_budget <= 0:
        raise LinvisionError(f"--time-budget must be > 0 seconds, got {cfg.time_budget}")


def _size_token(arch: str) -> Optional[str]:
    m = re.search(r"(?:^|_)(tiny|small|base|medium|large|huge|giant)(?:_|$|\d)", arch)
    return m.group(1) if m else None


def add_speedups(records: List[Dict[str, Any]]) -> None:
    """Fill ``speedup_vs_deit`` (img/s ÷ the img/s of timm's DeiT of the same size token — tiny, small, base —
    at the same resolution and mode in the same run; a DeiT spec without kwargs is preferred) and ``deit_ref``
    in place."""
    ref: Dict[Tuple, Dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: bool(r.get("kwargs"))):  # a plain DeiT first, else one with kwargs
        if r["arch"].startswith("deit_") and r["status"] == "ok":
            ref.setdefault((_size_token(r["arch"]), r["resolution"], r["mode"]), r)
    for r in records:
        d = ref.get((_size_token(r["arch"]), r["resolution"], r["mode"]))
        if d is not None and r["status"] == "ok" and r.get("img_per_s"):
            r["speedup_vs_deit"] = r["img_per_s"] / d["img_per_s"]
            r["deit_ref"] = d["model"]


def run_models(cfg: BenchConfig, out_dir: Path, log: Callable[[str], None] = lambda s: None
               ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Run the models suite: every selected spec × resolution × mode; writes ``bench.json``/``bench.csv`` after
    each case and the plots at the end. Returns ``(meta, records)``."""
    _check_config(cfg)
    preset = PRESETS.get(cfg.preset)
    specs = select_models(cfg.models, cfg.preset)
    resolutions = sorted(cfg.resolutions or preset.resolutions)
    modes = ["infer", "train"] if cfg.mode == "both" else [cfg.mode]
    total_budget = preset.total_budget if cfg.total_budget is None else (cfg.total_budget or None)
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    started = time.time()
    meta = _meta(cfg, threads, total_budget, [s.text for s in specs], resolutions, modes)
    log(f"GEMM peak: {meta['gemm']['gflops']:.1f} GFLOP/s ({meta['gemm']['dtype']}, n={meta['gemm']['n']})")
    cases = [(s, m, r) for s in specs for m in modes for r in resolutions]
    records = run_model_cases(cfg, meta, cases, out_dir, log, total_budget=total_budget, threads=threads,
                              started=started)
    write_model_plots(out_dir, meta, records)
    if any(r.get("profile_top") for r in records):
        from ..checkpoint import atomic_write
        atomic_write(out_dir / "profile.md", profile_markdown(records).encode())
    return meta, records


def run_model_cases(cfg: BenchConfig, meta: Dict[str, Any], cases: List[Tuple[Any, str, Any]], out_dir: Path,
                    log: Callable[[str], None], *, total_budget: Optional[float], threads: int, started: float,
                    stem: str = "bench", fields: Optional[List[str]] = None, extra: Optional[Dict[str, Any]] = None,
                    post: Callable[[List[Dict[str, Any]]], None] = add_speedups) -> List[Dict[str, Any]]:
    """Run ``cases`` — ``(spec, mode, size)``, ``size`` a square resolution (int) or ``(H, W)`` (a segmentation
    case: ``extra`` then holds ``task="seg"``, ``num_classes``, ``decoder``, ``decoder_channels``) — each with
    :func:`~linvision.bench.worker.run_with_backoff` within the case and total budgets (a spec out of memory or too
    slow at batch 1 skips its larger sizes). After every case: ``post(records)`` (ratio columns) and
    ``<stem>.json``/``<stem>.csv`` are written. Returns the records."""
    records: List[Dict[str, Any]] = []
    blocked: Dict[Tuple[str, str], str] = {}
    extra = extra or {}
    bar = _progress(cases, "bench", cfg)
    for spec, mode, size in bar:
        label = size_label(size)
        bar.set_postfix_str(f"{spec.text} {label} {mode}")
        rec = {"model": spec.text, "arch": spec.arch, "runner": spec.runner, "kwargs": dict(spec.kwargs),
               "resolution": size if isinstance(size, int) else label, "mode": mode, "dtype": cfg.dtype}
        if not isinstance(size, int):
            rec.update(height=size[0], width=size[1], pixels=size[0] * size[1])
        t0 = time.time()
        left = None if total_budget is None else total_budget - (t0 - started)
        if (spec.text, mode) in blocked:
            rec.update(status="skipped", reason=blocked[(spec.text, mode)], batch_size=cfg.batch_size)
        elif left is not None and left < min(10.0, cfg.time_budget):
            rec.update(status="skipped", reason=f"--total-budget ({total_budget:.0f} s) used up",
                       batch_size=cfg.batch_size)
        else:
            budget = cfg.time_budget if left is None else min(cfg.time_budget, left)
            case = {"kind": "model", "model": spec.text, "resolution": size if isinstance(size, int) else max(size),
                    "batch_size": cfg.batch_size, "mode": mode, "dtype": cfg.dtype, "device": cfg.device,
                    "threads": threads, "compile": cfg.compile, "channels_last": cfg.channels_last,
                    "warmup": cfg.warmup, "iters": cfg.iters, "min_time": cfg.min_time, "flops": cfg.flops,
                    "profile": cfg.profile, "budget": budget, "deadline_wall": t0 + budget, **extra}
            if not isinstance(size, int):
                case["size"] = list(size)
            rec.update(run_with_backoff(case, cfg.isolate))
            cut = budget < cfg.time_budget
            if rec["status"] == "skipped" and rec.get("skip_kind") == "too_slow" and cut:
                rec["reason"] += f" (case budget cut to {budget:.0f} s by --total-budget {total_budget:.0f} s)"
            elif rec["status"] == "skipped" and rec.get("skip_kind") and rec["batch_size"] == 1:
                what = {"oom": "out of memory"}.get(rec["skip_kind"], "too slow")
                blocked[(spec.text, mode)] = f"already {what} at {label}"
        rec["case_s"] = time.time() - t0
        if rec.get("gflops") is not None:
            rec["peak_frac"] = rec["gflops"] / meta["gemm"]["gflops"]
        records.append(rec)
        log(_record_line(rec))
        _finish_meta(meta, started)
        post(records)
        write_results(out_dir, stem, meta, records, fields or RECORD_FIELDS)
    bar.close()
    return records


def _meta(cfg: BenchConfig, threads: int, total_budget: Optional[float], models: List[str],
          resolutions: List[int], modes: List[str]) -> Dict[str, Any]:
    meta = machine_info(cfg.device, threads)
    meta.update(suite=cfg.suite, preset=cfg.preset, models=models, resolutions=resolutions, modes=modes,
                batch_size=cfg.batch_size, dtype=cfg.dtype, compile=cfg.compile, channels_last=cfg.channels_last,
                warmup=cfg.warmup, iters=cfg.iters or "auto", min_time_s=cfg.min_time, time_budget_s=cfg.time_budget,
                total_budget_s=total_budget, isolate=cfg.isolate, command=" ".join(["linvision"] + sys.argv[1:]),
                memory_method=("cuda_max_memory_allocated" if cfg.device.startswith("cuda") else
                               "rss_hwm_delta (VmHWM - VmRSS before model build)"),
                flop_method="torch.utils.flop_counter.FlopCounterMode (+ linvision.bench.CUSTOM_FLOP_FORMULAS)",
                started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if cfg.suite == "ops":
        meta.update(tokens=cfg.tokens, channels=cfg.channels, heads=cfg.heads)
    gdtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    meta["gemm"] = gemm_peak_gflops(cfg.device, gdtype, cfg.gemm_n)
    return meta


def _finish_meta(meta: Dict[str, Any], started: float) -> None:
    meta["duration_s"] = round(time.time() - started, 1)
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _record_line(r: Dict[str, Any]) -> str:
    head = f"{r['model']} {size_label(r['resolution'])} {r['mode']} b{r.get('batch_size')}"
    if r["status"] != "ok":
        return f"{head}: {r['status']}: {r.get('reason', '')}"
    pk = "?" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
    return f"{head}: {r['img_per_s']:.2f} img/s, {r['ms_per_step']:.1f} ms/step, {pk} MiB ({r['case_s']:.0f} s)"


OP_FIELDS = ["op", "tokens", "channels", "heads", "batch_size", "status", "reason", "fwd_ms", "fwdbwd_ms",
             "fwdbwd_x_linear", "fwd_peak_mib", "fwdbwd_peak_mib", "gflop_fwd", "fwd_iters", "fwdbwd_iters",
             "est_fwd_mib", "est_fwdbwd_mib", "memory_method", "case_s"]

def run_ops(cfg: BenchConfig, out_dir: Path, log: Callable[[str], None] = lambda s: None
            ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Run the ops suite: every selected op × T (``cfg.tokens``), forward and forward + backward. Writes
    ``ops.json``/``ops.csv`` (after each case) and ``ops_time.png``/``ops_memory.png``. Returns ``(meta, records)``."""
    _check_config(cfg)
    names = list(OPS)
    if cfg.ops:
        sel = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in cfg.ops)]
        if not sel:
            raise LinvisionError(f"--ops: {' '.join(cfg.ops)} matches none of {', '.join(names)}")
        names = sel
    if cfg.channels % 64 and "sdpa" in names:
        raise LinvisionError(f"--channels must be a multiple of 64 for sdpa (heads of 64), got {cfg.channels}")
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    limit = cfg.max_memory_mib
    if limit is None:
        avail = proc_meminfo_mib("MemAvailable")
        limit = 4096.0 if avail is None else min(4096.0, 0.5 * avail)
    started = time.time()
    meta = _meta(cfg, threads, None, names, [], ["fwd", "fwd+bwd"])
    meta["max_memory_mib"] = limit
    records: List[Dict[str, Any]] = []
    cases = [(n, T) for n in names for T in sorted(cfg.tokens)]
    bar = _progress(cases, "bench ops", cfg)
    for name, T in bar:
        bar.set_postfix_str(f"{name} T={T}")
        t0 = time.time()
        case = {"kind": "op", "op": name, "tokens": T, "channels": cfg.channels, "heads": cfg.heads,
                "batch_size": cfg.batch_size, "device": cfg.device, "dtype": cfg.dtype, "threads": threads,
                "warmup": cfg.warmup,
                "iters": cfg.iters, "min_time": min(cfg.min_time, 1.0), "max_memory_mib": limit,
                "flops": cfg.flops, "budget": cfg.time_budget, "deadline_wall": t0 + cfg.time_budget}
        rec = {"op": name, "tokens": T, "channels": cfg.channels, "heads": cfg.heads, "batch_size": cfg.batch_size}
        r = execute_case(case, cfg.isolate)
        if r.get("status") in ("oom", "too_slow"):
            r["status"] = "skipped"
        rec.update(r)
        rec["case_s"] = time.time() - t0
        records.append(rec)
        log(f"{name} T={T}: " + ", ".join(f"{k} {rec[k]:.2f} ms" for k in ("fwd_ms", "fwdbwd_ms")
                                          if rec.get(k) is not None) + (f" ({rec['reason']})" if rec.get("reason")
                                                                        else ""))
        _add_linear_ratio(records)
        _finish_meta(meta, started)
        write_results(out_dir, "ops", meta, records, OP_FIELDS)
    bar.close()
    write_op_plots(out_dir, meta, records)
    return meta, records


def _add_linear_ratio(records: List[Dict[str, Any]]) -> None:
    lin = {r["tokens"]: r.get("fwdbwd_ms") for r in records if r["op"] == "linear"}
    for r in records:
        if r.get("fwdbwd_ms") is not None and lin.get(r["tokens"]):
            r["fwdbwd_x_linear"] = r["fwdbwd_ms"] / lin[r["tokens"]]
