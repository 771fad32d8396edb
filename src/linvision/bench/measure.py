"""What a bench case measures and how: FLOPs (``torch.utils.flop_counter`` plus :data:`CUSTOM_FLOP_FORMULAS`),
the machine's GEMM peak, peak memory (:class:`MemoryMeter`), step timing within a deadline, a ``torch.profiler``
top-ops table, and the machine description. See :mod:`linvision.bench` for the definitions."""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .specs import RUNNERS, ModelSpec, Runner, create_model, parse_spec

__all__ = ["CUSTOM_FLOP_FORMULAS", "count_flops", "step_flops", "model_flops", "CaseTimeout", "time_limit",
           "gemm_peak_gflops", "MemoryMeter", "runtime_warmup", "TooSlow", "is_oom", "time_steps", "profile_step",
           "machine_info", "proc_meminfo_mib"]


def _sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out, query, key, value)


# Ops torch's flop counter does not know, by qualified name ("namespace::op"). Entries whose op does not exist
# (older torch) are ignored; a formula already in torch's registry wins. linvision's Bi-WKV op registers its own
# (linvision.ops.biwkv: 29 MACs per token and channel, as the official FLOP script).
CUSTOM_FLOP_FORMULAS: Dict[str, Callable[..., int]] = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu_flop,
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_cpu_backward_flop,
}


def _flop_mapping() -> Dict[Any, Callable[..., int]]:
    from torch.utils.flop_counter import flop_registry
    out = {}
    for qualname, fn in CUSTOM_FLOP_FORMULAS.items():
        ns, _, name = qualname.partition("::")
        try:
            packet = getattr(getattr(torch.ops, ns), name)
        except (AttributeError, RuntimeError):
            continue
        if packet not in flop_registry:
            out[packet] = fn
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of calling ``fn()`` (forward and, if ``fn`` calls it, backward), by ``torch.utils.flop_counter``
    with :data:`CUSTOM_FLOP_FORMULAS` added."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(model: nn.Module, runner: Runner, x: torch.Tensor, train: bool = False,
               autocast: Optional[torch.autocast] = None) -> Tuple[int, Optional[int]]:
    """``(forward FLOPs, train-step FLOPs or None)`` of one step of ``model`` on the batch ``x`` (real tensors; the
    step really runs). A train step is the forward, cross-entropy against class 0 (of every pixel, for ``[B, K, H, W]`` logits) and ``backward()``; its FLOPs
    are forward + backward. Divide by the batch size for per-image numbers."""
    amp = autocast or contextlib.nullcontext()
    if not train:
        with torch.no_grad(), amp:
            return count_flops(lambda: runner.forward(model, x)), None
    model.zero_grad(set_to_none=True)
    box = {}

    def fwd():
        with amp:
            box["out"] = runner.forward(model, x)

    f = count_flops(fwd)
    out = box.pop("out")
    target = torch.zeros(out.shape[:1] + out.shape[2:], dtype=torch.long, device=out.device)  # [B] or [B, H, W]
    b = count_flops(lambda: F.cross_entropy(out.float(), target).backward())
    model.zero_grad(set_to_none=True)
    return f, f + b


def model_flops(spec: ModelSpec | str, resolution: int, train: bool = False, device: str = "cpu",
                in_chans: int = 3) -> Tuple[int, Optional[int]]:
    """``(forward FLOPs, train-step FLOPs or None)`` per image of a freshly built ``spec`` at ``resolution`` (batch 1,
    random weights, ``eval()`` for the forward count). ``gmacs = forward FLOPs / 2e9``."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    model = create_model(spec, resolution, device).eval()
    x = torch.randn(1, in_chans, resolution, resolution, device=device)
    fwd, _ = step_flops(model, RUNNERS[spec.runner], x, False)
    if not train:
        return fwd, None
    return fwd, step_flops(model.train(), RUNNERS[spec.runner], x, True)[1]


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``CaseTimeout`` in the block after ``seconds`` (SIGALRM; a no-op off the main thread or without it)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    if seconds <= 0:
        raise CaseTimeout()

    def handler(signum, frame):
        raise CaseTimeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def gemm_peak_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: Optional[int] = None,
                     repeats: int = 5) -> Dict[str, Any]:
    """The machine's measured matmul throughput: best of ``repeats`` ``[n, n] @ [n, n]`` products in ``dtype``
    (n = 2048 on CPU, 8192 on CUDA), with the current thread count. Returns ``{"gflops", "n", "dtype"}``
    (GFLOP/s, 2·n³ FLOPs per product)."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2 * n ** 3 / best / 1e9, "n": n, "dtype": str(dtype).replace("torch.", "")}


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _ru_maxrss_kib() -> int:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def _malloc_trim() -> None:
    """glibc ``malloc_trim(0)``: return free heap memory to the OS (a no-op elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def runtime_warmup(device: torch.device) -> None:
    """Touch the math libraries once (thread pool, oneDNN/cuBLAS handles) so their lazy set-up is not billed to
    the first case's memory."""
    x = torch.randn(2, 3, 32, 32, device=device, requires_grad=True)
    conv = nn.Conv2d(3, 8, 4, 4).to(device)
    h = conv(x).flatten(2).transpose(1, 2)  # [2, 64, 8]
    h = F.layer_norm(F.gelu(F.linear(h, torch.randn(8, 8, device=device))), (8,))
    q = h.view(2, 64, 1, 8).transpose(1, 2)
    F.scaled_dot_product_attention(q, q, q).sum().backward()


class MemoryMeter:
    """Peak memory of what runs between :meth:`start` and :meth:`stop`, in MiB (see the module docstring).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: resident-set high-water mark minus the
    resident set at ``start`` (the mark is reset at ``start`` through ``/proc/self/clear_refs`` when allowed;
    otherwise the process must be fresh, ``fresh_process=True``, for the number to mean the case)."""

    def __init__(self, device: torch.device, fresh_process: bool):
        self.device, self.fresh = device, fresh_process
        self.method = ("cuda_max_memory_allocated" if device.type == "cuda" else
                       "rss_hwm_delta" if fresh_process else "rss_hwm_delta_in_process")

    def start(self, collect: bool = True) -> None:
        if collect and not self.fresh:
            gc.collect()  # free an earlier case's cyclic garbage before the baseline (0.1-0.5 s: not per op)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _malloc_trim()  # give freed heap pages back, so memory an earlier step left resident is not reused unseen
        self.base_kib = _proc_status_kib("VmRSS")
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.reset = True
        except OSError:
            pass
        if self.base_kib is None:
            self.base_kib = _ru_maxrss_kib()

    def stop(self) -> Dict[str, Optional[float]]:
        """``{"peak_mib", "rss_peak_mib", "baseline_mib", "reserved_peak_mib"}`` (None where not applicable)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_mib": torch.cuda.max_memory_allocated(self.device) / 2 ** 20, "rss_peak_mib": None,
                    "baseline_mib": None, "reserved_peak_mib": torch.cuda.max_memory_reserved(self.device) / 2 ** 20}
        hwm = _proc_status_kib("VmHWM")
        hwm = hwm if hwm is not None else _ru_maxrss_kib()
        valid = self.reset or self.fresh
        return {"peak_mib": (hwm - self.base_kib) / 1024 if valid else None, "rss_peak_mib": hwm / 1024,
                "baseline_mib": self.base_kib / 1024, "reserved_peak_mib": None}


class TooSlow(Exception):
    pass


def is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    msg = str(e)
    return isinstance(e, oom_types) or "out of memory" in msg.lower() or "can't allocate memory" in msg


def time_steps(step: Callable[[], Any], sync: Callable[[], None], *, warmup: int, iters: Optional[int],
                min_time: float, deadline: float, min_iters: int = 3, max_iters: int = 50) -> Dict[str, Any]:
    """Run ``warmup`` untimed steps, then timed steps (``iters``, or enough for ``min_time`` seconds within
    ``[min_iters, max_iters]``), never past ``deadline`` (``time.perf_counter`` scale). Raises ``TooSlow`` when
    not even one timed step fits. Returns step times (s) and counts."""
    warm = []
    for _ in range(max(1, warmup)):
        if time.perf_counter() > deadline:
            raise TooSlow(f"warm-up did not finish within the case budget ({len(warm)} steps of "
                           f"{warm[-1] if warm else float('nan'):.1f} s)")
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        warm.append(time.perf_counter() - t0)
    est = max(warm[-1], 1e-9)
    left = deadline - time.perf_counter()
    fit = int(left // est)
    if fit < 1:
        raise TooSlow(f"one step takes {est:.1f} s, {max(left, 0):.0f} s of the case budget left")
    want = iters if iters else min(max_iters, max(min_iters, math.ceil(min_time / est)))
    n = min(want, fit)
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"times": times, "warmup_times": warm, "iters": n, "iters_cut": n < want}


def profile_step(step: Callable[[], Any], sync: Callable[[], None], device: torch.device,
                 top: int = 12) -> List[Dict[str, Any]]:
    """One ``step()`` under ``torch.profiler``: the ``top`` ops by self time (device time on CUDA, CPU time
    otherwise) as ``[{"op", "self_ms", "calls", "pct"}]`` — what a case spends its time on."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        sync()
    attrs = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)

    def self_us(e) -> float:
        for a in attrs:
            if hasattr(e, a):
                return float(getattr(e, a))
        return 0.0

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return [{"op": e.key, "self_ms": self_us(e) / 1e3, "calls": e.count, "pct": 100 * self_us(e) / total}
            for e in events[:top]]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu", threads: Optional[int] = None) -> Dict[str, Any]:
    """Machine and software description for the JSON ``meta``: CPU model, cores, memory, GPU, load average,
    Python/torch/timm/linvision versions, threads."""
    import timm

    from .. import __version__
    info: Dict[str, Any] = {
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads or torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "linvision": __version__, "device": device,
    }
    mem = proc_meminfo_mib("MemTotal")
    info["mem_total_mib"] = mem
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    info["loadavg_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def proc_meminfo_mib(key: str) -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
