"""Where the GPU time of the models goes: CUDA-kernel profiles, compiled vs eager, and ViT without flash attention.

Usage: ``PYTHONPATH=src python3 scripts/gpu_profile.py [--out DIR] [--budget SECONDS] [--cases NAME,...]``

For each case (model, resolution, batch; bf16-autocast inference unless the case says ``train``) it writes
``DIR/profile.md``: milliseconds per step (CUDA events, median), kernels launched per step, the GPU-busy share
(summed kernel time ÷ step time: low means the step waits on Python/launches), peak MiB, and the top kernels by
self CUDA time (``torch.profiler``; with ``--cpu-top N`` also the top N host ops by self CPU time). Cases also
cover ``torch.compile`` (inductor, default mode) of the same step, and timm's DeiT-T with the math SDPA backend
(attention materialised, as the ViT the Vision-RWKV paper compares against).
Every case runs in its own try block, and no case starts after ``--budget`` seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import linvision  # noqa: F401  (registers the models; must precede timm)
import timm

from gpu_bench import events_ms  # scripts/ is on sys.path when this file runs

T0 = time.time()
LINES: list = []
ROWS: list = []
OUT = Path(".")
CPU_TOP = 0

CASES = {  # name: (model, kwargs, resolution, batch, train, compile, sdpa backend)
    "vrwkv_2048_b4": ("vrwkv_tiny", {}, 2048, 4, False, False, None),
    "vir_2048_b4": ("vir_tiny", {}, 2048, 4, False, False, None),
    "deit_2048_b4": ("deit_tiny_patch16_224", {}, 2048, 4, False, False, None),
    "vrwkv_1024_b8": ("vrwkv_tiny", {}, 1024, 8, False, False, None),
    "vir_1024_b8": ("vir_tiny", {}, 1024, 8, False, False, None),
    "vrwkv_224_b64_train": ("vrwkv_tiny", {}, 224, 64, True, False, None),
    "vir_224_b64_train": ("vir_tiny", {}, 224, 64, True, False, None),
    "deit_224_b64_train": ("deit_tiny_patch16_224", {}, 224, 64, True, False, None),
    "vrwkv_2048_b4_compiled": ("vrwkv_tiny", {}, 2048, 4, False, True, None),
    "deit_2048_b4_compiled": ("deit_tiny_patch16_224", {}, 2048, 4, False, True, None),
    "deit_2048_b1_math": ("deit_tiny_patch16_224", {}, 2048, 1, False, False, "math"),
    "deit_1024_b8_math": ("deit_tiny_patch16_224", {}, 1024, 8, False, False, "math"),
    "vrwkv_2048_b1": ("vrwkv_tiny", {}, 2048, 1, False, False, None),
    "deit_2048_b1": ("deit_tiny_patch16_224", {}, 2048, 1, False, False, None),
    "vir_2048_b1": ("vir_tiny", {}, 2048, 1, False, False, None),
    "deit_1024_b8": ("deit_tiny_patch16_224", {}, 1024, 8, False, False, None),
}


def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)
        LINES.append(line)
    (OUT / "profile.md").write_text("\n".join(LINES) + "\n")
    (OUT / "profile.json").write_text(json.dumps(ROWS, indent=1))


def make_step(name, kw, res, batch, train, compiled, sdpa):
    model = timm.create_model(name, img_size=res, num_classes=1000, **kw).cuda()
    model.train(train)
    x = torch.randn(batch, 3, res, res, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None

    def step():
        ctx = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if sdpa == "math" else _null()
        with ctx:
            if train:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(fwd(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    fwd(x)
    return step


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_case(key: str) -> None:
    name, kw, res, batch, train, compiled, sdpa = CASES[key]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.time()
    step = make_step(name, kw, res, batch, train, compiled, sdpa)
    step()
    step()
    torch.cuda.synchronize()
    warm_s = time.time() - t
    ms = events_ms(step, 7)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kern = sum(e.count for e in evs) / 2
    busy = sum(e.self_device_time_total for e in evs) / 2 / 1000  # ms per step
    row = dict(case=key, model=name, res=res, batch=batch, train=train, compiled=compiled, sdpa=sdpa or "default",
               ms=round(ms, 3), img_per_s=round(batch * 1000 / ms, 1), peak_mib=round(peak, 1),
               kernels_per_step=kern, gpu_busy_ms=round(busy, 3), warm_s=round(warm_s, 1))
    ROWS.append(row)
    evs.sort(key=lambda e: -e.self_device_time_total)
    say(f"\n## {key}: {json.dumps(row)}\n", "| kernel | calls/step | ms/step | share |", "|---|---|---|---|")
    for e in evs[:14]:
        say(f"| {e.key[:110]} | {e.count / 2:g} | {e.self_device_time_total / 2000:.3f} | "
            f"{e.self_device_time_total / 2000 / max(busy, 1e-9):.1%} |")
    if CPU_TOP:  # where the host's time goes (a step much longer than its kernels waits on Python / launches)
        ops = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: -e.self_cpu_time_total)
        say("", "| host op | calls/step | self CPU ms/step | CPU ms/step incl. children |", "|---|---|---|---|")
        for e in ops[:CPU_TOP]:
            say(f"| {e.key[:110]} | {e.count / 2:g} | {e.self_cpu_time_total / 2000:.3f} | "
                f"{e.cpu_time_total / 2000:.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--cpu-top", type=int, default=0, help="also list this many host ops by self CPU time")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: CUDA is not available", file=sys.stderr)
        return 2
    global OUT, CPU_TOP
    OUT, CPU_TOP = Path(args.out), args.cpu_top
    OUT.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    say(f"# GPU profile: {torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}")
    for key in args.cases.split(","):
        if time.time() - T0 > args.budget:
            say(f"\n## {key}: skipped (budget)")
            continue
        try:
            run_case(key)
        except Exception as e:  # one case's failure must not stop the others
            say(f"\n## {key}: ERROR {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        torch.cuda.empty_cache()
    say(f"\nwall {time.time() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
