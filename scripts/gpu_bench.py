"""GPU benchmarks of the Triton kernels and the models (run by scripts/gpu_check.sh; needs CUDA).

Usage: ``PYTHONPATH=src python3 scripts/gpu_bench.py [--out DIR] [--budget SECONDS] [--quick]``

Three tables (median times; ops by ``triton.testing.do_bench``, models by CUDA events), printed as markdown and
written to ``DIR/bench.json`` and ``DIR/bench.md``:

1. Bi-WKV (Triton, bf16 in, fp32 inside) forward and forward+backward vs ``F.scaled_dot_product_attention`` (flash,
   bf16, heads of 64) and the PyTorch Bi-WKV op, at T = 4,096 / 16,384, C = 192 / 384, B = 1 / 4;
2. chunkwise retention: Triton vs the PyTorch chunkwise form (bf16, heads of 64);
3. ``vrwkv_tiny``, ``vir_tiny`` (mode chunkwise) and timm's ``deit_tiny_patch16_224``: images/s and peak memory
   (``torch.cuda.max_memory_allocated``) at 224² / 1024² / 2048² (batch 8 / 1 / 1), bf16 autocast inference.

Every row is measured in its own try block (an error or OOM is recorded in the row, the rest goes on), and the
script stops starting rows once ``--budget`` seconds have passed. Imports only linvision's models and ops + timm.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import linvision  # noqa: F401  (registers the models; must precede timm)
import timm
from linvision.ops import bi_wkv, decay_gammas, retention_chunkwise

T0 = time.time()
ROWS: list = []
META: dict = {}
OUT_DIR = Path(".")


def _torch_path(on: bool):
    """Context: the PyTorch forms (``LINVISION_TRITON=0``) instead of the Triton kernels."""
    class _Ctx:
        def __enter__(self):
            self.old = os.environ.get("LINVISION_TRITON")
            if on:
                os.environ["LINVISION_TRITON"] = "0"

        def __exit__(self, *a):
            if self.old is None:
                os.environ.pop("LINVISION_TRITON", None)
            else:
                os.environ["LINVISION_TRITON"] = self.old
    return _Ctx()


def bench_ms(fn, budget_s: float = 3.0) -> float:
    """Median milliseconds of ``fn()`` by ``triton.testing.do_bench``."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=min(200, int(budget_s * 1000 / 4)), return_mode="median"))


def events_ms(fn, iters: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def record(table: str, row: dict, fn):
    """Run ``fn() -> dict`` into ``row`` (error text on failure), append, print one line."""
    t = time.time()
    try:
        row.update(fn())
    except Exception as e:  # one row's failure (OOM, compile error) must not stop the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    finally:
        torch.cuda.empty_cache()
    row["table"], row["wall_s"] = table, round(time.time() - t, 1)
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    write()  # after every row: a run killed by its time limit still leaves what it measured


def write() -> str:
    META["wall_s"] = round(time.time() - T0, 1)
    (OUT_DIR / "bench.json").write_text(json.dumps({"meta": META, "rows": ROWS}, indent=1))
    md = f"GPU benchmark: {json.dumps(META)}\n" + to_markdown()
    (OUT_DIR / "bench.md").write_text(md)
    return md


def _wkv_leaves(B, T, C):
    w = (torch.randn(C, device="cuda") * 3 / T).requires_grad_()
    u = (torch.randn(C, device="cuda") * 2 / T).requires_grad_()
    k = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return w, u, k, v


def _fwd_bwd(f, leaves):
    def step():
        out = f()
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None
    return step


def bench_wkv(B, T, C, torch_op: bool):
    w, u, k, v = _wkv_leaves(B, T, C)
    H = C // 64
    q4, k4, v4 = (torch.randn(B, H, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    res = {}
    with torch.no_grad():
        res["wkv_fwd_ms"] = bench_ms(lambda: bi_wkv(w, u, k, v))
    res["wkv_fwdbwd_ms"] = bench_ms(_fwd_bwd(lambda: bi_wkv(w, u, k, v), (w, u, k, v)))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # flash only (an error, not a silent fallback)
        with torch.no_grad():
            res["sdpa_fwd_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q4, k4, v4))
        res["sdpa_fwdbwd_ms"] = bench_ms(_fwd_bwd(lambda: F.scaled_dot_product_attention(q4, k4, v4),
                                                  (q4, k4, v4)))
    if torch_op:
        with _torch_path(True):
            with torch.no_grad():
                res["wkv_pytorch_fwd_ms"] = events_ms(lambda: bi_wkv(w, u, k, v), iters=3)
            res["wkv_pytorch_fwdbwd_ms"] = events_ms(_fwd_bwd(lambda: bi_wkv(w, u, k, v), (w, u, k, v)), iters=3)
    return {k_: round(v_, 4) for k_, v_ in res.items()}


def bench_retention(B, T, H, chunk=64):
    q, k, v = (torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gamma = decay_gammas(H).cuda()
    f = lambda: retention_chunkwise(q, k, v, gamma, chunk_size=chunk)[0]  # noqa: E731
    res = {}
    for name, torch_op in (("triton", False), ("pytorch", True)):
        with _torch_path(torch_op):
            with torch.no_grad():
                res[f"{name}_fwd_ms"] = bench_ms(f) if not torch_op else events_ms(f, iters=3)
            step = _fwd_bwd(f, (q, k, v))
            res[f"{name}_fwdbwd_ms"] = bench_ms(step) if not torch_op else events_ms(step, iters=3)
    return {k_: round(v_, 4) for k_, v_ in res.items()}


def bench_model(name, res, batch, kw, max_s=20.0, graph=False, math=False):
    """img/s and peak MiB of one bf16-autocast inference step; ``graph``: replay a captured CUDA graph of the step
    (removes the per-op launch cost, which dominates small batches of these 12-block models); ``math``: SDPA's math
    backend (attention materialised: the ViT without flash attention that the Vision-RWKV paper compares with)."""
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = timm.create_model(name, img_size=res, num_classes=1000, **kw).cuda().eval()
    x = torch.randn(batch, 3, res, res, device="cuda")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), \
                (sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()):
            model(x)
    t = time.time()
    step()  # warm-up (Triton compiles, cuDNN picks)
    torch.cuda.synchronize()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        step = g.replay
        step()
        torch.cuda.synchronize()
    once = time.time() - t
    iters = max(1, min(10, int(max_s / max(once, 1e-3) / 2)))
    ms = events_ms(step, iters=iters, warmup=1 if once < max_s / 4 else 0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return {"ms": round(ms, 3), "img_per_s": round(batch * 1000 / ms, 2), "peak_mib": round(peak, 1),
            "iters": iters}


def to_markdown() -> str:
    lines = []
    for table, cols in (("bi_wkv", ["B", "T", "C", "wkv_fwd_ms", "sdpa_fwd_ms", "wkv_fwdbwd_ms", "sdpa_fwdbwd_ms",
                                    "wkv_pytorch_fwd_ms", "wkv_pytorch_fwdbwd_ms", "error"]),
                        ("retention", ["B", "T", "H", "triton_fwd_ms", "pytorch_fwd_ms", "triton_fwdbwd_ms",
                                       "pytorch_fwdbwd_ms", "error"]),
                        ("models", ["model", "res", "batch", "img_per_s", "ms", "peak_mib", "error"])):
        rows = [r for r in ROWS if r["table"] == table]
        if not rows:
            continue
        lines += [f"\n### {table}\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for bench.json / bench.md")
    ap.add_argument("--budget", type=float, default=200.0, help="stop starting rows after this many seconds")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--models", default="", help="only model rows at these RES:BATCH pairs, e.g. 1024:8,2048:4, "
                    "each eager and as a replayed CUDA graph")
    ap.add_argument("--math", action="store_true", help="with --models: also DeiT-T with SDPA's math backend")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    global OUT_DIR
    OUT_DIR = Path(args.out)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    import triton
    META.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                timm=timm.__version__, budget_s=args.budget)

    def time_left() -> bool:
        return time.time() - T0 < args.budget

    if args.models:  # only the model rows, at the given res:batch pairs, eager and CUDA-graph replay
        pairs = [tuple(int(v) for v in p.split(":")) for p in args.models.split(",")]
        models = [("deit_tiny_patch16_224", {}), ("vrwkv_tiny", {}), ("vir_tiny", {"mode": "chunkwise"})]
        for res, batch in pairs:
            for name, kw in models:
                for graph in (False, True):
                    if time_left():
                        label = name + ("[chunkwise]" if kw else "") + ("[graph]" if graph else "")
                        record("models", {"model": label, "res": res, "batch": batch},
                               lambda: bench_model(name, res, batch, kw, graph=graph))
            if args.math and time_left():
                record("models", {"model": "deit_tiny_patch16_224[math SDPA]", "res": res, "batch": batch},
                       lambda: bench_model("deit_tiny_patch16_224", res, batch, {}, math=True))
        print(write())
        return 0
    Bs = (1,) if args.quick else (1, 4)
    for T in (4096, 16384):
        for C in (192, 384):
            for B in Bs:
                if time_left():
                    record("bi_wkv", {"B": B, "T": T, "C": C},
                           lambda: bench_wkv(B, T, C, torch_op=(B == 1 and C == 192)))
    for T in (4096, 16384):
        for H in (3, 6):
            for B in Bs:
                if time_left():
                    record("retention", {"B": B, "T": T, "H": H}, lambda: bench_retention(B, T, H))
    models = [("deit_tiny_patch16_224", {}), ("vrwkv_tiny", {}), ("vir_tiny", {"mode": "chunkwise"})]
    for res, batch in ((224, 8), (1024, 1), (2048, 1)):
        for name, kw in models:
            if time_left():
                label = name + ("[chunkwise]" if kw else "")
                record("models", {"model": label, "res": res, "batch": batch},
                       lambda: bench_model(name, res, batch, kw))
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
