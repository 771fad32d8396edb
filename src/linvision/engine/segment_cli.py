"""``linvision segment train | eval | predict`` (semantic segmentation; hooked into :mod:`linvision.cli` by
:func:`add_segment_commands`). The work is in :mod:`linvision.engine.segmentation`, imported only when a
``segment`` command runs (it pulls torchvision / torchmetrics / smp)."""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ..errors import LinvisionError

__all__ = ["SEGMENT_DEFAULTS", "add_segment_commands", "segment_args"]

# Every default of `linvision segment train` (`--help` shows them).
SEGMENT_DEFAULTS: dict[str, Any] = {
    "backbone": "vrwkv_tiny",
    "decoder": "upernet",
    "decoder_channels": 64,
    "pyramid_channels": None,   # None: the simple feature pyramid keeps the backbone's widths
    "patch_size": None,         # None: the backbone's own
    "backbone_checkpoint": None,
    "data": None,
    "crop_size": [256, 256],
    "base_size": None,          # None: rescale by a factor of each image's own size
    "scale_range": [0.5, 2.0],
    "epochs": 20,
    "batch_size": 8,
    "eval_batch_size": 1,
    "lr": 6e-4,
    "min_lr": 1e-6,
    "warmup_lr": 1e-6,
    "warmup_epochs": 1,
    "weight_decay": 0.01,
    "opt": "adamw",
    "ema": False,
    "ema_decay": 0.999,
    "clip_grad": 1.0,
    "drop_path": 0.1,
    "val_split": 0.1,           # only when the data set has no val/ split
    "test": True,               # evaluate test/ after every epoch (reported only; `segment eval` can do it later)
    "workers": None,
    "threads": None,
    "max_steps": None,
    "seed": 0,
    "output": None,             # None: runs/seg-<backbone>-<decoder>-<timestamp>
    "save_every_steps": 0,
    "log_interval": 0,
    "device": "auto",
    "amp": False,
    "inference": "whole",       # for validation/test during training
    "window": None,             # slide window [h, w]; None: --crop-size
    "stride": None,             # slide stride [h, w]; None: 2/3 of the window
}

_TRAIN_EPILOG = """examples:
  linvision segment train --data ../shared/data/camvid.tar.gz --backbone vrwkv_tiny --decoder upernet \\
      --crop-size 240 320 --epochs 20 --output runs/camvid
  linvision segment train --data DATA --backbone vrwkv_tiny --backbone-checkpoint runs/quick   # a `train` run
  linvision segment train --resume runs/camvid --epochs 30           # continue (and extend) a run
  torchrun --nproc_per_node 4 -m linvision segment train --data DATA --batch-size 4

--data: a folder (or .tar/.tar.gz of one) with {train,val,test}/images/<name>.<ext> and
{train,val,test}/masks/<name>.png (8-bit class indices, or colours with a palette), optionally classes.json
(classes, palette, ignore_index [255]). Model choice (raw/EMA) on val/ by mIoU (or --val-split of train/ when
there is no val/); test/ is only reported. Every epoch writes model.safetensors, config.json (everything needed to
rebuild the model), train_state.pt, metrics.csv and curves.png."""

_EVAL_EPILOG = """examples:
  linvision segment eval --checkpoint runs/camvid
  linvision segment eval --checkpoint runs/camvid --split val --json
  linvision segment eval --checkpoint runs/camvid --inference slide --window 240 320 --stride 160 214

--json prints one JSON object: miou, acc, macc (percent), loss, n, iou and class_acc ({class: percent or null}),
checkpoint, data, split, inference."""

_PREDICT_EPILOG = """examples:
  linvision segment predict --checkpoint runs/camvid street.jpg --output preds/

Writes per image <stem>_mask.png (colour mask; a palette PNG whose pixel values are the class indices) and
<stem>_overlay.png (image | prediction overlaid), each the image's size (the overlay two images wide)."""


def _fmt(v: Any) -> str:
    return "none" if v is None else " ".join(map(str, v)) if isinstance(v, list) else str(v)


def _inference_options(p: argparse.ArgumentParser, default: Any = None) -> None:
    p.add_argument("--inference", choices=("whole", "slide"), default=default,
                   help="whole images, or overlapping sliding windows (mmseg's slide inference) [whole]")
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"), default=default,
                   help="sliding window [the run's --crop-size]")
    p.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), default=default,
                   help="sliding-window step [2/3 of the window]")


def add_segment_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
                         fmt: type = argparse.RawDescriptionHelpFormatter) -> None:
    """Add ``segment`` with its ``train``, ``eval`` and ``predict`` sub-commands to ``sub``."""
    d = SEGMENT_DEFAULTS
    sg = sub.add_parser("segment", formatter_class=fmt, help="semantic segmentation (train, eval, predict)",
                        description="Semantic segmentation: a backbone + UPerNet/FPN/DPT decoder.")
    ss = sg.add_subparsers(dest="segment_command", metavar="SUBCOMMAND", required=True)
    t = ss.add_parser("train", parents=[common], formatter_class=fmt, epilog=_TRAIN_EPILOG,
                      argument_default=argparse.SUPPRESS, help="train a segmentation model",
                      description="Train a segmentation model. Defaults are shown in brackets.")
    t.add_argument("--data", metavar="PATH", help="data folder or archive (required for a new run)")
    t.add_argument("--backbone", help=f"linvision or timm model name [{d['backbone']}]")
    t.add_argument("--decoder", choices=("upernet", "fpn", "dpt"), help=f"[{d['decoder']}]")
    t.add_argument("--decoder-channels", type=int, help=f"decoder width [{d['decoder_channels']}]")
    t.add_argument("--pyramid-channels", type=int, help="common width of the feature-pyramid levels "
                                                        f"[{_fmt(d['pyramid_channels'])}: the backbone's]")
    t.add_argument("--patch-size", type=int, help="backbone patch size [the backbone's]")
    t.add_argument("--backbone-checkpoint", metavar="RUN|FILE",
                   help="initial encoder weights: a `linvision train` run folder (its head is left out) or an "
                        "official weights file (.safetensors/.pth, loaded by timm)")
    t.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help=f"training crop [{_fmt(d['crop_size'])}]")
    t.add_argument("--base-size", type=int, help="shorter side the random rescale applies to [each image's own]")
    t.add_argument("--scale-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help=f"random rescale factors [{_fmt(d['scale_range'])}]")
    t.add_argument("--output", metavar="DIR", help="output folder [runs/seg-<backbone>-<decoder>-<timestamp>]")
    t.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its settings are reused)")
    for k in ("epochs", "batch_size", "eval_batch_size"):
        t.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"[{d[k]}]")
    for k in ("lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "ema_decay", "clip_grad", "drop_path"):
        t.add_argument(f"--{k.replace('_', '-')}", type=float, help=f"[{d[k]}]")
    t.add_argument("--opt", help=f"timm optimizer name [{d['opt']}]")
    t.add_argument("--ema", action=argparse.BooleanOptionalAction,
                   help="keep an EMA of the weights; the better by validation mIoU is saved "
                        f"[{'on' if d['ema'] else 'off'}]")
    t.add_argument("--val-split", type=float, metavar="F", help="without a val/ split: hold out this part of train/ "
                                                                f"(fraction < 1 or count; 0: none) [{d['val_split']}]")
    t.add_argument("--test", action=argparse.BooleanOptionalAction,
                   help="evaluate the kept weights on test/ after every epoch (only reported; --no-test saves that "
                        f"time, `segment eval` reports it later) [{'on' if d['test'] else 'off'}]")
    t.add_argument("--seed", type=int, help=f"[{d['seed']}]")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps of this invocation")
    t.add_argument("--save-every-steps", type=int, metavar="N", help="also write train_state.pt every N steps [0]")
    t.add_argument("--log-interval", type=int, metavar="N", help="without a terminal, log every N steps [0]")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), help=f"[{d['device']}]")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, help="mixed precision [off]")
    _inference_options(t, argparse.SUPPRESS)
    t.set_defaults(func=_cmd_train)

    e = ss.add_parser("eval", parents=[common], formatter_class=fmt, epilog=_EVAL_EPILOG,
                      help="evaluate a segmentation run", description="mIoU, pixel accuracy and per-class IoU.")
    e.add_argument("--checkpoint", required=True, metavar="RUN", help="segment-train run folder")
    e.add_argument("--data", metavar="PATH", help="data folder or archive [the run's]")
    e.add_argument("--split", default="test", choices=("test", "val", "train"), help="[test]")
    e.add_argument("--batch-size", type=int, default=1, help="[1]")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="[auto]")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _inference_options(e)
    e.set_defaults(func=_cmd_eval)

    p = ss.add_parser("predict", parents=[common], formatter_class=fmt, epilog=_PREDICT_EPILOG,
                      help="segment image files", description="Write colour masks and overlays of image files.")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="segment-train run folder")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="[auto]")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _inference_options(p)
    p.set_defaults(func=_cmd_predict)


def _check_numbers(given: dict[str, Any]) -> None:
    for k in ("epochs", "batch_size", "eval_batch_size", "decoder_channels", "pyramid_channels", "patch_size",
              "base_size", "max_steps"):
        if given.get(k) is not None and given[k] <= 0:
            raise LinvisionError(f"--{k.replace('_', '-')} must be positive (got {given[k]})")
    for k in ("crop_size", "window", "stride"):
        if given.get(k) is not None and min(given[k]) <= 0:
            raise LinvisionError(f"--{k.replace('_', '-')} must be positive (got {' '.join(map(str, given[k]))})")
    for k in ("save_every_steps", "workers", "threads", "warmup_epochs", "clip_grad", "val_split", "log_interval",
              "weight_decay", "drop_path"):
        if given.get(k) is not None and (given[k] < 0 or not math.isfinite(given[k])):
            raise LinvisionError(f"--{k.replace('_', '-')} must be a finite number >= 0 (got {given[k]})")
    for k in ("lr", "min_lr", "warmup_lr", "ema_decay"):
        if given.get(k) is not None and not math.isfinite(given[k]):
            raise LinvisionError(f"--{k.replace('_', '-')} must be a finite number (got {given[k]})")
    sr = given.get("scale_range")
    if sr is not None and not 0 < sr[0] <= sr[1]:
        raise LinvisionError(f"--scale-range must be 0 < LO <= HI (got {sr[0]} {sr[1]})")


def segment_args(given: dict[str, Any]) -> argparse.Namespace:
    """``SEGMENT_DEFAULTS``, overridden by a resumed run's stored arguments, then by ``given``."""
    from ..checkpoint import load_train_state
    _check_numbers(given)
    merged = dict(SEGMENT_DEFAULTS)
    if given.get("resume"):
        merged.update({k: v for k, v in load_train_state(given["resume"])["args"].items() if k in merged})
        merged["output"] = given["resume"]
    merged.update({k: v for k, v in given.items() if k in SEGMENT_DEFAULTS or k == "resume"})
    merged.setdefault("resume", None)
    if merged["data"] is None:
        raise LinvisionError("segment train needs --data: a folder or .tar.gz with {train,val,test}/{images,masks}/")
    if merged["output"] is None:
        merged["output"] = str(Path("runs") / f"seg-{merged['backbone']}-{merged['decoder']}-"
                                              f"{time.strftime('%Y%m%d-%H%M%S')}")
    return argparse.Namespace(**merged)


def _cmd_train(ns: argparse.Namespace) -> int:
    from .segmentation import train
    given = {k: v for k, v in vars(ns).items() if k not in ("func", "command", "segment_command", "debug")}
    r = train(segment_args(given))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    m = r["metrics"]
    print(f"done: epoch {r['epoch']}, step {r['step']}, {r['split']} mIoU {m.get('miou', float('nan')):.2f}% "
          f"pixel acc {m.get('acc', float('nan')):.2f}% (best {r['split']} mIoU {r['best_miou']:.2f}%) -> "
          f"{r['output']}")
    return 0


def _device(name: str):
    import torch
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _inference(ns: argparse.Namespace, config: dict[str, Any]) -> tuple[str, Any, Any]:
    _check_numbers({"window": ns.window, "stride": ns.stride})
    inference = ns.inference or "whole"
    window = tuple(ns.window or config.get("crop_size") or (512, 512))
    stride = tuple(ns.stride or [max(1, (2 * w) // 3) for w in window])
    if inference == "slide" and (stride[0] > window[0] or stride[1] > window[1]):
        raise LinvisionError(f"--stride {stride[0]} {stride[1]} is larger than --window {window[0]} {window[1]}: "
                             "pixels would be left uncovered")
    return inference, window, stride


def _nan_none(v: float) -> float | None:
    return None if v != v else round(v, 4)


def _cmd_eval(ns: argparse.Namespace) -> int:
    from ..segmentation import SegmentationDataset, build_seg_transform, resolve_seg_root
    from .classification import setup_threads
    from .segmentation import _seg_loader, evaluate_segmentation, load_seg_model
    setup_threads(getattr(ns, "threads", None))
    if ns.batch_size <= 0:
        raise LinvisionError(f"--batch-size must be positive (got {ns.batch_size})")
    device = _device(ns.device)
    model, config = load_seg_model(ns.checkpoint, device)
    inference, window, stride = _inference(ns, config)
    from ..segmentation import SegMeta
    meta = SegMeta(config["class_names"], [tuple(c) for c in config["palette"]], config["ignore_index"],
                   tuple(config["ignore_color"]) if config.get("ignore_color") else None, str(ns.checkpoint))
    root = resolve_seg_root(ns.data or config.get("data"))
    tf = build_seg_transform(False, ignore_index=meta.ignore_index, mean=config["mean"], std=config["std"])
    ds = SegmentationDataset(root, ns.split, tf, meta=meta)
    loader = _seg_loader(ds, ns.batch_size, None, getattr(ns, "workers", None), False)
    m = evaluate_segmentation(model, loader, config["num_classes"], config["ignore_index"], inference=inference,
                              window=window, stride=stride, device=device)
    names = config["class_names"]
    if ns.json:
        print(json.dumps({"miou": _nan_none(m["miou"]), "acc": _nan_none(m["acc"]), "macc": _nan_none(m["macc"]),
                          "loss": _nan_none(m["loss"]), "n": m["n"],
                          "iou": {c: _nan_none(v) for c, v in zip(names, m["iou"])},
                          "class_acc": {c: _nan_none(v) for c, v in zip(names, m["class_acc"])},
                          "checkpoint": str(ns.checkpoint), "model": config["model"], "data": str(root),
                          "split": ds.split_dir.name, "inference": inference}))
        return 0
    print(f"checkpoint {ns.checkpoint} ({config['model']}, epoch {config.get('epoch', '?')}) on {root} "
          f"{ds.split_dir.name}/ ({m['n']} images, {inference} inference)")
    print(f"mIoU {m['miou']:.2f}%  pixel acc {m['acc']:.2f}%  mean class acc {m['macc']:.2f}%  loss {m['loss']:.4f}")
    width = max(map(len, names), default=0)
    for c, iou, acc in zip(names, m["iou"], m["class_acc"]):
        print(f"  {c:<{width}}  IoU {'   n/a' if iou != iou else f'{iou:6.2f}%'}  "
              f"acc {'   n/a' if acc != acc else f'{acc:6.2f}%'}")
    return 0


def _cmd_predict(ns: argparse.Namespace) -> int:
    from .classification import setup_threads
    from .segmentation import load_seg_model, predict_segmentation
    setup_threads(getattr(ns, "threads", None))
    model, config = load_seg_model(ns.checkpoint, _device(ns.device))
    inference, window, stride = _inference(ns, config)
    out = Path(ns.output)
    if out.exists() and not out.is_dir():
        raise LinvisionError(f"--output {out} is a file, not a folder")
    results = predict_segmentation(model, config, ns.images, out, inference=inference, window=window, stride=stride)
    if ns.json:
        print(json.dumps({"checkpoint": str(ns.checkpoint), "model": config["model"], "results": results}))
        return 0
    for r in results:
        top = ", ".join(f"{c} {100 * f:.1f}%" for c, f in sorted(r["class_fraction"].items(), key=lambda x: -x[1])[:3])
        print(f"{r['image']}: {r['mask']}, {r['overlay']} ({top})")
    return 0
