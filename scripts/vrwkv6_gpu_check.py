#!/usr/bin/env python
"""VRWKV6 device check (CUDA): the WKV6 op against its float64 reference on the GPU (outputs and gradients, fp32
and bf16, head size 64, T = 4096), the official goldens on the GPU, and a vrwkv6_tiny/base training step
(peak memory; step time as an indication only).

Usage::

    PYTHONPATH=src python scripts/vrwkv6_gpu_check.py [--batch 64] [--device cpu]

Goldens are read from ``../shared/golden`` beside the checkout (skipped with a note when absent).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import linvision  # noqa: F401
import timm
from linvision.ops import wkv6, wkv6_ref

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def check_op(dev, B, T, H, dtype, w_lo=-5.0, w_hi=1.0):
    g = torch.Generator(device="cpu").manual_seed(0)
    C = 64 * H
    r, k, v = (torch.randn(B, T, C, generator=g) for _ in range(3))
    w = w_lo + (w_hi - w_lo) * torch.rand(B, T, C, generator=g)
    u = torch.randn(H, 64, generator=g)
    x = [t.to(dev, dtype).requires_grad_() for t in (r, k, v, w, u)]
    gy = torch.randn(B, T, C, generator=g).to(dev, dtype)
    y = wkv6(*x)
    grads = torch.autograd.grad(y, x, gy)
    yr = wkv6_ref(*x)
    grads_r = torch.autograd.grad(yr, x, gy)
    errs = [rel_rms(a, b) for a, b in zip((y,) + grads, (yr,) + grads_r)]
    print(f"wkv6 {dev} {dtype} B={B} T={T} H={H} w in [{w_lo},{w_hi}]: rel_rms out/r/k/v/w/u = "
          + " ".join(f"{e:.1e}" for e in errs))
    return max(errs)


def check_goldens(dev):
    from safetensors.torch import load_file
    worst = 0.0
    for golden, name in [("vrwkv6_golden_small", "test_vrwkv6"), ("vrwkv6_golden_small_rand", "test_vrwkv6"),
                         ("vrwkv6_golden_small_postnorm_rand", "test_vrwkv6_postnorm")]:
        path = GOLDEN / f"{golden}.safetensors"
        if not path.exists():
            print("no golden", path)
            continue
        m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval().to(dev)
        ref = load_file(str(path))
        with torch.no_grad():
            d = (m(ref["__input__"].to(dev)).cpu() - ref["__logits__"]).abs().max().item()
        print(f"golden {golden} on {dev}: max|dlogits| = {d:.2e}")
        worst = max(worst, d)
    return worst


def train_step(dev, name, batch):
    m = timm.create_model(name).to(dev).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    yt = torch.randint(0, 1000, (batch,), device=dev)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x), yt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"train {name} bf16 autocast B={batch} 224²: loss {loss.item():.3f}, peak {peak:.1f} GiB, "
          f"step {min(times[1:]) * 1e3:.0f} ms ({batch / min(times[1:]):.0f} img/s, indicative)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run: no training step)")
    args = p.parse_args()
    dev = args.device
    print(torch.__version__, torch.cuda.get_device_name() if dev == "cuda" else dev)
    e = [check_op(dev, 2, 197, 3, torch.float32), check_op(dev, 1, 4096, 2, torch.float32),
         check_op(dev, 2, 100, 2, torch.float32, 2.0, 6.0)]
    check_op(dev, 2, 197, 3, torch.bfloat16)
    print("fp32 op worst rel_rms", max(e), "OK" if max(e) < 1e-5 else "FAIL")
    worst = check_goldens(dev)
    print("goldens", "OK" if worst <= 1e-4 else "FAIL")
    for name in ("vrwkv6_tiny", "vrwkv6_base") if dev == "cuda" else ():
        train_step(dev, name, args.batch)


if __name__ == "__main__":
    main()
