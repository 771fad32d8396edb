"""``linvision bench --suite seg``: inference speed and peak memory of the segmentation models ``linvision segment
train`` builds — backbone + UPerNet decoder (width 64) + head, :func:`linvision.dense.create_segmentation_model` —
at ``H × W`` input sizes, every backbone against timm's DeiT-T and Swin-T in the same run.

Each case is a models-suite case (:func:`~linvision.bench.suites.run_model_cases`: a fresh subprocess per case,
killed at ``--time-budget``, the batch halved on out of memory / too slow, then skipped with the reason) whose
model is :func:`~linvision.bench.specs.create_seg_model` and whose input is ``[B, 3, H, W]``.

**Sizes.** Any ``H × W``: the model zero-pads the image bottom/right to its encoder's ``size_multiple`` (32 for the
stride-16 plain backbones and Swin, 56 for ViT-ResNAS: 360×480 runs as 384×480 / 392×504) and crops the logits
back. DeiT-T resizes its 14×14 position embedding to the patch grid on every call (timm ``dynamic_img_size=True``);
Swin-T (``dynamic_img_size=True`` → ``strict_img_size=False``) keeps its 7×7 windows and pads each stage's map to
a multiple of 7 inside every block (timm's ``SwinTransformerBlock``, attention masks built per call), so it runs at
the padded size with no resizing of its weights.

**Classes.** 11 (CamVid: 11 classes + void; void is an ignore index, not an output channel).

**Modes.** ``infer`` (eval, ``torch.inference_mode``) by default; ``train`` (forward + pixel-wise cross-entropy
against random labels + backward) needs a batch of 2 or more: UPerNet's pooling branch has BatchNorm on 1×1 maps.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import LinvisionError
from .report import _f, case_table, profile_markdown, write_model_plots
from .specs import select_models
from .suites import RECORD_FIELDS, BenchConfig, _check_config, _meta, run_model_cases

__all__ = ["SEG_BACKBONES", "SEG_SIZES", "SEG_FIELDS", "SEG_REFS", "parse_sizes", "add_seg_ratios", "run_seg",
           "seg_markdown_table"]

# The five backbones of the segmentation issue, each as `linvision segment train --backbone NAME` builds it (ViR in
# its default 'auto' retention form: parallel up to 320 tokens, chunkwise above; `vir_tiny:mode=parallel` forces
# the quadratic form).
SEG_BACKBONES: Tuple[str, ...] = ("vrwkv_tiny", "vir_tiny", "vit_resnas_tiny", "deit_tiny_patch16_224",
                                  "swin_tiny_patch4_window7_224")
SEG_SIZES: Tuple[Tuple[int, int], ...] = ((360, 480), (720, 960), (1440, 1920))  # CamVid's size, ×2, ×4
# Ratio column -> (reference arch, record key): img/s ÷ DeiT-T's and Swin-T's, peak MiB ÷ DeiT-T's (same size, mode)
SEG_REFS: Dict[str, Tuple[str, str]] = {
    "speedup_vs_deit": ("deit_tiny_patch16_224", "img_per_s"),
    "memory_vs_deit": ("deit_tiny_patch16_224", "peak_mib"),
    "speedup_vs_swin": ("swin_tiny_patch4_window7_224", "img_per_s"),
}
SEG_FIELDS = (RECORD_FIELDS[:5] + ["height", "width", "pixels"] + RECORD_FIELDS[5:]
              + ["memory_vs_deit", "speedup_vs_swin", "swin_ref"])


def parse_sizes(text: Optional[str]) -> List[Tuple[int, int]]:
    """``"360x480,720x960"`` (``HxW`` items; a bare ``R`` means ``RxR``) → ``[(360, 480), (720, 960)]`` sorted by
    pixel count; None → :data:`SEG_SIZES`.

    Raises:
        LinvisionError: an item that is not ``HxW`` / ``R`` with positive integers, or no item.
    """
    if text is None:
        return list(SEG_SIZES)
    out: List[Tuple[int, int]] = []
    for item in filter(None, (s.strip() for s in str(text).split(","))):
        m = re.fullmatch(r"(\d+)(?:\s*[x×X]\s*(\d+))?", item)
        if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise LinvisionError(f"--seg-sizes: bad size {item!r} in {text!r} (expected HxW,HxW,... with positive "
                                 "integers, e.g. 360x480,720x960)")
        hw = (int(m.group(1)), int(m.group(2) or m.group(1)))
        if hw not in out:
            out.append(hw)
    if not out:
        raise LinvisionError(f"--seg-sizes: no size in {text!r} (expected HxW,HxW,..., e.g. 360x480,720x960)")
    return sorted(out, key=lambda hw: (hw[0] * hw[1], hw))


def add_seg_ratios(records: List[Dict[str, Any]]) -> None:
    """Fill the :data:`SEG_REFS` ratio columns in place — ``speedup_vs_deit`` / ``speedup_vs_swin`` (img/s ÷ the
    reference's) and ``memory_vs_deit`` (peak MiB ÷ DeiT-T's) — against the reference backbone's record of the same
    size and mode in the same run (a spec without kwargs preferred), and ``deit_ref`` / ``swin_ref``."""
    for col, (arch, key) in SEG_REFS.items():
        ref: Dict[Tuple, Dict[str, Any]] = {}
        for r in sorted(records, key=lambda r: bool(r.get("kwargs"))):
            if r["arch"] == arch and r["status"] == "ok" and r.get(key):
                ref.setdefault((r["resolution"], r["mode"]), r)
        for r in records:
            d = ref.get((r["resolution"], r["mode"]))
            if d is not None and r["status"] == "ok" and r.get(key) is not None:
                r[col] = r[key] / d[key]
                r["swin_ref" if "swin" in col else "deit_ref"] = d["model"]


def _check_seg_config(cfg: BenchConfig) -> None:
    _check_config(cfg)
    if cfg.resolutions:
        raise LinvisionError("--resolutions is for --suite models; give the seg suite's sizes as --seg-sizes HxW,...")
    if cfg.num_classes < 1:
        raise LinvisionError(f"--num-classes must be >= 1, got {cfg.num_classes}")
    if cfg.decoder_channels < 1:
        raise LinvisionError(f"--decoder-channels must be >= 1, got {cfg.decoder_channels}")


def run_seg(cfg: BenchConfig, out_dir: Path, log: Callable[[str], None] = lambda s: None
            ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Run the seg suite: every backbone (``cfg.models``: specs or fnmatch patterns over :data:`SEG_BACKBONES`) ×
    size (``cfg.seg_sizes``) × mode (``infer`` by default) with a ``cfg.decoder`` decoder of width
    ``cfg.decoder_channels`` and ``cfg.num_classes`` classes. Writes ``seg.json``/``seg.csv`` after each case and
    ``seg_throughput_<mode>.png``, ``seg_memory_<mode>.png``, ``seg_speedup_<mode>.png`` (and with ``--profile``
``seg_profile.md``) at the end. Returns
    ``(meta, records)``.

    Raises:
        LinvisionError: a bad option (size, model, device, ...), before any case runs.
    """
    from ..dense import DECODERS
    sizes = parse_sizes(cfg.seg_sizes)
    _check_seg_config(cfg)
    if cfg.decoder not in DECODERS:
        raise LinvisionError(f"--decoder: expected one of {', '.join(DECODERS)}, got {cfg.decoder!r}")
    specs = select_models(cfg.models, pool=SEG_BACKBONES)
    modes = ["infer", "train"] if cfg.mode == "both" else [cfg.mode]
    total_budget = cfg.total_budget or None
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    started = time.time()
    meta = _meta(cfg, threads, total_budget, [s.text for s in specs], [f"{h}x{w}" for h, w in sizes], modes)
    meta.update(task="segmentation", num_classes=cfg.num_classes, decoder=cfg.decoder,
                decoder_channels=cfg.decoder_channels,
                model_builder="linvision.dense.create_segmentation_model (as linvision segment train)")
    log(f"GEMM peak: {meta['gemm']['gflops']:.1f} GFLOP/s ({meta['gemm']['dtype']}, n={meta['gemm']['n']})")
    extra = {"task": "seg", "num_classes": cfg.num_classes, "decoder": cfg.decoder,
             "decoder_channels": cfg.decoder_channels}
    cases = [(s, m, hw) for s in specs for m in modes for hw in sizes]
    records = run_model_cases(cfg, meta, cases, out_dir, log, total_budget=total_budget, threads=threads,
                              started=started, stem="seg", fields=SEG_FIELDS, extra=extra, post=add_seg_ratios)
    write_model_plots(out_dir, meta, records, prefix="seg_")
    if any(r.get("profile_top") for r in records):
        from ..checkpoint import atomic_write
        atomic_write(out_dir / "seg_profile.md", profile_markdown(records).encode())
    return meta, records


def seg_markdown_table(records: Sequence[Dict[str, Any]]) -> str:
    """The seg suite's results as a markdown table (one row per case), ratio columns against DeiT-T and Swin-T."""
    return case_table(records, "backbone", "H×W", extra=[
        ("× DeiT-T img/s", lambda r: _f(r.get("speedup_vs_deit"), ".2f")),
        ("× DeiT-T MiB", lambda r: _f(r.get("memory_vs_deit"), ".2f")),
        ("× Swin-T img/s", lambda r: _f(r.get("speedup_vs_swin"), ".2f"))])
