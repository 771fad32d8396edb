"""``linvision`` command line: ``train``, ``eval``, ``predict``, ``bench``, ``export``, ``segment`` and the NAS
commands (also ``python -m linvision``).

``linvision`` with no arguments (or ``linvision train`` with no options) runs the main job: ``MAIN_JOB`` — the
default model trained on the CIFAR-10 subset embedded in the package, written to ``runs/<model>-<timestamp>``.
User errors print one line ``linvision: error: ...`` on stderr and exit with status 2 (``--debug`` shows the
traceback instead); progress bars and logs go to stderr, results to stdout.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .engine.recipe import AUTO_SHORT_MAX_EPOCHS, MIN_STEPS_PER_EPOCH, RECIPE_CHOICES
from .errors import LinvisionError, user_message

DEFAULT_MODEL = "vrwkv_tiny"

# Every default of `linvision train`, i.e. the main job. Tune here; `linvision train --help` shows these values.
MAIN_JOB: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "data": None,            # None: the embedded CIFAR-10 subset (500 train + 100 test images per class, 32x32)
    "img_size": 32,
    "patch_size": 8,         # 4x4 tokens
    "epochs": 7,             # with the install, within 10 minutes on 2 CPU cores (README)
    "recipe": "auto",        # auto | short | deit: see linvision/engine/recipe.py (auto: short for <= 20 epochs)
    "batch_size": None,      # per process; None: global 128, halved while an epoch has < 64 steps (recipe.py)
    "lr": None,              # None: the recipe's (short: 2e-3 Vision-RWKV/ViR, 1e-3 others; deit 1e-3)
    "lr_base_size": 128,     # --lr is the peak lr at this global batch; scaled linearly with the global batch
    "min_lr": 1e-5,
    "warmup_lr": 1e-5,
    "warmup_epochs": None,   # None: min(recipe cap, 10% of the run's epochs)
    "weight_decay": 0.05,
    "opt": None,             # None: the recipe's (short: nadamw for Vision-RWKV, else adamw)
    "mixup": False,          # measured: deit_tiny p8, 15 epochs: 45.8% off vs 40.3% on
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "smoothing": None,       # None: the recipe's (0.1)
    "ema": True,
    "ema_decay": None,       # None: horizon 1/(1-decay) = 10% of the run's steps, in [0.9, 0.998]
    "clip_grad": 1.0,
    "drop_path": None,       # None: the recipe's (short 0, deit 0.1)
    "auto_augment": None,
    "re_prob": 0.0,
    "workers": None,         # None: min(2, cpu_count)
    "threads": None,         # None: all CPU cores
    "max_steps": None,
    "train_subset": None,
    "val_split": 0.05,       # model choice (raw/EMA) on this part of train/ (fraction or count; 0: none; val/ wins)
    "seed": 0,
    "output": None,          # None: runs/<model>-<YYYYmmdd-HHMMSS>
    "save_every_steps": 0,   # 0: train_state.pt only at epoch ends; N: also after every N-th optimizer step
    "log_interval": 0,       # without a terminal: also a progress line every N steps (0: one line per epoch)
    "device": "auto",        # cuda:LOCAL_RANK if CUDA is available, else cpu
    "amp": False,            # mixed precision: float16 + grad scaler on CUDA, bfloat16 on CPU
    "arch": None,            # ViT-ResNAS architecture (from --arch FILE, e.g. `linvision search`'s best.json)
}

_TRAIN_EPILOG = """examples:
  linvision                                   # the main job (same as `linvision train`)
  linvision train --epochs 5 --output runs/quick
  linvision train --model deit_tiny_patch16_224 --img-size 32 --patch-size 4 --epochs 10
  linvision train --data ../shared/data/imagenette-224.tar.gz --img-size 128 --patch-size 16
  linvision train --resume runs/quick --epochs 10     # continue (and extend) a run
  linvision train --max-steps 20 --train-subset 256 --no-ema --output /tmp/smoke
  linvision train --save-every-steps 50 --output runs/long         # pre-emptible: a recovery point every 50 steps
  torchrun --nproc_per_node 4 -m linvision train --batch-size 64   # 4 processes (GPUs), global batch 256

--data accepts a folder DATA/train/<class>/<image> + DATA/test/<class>/<image> (or val/), a folder holding
one such folder, or a .tar/.tar.gz/.tgz of either (extracted once to $LINVISION_CACHE/datasets or
~/.cache/linvision/datasets). Every epoch writes model.safetensors, config.json, train_state.pt, metrics.csv
and curves.png to the output folder (atomically: temp file, fsync, rename); --save-every-steps N also rewrites
train_state.pt after every N-th step. --resume DIR continues exactly where DIR's train_state.pt left off, also
after a kill in the middle of an epoch.

Under torchrun (WORLD_SIZE > 1) training is data-parallel (DDP; nccl on CUDA, gloo on CPU): --batch-size is per
process, the peak learning rate is --lr x global batch / --lr-base-size, and only rank 0 writes."""

_EVAL_EPILOG = """examples:
  linvision eval --checkpoint runs/quick
  linvision eval --checkpoint runs/quick --json
  linvision eval --checkpoint runs/quick --data ../shared/data/cifar10-jpeg.tar.gz

Evaluates on the test/ (or val/) split; the default data is the embedded CIFAR-10 subset's test split.
--json prints exactly one JSON object on stdout: top1, top5 (percent), loss, n, skipped (unreadable images),
per_class, checkpoint, data."""

_PREDICT_EPILOG = """examples:
  linvision predict --checkpoint runs/quick cat.jpg dog.png
  linvision predict --checkpoint runs/quick --top-k 3 --json images/*.jpg
  linvision predict --checkpoint runs/vir --stream huge_scan.tif      # native size, row by row (ViR models)

--json prints one JSON object on stdout:
  {"checkpoint", "model", "results": [{"image", "predictions": [{"class", "index", "prob"}, ...]}, ...]}"""


def _fmt(v: Any) -> str:
    return "none" if v is None else str(v)


def build_parser() -> argparse.ArgumentParser:
    """The ``linvision`` argument parser (subcommands ``train``, ``eval``, ``predict``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks for errors")
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                        help="torch CPU threads (default: all cores; under torchrun: shared by the node's processes)")
    common.add_argument("--workers", type=int, default=argparse.SUPPRESS,
                        help="data-loader worker processes (default: min(2, cores))")
    common.add_argument("--max-pixels", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="largest image (width x height) decoded whole; larger ones are refused as possible "
                             "decompression bombs (default: PIL's limit, about 89.5 million)")
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="linvision", formatter_class=fmt,
        description="Train, evaluate and run linear-complexity vision backbones (ViR, Vision-RWKV) on CPU.",
        epilog="With no command, runs the main job (`linvision train` with its defaults).\n"
               "Run `linvision COMMAND --help` for the options and examples of each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = MAIN_JOB
    t = sub.add_parser("train", parents=[common], formatter_class=fmt, epilog=_TRAIN_EPILOG,
                       argument_default=argparse.SUPPRESS, help="train a model (default: the main job)",
                       description=f"Train an image classifier. With no options: the main job, {d['model']} on the "
                                   "embedded CIFAR-10 subset. Defaults are shown in brackets.")
    t.add_argument("--model", help=f"timm model name [{d['model']}]")
    t.add_argument("--data", metavar="PATH", help="data folder or archive [embedded CIFAR-10 subset]")
    t.add_argument("--output", metavar="DIR", help="output folder [runs/<model>-<timestamp>; the resumed folder]")
    t.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its settings are reused)")
    t.add_argument("--img-size", type=int, help=f"input resolution [{d['img_size']}]")
    t.add_argument("--patch-size", type=int, help=f"patch size for ViT-style models [{d['patch_size']}]")
    t.add_argument("--epochs", type=int, help=f"[{d['epochs']}]")
    t.add_argument("--recipe", choices=RECIPE_CHOICES,
                   help="training recipe for the options below marked [recipe]: short (small data, short runs: "
                        "NAdamW for Vision-RWKV, no drop path, peak lr 2e-3 for Vision-RWKV/ViR, 1e-3 for other "
                        "models), deit (DeiT's AdamW and regularisers, peak lr 1e-3), auto = short for runs "
                        f"of at most {AUTO_SHORT_MAX_EPOCHS} epochs, else deit [{d['recipe']}]")
    t.add_argument("--batch-size", type=int, help="images per step and process [global 128, halved while an epoch "
                                                   f"would have < {MIN_STEPS_PER_EPOCH} steps]")
    t.add_argument("--lr", type=float, help="peak learning rate at a global batch of --lr-base-size [recipe]")
    t.add_argument("--lr-base-size", type=int, metavar="N",
                   help="global batch (--batch-size x processes) that --lr is meant for; the peak lr used is "
                        f"--lr x global batch / N (linear scaling) [{d['lr_base_size']}]")
    t.add_argument("--min-lr", type=float, help=f"final cosine learning rate [{d['min_lr']}]")
    t.add_argument("--warmup-lr", type=float, help=f"learning rate at step 0 [{d['warmup_lr']}]")
    t.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs (may be fractional) "
                                                       "[min(recipe cap: short 1, deit 2; 10%% of --epochs)]")
    t.add_argument("--weight-decay", type=float, help=f"[{d['weight_decay']}]")
    t.add_argument("--opt", help="timm optimizer name [recipe: short nadamw for Vision-RWKV, adamw for other "
                                 "models; deit adamw]")
    t.add_argument("--mixup", action=argparse.BooleanOptionalAction,
                   help=f"mixup + cutmix with soft-target loss [{'on' if d['mixup'] else 'off'}]")
    t.add_argument("--mixup-alpha", type=float, help=f"[{d['mixup_alpha']}]")
    t.add_argument("--cutmix-alpha", type=float, help=f"[{d['cutmix_alpha']}]")
    t.add_argument("--smoothing", type=float, help="label smoothing [recipe: 0.1]")
    t.add_argument("--ema", action=argparse.BooleanOptionalAction,
                   help="keep an EMA of the weights; the better of EMA/raw on the validation data is saved "
                        f"[{'on' if d['ema'] else 'off'}]")
    t.add_argument("--ema-decay", type=float, help="EMA decay [1 - 1/H for a horizon H of 10%% of the run's "
                                                    "optimizer steps, within 0.9 - 0.998]")
    t.add_argument("--clip-grad", type=float, help=f"gradient-norm clipping, 0 = off [{d['clip_grad']}]")
    t.add_argument("--drop-path", type=float, help="stochastic depth rate [recipe: short 0, deit 0.1]")
    t.add_argument("--auto-augment", metavar="POLICY", help="timm auto-augment policy, e.g. rand-m9-mstd0.5 "
                                                            f"[{_fmt(d['auto_augment'])}]")
    t.add_argument("--re-prob", type=float, help=f"random-erasing probability [{d['re_prob']}]")
    t.add_argument("--seed", type=int, help=f"[{d['seed']}]")
    t.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N optimizer steps of this invocation (ends that epoch early, saves, stops)")
    t.add_argument("--train-subset", type=int, metavar="N", help="train on a class-balanced subset of N images")
    t.add_argument("--val-split", type=float, metavar="F",
                   help="hold out this part of train/ (a fraction < 1, or a count; class-balanced, seeded by --seed, "
                        "at least one image per class) to choose between raw and EMA weights; a data set's val/ "
                        f"split (next to test/) is used instead; 0 = none: EMA kept [{d['val_split']}]")
    t.add_argument("--log-interval", type=int, metavar="N",
                   help="when stderr is not a terminal, also log progress every N steps (0: one line per epoch) "
                        f"[{d['log_interval']}]")
    t.add_argument("--save-every-steps", type=int, metavar="N",
                   help="also write the resumable train_state.pt after every N-th optimizer step, 0 = only at "
                        f"epoch ends [{d['save_every_steps']}]")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help=f"auto: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu [{d['device']}]")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="mixed precision: float16 with a grad scaler on CUDA, bfloat16 on CPU "
                        f"[{'on' if d['amp'] else 'off'}]")
    t.add_argument("--arch", metavar="FILE", help="ViT-ResNAS architecture JSON (e.g. `linvision search`'s "
                                                  "best.json); sets --model/--img-size unless given")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", parents=[common], formatter_class=fmt, epilog=_EVAL_EPILOG,
                       help="evaluate a checkpoint", description="Evaluate a checkpoint on a test split.")
    e.add_argument("--checkpoint", required=True, metavar="DIR", help="run folder (or its model.safetensors)")
    e.add_argument("--data", metavar="PATH", help="data folder or archive [embedded CIFAR-10 subset]")
    e.add_argument("--batch-size", type=int, default=256, help="[256]")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", parents=[common], formatter_class=fmt, epilog=_PREDICT_EPILOG,
                       help="classify image files", description="Classify image files with a checkpoint.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run folder (or its model.safetensors)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image [5]")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--stream", action="store_true",
                   help="classify each image at its native size, streamed row by row in constant memory "
                        "(ViR models; .npy, PPM, BMP and uncompressed TIFF are read by strips)")
    p.set_defaults(func=_cmd_predict)

    from .nas.cli import add_nas_commands  # ViT-ResNAS pipeline: `supernet train`, `search`
    add_nas_commands(sub, common, fmt)
    from .bench import add_parser as add_bench_parser  # `linvision bench`: see linvision/bench/
    add_bench_parser(sub)
    from .export import add_parser as add_export_parser  # `linvision export`: see linvision/export.py
    add_export_parser(sub, common)
    from .engine.segment_cli import add_segment_commands  # `segment train|eval|predict`: see engine/segmentation.py
    add_segment_commands(sub, common, fmt)
    return parser


def train_args(given: dict[str, Any]) -> argparse.Namespace:
    """Complete ``train`` arguments: ``MAIN_JOB`` defaults, overridden by a resumed run's stored arguments, overridden
    by the options given on the command line (``given``). Fills in the default output folder."""
    from .checkpoint import load_train_state
    merged = dict(MAIN_JOB)
    if given.get("resume"):
        stored = load_train_state(given["resume"])["args"]
        merged.update({"val_split": 0, **stored})  # runs from before --val-split had none
        merged["output"] = given["resume"]
    merged.update(given)
    merged.setdefault("resume", None)
    merged.pop("debug", None)
    if merged["output"] is None:
        merged["output"] = str(Path("runs") / f"{merged['model']}-{time.strftime('%Y%m%d-%H%M%S')}")
    return argparse.Namespace(**{k: merged.get(k) for k in list(MAIN_JOB) + ["resume"]})


def _positive(given: dict[str, Any]) -> None:
    """One-line errors for numeric options out of range (argparse only checks the type): see
    :func:`linvision.options.check_options`, which ``main`` applies to every command."""
    from .options import check_options
    check_options(given)


def _cmd_train(ns: argparse.Namespace) -> int:
    from .engine import train
    given = {k: v for k, v in vars(ns).items() if k not in ("func", "command")}
    _positive(given)
    if given.get("arch"):
        from .nas.cli import arch_train_args
        given = arch_train_args(given)
    args = train_args(given)
    _positive(vars(args))  # also the stored arguments of a resumed run
    summary = train(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    t = summary["test"]
    print(f"done: epoch {summary['epoch']}, step {summary['step']}, test top-1 {t['top1']:.2f}% top-5 {t['top5']:.2f}% "
          f"loss {t['loss']:.4f} (best top-1 {summary['best_top1']:.2f}%) -> {summary['output']}")
    return 0


def _cmd_eval(ns: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .data import build_eval_loader, resolve_data_root
    from .engine import evaluate, setup_threads
    setup_threads(getattr(ns, "threads", None))
    model, config = load_model(ns.checkpoint)
    root = resolve_data_root(ns.data)
    loader = build_eval_loader(root, config["data_config"], ns.batch_size, classes=config.get("class_names"),
                               num_workers=getattr(ns, "workers", None))
    m = evaluate(model, loader, config.get("class_names"))
    if m["skipped"]:
        logging.getLogger("linvision").warning("%d unreadable image(s) skipped", m["skipped"])
    if ns.json:
        print(json.dumps({"top1": m["top1"], "top5": m["top5"], "loss": m["loss"], "n": m["n"],
                          "skipped": m["skipped"],
                          "per_class": m["per_class"], "checkpoint": str(ns.checkpoint), "model": config["model"],
                          "data": str(loader.dataset.root)}))
        return 0
    print(f"checkpoint {ns.checkpoint} ({config['model']}, epoch {config.get('epoch', '?')}) on "
          f"{loader.dataset.root} ({m['n']} images)")
    print(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}")
    width = max(map(len, m["per_class"]), default=0)
    for name, acc in m["per_class"].items():
        print(f"  {name:<{width}}  {acc:6.2f}%")
    return 0


def _cmd_predict(ns: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .engine import predict, setup_threads
    setup_threads(getattr(ns, "threads", None))
    model, config = load_model(ns.checkpoint)
    if getattr(ns, "stream", False):
        from .stream import predict_stream
        results = predict_stream(model, config, ns.images, top_k=ns.top_k)
        for r in results:
            print(f"linvision: streamed {r['image']}: {r['size'][0]}x{r['size'][1]} px, {r['tokens']} tokens, "
                  f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    else:
        results = predict(model, config, ns.images, top_k=ns.top_k)
    if ns.json:
        print(json.dumps({"checkpoint": str(ns.checkpoint), "model": config["model"], "results": results}))
        return 0
    for r in results:
        print(r["image"] + ": " + ", ".join(f"{p['class']} {100 * p['prob']:.1f}%" for p in r["predictions"]))
    return 0


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is at the time (it may be replaced, e.g. by test capture)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def _error_text(e: BaseException) -> str:
    """The one-line message for an error ``main`` reports: a :class:`LinvisionError` as is; an ``OSError`` (full
    disk, permission denied, ...) as its ``strerror`` and file name; a ``MemoryError`` with a hint."""
    if isinstance(e, LinvisionError):
        return str(e)
    if isinstance(e, MemoryError):
        return f"out of memory{': ' + str(e) if str(e) else ''} (try a smaller --batch-size or input size)"
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    hint = " (the disk is full; free space and --resume)" if e.errno == errno.ENOSPC else ""
    return f"{e.strerror or e}{where}{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``linvision`` / ``python -m linvision``; returns the exit status (0 ok, 2 user error,
    130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv or ["train"])  # no arguments: the main job
    debug = getattr(ns, "debug", False)
    log = logging.getLogger("linvision")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("linvision: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        warnings.formatwarning = lambda msg, cat, *a, **k: f"linvision: warning: {msg}\n"
    try:
        _positive({k: v for k, v in vars(ns).items() if k not in ("func", "command")})
        if getattr(ns, "max_pixels", None):
            from .data import set_max_pixels
            set_max_pixels(ns.max_pixels)
        return ns.func(ns)
    except (LinvisionError, OSError, MemoryError) as e:
        if debug:
            raise
        msg = user_message(e) if isinstance(e, LinvisionError) else _error_text(e)  # always one line
        rank = int(os.environ.get("RANK", "0"))
        print(f"linvision: error: {f'[rank {rank}] ' if rank else ''}{msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linvision: interrupted", file=sys.stderr)
        return 130
