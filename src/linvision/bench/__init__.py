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
``ops_memory.png``. The seg suite (:mod:`~linvision.bench.seg`: segmentation models, backbone + UPerNet, at
``H × W`` sizes) writes ``seg.csv``, ``seg.json``, ``seg_throughput_<mode>.png``, ``seg_memory_<mode>.png``,
``seg_speedup_<mode>.png``.

**Layout.** :mod:`~linvision.bench.specs` (runners, model specs, presets, ops), :mod:`~linvision.bench.measure`
(FLOPs, memory, timing, machine), :mod:`~linvision.bench.worker` (one case, in a subprocess by default),
:mod:`~linvision.bench.suites` (the models and ops suites), :mod:`~linvision.bench.seg` (the seg suite),
:mod:`~linvision.bench.report` (JSON/CSV, plots, markdown) and :mod:`~linvision.bench.cli` (``linvision bench``, also ``python -m linvision.bench``). Progress: a tqdm bar when
stdout and stderr are terminals, else one line per case on stderr.
"""
from __future__ import annotations

from .cli import add_parser, cmd_bench
from .measure import CUSTOM_FLOP_FORMULAS, count_flops, gemm_peak_gflops, machine_info, model_flops, step_flops
from .report import markdown_table, ops_markdown_table, profile_markdown, write_results
from .specs import (DEFAULT_MODELS, OPS, PRESETS, RUNNERS, CaseSkip, ModelSpec, OpSpec, Preset, Runner, create_model,
                    parse_spec, register_runner, select_models)
from .seg import SEG_BACKBONES, SEG_FIELDS, SEG_SIZES, add_seg_ratios, parse_sizes, run_seg, seg_markdown_table
from .specs import create_seg_model
from .suites import OP_FIELDS, RECORD_FIELDS, BenchConfig, add_speedups, run_model_cases, run_models, run_ops
from .worker import execute_case, run_model_case, run_op_case

__all__ = ["Runner", "RUNNERS", "register_runner", "CaseSkip", "ModelSpec", "parse_spec", "Preset", "PRESETS",
           "DEFAULT_MODELS", "select_models", "create_model", "OpSpec", "OPS", "count_flops", "step_flops",
           "model_flops", "gemm_peak_gflops", "machine_info", "CUSTOM_FLOP_FORMULAS", "BenchConfig", "RECORD_FIELDS",
           "OP_FIELDS", "add_speedups", "run_models", "run_ops", "run_model_case", "run_op_case", "execute_case",
           "write_results", "markdown_table", "ops_markdown_table", "profile_markdown", "add_parser", "cmd_bench",
           "create_seg_model", "run_model_cases", "SEG_BACKBONES", "SEG_SIZES", "SEG_FIELDS", "parse_sizes",
           "add_seg_ratios", "run_seg", "seg_markdown_table"]
