#!/usr/bin/env python
"""CPU benchmark of the compiled Bi-WKV kernels (issue 13): run it on a quiet machine.

Measures, interleaved (each repeat times every candidate once, in turn) and reported as medians, at 1 and 2
threads:

* ``bi_wkv`` forward and forward+backward with the numba kernels (``LINVISION_BIWKV_CPU=numba``) and with the
  torch-ops path (``=torch``), against one ``nn.Linear(192, 192)`` forward+backward on the same ``[1, T, 192]``
  tokens, at T = 196, 1024, 4096, 16384 (C = 192, fp32, batch 1);
* ``vrwkv_tiny`` (numba and torch-ops Bi-WKV) and ``vir_tiny`` (its default ``mode="auto"``, and chunkwise) against
  timm's ``deit_tiny_patch16_224`` inference, batch 1, at 224² and 1024² (all built at that image size), and
  ``vrwkv_tiny`` / ``vir_tiny`` chunkwise with every product packed and with every product through ``F.linear``
  (PackedLinear's modes ``all`` / ``off``, ``linvision.layers.linear``; the main columns run this CPU's default);
* ``vir_tiny`` parallel against chunkwise at ``--vir-forms`` sizes (where ``mode="auto"`` should switch);

then prints markdown tables and the torch.profiler top-5 ops (self CPU time, with call counts) of ``vrwkv_tiny`` at
224² and 1024² with the numba kernels. Goals (issue 13): vrwkv_tiny ÷ deit_tiny ≤ 1/0.9 at 224² and ≤ 1/4 at
1024²; bi_wkv fwd+bwd ÷ Linear fwd+bwd ≤ 2 at T = 16,384, 2 threads.

Usage (from the repository root; ~5-10 min)::

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src python scripts/cpu_kernel_bench.py
    python scripts/cpu_kernel_bench.py --quick   # a smoke run (T = 196, 64², 2 repeats): checks the script only
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch

import linvision  # noqa: F401  (registers the models; must precede timm)
import timm
from linvision.layers import linear as packed_linear
from linvision.ops import bi_wkv
from linvision.ops.biwkv import CPU_KERNEL_ENV

C = 192


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_medians(cands: Dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median ms of each candidate over ``repeats`` rounds; every round runs each candidate once, in turn."""
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _with_path(path: str, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        os.environ[CPU_KERNEL_ENV] = path
        fn()
    return run


def op_candidates(T: int) -> Dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(C, generator=g) * 3 / T).requires_grad_()
    u = (torch.randn(C, generator=g) * 2 / T).requires_grad_()
    k, v = (torch.randn(1, T, C, generator=g).requires_grad_() for _ in range(2))
    gy = torch.randn(1, T, C, generator=g)
    lin = torch.nn.Linear(C, C)
    x = torch.randn(1, T, C, generator=g).requires_grad_()

    def fwd():
        with torch.no_grad():
            bi_wkv(w, u, k, v)

    def fwd_bwd():
        torch.autograd.grad(bi_wkv(w, u, k, v), (w, u, k, v), gy)

    def lin_fwd_bwd():
        torch.autograd.grad(lin(x), [x, *lin.parameters()], gy)

    return {"numba fwd": _with_path("numba", fwd), "torch fwd": _with_path("torch", fwd),
            "numba fwd+bwd": _with_path("numba", fwd_bwd), "torch fwd+bwd": _with_path("torch", fwd_bwd),
            "Linear fwd+bwd": lin_fwd_bwd}


def _infer(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> Callable[[], None]:
    """One timed call: ``model(x, **kwargs)`` under ``torch.inference_mode``."""
    def run():
        with torch.inference_mode():
            model(x, **kwargs)
    return run


def _with_linear_mode(mode: str, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with :class:`~linvision.layers.PackedLinear`'s packed path in ``mode`` (``"all"``: every product
    packed; ``"off"``: every product through ``F.linear``), then back to this process's mode."""
    def run() -> None:
        with packed_linear.packed_mode_scope(mode):
            fn()
    return run


def _model_repeats(res: int, repeats: int) -> int:
    """Rounds of the model table: all ``repeats`` up to 512² (a 224² round of the seven candidates takes ~0.4 s;
    seven rounds left the 224² ratios moving by ±6 % between runs of the same code), a third of them (at least 3)
    above, where one round takes ~10 s."""
    return repeats if res <= 512 else max(3, repeats // 3)


def model_candidates(res: int) -> Dict[str, Callable[[], None]]:
    vrwkv = timm.create_model("vrwkv_tiny", img_size=res).eval()
    deit = timm.create_model("deit_tiny_patch16_224", img_size=res).eval()
    x = torch.randn(1, 3, res, res)
    vir = timm.create_model("vir_tiny", img_size=res).eval()
    vir_chunk = timm.create_model("vir_tiny", img_size=res, mode="chunkwise").eval()
    return {"vrwkv_tiny numba": _with_path("numba", _infer(vrwkv, x)),
            "vrwkv_tiny torch": _with_path("torch", _infer(vrwkv, x)), "deit_tiny": _infer(deit, x),
            "vir_tiny": _infer(vir, x), "vir_tiny chunkwise": _infer(vir_chunk, x),
            **{f"vrwkv_tiny {mode}": _with_linear_mode(mode, _with_path("numba", _infer(vrwkv, x)))
               for mode in ("all", "off")},
            **{f"vir_tiny chunkwise {mode}": _with_linear_mode(mode, _infer(vir_chunk, x))
               for mode in ("all", "off")}}


def vir_form_candidates(res: int) -> Dict[str, Callable[[], None]]:
    model = timm.create_model("vir_tiny", img_size=res).eval()
    x = torch.randn(1, 3, res, res)
    return {"parallel": _infer(model, x, mode="parallel"), "chunkwise": _infer(model, x, mode="chunkwise")}


def profile_top(res: int, n: int = 5) -> str:
    model = timm.create_model("vrwkv_tiny", img_size=res).eval()
    x = torch.randn(1, 3, res, res)
    os.environ[CPU_KERNEL_ENV] = "numba"
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):  # three forwards: one is at the mercy of a single slow call
                model(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--tokens", default="196,1024,4096,16384")
    ap.add_argument("--resolutions", default="224,1024")
    ap.add_argument("--vir-forms", default="224,288,352,384,416,448,512")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="smoke run: T=196, 64², 2 repeats")
    ns = ap.parse_args()
    if ns.quick:
        ns.tokens, ns.resolutions, ns.repeats, ns.vir_forms = "196", "64", 2, "64"
    threads = [int(t) for t in ns.threads.split(",")]
    tokens = [int(t) for t in ns.tokens.split(",")]
    resolutions = [int(r) for r in ns.resolutions.split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, fp32, batch 1, medians of {ns.repeats} interleaved "
          f"repeats (models above 512²: {_model_repeats(1024, ns.repeats)})\n")
    print("| threads | T | numba fwd ms | torch fwd ms | numba fwd+bwd ms | torch fwd+bwd ms | Linear fwd+bwd ms "
          "| numba ÷ Linear | torch ÷ Linear |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in threads:
        torch.set_num_threads(n)
        for T in tokens:
            m = interleaved_medians(op_candidates(T), ns.repeats)
            lin = m["Linear fwd+bwd"]
            print(f"| {n} | {T} | {m['numba fwd']:.3f} | {m['torch fwd']:.3f} | {m['numba fwd+bwd']:.3f} | "
                  f"{m['torch fwd+bwd']:.3f} | {lin:.3f} | {m['numba fwd+bwd'] / lin:.2f}× | "
                  f"{m['torch fwd+bwd'] / lin:.2f}× |", flush=True)
    print(f"\nPackedLinear's packed path in the main columns: {packed_linear.packed_mode()} (CPU vendor "
          f"{packed_linear.cpu_vendor()}; {packed_linear.PACKED_ENV} overrides); 'all': every product packed, "
          "'off': every product through F.linear")
    print("\n| threads | image | vrwkv_tiny numba ms | vrwkv_tiny torch-ops ms | vir_tiny (auto) ms | vir_tiny "
          "chunkwise ms | deit_tiny ms | deit ÷ vrwkv (numba) | deit ÷ vrwkv (torch) | deit ÷ vir (auto) | deit ÷ vir "
          "(chunkwise) | deit ÷ vrwkv, all | deit ÷ vrwkv, off | deit ÷ vir chunkwise, all | deit ÷ vir chunkwise, "
          "off |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in threads:
        torch.set_num_threads(n)
        for res in resolutions:
            m = interleaved_medians(model_candidates(res), _model_repeats(res, ns.repeats), warmup=1)
            d = m["deit_tiny"]
            print(f"| {n} | {res}² | {m['vrwkv_tiny numba']:.1f} | {m['vrwkv_tiny torch']:.1f} | {m['vir_tiny']:.1f} "
                  f"| {m['vir_tiny chunkwise']:.1f} | {d:.1f} | {d / m['vrwkv_tiny numba']:.2f}× | "
                  f"{d / m['vrwkv_tiny torch']:.2f}× | {d / m['vir_tiny']:.2f}× | "
                  f"{d / m['vir_tiny chunkwise']:.2f}× | "
                  + " | ".join(f"{d / m[f'{name} {mode}']:.2f}×" for name in ("vrwkv_tiny", "vir_tiny chunkwise")
                               for mode in ("all", "off")) + " |", flush=True)
    print(f"\n| image | tokens | vir_tiny parallel ms | chunkwise ms | parallel ÷ chunkwise ({threads[-1]} threads) |")
    print("|---|---|---|---|---|")
    torch.set_num_threads(threads[-1])
    for res in (int(r) for r in ns.vir_forms.split(",")):
        m = interleaved_medians(vir_form_candidates(res), max(5, ns.repeats // 2), warmup=1)
        print(f"| {res}² | {(res // 16) ** 2 + 1} | {m['parallel']:.1f} | {m['chunkwise']:.1f} | "
              f"{m['parallel'] / m['chunkwise']:.2f} |", flush=True)
    torch.set_num_threads(threads[-1])
    for res in resolutions:
        print(f"\nvrwkv_tiny {res}², numba Bi-WKV, {threads[-1]} threads: top ops by self CPU time (3 forwards)\n")
        print(profile_top(res))


if __name__ == "__main__":
    main()
