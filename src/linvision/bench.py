"""``linvision bench``: images per second, peak memory and FLOP efficiency versus resolution, every model family
against timm's DeiT in one run (``--suite models``), and the token mixers alone (``--suite ops``).

**Model specs.** A case is a *model spec* × a resolution (× a mode, ``infer`` and/or ``train``). A spec is a timm
model name, optionally followed by a colon and comma-separated items::

    deit_tiny_patch16_224                  # any timm model (import linvision first, so ours are registered)
    vir_tiny:mode=chunkwise,chunk_size=256 # key=value items are model kwargs (values parsed as Python literals)
    vir_tiny:stream                        # a bare word names a *runner* (see RUNNERS) instead of model(x)

Every model is built with ``timm.create_model(name, num_classes=1000, img_size=resolution, **kwargs)`` (random
weights; ``img_size`` is dropped for models that do not take it), ``eval()`` for ``infer``, ``train()`` for
``train``.

**Runners** (:func:`register_runner`): a named forward function ``(model, x [B, 3, H, W]) -> logits [B, classes]``.
``default`` calls ``model(x)``; an ``infer`` step runs it under ``torch.inference_mode``, a ``train`` step runs it,
takes the cross-entropy against random labels and calls ``backward()`` (no optimizer step). A runner registered
with ``supports_train=False`` is skipped in ``train`` mode with that reason.

**What is measured per case** (each case runs in a fresh subprocess by default, killed at its time budget):

* ``img_per_s`` — batch / median step time over the timed iterations (after warm-up; CUDA synchronized around
  every step); ``ms_per_step`` the median itself. Without ``--iters``, a case runs as many steps as fill
  ``--min-time`` seconds (at least 3, at most 50), capped by what is left of its time budget, so slow cases at
  large resolutions run fewer steps.
* ``peak_mib`` — the memory the case needs on top of the runtime. CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` (reset once the CUDA runtime is up, before the model is built), i.e. weights +
  input + the largest activation/workspace footprint of any step. CPU: the same quantity as the operating system
  sees it — the process's resident-set high-water mark (``VmHWM``) minus its resident set (``VmRSS``) just before
  the model is built, after the imports and a tiny warm-up of the math libraries (thread pools, oneDNN). This
  counts everything a step really touches (torch tensors, oneDNN scratch buffers outside torch's allocator,
  allocator slack), which is what decides whether a case fits in RAM; ``torch.profiler``'s allocation tracking
  would miss non-torch buffers and slow every op. ``rss_peak_mib`` keeps the absolute high-water mark (it includes
  Python, torch and timm, about 0.3 GiB) and ``weights_mib`` the parameter + buffer bytes, for reference. A fresh
  process per case keeps one case's memory out of the next; without isolation the high-water mark is reset through
  ``/proc/self/clear_refs`` (Linux) before each case.
* ``params_m`` (millions), ``gmacs`` — forward multiply-accumulates per image (one MAC = 2 FLOPs, the convention of
  timm/fvcore tables), counted with ``torch.utils.flop_counter.FlopCounterMode`` over one extra step after the
  timed ones (real tensors: counting on the meta device is slower than computing for the many small ops of
  chunkwise/recurrent retention), stopped at the case's deadline if need be. Matmuls, convolutions and attention
  are counted; :data:`CUSTOM_FLOP_FORMULAS` adds the ops torch's table lacks: CPU flash attention (forward and
  backward; without it DeiT on CPU loses 14 % of its MACs) and the Bi-WKV custom op ``linvision::bi_wkv``
  (29·T·C FLOPs per [T, C] sequence, as the official Vision-RWKV FLOP script) once it exists and if it has no
  formula of its own; until then Bi-WKV's inner matmuls are counted as they run. Retention is counted as each form
  runs (the forms differ: parallel is O(T²), chunkwise and recurrent O(T)).
* ``gflops`` — FLOPs of one step (forward, or forward + backward in ``train``) × steps per second, and
  ``peak_frac`` — that as a fraction of the machine's GEMM peak, measured once per run with a large matmul in the
  run's dtype and thread count (the roofline's compute roof).

Out of memory, or one step longer than what is left of the budget: the batch size is halved and the case retried;
at batch 1 it is marked ``skipped`` with the reason (and larger resolutions of the same spec are skipped too). An
exception marks it ``failed`` with the exception. The run never stops on a case. A worker killed at its budget
keeps what it had finished (a model's timing before its FLOP count; an op's forward before its backward).

Outputs (``--output DIR``): ``bench.csv``, ``bench.json`` (``{"meta": {...}, "records": [...]}``, rewritten after
every case), ``throughput_<mode>.png`` and ``memory_<mode>.png`` (log-log, one line per spec) and
``speedup_<mode>.png`` (img/s over the DeiT of the same size — tiny, small, base — at the same resolution, same
run); a markdown table on stdout. The ops suite writes ``ops.csv``, ``ops.json``, ``ops_time.png``,
``ops_memory.png``.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import fnmatch
import gc
import io
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _compat  # noqa: F401  (before timm)
from .errors import LinvisionError

__all__ = ["Runner", "RUNNERS", "register_runner", "ModelSpec", "parse_spec", "Preset", "PRESETS", "DEFAULT_MODELS",
           "select_models", "OpSpec", "OPS", "count_flops", "model_flops", "gemm_peak_gflops", "machine_info",
           "run_models", "run_ops", "markdown_table", "ops_markdown_table", "CUSTOM_FLOP_FORMULAS"]

# ----------------------------------------------------------------------------------------------------- runners


@dataclass(frozen=True)
class Runner:
    """A named way to run a model: ``forward(model, x [B, C, H, W]) -> logits [B, num_classes]``."""

    name: str
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    supports_train: bool = True
    doc: str = ""
    make_input: Optional[Callable[[int, int, torch.device], Any]] = None  # None: torch.randn [B, 3, R, R]
    build_at_resolution: bool = True  # False: the model keeps its default img_size (its pos-embed is resized per call)


RUNNERS: Dict[str, Runner] = {}


def register_runner(name: str, supports_train: bool = True, doc: str = "",
                    make_input: Optional[Callable[[int, int, torch.device], Any]] = None,
                    build_at_resolution: bool = True) -> Callable:
    """Decorator: register ``fn(model, x) -> logits`` as runner ``name`` (selected in a spec as ``model:name``);
    ``make_input(batch, resolution, device)`` builds ``x`` (default: a random ``[B, 3, R, R]`` tensor).

    Register at import time of a linvision module so that the per-case subprocesses see it too."""
    def deco(fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable:
        RUNNERS[name] = Runner(name, fn, supports_train, doc or (fn.__doc__ or "").strip(), make_input,
                               build_at_resolution)
        return fn
    return deco


class CaseSkip(Exception):
    """Raised by a runner (or the harness) to mark a case ``skipped`` with the message as its reason."""


@register_runner("default", doc="model(x)")
def _run_default(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@dataclass(frozen=True)
class LazyImage:
    """A ``resolution``² uint8 RGB image that exists only as row strips generated on demand (for streaming)."""

    resolution: int
    batch: int = 1
    rows: int = 16

    def strips(self):
        import numpy as np
        rng = np.random.default_rng(0)
        for r in range(0, self.resolution, self.rows):
            yield rng.integers(0, 256, (min(self.rows, self.resolution - r), self.resolution, 3), dtype=np.uint8)


def _lazy_image(batch: int, resolution: int, device: torch.device) -> LazyImage:
    return LazyImage(resolution, batch)


@register_runner("stream", supports_train=False, make_input=_lazy_image, build_at_resolution=False,
                 doc="model.forward_stream(strips): streaming inference (ViR) of an image never held whole")
def _run_stream(model: nn.Module, x: LazyImage) -> torch.Tensor:
    fn = getattr(model, "forward_stream", None)
    if fn is None:
        raise CaseSkip(f"{type(model).__name__} has no forward_stream")
    if x.batch != 1:
        raise CaseSkip("streaming classifies one image at a time (batch 1)")
    from .stream import StripSource
    return fn(StripSource(x.strips(), height=x.resolution))


# ------------------------------------------------------------------------------------------------ model specs


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``text`` as written (normalized), timm ``arch`` name, model ``kwargs``, ``runner``."""

    text: str
    arch: str
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    runner: str = "default"


def _literal(s: str) -> Any:
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s


def parse_spec(text: str) -> ModelSpec:
    """Parse ``name[:item,item,...]`` (items ``key=value`` = model kwargs, a bare word = runner name).

    Raises:
        LinvisionError: empty name, a malformed item, two runners or an unknown runner.
    """
    text = text.strip()
    arch, _, rest = text.partition(":")
    if not arch or not re.fullmatch(r"[\w.\-]+", arch):
        raise LinvisionError(f"--models: bad model spec {text!r} (expected NAME or NAME:key=value,...)")
    kwargs, runner = [], None
    for item in filter(None, (s.strip() for s in rest.split(","))) if rest else ():
        if "=" in item:
            k, _, v = item.partition("=")
            if not k.isidentifier():
                raise LinvisionError(f"--models: bad kwarg {item!r} in spec {text!r}")
            kwargs.append((k.strip(), _literal(v.strip())))
        elif runner is not None:
            raise LinvisionError(f"--models: two runners ({runner!r}, {item!r}) in spec {text!r}")
        else:
            runner = item
    runner = runner or "default"
    if runner not in RUNNERS:
        raise LinvisionError(f"--models: unknown runner {runner!r} in spec {text!r} (known: {', '.join(RUNNERS)})")
    items = [f"{k}={v}" for k, v in kwargs] + ([runner] if runner != "default" else [])
    return ModelSpec(arch + (":" + ",".join(items) if items else ""), arch, tuple(kwargs), runner)


@dataclass(frozen=True)
class Preset:
    """A named case list: model specs, resolutions, and the run's total time budget (None: unlimited)."""

    models: Tuple[str, ...]
    resolutions: Tuple[int, ...] = (224, 512, 1024)
    total_budget: Optional[float] = None
    doc: str = ""


# The default set: timm's DeiT baselines and every linvision family's tiny and small. ViR runs in the parallel
# form (its fastest at 224²) and the chunkwise form (linear: its fastest at high resolution); the recurrent form is
# in the `vir` preset (a per-token Python loop: for memory, not speed). Add a family with one line each.
DEFAULT_MODELS: Tuple[str, ...] = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "vrwkv_tiny",
    "vrwkv_small",
    "vir_tiny:mode=parallel",
    "vir_tiny:mode=chunkwise,chunk_size=256",
    "vir_small:mode=chunkwise,chunk_size=256",
    "vit_resnas_tiny",  # any size (official: multiples of 56; 512/1024 are zero-padded to multiples of 14)
)

PRESETS: Dict[str, Preset] = {
    "default": Preset(DEFAULT_MODELS, (224, 512, 1024), total_budget=840.0,
                      doc="DeiT-T/S and every family's tiny and small; fits 15 min on 2 CPU cores"),
    "vir": Preset(("deit_tiny_patch16_224", "vir_tiny:mode=parallel", "vir_tiny:mode=chunkwise",
                   "vir_tiny:mode=chunkwise,chunk_size=256", "vir_tiny:mode=recurrent", "vir_tiny:stream",
                   "vir2d_tiny:mode=parallel", "vir2d_tiny:mode=recurrent", "vir2d_tiny:stream"), (224, 512, 1024),
                  doc="ViR-T in each retention form against DeiT-T (the ViR issue's table)"),
    "vrwkv": Preset(("deit_tiny_patch16_224", "deit_small_patch16_224", "vrwkv_tiny", "vrwkv_small"),
                    (224, 512, 1024, 2048), doc="Vision-RWKV T/S against DeiT-T/S (the Bi-WKV issue's table)"),
}


def select_models(patterns: Optional[Sequence[str]], preset: str = "default") -> List[ModelSpec]:
    """Model specs to run: the preset's list, or for each of ``patterns`` either the preset's specs it matches
    (``fnmatch``, against the spec text or its bare model name; a pattern has ``*?[``) or an explicit spec.

    Raises:
        LinvisionError: unknown preset, a pattern matching nothing, an unknown model name, a bad spec.
    """
    import timm
    if preset not in PRESETS:
        raise LinvisionError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    pool = [parse_spec(s) for s in PRESETS[preset].models]
    out: List[ModelSpec] = []
    for pat in patterns or [s.text for s in pool]:
        if any(ch in pat for ch in "*?["):
            hits = [s for s in pool if fnmatch.fnmatchcase(s.text, pat) or fnmatch.fnmatchcase(s.arch, pat)]
            if not hits:
                raise LinvisionError(f"--models: pattern {pat!r} matches none of the {preset!r} preset's models "
                                     f"({', '.join(s.text for s in pool)}); name other models explicitly")
        else:
            hits = [parse_spec(pat)]
        out.extend(h for h in hits if h not in out)
    for s in out:
        if not timm.is_model(s.arch):
            raise LinvisionError(f"--models: unknown model {s.arch!r} (not in timm's registry)")
    return out


def create_model(spec: ModelSpec, resolution: int, device: torch.device | str = "cpu") -> nn.Module:
    """``timm.create_model(arch, num_classes=1000, img_size=resolution, **kwargs)`` with random weights (``img_size``
    left out for models that do not accept it, and for runners that keep the default size, e.g. streaming, whose
    weights must not grow with the image), on ``device``."""
    import timm
    kwargs = dict(spec.kwargs)
    kwargs.setdefault("num_classes", 1000)
    if not RUNNERS[spec.runner].build_at_resolution:
        return timm.create_model(spec.arch, pretrained=False, **kwargs).to(device)
    try:
        model = timm.create_model(spec.arch, pretrained=False, img_size=resolution, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    return model.to(device)


# --------------------------------------------------------------------------------------------- FLOP counting


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
    step really runs). A train step is the forward, cross-entropy against class 0 and ``backward()``; its FLOPs
    are forward + backward. Divide by the batch size for per-image numbers."""
    import contextlib
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
    target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
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


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise ``_Timeout`` in the block after ``seconds`` (SIGALRM; a no-op off the main thread or without it)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    if seconds <= 0:
        raise _Timeout()

    def handler(signum, frame):
        raise _Timeout()

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


# ------------------------------------------------------------------------------------------------ memory meter


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


def _runtime_warmup(device: torch.device) -> None:
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


# -------------------------------------------------------------------------------------------------- timing


class _TooSlow(Exception):
    pass


def _is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    msg = str(e)
    return isinstance(e, oom_types) or "out of memory" in msg.lower() or "can't allocate memory" in msg


def _time_steps(step: Callable[[], Any], sync: Callable[[], None], *, warmup: int, iters: Optional[int],
                min_time: float, deadline: float, min_iters: int = 3, max_iters: int = 50) -> Dict[str, Any]:
    """Run ``warmup`` untimed steps, then timed steps (``iters``, or enough for ``min_time`` seconds within
    ``[min_iters, max_iters]``), never past ``deadline`` (``time.perf_counter`` scale). Raises ``_TooSlow`` when
    not even one timed step fits. Returns step times (s) and counts."""
    warm = []
    for _ in range(max(1, warmup)):
        if time.perf_counter() > deadline:
            raise _TooSlow(f"warm-up did not finish within the case budget ({len(warm)} steps of "
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
        raise _TooSlow(f"one step takes {est:.1f} s, {max(left, 0):.0f} s of the case budget left")
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


# ------------------------------------------------------------------------------------------------- workers


def _setup_worker(case: Dict[str, Any]) -> torch.device:
    torch.set_num_threads(case["threads"])
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    device = torch.device(case["device"])
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LinvisionError("--device cuda: no CUDA device available")
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def _deadline(case: Dict[str, Any]) -> float:
    """The case's wall-clock deadline (``time.time()`` scale, set by the parent) on the ``perf_counter`` scale,
    less a second for writing the result."""
    return time.perf_counter() + (case["deadline_wall"] - time.time()) - 1.0


def run_model_case(case: Dict[str, Any], fresh_process: bool = False,
                   save_partial: Callable[[Dict[str, Any]], None] = lambda r: None) -> Dict[str, Any]:
    """Run one model case (``case``: model, resolution, batch_size, mode, dtype, device, threads, compile,
    channels_last, warmup, iters, min_time, deadline_wall, flops). Returns a result dict with ``status`` ``ok`` or
    ``oom`` / ``too_slow`` / ``skipped`` / ``failed`` and a ``reason``; never raises for a case problem.
    ``save_partial(result)`` is called once the timing is done (a worker killed later keeps it)."""
    device = _setup_worker(case)
    spec, runner = parse_spec(case["model"]), None
    res, bs, train = case["resolution"], case["batch_size"], case["mode"] == "train"
    deadline = _deadline(case)
    out: Dict[str, Any] = {}
    try:
        runner = RUNNERS[spec.runner]
        if train and not runner.supports_train:
            raise CaseSkip(f"runner {runner.name!r} does not support train mode")
        _runtime_warmup(device)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        meter = MemoryMeter(device, fresh_process)
        meter.start()
        model = create_model(spec, res, device)
        model.train(train)
        mf = torch.channels_last if case.get("channels_last") else torch.contiguous_format
        model = model.to(memory_format=mf)
        out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        out["weights_mib"] = (sum(p.numel() * p.element_size() for p in model.parameters())
                              + sum(b.numel() * b.element_size() for b in model.buffers())) / 2 ** 20
        x = (runner.make_input(bs, res, device) if runner.make_input is not None
             else torch.randn(bs, 3, res, res, device=device).contiguous(memory_format=mf))
        y = torch.randint(0, 1000, (bs,), device=device)
        fn = torch.compile(model) if case.get("compile") else model
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["dtype"] == "bf16")

        if train:
            def step():
                model.zero_grad(set_to_none=True)
                with amp:
                    o = runner.forward(fn, x)
                F.cross_entropy(o.float(), y).backward()
        else:
            def step():
                with torch.inference_mode(), amp:
                    runner.forward(fn, x)

        warmup = max(case["warmup"], 3) if case.get("compile") else case["warmup"]
        t = _time_steps(step, sync, warmup=warmup, iters=case.get("iters"), min_time=case["min_time"],
                        deadline=deadline)
        out.update(meter.stop())
        med = statistics.median(t["times"])
        out.update(status="ok", reason="", img_per_s=bs / med, ms_per_step=1e3 * med,
                   ms_min=1e3 * min(t["times"]), ms_max=1e3 * max(t["times"]), iters=t["iters"],
                   warmup=len(t["warmup_times"]), memory_method=meter.method)
        if t["iters_cut"]:
            out["reason"] = f"{t['iters']} timed steps (cut by the case budget)"
        save_partial(out)
        if case.get("profile"):  # one more step under torch.profiler, within the budget
            try:
                with _time_limit(deadline - time.perf_counter()):
                    out["profile_top"] = profile_step(step, sync, device)
            except _Timeout:
                out["reason"] = "; ".join(filter(None, [out["reason"], "not profiled (case budget)"]))
        if case.get("flops", True):  # one more step (eager), counted; after timing and memory, within the budget
            try:
                with _time_limit(deadline - time.perf_counter()):
                    fwd, stp = step_flops(model, runner, x, train, amp)
                out.update(gmacs=fwd / bs / 2e9, gflop_per_img_step=(stp if train else fwd) / bs / 1e9)
                out["gflops"] = out["gflop_per_img_step"] * out["img_per_s"]
            except _Timeout:
                out["reason"] = "; ".join(filter(None, [out["reason"], "FLOPs not counted (case budget)"]))
            except Exception as e:  # noqa: BLE001  (the timing stands without FLOPs)
                out["reason"] = "; ".join(filter(None, [out["reason"], f"FLOPs not counted: {_one_line(e)}"]))
    except CaseSkip as e:
        out.update(status="skipped", reason=str(e))
    except _TooSlow as e:
        out.update(status="too_slow", reason=f"too slow at batch {bs}: {e}")
    except LinvisionError:
        raise
    except Exception as e:  # noqa: BLE001  (a case failure must not stop the run)
        if _is_oom(e):
            out.update(status="oom", reason=f"out of memory at batch {bs}: {_one_line(e)}")
        else:
            out.update(status="failed", reason=_one_line(e))
    return out


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def _worker_main() -> None:
    """Subprocess entry: ``python -c 'from linvision.bench import _worker_main; _worker_main()' IN.json OUT.json``."""
    case = json.loads(Path(sys.argv[1]).read_text())
    out, partial = Path(sys.argv[2]), Path(sys.argv[2] + ".partial")

    def save_partial(result: Dict[str, Any]) -> None:
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, partial)

    try:
        fn = run_op_case if case["kind"] == "op" else run_model_case
        result = fn(case, fresh_process=True, save_partial=save_partial)
    except Exception as e:  # noqa: BLE001
        result = {"status": "failed", "reason": _one_line(e)}
    out.write_text(json.dumps(result))


def _execute(case: Dict[str, Any], isolate: bool) -> Dict[str, Any]:
    """Run a case in a fresh subprocess (killed at its deadline) or in this process."""
    if not isolate:
        fn = run_op_case if case["kind"] == "op" else run_model_case
        return fn(case, fresh_process=False)
    timeout = case["deadline_wall"] - time.time()
    if timeout <= 0:
        return {"status": "too_slow", "reason": "no time left in the case budget"}
    with tempfile.TemporaryDirectory(prefix="linvision-bench-") as tmp:
        inp, outp = Path(tmp) / "case.json", Path(tmp) / "result.json"
        inp.write_text(json.dumps(case))
        cmd = [sys.executable, "-c", "from linvision.bench import _worker_main; _worker_main()", str(inp), str(outp)]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired:
            killed = f"killed at the case time budget ({case['budget']:.3g} s)"
            partial = Path(str(outp) + ".partial")
            if partial.exists():  # what finished before the kill (the timing; an op's forward)
                r = json.loads(partial.read_text())
                r["reason"] = "; ".join(filter(None, [r.get("reason"), f"then {killed}"]))
                return r
            return {"status": "too_slow", "reason": killed}
        if outp.exists():
            return json.loads(outp.read_text())
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        if proc.returncode < 0:
            return {"status": "oom", "reason": f"worker killed by signal {-proc.returncode} (out of memory?)"}
        return {"status": "failed", "reason": f"worker exited with status {proc.returncode}: "
                                              f"{err[-1] if err else 'no output'}"}


def _run_with_backoff(case: Dict[str, Any], isolate: bool) -> Dict[str, Any]:
    """Run ``case``; on ``oom`` / ``too_slow`` halve the batch size and retry (same budget), down to 1."""
    attempts = []
    while True:
        r = _execute(case, isolate)
        if r["status"] in ("oom", "too_slow") and case["batch_size"] > 1:
            attempts.append(f"batch {case['batch_size']}: {r['reason']}")
            case = dict(case, batch_size=case["batch_size"] // 2)
            continue
        break
    r["batch_size"] = case["batch_size"]
    r["attempts"] = attempts
    if r["status"] in ("oom", "too_slow"):
        r["skip_kind"], r["status"] = r["status"], "skipped"
    return r


# -------------------------------------------------------------------------------------------- machine info


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

    from . import __version__
    info: Dict[str, Any] = {
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads or torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "linvision": __version__, "device": device,
    }
    mem = _proc_meminfo_mib("MemTotal")
    info["mem_total_mib"] = mem
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    info["loadavg_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def _proc_meminfo_mib(key: str) -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------ the suites


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


RECORD_FIELDS = ["model", "arch", "runner", "kwargs", "resolution", "batch_size", "mode", "dtype", "status",
                 "reason", "img_per_s", "ms_per_step", "ms_min", "ms_max", "iters", "warmup", "peak_mib",
                 "rss_peak_mib", "baseline_mib", "reserved_peak_mib", "weights_mib", "params_m", "gmacs",
                 "gflop_per_img_step", "gflops", "peak_frac", "speedup_vs_deit", "deit_ref", "memory_method",
                 "case_s", "attempts"]


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
    from tqdm.auto import tqdm
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
    records: List[Dict[str, Any]] = []
    cases = [(s, m, r) for s in specs for m in modes for r in resolutions]
    blocked: Dict[Tuple[str, str], str] = {}
    bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr, disable=not cfg.progress or None,
               dynamic_ncols=True)
    for spec, mode, res in bar:
        bar.set_postfix_str(f"{spec.text} {res}px {mode}")
        rec = {"model": spec.text, "arch": spec.arch, "runner": spec.runner, "kwargs": dict(spec.kwargs),
               "resolution": res, "mode": mode, "dtype": cfg.dtype}
        t0 = time.time()
        left = None if total_budget is None else total_budget - (t0 - started)
        if (spec.text, mode) in blocked:
            rec.update(status="skipped", reason=blocked[(spec.text, mode)], batch_size=cfg.batch_size)
        elif left is not None and left < min(10.0, cfg.time_budget):
            rec.update(status="skipped", reason=f"--total-budget ({total_budget:.0f} s) used up",
                       batch_size=cfg.batch_size)
        else:
            budget = cfg.time_budget if left is None else min(cfg.time_budget, left)
            case = {"kind": "model", "model": spec.text, "resolution": res, "batch_size": cfg.batch_size,
                    "mode": mode, "dtype": cfg.dtype, "device": cfg.device, "threads": threads,
                    "compile": cfg.compile, "channels_last": cfg.channels_last, "warmup": cfg.warmup,
                    "iters": cfg.iters, "min_time": cfg.min_time, "flops": cfg.flops, "profile": cfg.profile,
                    "budget": budget,
                    "deadline_wall": t0 + budget}
            rec.update(_run_with_backoff(case, cfg.isolate))
            cut = budget < cfg.time_budget
            if rec["status"] == "skipped" and rec.get("skip_kind") == "too_slow" and cut:
                rec["reason"] += f" (case budget cut to {budget:.0f} s by --total-budget {total_budget:.0f} s)"
            elif rec["status"] == "skipped" and rec.get("skip_kind") and rec["batch_size"] == 1:
                what = {"oom": "out of memory"}.get(rec["skip_kind"], "too slow")
                blocked[(spec.text, mode)] = f"already {what} at {res}px"
        rec["case_s"] = time.time() - t0
        if rec.get("gflops") is not None:
            rec["peak_frac"] = rec["gflops"] / meta["gemm"]["gflops"]
        records.append(rec)
        log(_record_line(rec))
        _finish_meta(meta, started)
        add_speedups(records)
        write_results(out_dir, "bench", meta, records, RECORD_FIELDS)
    bar.close()
    write_model_plots(out_dir, meta, records)
    if any(r.get("profile_top") for r in records):
        from .checkpoint import atomic_write
        atomic_write(out_dir / "profile.md", profile_markdown(records).encode())
    return meta, records


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
    head = f"{r['model']} {r['resolution']}px {r['mode']} b{r.get('batch_size')}"
    if r["status"] != "ok":
        return f"{head}: {r['status']}: {r.get('reason', '')}"
    pk = "?" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
    return f"{head}: {r['img_per_s']:.2f} img/s, {r['ms_per_step']:.1f} ms/step, {pk} MiB ({r['case_s']:.0f} s)"


# --------------------------------------------------------------------------------------------------- ops suite


@dataclass(frozen=True)
class OpSpec:
    """A token mixer benchmarked alone on ``T`` tokens of width ``C`` (``H`` heads for retention).

    ``make(B, T, C, H, device, dtype) -> (fn, leaves)``: ``fn()`` computes the op from the tensors ``leaves``
    (which require grad; activations in ``dtype``, fp32 or bf16). ``mem_mib(B, T, C, H, backward) -> estimated
    MiB`` for ops whose memory grows faster than T
    (None: linear in T); an op over ``--max-memory-mib`` is skipped before it runs."""

    name: str
    make: Callable[..., Tuple[Callable[[], torch.Tensor], List[torch.Tensor]]]
    mem_mib: Optional[Callable[[int, int, int, int, bool], float]] = None
    doc: str = ""


def _leaf(*shape, device, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()


def _make_wkv(fn_name: str):
    def make(B, T, C, H, device, dtype=torch.float32):
        from . import ops
        fn = getattr(ops, fn_name)
        w, u = _leaf(C, device=device, scale=1 / T), _leaf(C, device=device, scale=1 / T)  # fp32 parameters
        k, v = _leaf(B, T, C, device=device, dtype=dtype), _leaf(B, T, C, device=device, dtype=dtype)
        return (lambda: fn(w, u, k, v)), [w, u, k, v]
    return make


def _make_sdpa(B, T, C, H, device, dtype=torch.float32):
    h = max(1, C // 64)
    q, k, v = (_leaf(B, h, T, C // h, device=device, dtype=dtype) for _ in range(3))
    return (lambda: F.scaled_dot_product_attention(q, k, v)), [q, k, v]


def _make_linear(B, T, C, H, device, dtype=torch.float32):
    lin = nn.Linear(C, C).to(device, dtype)
    x = _leaf(B, T, C, device=device, dtype=dtype)
    return (lambda: lin(x)), [x] + list(lin.parameters())


def _make_retention(form: str):
    def make(B, T, C, H, device, dtype=torch.float32):
        from . import ops
        fn = getattr(ops, f"retention_{form}")
        q, k, v = (_leaf(B, T, H, 64, device=device, dtype=dtype) for _ in range(3))
        g = ops.decay_gammas(H).to(device)
        return (lambda: fn(q, k, v, g)[0]), [q, k, v]
    return make


OPS: Dict[str, OpSpec] = {o.name: o for o in [
    OpSpec("bi_wkv", _make_wkv("bi_wkv"), doc="linvision.ops.bi_wkv, [B, T, C]"),
    # float64 [B, T, T, C]: logits, where, exp, p*v (x2.5 with autograd's saved tensors); measured 174 / 239 MiB
    # at T = 196 against 225 / 563 estimated
    OpSpec("bi_wkv_ref", _make_wkv("bi_wkv_ref"),
           lambda B, T, C, H, bwd: (10 if bwd else 4) * B * T * T * C * 8 / 2 ** 20,
           doc="linvision.ops.bi_wkv_ref (float64, O(T^2))"),
    OpSpec("sdpa", _make_sdpa, doc="F.scaled_dot_product_attention, q/k/v [B, C/64, T, 64]"),
    OpSpec("linear", _make_linear, doc="one nn.Linear(C, C) on [B, T, C]"),
    # fp32 [B, H, T, T]: decay mask, scores, masked scores (+ their grads); measured 62 / 119 MiB at T = 1024
    OpSpec("retention_parallel", _make_retention("parallel"),
           lambda B, T, C, H, bwd: (10 if bwd else 5) * B * H * T * T * 4 / 2 ** 20,
           doc="linvision.ops.retention_parallel, [B, T, H, 64]"),
    OpSpec("retention_chunkwise", _make_retention("chunkwise"), doc="linvision.ops.retention_chunkwise (64)"),
    # autograd keeps ~3 [B, H, K, V] tensors per token
    OpSpec("retention_recurrent", _make_retention("recurrent"),
           lambda B, T, C, H, bwd: (3 * B * T * H * 64 * 64 * 4 / 2 ** 20) if bwd else 1.0,
           doc="linvision.ops.retention_recurrent (a per-token loop)"),
]}

OP_FIELDS = ["op", "tokens", "channels", "heads", "batch_size", "status", "reason", "fwd_ms", "fwdbwd_ms",
             "fwdbwd_x_linear", "fwd_peak_mib", "fwdbwd_peak_mib", "gflop_fwd", "fwd_iters", "fwdbwd_iters",
             "est_fwd_mib", "est_fwdbwd_mib", "memory_method", "case_s"]


def _op_step(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor], backward: bool) -> Callable[[], None]:
    """One forward (``no_grad``) or forward + backward (a fixed random output gradient) of an op."""
    if not backward:
        def step():
            with torch.no_grad():
                fn()
        return step
    g = torch.randn_like(fn().detach())

    def step():
        for p in leaves:
            p.grad = None
        fn().backward(g)
    return step


def run_op_case(case: Dict[str, Any], fresh_process: bool = False,
                save_partial: Callable[[Dict[str, Any]], None] = lambda r: None) -> Dict[str, Any]:
    """One op at one T: forward (under ``no_grad``) and forward + backward, each timed and memory-metered; a
    direction over the memory estimate limit or the time budget is skipped with its reason."""
    device = _setup_worker(case)
    op = OPS[case["op"]]
    B, T, C, H = case["batch_size"], case["tokens"], case["channels"], case["heads"]
    deadline = _deadline(case)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out: Dict[str, Any] = {"status": "ok", "reason": ""}
    reasons = []
    _runtime_warmup(device)
    meter = MemoryMeter(device, fresh_process)
    for direction, key in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")):
        bwd = key == "fwdbwd"
        est = op.mem_mib(B, T, C, H, bwd) if op.mem_mib else None
        out[f"est_{key}_mib"] = est
        limit = case.get("max_memory_mib")
        if est is not None and limit is not None and est > limit:
            reasons.append(f"{direction} skipped: needs ~{est:.0f} MiB (estimate), over --max-memory-mib {limit:.0f}")
            continue
        try:
            meter.start(collect=False)
            fn, leaves = op.make(B, T, C, H, device, torch.bfloat16 if case.get("dtype") == "bf16" else torch.float32)
            step = _op_step(fn, leaves, bwd)
            t = _time_steps(step, sync, warmup=case["warmup"], iters=case.get("iters"), min_time=case["min_time"],
                            deadline=deadline)
            mem = meter.stop()
            out[f"{key}_ms"] = 1e3 * statistics.median(t["times"])
            out[f"{key}_iters"] = t["iters"]
            out[f"{key}_peak_mib"] = mem["peak_mib"]
            save_partial(dict(out, memory_method=meter.method, reason="; ".join(reasons)))
            if not bwd and case.get("flops", True):
                try:
                    with _time_limit(deadline - time.perf_counter()), torch.no_grad():
                        out["gflop_fwd"] = count_flops(fn) / 1e9
                except _Timeout:
                    reasons.append("FLOPs not counted (case budget)")
            del fn, leaves, step
        except _TooSlow as e:
            reasons.append(f"{direction} too slow: {e}")
        except Exception as e:  # noqa: BLE001
            reasons.append(f"{direction} {'out of memory' if _is_oom(e) else 'failed'}: {_one_line(e)}")
    out["memory_method"] = meter.method
    out["reason"] = "; ".join(reasons)
    if out.get("fwd_ms") is None and out.get("fwdbwd_ms") is None:
        out["status"] = "skipped"
    return out


def run_ops(cfg: BenchConfig, out_dir: Path, log: Callable[[str], None] = lambda s: None
            ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Run the ops suite: every selected op × T (``cfg.tokens``), forward and forward + backward. Writes
    ``ops.json``/``ops.csv`` (after each case) and ``ops_time.png``/``ops_memory.png``. Returns ``(meta, records)``."""
    from tqdm.auto import tqdm
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
        avail = _proc_meminfo_mib("MemAvailable")
        limit = 4096.0 if avail is None else min(4096.0, 0.5 * avail)
    started = time.time()
    meta = _meta(cfg, threads, None, names, [], ["fwd", "fwd+bwd"])
    meta["max_memory_mib"] = limit
    records: List[Dict[str, Any]] = []
    cases = [(n, T) for n in names for T in sorted(cfg.tokens)]
    bar = tqdm(cases, desc="bench ops", unit="case", file=sys.stderr, disable=not cfg.progress or None,
               dynamic_ncols=True)
    for name, T in bar:
        bar.set_postfix_str(f"{name} T={T}")
        t0 = time.time()
        case = {"kind": "op", "op": name, "tokens": T, "channels": cfg.channels, "heads": cfg.heads,
                "batch_size": cfg.batch_size, "device": cfg.device, "dtype": cfg.dtype, "threads": threads,
                "warmup": cfg.warmup,
                "iters": cfg.iters, "min_time": min(cfg.min_time, 1.0), "max_memory_mib": limit,
                "flops": cfg.flops, "budget": cfg.time_budget, "deadline_wall": t0 + cfg.time_budget}
        rec = {"op": name, "tokens": T, "channels": cfg.channels, "heads": cfg.heads, "batch_size": cfg.batch_size}
        r = _execute(case, cfg.isolate)
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


# ------------------------------------------------------------------------------------------------- outputs


def write_results(out_dir: Path, stem: str, meta: Dict[str, Any], records: List[Dict[str, Any]],
                  fields: List[str]) -> None:
    """``<stem>.json`` = ``{"meta", "records"}`` and ``<stem>.csv`` (``fields`` columns, then any others),
    each written atomically."""
    from .checkpoint import atomic_write
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / f"{stem}.json",
                 json.dumps({"meta": meta, "records": records}, indent=1, default=str).encode())
    extra = sorted({k for r in records for k in r} - set(fields))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields + extra, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v))
                    for k, v in r.items()})
    atomic_write(out_dir / f"{stem}.csv", buf.getvalue().encode())


def _plot_title(meta: Dict[str, Any], what: str) -> str:
    dev = meta.get("gpu") or f"{meta['cpu_model']}, {meta['threads']} threads"
    return f"{what}\n{dev}, {meta['dtype']}, batch {meta['batch_size']}"


def write_model_plots(out_dir: Path, meta: Dict[str, Any], records: List[Dict[str, Any]]) -> List[Path]:
    """``throughput_<mode>.png``, ``memory_<mode>.png`` (log-log vs resolution, one line per spec) and
    ``speedup_<mode>.png`` (img/s ÷ DeiT of the same size; only if the run has DeiT). Returns the files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    written = []
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: cycle[i % len(cycle)] for i, m in enumerate(dict.fromkeys(r["model"] for r in records))}
    for mode in sorted({r["mode"] for r in records}):
        rs = [r for r in records if r["mode"] == mode and r["status"] == "ok"]
        plots = [("throughput", "img_per_s", "images / s", True), ("memory", "peak_mib", "peak memory (MiB)", True),
                 ("speedup", "speedup_vs_deit", "img/s ÷ DeiT of the same size", False)]
        for stem, key, ylabel, all_models in plots:
            lines: Dict[str, List[Tuple[int, float]]] = {}
            for r in rs:
                if r.get(key) is not None and r[key] > 0 and (all_models or not r["arch"].startswith("deit_")):
                    lines.setdefault(r["model"], []).append((r["resolution"], r[key]))
            if not lines:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.8))
            for name, pts in lines.items():
                pts.sort()
                style = "--" if name.startswith("deit_") else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name, color=color[name])
            if stem == "speedup":
                ax.axhline(1.0, color="k", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            res = sorted({r["resolution"] for r in rs})
            ax.set_xticks(res)
            ax.set_xticklabels([str(x) for x in res])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("resolution (px, square)")
            ax.set_ylabel(ylabel)
            ax.set_title(_plot_title(meta, f"{stem} ({mode})"), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{stem}_{mode}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write_op_plots(out_dir: Path, meta: Dict[str, Any], records: List[Dict[str, Any]]) -> List[Path]:
    """``ops_time.png`` and ``ops_memory.png``: ms and peak MiB vs T (log-log), forward and forward + backward
    side by side, one line per op. Returns the files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for stem, suffix, ylabel in (("ops_time", "ms", "time (ms)"), ("ops_memory", "peak_mib", "peak memory (MiB)")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        any_line = False
        for ax, (key, title) in zip(axes, (("fwd", "forward"), ("fwdbwd", "forward + backward"))):
            for op in dict.fromkeys(r["op"] for r in records):
                pts = sorted((r["tokens"], r[f"{key}_{suffix}"]) for r in records
                             if r["op"] == op and r.get(f"{key}_{suffix}") is not None and r[f"{key}_{suffix}"] > 0)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=op)
                    any_line = True
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens T")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}, C={meta.get('channels')}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(_plot_title(meta, stem.replace("_", " ")), fontsize=9)
        fig.tight_layout()
        if any_line:
            path = out_dir / f"{stem}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written


def _f(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def markdown_table(records: List[Dict[str, Any]]) -> str:
    """The models suite's results as a markdown table (one row per case)."""
    head = ("| model | res | batch | mode | img/s | ms/step | peak MiB | params (M) | GMACs | GFLOP/s | % GEMM peak "
            "| × DeiT | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in records:
        note = r.get("reason") or ""
        if r["status"] != "ok":
            note = f"**{r['status']}**: {note}"
        rows.append(f"| `{r['model']}` | {r['resolution']} | {r.get('batch_size', '')} | {r['mode']} "
                    f"| {_f(r.get('img_per_s'), '.2f')} | {_f(r.get('ms_per_step'), '.1f')} "
                    f"| {_f(r.get('peak_mib'), '.0f')} | {_f(r.get('params_m'), '.1f')} | {_f(r.get('gmacs'), '.2f')} "
                    f"| {_f(r.get('gflops'), '.1f')} | {_f(r.get('peak_frac') and 100 * r['peak_frac'], '.0f')} "
                    f"| {_f(r.get('speedup_vs_deit'), '.2f')} | {note.replace('|', '/')} |")
    return "\n".join([head] + rows)


def profile_markdown(records: List[Dict[str, Any]]) -> str:
    """The ``--profile`` top ops of every case, one markdown table per case."""
    parts = []
    for r in records:
        if r.get("profile_top"):
            parts.append(f"### `{r['model']}` {r['resolution']}px {r['mode']} (batch {r['batch_size']}, "
                         f"{_f(r.get('ms_per_step'), '.1f')} ms/step)\n\n"
                         "| op | self ms | calls | % |\n|---|---|---|---|")
            parts.extend(f"| `{e['op']}` | {e['self_ms']:.2f} | {e['calls']} | {e['pct']:.1f} |"
                         for e in r["profile_top"])
            parts.append("")
    return "\n".join(parts)


def ops_markdown_table(records: List[Dict[str, Any]]) -> str:
    """The ops suite's results as a markdown table (one row per op and T)."""
    head = ("| op | T | fwd ms | fwd+bwd ms | fwd+bwd × Linear | fwd peak MiB | fwd+bwd peak MiB | GFLOP fwd "
            "| note |\n|---|---|---|---|---|---|---|---|---|")
    rows = [f"| `{r['op']}` | {r['tokens']} | {_f(r.get('fwd_ms'), '.2f')} | {_f(r.get('fwdbwd_ms'), '.2f')} "
            f"| {_f(r.get('fwdbwd_x_linear'), '.2f')} | {_f(r.get('fwd_peak_mib'), '.0f')} "
            f"| {_f(r.get('fwdbwd_peak_mib'), '.0f')} | {_f(r.get('gflop_fwd'), '.3f')} "
            f"| {(r.get('reason') or '').replace('|', '/')} |" for r in records]
    return "\n".join([head] + rows)


# --------------------------------------------------------------------------------------------------------- CLI

_EPILOG = """examples:
  linvision bench                                    # the default set at 224, 512, 1024 (<= 15 min on 2 CPU cores)
  linvision bench --preset vir                       # ViR-T parallel / chunkwise / recurrent vs DeiT-T
  linvision bench --preset vrwkv                     # Vision-RWKV T/S vs DeiT-T/S up to 2048
  linvision bench --models 'vir*' deit_tiny_patch16_224 --resolutions 224,512
  linvision bench --models vir_tiny:mode=chunkwise,chunk_size=256 vir_tiny:mode=recurrent
  linvision bench --mode both --batch-size 8 --output runs/bench-cpu
  linvision bench --device cuda --dtype bf16 --compile --batch-size 64 --resolutions 224,512,1024,2048
  linvision bench --suite ops                        # Bi-WKV vs its reference vs SDPA vs Linear; retention forms

A model spec is NAME[:key=value,...][:RUNNER]: key=value items are model kwargs (e.g. mode=chunkwise), a bare
word picks a runner (registered with linvision.bench.register_runner; `default` = model(x), `stream` =
model.forward_stream(x)). --models takes specs and fnmatch patterns over the preset's specs.

Each case runs in a fresh subprocess, killed at --time-budget; out of memory or too slow halves the batch, then
the case is skipped with the reason. Results: DIR/bench.csv, DIR/bench.json ({"meta", "records"}),
DIR/throughput_<mode>.png, DIR/memory_<mode>.png, DIR/speedup_<mode>.png; a markdown table on stdout.
Peak memory: CUDA max_memory_allocated; CPU resident-set high-water mark minus the resident set before the model
is built (see `python -c "import linvision.bench as b; help(b)"`)."""


def _int_list(s: str) -> List[int]:
    try:
        out = [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``linvision`` subparsers ``sub``."""
    b = sub.add_parser("bench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
                       help="throughput, memory and FLOPs vs resolution (models) or tokens (ops)",
                       description="Benchmark models (img/s, ms/step, peak MiB, GMACs, GFLOP/s vs the GEMM peak) "
                                   "across resolutions, or the token-mixing ops across token counts.")
    b.add_argument("--suite", choices=("models", "ops"), default="models", help="[models]")
    b.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="model list + resolutions: " + "; ".join(f"{k}: {p.doc}" for k, p in PRESETS.items()))
    b.add_argument("--models", nargs="+", metavar="SPEC", help="model specs or fnmatch patterns [the preset's]")
    b.add_argument("--resolutions", type=_int_list, metavar="R,R,...", help="[the preset's, default 224,512,1024]")
    b.add_argument("--batch-size", type=int, default=1, help="starting batch size (halved on OOM/too slow) [1]")
    b.add_argument("--mode", choices=("infer", "train", "both"), default="infer",
                   help="inference (inference_mode) and/or a train step (forward + backward) [infer]")
    b.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast [fp32]")
    b.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up >= 3 steps)")
    b.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N] [cpu]")
    b.add_argument("--threads", type=int, help="torch CPU threads [all cores]")
    b.add_argument("--output", metavar="DIR", help="output folder [runs/bench-<suite>-<timestamp>]")
    b.add_argument("--time-budget", type=float, default=120.0, metavar="S",
                   help="seconds per case, all attempts and the subprocess start included [120]")
    b.add_argument("--total-budget", type=float, metavar="S",
                   help="seconds for the whole run; later cases are skipped once used up; 0 = unlimited "
                        "[default preset: 840, others unlimited]")
    b.add_argument("--warmup", type=int, default=1, help="untimed steps per case [1]")
    b.add_argument("--iters", type=int, help="timed steps per case [auto: fill --min-time, 3..50]")
    b.add_argument("--min-time", type=float, default=2.0, metavar="S", help="timed seconds per case when auto [2]")
    b.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each case in a fresh subprocess (memory isolation, hard time limit) [on]")
    b.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True, help="count FLOPs [on]")
    b.add_argument("--profile", action="store_true",
                   help="profile one more step per case (torch.profiler): top ops in bench.json and profile.md")
    b.add_argument("--ops", nargs="+", metavar="PATTERN", help=f"ops suite: ops to run [{', '.join(OPS)}]")
    b.add_argument("--tokens", type=_int_list, default=[196, 1024, 4096, 16384], metavar="T,T,...",
                   help="ops suite: token counts [196,1024,4096,16384]")
    b.add_argument("--channels", type=int, default=192, help="ops suite: C [192]")
    b.add_argument("--heads", type=int, default=3, help="ops suite: retention heads of 64 [3]")
    b.add_argument("--max-memory-mib", type=float, metavar="MIB",
                   help="ops suite: skip an O(T^2) op whose estimated memory exceeds this [min(4096, half of free)]")
    b.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(ns: argparse.Namespace) -> int:
    """``linvision bench``: run the suite, write the files, print the markdown table on stdout."""
    import logging
    fields = set(BenchConfig.__dataclass_fields__)
    cfg = BenchConfig(**{k: v for k, v in vars(ns).items() if k in fields and v is not None})
    out = Path(cfg.output or Path("runs") / f"bench-{cfg.suite}-{time.strftime('%Y%m%d-%H%M%S')}")
    logger = logging.getLogger("linvision")

    def log(msg: str) -> None:
        from tqdm.auto import tqdm
        tqdm.write(f"linvision: {msg}", file=sys.stderr)

    if cfg.suite == "ops":
        meta, records = run_ops(cfg, out, log)
        table = ops_markdown_table(records)
    else:
        meta, records = run_models(cfg, out, log)
        table = markdown_table(records)
    load = meta.get("loadavg_start") or [0]
    if load[0] > 0.25 * (meta.get("cpu_affinity") or meta.get("cpu_count") or 1) and cfg.device == "cpu":
        logger.warning(f"load average was {load[0]:.2f} at the start: other processes shared the CPU, so these "
                       "timings are not quiet-machine numbers")
    print(table)
    print(f"\n{len(records)} cases ({sum(r['status'] == 'ok' for r in records)} ok) in {meta['duration_s']:.0f} s; "
          f"GEMM peak {meta['gemm']['gflops']:.1f} GFLOP/s; results in {out}")
    return 0
