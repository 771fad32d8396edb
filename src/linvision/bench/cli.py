"""``linvision bench`` command line (also ``python -m linvision.bench``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, List

from .report import markdown_table, ops_markdown_table
from .specs import OPS, PRESETS
from .suites import BenchConfig, run_models, run_ops

__all__ = ["add_parser", "cmd_bench"]


_EPILOG = """examples:
  linvision bench                                    # the default set at 224, 512, 1024 (<= 15 min on 2 CPU cores)
  linvision bench --preset vir                       # ViR-T parallel / chunkwise / recurrent vs DeiT-T
  linvision bench --preset vrwkv                     # Vision-RWKV T/S vs DeiT-T/S up to 2048
  linvision bench --models 'vir*' deit_tiny_patch16_224 --resolutions 224,512
  linvision bench --models vir_tiny:mode=chunkwise,chunk_size=256 vir_tiny:mode=recurrent
  linvision bench --mode both --batch-size 8 --output runs/bench-cpu
  linvision bench --device cuda --dtype bf16 --compile --batch-size 64 --resolutions 224,512,1024,2048
  linvision bench --suite ops                        # Bi-WKV vs its reference vs SDPA vs Linear; retention forms
  linvision bench --suite seg --time-budget 300      # segmentation models (backbone + UPerNet-64), 5 backbones
  linvision bench --suite seg --models 'vir*' vir_tiny:mode=chunkwise --seg-sizes 360x480,720x960

A model spec is NAME[:key=value,...][:RUNNER]: key=value items are model kwargs (e.g. mode=chunkwise), a bare
word picks a runner (registered with linvision.bench.register_runner; `default` = model(x), `stream` =
linvision.stream.forward_stream(model, strips)). --models takes specs and fnmatch patterns over the preset's specs.

Each case runs in a fresh subprocess, killed at --time-budget; out of memory or too slow halves the batch, then
the case is skipped with the reason. Results: DIR/bench.csv, DIR/bench.json ({"meta", "records"}),
DIR/throughput_<mode>.png, DIR/memory_<mode>.png, DIR/speedup_<mode>.png; a markdown table on stdout.
Peak memory: CUDA max_memory_allocated; CPU resident-set high-water mark minus the resident set before the model
is built (see `python -c "import linvision.bench as b; help(b)"`). A progress bar is drawn only when stdout and
stderr are terminals; otherwise each case prints one line on stderr.

--suite seg: the segmentation model `linvision segment train --backbone NAME` builds (linvision.dense.
create_segmentation_model: backbone + --decoder of width --decoder-channels + head, --num-classes logits, random
weights) at each --seg-sizes H x W, --models over vrwkv_tiny, vir_tiny, vit_resnas_tiny, deit_tiny_patch16_224,
swin_tiny_patch4_window7_224. Same subprocess / budget / batch-halving machinery; results DIR/seg.csv,
DIR/seg.json, DIR/seg_throughput_<mode>.png, DIR/seg_memory_<mode>.png (vs the pixel count, one line per
backbone), DIR/seg_speedup_<mode>.png; the table has img/s and MiB ratios to DeiT-T and img/s ratios to Swin-T
at the same size. Inputs are zero-padded to the encoder's multiple (32; ViT-ResNAS 56); Swin-T pads each
stage to its 7x7 windows inside its blocks."""


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
    b.add_argument("--suite", choices=("models", "ops", "export", "seg"), default="models",
                   help="models, ops, export (onnxruntime vs eager PyTorch on CPU) or seg (segmentation models) "
                        "[models]")
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
    b.add_argument("--seg-sizes", metavar="HxW,HxW,...",
                   help="seg suite: input sizes (H x W; R = RxR) [360x480,720x960,1440x1920]")
    b.add_argument("--num-classes", type=int, default=11,
                   help="seg suite: output classes [11: CamVid's 11 classes; void is ignored, not predicted]")
    b.add_argument("--decoder", choices=("upernet", "fpn", "dpt"), default="upernet", help="seg suite [upernet]")
    b.add_argument("--decoder-channels", type=int, default=64, help="seg suite: decoder width [64]")
    b.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors")
    b.set_defaults(func=cmd_bench)
    return b


EXPORT_MODELS = ("vrwkv_tiny", "vir_tiny:mode=chunkwise")


def _cmd_export_suite(cfg: BenchConfig, out: Path, log) -> int:
    """``--suite export``: onnxruntime vs eager PyTorch img/s per model spec and resolution (CPU, batch
    ``--batch-size``, interleaved medians; :func:`linvision.export.onnx_vs_eager_timing`); writes
    ``export.csv``/``export.json`` and prints a markdown table."""
    from ..export import onnx_vs_eager_timing
    from .measure import machine_info
    from .report import write_results
    from .specs import parse_spec

    records = []
    for text in cfg.models or EXPORT_MODELS:
        spec = parse_spec(text)
        for res in cfg.resolutions or [224, 1024]:
            log(f"export suite: {text} at {res}x{res}")
            records += onnx_vs_eager_timing(spec.arch, res, batch=cfg.batch_size, repeats=cfg.iters or 5,
                                            warmup=cfg.warmup, threads=cfg.threads, **dict(spec.kwargs))
    meta = {**machine_info(threads=cfg.threads), "suite": "export"}
    write_results(out, "export", meta, records, ["model", "img_size", "batch", "backend", "ms", "img_per_s"])
    print("| model | res | batch | backend | ms | img/s | × eager |\n|---|---|---|---|---|---|---|")
    eager = {(r["model"], r["img_size"]): r["ms"] for r in records if r["backend"] == "eager"}
    for r in records:
        ratio = eager[(r["model"], r["img_size"])] / r["ms"]
        print(f"| `{r['model']}` | {r['img_size']} | {r['batch']} | {r['backend']} | {r['ms']} | {r['img_per_s']} | "
              f"{ratio:.2f} |")
    print(f"\nresults in {out}")
    return 0


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
    elif cfg.suite == "export":
        return _cmd_export_suite(cfg, out, log)
    elif cfg.suite == "seg":
        from .seg import run_seg, seg_markdown_table
        meta, records = run_seg(cfg, out, log)
        table = seg_markdown_table(records)
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
