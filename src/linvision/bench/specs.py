"""What a bench run can run: *runners* (how a model is called), *model specs* (``name[:kwargs][:runner]``),
*presets* (named case lists) and the *ops* of the ops suite (token mixers alone). See :mod:`linvision.bench`."""
from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LinvisionError

__all__ = ["Runner", "RUNNERS", "register_runner", "CaseSkip", "LazyImage", "ModelSpec", "parse_spec", "Preset",
           "DEFAULT_MODELS", "PRESETS", "select_models", "create_model", "create_seg_model", "OpSpec", "OPS"]


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
                 doc="linvision.stream.forward_stream(model, strips): streaming inference (ViR) of an image never "
                     "held whole")
def _run_stream(model: nn.Module, x: LazyImage) -> torch.Tensor:
    from ..stream import StripSource, can_stream, forward_stream
    if not can_stream(model):
        raise CaseSkip(f"{type(model).__name__} cannot stream (linvision.stream.forward_stream takes ViR models)")
    if x.batch != 1:
        raise CaseSkip("streaming classifies one image at a time (batch 1)")
    return forward_stream(model, StripSource(x.strips(), height=x.resolution))


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
    "vrwkv6": Preset(("deit_tiny_patch16_224", "vrwkv_tiny", "vrwkv6_tiny", "deit_small_patch16_224", "vrwkv6_small"),
                     (224, 512, 1024), doc="VRWKV6 T/S against Vision-RWKV-T and DeiT-T/S"),
}


def select_models(patterns: Optional[Sequence[str]], preset: str = "default",
                  pool: Optional[Sequence[str]] = None) -> List[ModelSpec]:
    """Model specs to run: the preset's list (or ``pool``, a list of spec texts, when given), or for each of
    ``patterns`` either the list's specs it matches (``fnmatch``, against the spec text or its bare model name; a
    pattern has ``*?[``) or an explicit spec.

    Raises:
        LinvisionError: unknown preset, a pattern matching nothing, an unknown model name, a bad spec.
    """
    import timm
    if pool is None and preset not in PRESETS:
        raise LinvisionError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    where = f"the {preset!r} preset's" if pool is None else "the suite's"
    pool = [parse_spec(s) for s in (PRESETS[preset].models if pool is None else pool)]
    out: List[ModelSpec] = []
    for pat in patterns or [s.text for s in pool]:
        if any(ch in pat for ch in "*?["):
            hits = [s for s in pool if fnmatch.fnmatchcase(s.text, pat) or fnmatch.fnmatchcase(s.arch, pat)]
            if not hits:
                raise LinvisionError(f"--models: pattern {pat!r} matches none of {where} models "
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


def create_seg_model(spec: ModelSpec, num_classes: int = 11, decoder: str = "upernet", decoder_channels: int = 64,
                     device: torch.device | str = "cpu") -> nn.Module:
    """The segmentation model ``linvision segment train --backbone ARCH`` trains (random weights):
    :func:`linvision.dense.create_segmentation_model` ``(arch, decoder, num_classes, decoder_channels, **kwargs)``,
    ``[B, 3, H, W] -> [B, num_classes, H, W]`` for any H × W (timm's DeiT and Swin get ``dynamic_img_size=True``;
    the input is zero-padded to the encoder's ``size_multiple``), on ``device``."""
    from ..dense import create_segmentation_model
    return create_segmentation_model(spec.arch, decoder, num_classes=num_classes, decoder_channels=decoder_channels,
                                     **dict(spec.kwargs)).to(device)


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
        from .. import ops
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
        from .. import ops
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
