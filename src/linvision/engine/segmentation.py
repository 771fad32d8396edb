"""Semantic segmentation on the engine's loop: :class:`SegmentationTask` and ``train(args)`` (``linvision segment
train``), plus ``load_seg_model``, ``evaluate_segmentation`` and ``predict_segmentation`` (``segment eval`` /
``segment predict``).

The model is :func:`linvision.dense.create_segmentation_model` (any linvision or timm backbone + smp UPerNet /
FPN / DPT decoder), trained with pixel-wise cross-entropy (``ignore_index`` pixels left out) on random
rescale + crop + flip (:func:`linvision.segmentation.build_seg_transform`). Model choice (raw vs EMA) is made on
mIoU of the ``val/`` split (or a seeded hold-out of ``train/`` when the data set has none); ``test/`` is only
reported. Everything else — resume (bit for bit on CPU), DDP under ``torchrun``, locked arguments, atomic saves,
``metrics.csv`` / ``curves.png``, non-finite checks — comes from :func:`linvision.engine.loop.fit`.

``config.json`` holds everything needed to rebuild the model (``backbone``, ``backbone_args``, ``decoder``,
``decoder_channels``, ``pyramid_channels``, ``num_classes``, ``class_names``, ``palette``, ``ignore_index``,
normalisation ``mean``/``std``, training ``crop_size``), so ``load_seg_model(RUN)`` needs nothing else.
"""
from __future__ import annotations

import logging
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader
from tqdm import tqdm

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import random_seed

from ..checkpoint import MODEL_FILE, check_state_dict, load_config, load_state_dict
from ..data import IMAGE_ERRORS, SeededSampler, default_workers, holdout_split, load_rgb
from ..dense import DECODERS, create_segmentation_model
from ..distributed import DistInfo, all_reduce_sum, run_distributed
from ..errors import LinvisionError
from ..segmentation import (SegCollate, SegMeta, SegmentationDataset, SegmentationMetrics,
                            build_seg_transform, default_palette, load_meta, predict_slide, predict_whole,
                            resolve_seg_root, save_color_mask, save_side_by_side)
from ..segmentation.dataset import SPLIT_NAMES
from .classification import check_model_name, setup_threads
from .loop import LoopConfig, StepInfo, Trainer, build_trainer, fit, progress_enabled
from .run import Panel, RunFolder, release_run_locks

__all__ = ["SegmentationTask", "train", "build_seg_model", "load_seg_model", "evaluate_segmentation",
           "predict_segmentation", "SEG_RESUME_LOCKED_ARGS", "SEG_METRIC_FIELDS", "TASK"]

_log = logging.getLogger("linvision")

TASK = "segmentation"  # config.json "task"
SEG_RESUME_LOCKED_ARGS = ("backbone", "decoder", "decoder_channels", "pyramid_channels", "patch_size", "crop_size",
                          "batch_size", "seed", "ema", "val_split", "backbone_checkpoint")
SEG_METRIC_FIELDS = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_miou", "val_acc", "val_miou_raw",
                     "val_miou_ema", "weights", "test_loss", "test_miou", "test_acc", "test_macc", "lr",
                     "img_per_s", "epoch_seconds")


def _pct(v: float) -> float:
    return 100.0 * v  # NaN stays NaN


# --------------------------------------------------------------------------------------------------- model
def build_seg_model(config: dict[str, Any], pretrained_file: str | None = None) -> torch.nn.Module:
    """:func:`~linvision.dense.create_segmentation_model` from a segmentation ``config.json`` dict (keys
    ``backbone``, ``backbone_args``, ``decoder``, ``decoder_channels``, ``pyramid_channels``, ``num_classes``).
    ``pretrained_file``: official backbone weights loaded by timm (the model's ``checkpoint_filter_fn``, through
    ``pretrained_cfg_overlay``).

    Raises:
        LinvisionError: unknown backbone, or a backbone/decoder combination that cannot be built.
    """
    check_model_name(config["backbone"])
    extra = dict(config.get("backbone_args") or {})
    if pretrained_file:
        extra["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        return create_segmentation_model(config["backbone"], config["decoder"], num_classes=config["num_classes"],
                                         decoder_channels=config["decoder_channels"],
                                         pyramid_channels=config.get("pyramid_channels"),
                                         pretrained=bool(pretrained_file), **extra)
    except (TypeError, ValueError, AssertionError) as e:
        raise LinvisionError(f"cannot build {config['backbone']} + {config['decoder']} "
                             f"({', '.join(f'{k}={v}' for k, v in extra.items())}): "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    except (RuntimeError, OSError) as e:
        if not pretrained_file:
            raise
        raise LinvisionError(f"cannot load backbone weights {pretrained_file} into {config['backbone']}: "
                             f"{str(e).strip().splitlines()[0]}") from None


def load_seg_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a ``segment train`` run's model (its folder or ``model.safetensors``); returns ``(model.eval(),
    config)``.

    Raises:
        LinvisionError: missing files, not a segmentation run, weights that do not match the model.
    """
    p = Path(path).expanduser()
    config = load_config(p)
    d = p.parent if p.is_file() else p
    if config.get("task") != TASK:
        raise LinvisionError(f"checkpoint {d} is not a segmentation run (no \"task\": \"{TASK}\" in its config.json); "
                             "use `linvision eval` for classifiers")
    model = build_seg_model(config)
    weights = p if p.is_file() and p.suffix == ".safetensors" else d / MODEL_FILE
    sd = load_state_dict(weights)
    check_state_dict(model, sd, weights)
    model.load_state_dict(sd)
    return model.to(device).eval(), config


def _load_backbone_run(model: torch.nn.Module, run: Path) -> dict[str, int]:
    """Load a ``linvision train`` run's weights into ``model.encoder.model``; tensors the encoder does not have
    (the classifier head, the final norm the dense encoder prunes) are left out. Returns counts of loaded /
    left-out / encoder-only tensors.

    Raises:
        LinvisionError: a tensor of another shape, or fewer than half of the encoder's tensors in the run.
    """
    enc = model.encoder.model
    sd = load_state_dict(run / MODEL_FILE)
    own = enc.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs encoder {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    if shapes:
        raise LinvisionError(f"--backbone-checkpoint {run}: its weights do not fit the encoder (shape mismatch "
                             f"{', '.join(shapes[:3])})")
    kept = {k: v for k, v in sd.items() if k in own}
    if len(kept) < len(own) / 2:
        raise LinvisionError(f"--backbone-checkpoint {run}: only {len(kept)} of the encoder's {len(own)} tensors "
                             "are in it (another architecture?)")
    enc.load_state_dict(kept, strict=False)
    return {"loaded": len(kept), "left_out": len(sd) - len(kept), "not_in_checkpoint": len(own) - len(kept)}


def _backbone_source(args: Namespace) -> tuple[dict[str, Any], Path | None, str | None]:
    """``(backbone kwargs, linvision run folder or None, official weights file or None)`` of the arguments."""
    kwargs: dict[str, Any] = {}
    if args.patch_size:
        kwargs["patch_size"] = args.patch_size
    if args.drop_path:
        kwargs["drop_path_rate"] = args.drop_path
    ck = args.backbone_checkpoint
    if not ck:
        return kwargs, None, None
    p = Path(ck).expanduser()
    if not p.exists():
        raise LinvisionError(f"--backbone-checkpoint {ck} does not exist")
    if p.is_dir():
        cfg = load_config(p)
        if cfg.get("task") == TASK:
            raise LinvisionError(f"--backbone-checkpoint {ck} is a segmentation run; give a `linvision train` run")
        if cfg["model"] != args.backbone:
            raise LinvisionError(f"--backbone-checkpoint {ck} holds {cfg['model']!r}, not --backbone "
                                 f"{args.backbone!r}")
        run_args = {k: v for k, v in (cfg.get("model_args") or {}).items()
                    if k not in ("num_classes", "drop_path_rate", "arch")}
        for k, v in run_args.items():
            if k in kwargs and kwargs[k] != v:
                raise LinvisionError(f"--{k.replace('_', '-')} {kwargs[k]} differs from the backbone run's {v} "
                                     f"({p / 'config.json'})")
        return {**run_args, **kwargs}, p, None
    if p.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise LinvisionError(f"--backbone-checkpoint {ck}: expected a run folder or a .safetensors/.pth/.bin file")
    return kwargs, None, str(p)


# --------------------------------------------------------------------------------------------------- evaluation
def _logits(model: torch.nn.Module, x: torch.Tensor, num_classes: int, inference: str,
            window: Sequence[int] | None, stride: Sequence[int] | None) -> torch.Tensor:
    if inference == "slide":
        return predict_slide(model, x, window, stride, num_classes).float()
    return predict_whole(model, x).float()


@torch.inference_mode()
def evaluate_segmentation(model: torch.nn.Module, loader: Any, num_classes: int, ignore_index: int, *,
                          inference: str = "whole", window: Sequence[int] | None = None,
                          stride: Sequence[int] | None = None, device: str | torch.device | None = None,
                          dist_info: DistInfo | None = None, progress: bool = True, desc: str = "eval"
                          ) -> dict[str, Any]:
    """mIoU & co. of a model over a loader of ``(images [B, 3, H, W], masks [B, H, W])`` (``None`` batches
    skipped), by whole-image or sliding-window (``window``/``stride`` ``(h, w)``) inference.

    Under DDP each rank evaluates its shard; the confusion matrix (torchmetrics) and the loss sums are reduced, so
    every rank returns the whole split's metrics.

    Returns:
        ``{"miou", "acc", "macc", "score" (= miou)}`` in percent, ``"iou"``, ``"class_acc"``: K per-class
        percentages (NaN where undefined), ``"loss"``: mean cross-entropy per labelled pixel (nats), ``"n"``:
        images, ``"pixels"``: labelled pixels.

    Raises:
        LinvisionError: no readable image.
    """
    model.eval()
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    metrics = SegmentationMetrics(num_classes, ignore_index, device)
    n, loss_sum, pixels = 0, 0.0, 0
    bar = progress and sys.stderr.isatty()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not bar, file=sys.stderr, dynamic_ncols=True):
        if batch is None:
            continue
        x, y = batch[0].to(device), batch[1].to(device)
        out = _logits(model, x, num_classes, inference, window, stride)
        metrics.update(out, y)
        loss_sum += float(F.cross_entropy(out, y, ignore_index=ignore_index, reduction="sum"))
        pixels += int((y != ignore_index).sum())
        n += len(x)
    if dist_info is not None and dist_info.distributed:
        n, loss_sum, pixels = all_reduce_sum([n, loss_sum, pixels], dist_info).tolist()
        n, pixels = int(n), int(pixels)
    m = metrics.compute()  # reduced over ranks by torchmetrics under DDP
    if n == 0:
        raise LinvisionError("no readable images to evaluate")
    return {"miou": _pct(m["miou"]), "acc": _pct(m["acc"]), "macc": _pct(m["macc"]), "score": _pct(m["miou"]),
            "iou": [_pct(v) for v in m["iou"]], "class_acc": [_pct(v) for v in m["class_acc"]],
            "loss": loss_sum / max(pixels, 1), "n": n, "pixels": pixels}


@torch.inference_mode()
def predict_segmentation(model: torch.nn.Module, config: dict[str, Any], image_paths: Sequence[str | Path],
                         output: str | Path, *, inference: str = "whole", window: Sequence[int] | None = None,
                         stride: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Segment image files; writes per image ``<stem>_mask.png`` (colour mask; a palette PNG holding the class
    indices) and ``<stem>_overlay.png`` (image | prediction overlay) into ``output``.

    Returns:
        One dict per image: ``{"image", "size": [H, W], "mask", "overlay", "class_fraction": {class: share of
        pixels}}``.

    Raises:
        LinvisionError: an image is missing or cannot be decoded (the message names it), or two inputs share a
        file name stem.
    """
    out = Path(output)
    tf = build_seg_transform(False, ignore_index=config["ignore_index"], mean=config["mean"], std=config["std"])
    stems = [Path(p).stem for p in image_paths]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise LinvisionError(f"two images named {dup}.*: their outputs would overwrite each other")
    palette, k, names = [tuple(c) for c in config["palette"]], config["num_classes"], config["class_names"]
    device = next(model.parameters()).device
    model.eval()
    results = []
    for p in image_paths:
        if not Path(p).is_file():
            raise LinvisionError(f"image not found: {p}" if not Path(p).exists() else f"not an image file: {p}")
        try:
            img = load_rgb(p)
        except IMAGE_ERRORS as e:
            why = ("not an image (PIL cannot identify its format)" if isinstance(e, UnidentifiedImageError) else
                   f"corrupt or truncated image file ({e})")
            raise LinvisionError(f"cannot decode image {p}: {why}") from None
        x, _ = tf(img, torch.zeros(img.height, img.width, dtype=torch.long))
        pred = _logits(model, x[None].to(device), k, inference, window, stride)[0].argmax(0).cpu()
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(p).stem
        mask_file = save_color_mask(out / f"{stem}_mask.png", pred, palette, k)
        over_file = save_side_by_side(out / f"{stem}_overlay.png", img, pred, palette=palette, num_classes=k)
        counts = torch.bincount(pred.flatten(), minlength=k).tolist()
        results.append({"image": str(p), "size": [img.height, img.width], "mask": str(mask_file),
                        "overlay": str(over_file),
                        "class_fraction": {names[i]: round(c / pred.numel(), 4) for i, c in enumerate(counts) if c}})
    return results


# --------------------------------------------------------------------------------------------------- the task
class SegmentationTask:
    """Semantic segmentation on the engine's loop (:class:`linvision.engine.loop.Task`): pixel-wise cross-entropy
    (``ignore_index`` left out), training pixel accuracy, and :func:`evaluate_segmentation` (``score`` = mIoU %)
    for model choice on validation data and the test report."""

    score_name = "miou"
    metric_fields = SEG_METRIC_FIELDS
    panels = (Panel("loss", "cross-entropy per labelled pixel", (("train_loss", "train"), ("val_loss", "validation"),
                                                                 ("test_loss", "test"))),
              Panel("mIoU / accuracy", "%", (("val_miou", "validation mIoU"), ("test_miou", "test mIoU"),
                                             ("train_acc", "train pixel acc."), ("val_acc", "validation pixel acc."),
                                             ("test_acc", "test pixel acc."))))

    def __init__(self, config: dict[str, Any], title: str, inference: str = "whole",
                 window: Sequence[int] | None = None, stride: Sequence[int] | None = None):
        self.config, self.title = config, title
        self.ignore_index, self.num_classes = config["ignore_index"], config["num_classes"]
        self.criterion = torch.nn.CrossEntropyLoss(ignore_index=self.ignore_index)
        self.inference, self.window, self.stride = inference, window, stride

    def prepare(self, batch: Any) -> tuple[Any, int]:
        x, y = batch
        labelled = bool((y != self.ignore_index).any())  # an all-ignore batch has no loss (NaN mean)
        return ((x, y) if len(x) > 0 and labelled else None), len(x)

    def train_step(self, net: torch.nn.Module, batch: Any, info: StepInfo
                   ) -> tuple[torch.Tensor, int, dict[str, float]]:
        x, y = (t.to(info.device, non_blocking=True) for t in batch)
        logits = net(x)
        loss = self.criterion(logits.float(), y)
        valid = y != self.ignore_index
        correct = int(((logits.argmax(1) == y) & valid).sum())
        return loss, len(x), {"correct_px": correct, "labelled_px": int(valid.sum())}

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"train_acc": 100 * sums.get("correct_px", 0) / max(sums.get("labelled_px", 0), 1)}

    def evaluate(self, model: torch.nn.Module, loader: Any, di: DistInfo, desc: str) -> dict[str, Any]:
        return evaluate_segmentation(model, loader, self.num_classes, self.ignore_index, inference=self.inference,
                                     window=self.window, stride=self.stride, device=di.device, dist_info=di,
                                     progress=progress_enabled(di), desc=desc)

    def on_epoch_start(self, epoch: int, trainer: Trainer) -> None:
        pass

    def model_config(self, epoch: int, step: int, weights: str, metrics: dict[str, Any],
                     choice: dict[str, Any]) -> dict[str, Any]:
        keep = ("miou", "acc", "macc", "loss", "n", "split")
        m = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if k in keep}
        if "iou" in metrics:
            m["iou"] = {c: (None if v != v else round(v, 3)) for c, v in zip(self.config["class_names"],
                                                                            metrics["iou"])}
        return {**self.config, "weights": weights, "epoch": epoch, "step": step, "metrics": m,
                "model_choice": choice, "versions": {"torch": torch.__version__, "timm": timm.__version__}}


# --------------------------------------------------------------------------------------------------- data
def _seg_loader(ds: SegmentationDataset, batch_size: int, sampler: Any, workers: int | None, drop_last: bool,
                seed: int = 0) -> DataLoader:
    w = default_workers() if workers is None else workers
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=w, drop_last=drop_last,
                      collate_fn=SegCollate(ds.ignore_index), persistent_workers=w > 0,
                      prefetch_factor=4 if w > 0 else None, generator=torch.Generator().manual_seed(seed))


def _has_split(root: Path, split: str) -> bool:
    return any((root / n).is_dir() for n in SPLIT_NAMES[split])


def _seg_data(args: Namespace, di: DistInfo, root: Path, meta: SegMeta
              ) -> tuple[DataLoader, tuple[str, DataLoader] | None, tuple[str, DataLoader] | None, dict[str, Any]]:
    """``(train loader, ("val", loader) or None, ("test", loader) or None, validation record)``."""
    mean, std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    train_tf = build_seg_transform(True, tuple(args.crop_size), base_size=args.base_size,
                                   scale_range=tuple(args.scale_range), ignore_index=meta.ignore_index,
                                   mean=mean, std=std)
    eval_tf = build_seg_transform(False, ignore_index=meta.ignore_index, mean=mean, std=std)
    train_ds = SegmentationDataset(root, "train", train_tf, meta=meta)
    train_idx, held = list(range(len(train_ds))), None
    val = None
    if _has_split(root, "val"):
        val_ds = SegmentationDataset(root, "val", eval_tf, meta=meta)
        val_idx = list(range(len(val_ds)))
        record = {"source": f"{val_ds.split_dir.name}/ split", "n": len(val_ds)}
    elif args.val_split:
        train_idx, held = holdout_split([0] * len(train_ds), args.val_split, args.seed, what="--val-split")
        val_ds, val_idx = SegmentationDataset(root, "train", eval_tf, meta=meta), held
        record = {"source": "held out of train/", "val_split": args.val_split, "seed": args.seed, "n": len(held)}
    else:
        val_ds, record = None, {"source": None, "n": 0}
    sampler = SeededSampler(train_idx, args.seed, num_replicas=di.world_size, rank=di.rank)
    train = _seg_loader(train_ds, args.batch_size, sampler, args.workers, sampler.num_samples >= args.batch_size,
                        args.seed)
    shard = (lambda idx: idx[di.rank::di.world_size]) if di.world_size > 1 else (lambda idx: idx)
    eb = args.eval_batch_size
    if val_ds is not None:
        val = ("val", _seg_loader(val_ds, eb, shard(val_idx), args.workers, False))
    test = None
    if getattr(args, "test", True) and _has_split(root, "test"):
        test_ds = SegmentationDataset(root, "test", eval_tf, meta=meta)
        test = ("test", _seg_loader(test_ds, eb, shard(list(range(len(test_ds)))), args.workers, False))
    return train, val, test, record


# --------------------------------------------------------------------------------------------------- training
def train(args: Namespace) -> dict[str, Any]:
    """Train a segmentation model; returns ``{"output", "epoch", "step", "weights", "metrics" (of the kept weights
    on test, else val), "split", "best_miou"}``.

    ``args`` attributes (``linvision segment train``'s options, see :data:`linvision.engine.segment_cli.
    SEGMENT_DEFAULTS`): ``backbone, decoder, decoder_channels, pyramid_channels, patch_size, backbone_checkpoint,
    data, crop_size (h, w), base_size, scale_range (lo, hi), epochs, batch_size, eval_batch_size, lr, min_lr,
    warmup_lr, warmup_epochs, weight_decay, opt, ema, ema_decay, clip_grad, drop_path, workers, threads,
    max_steps, val_split, test, seed, output, resume, save_every_steps, log_interval, device, amp, inference,
    window, stride``.

    Validation (model choice, raw vs EMA by mIoU): the data set's ``val/`` split, else ``val_split`` training
    images held out (fraction if < 1, else a count; seeded by ``seed``), else none (EMA kept if any). ``test/`` is
    evaluated for the kept weights only and only reported (not at all with ``test`` False). Resume, DDP and the
    files written: as :func:`linvision.engine.classification.train`.

    Raises:
        LinvisionError: bad data/backbone/arguments, a resume whose locked arguments
        (:data:`SEG_RESUME_LOCKED_ARGS`) or number of processes differ, an output folder holding another run, a
        backbone checkpoint that does not fit, or a non-finite loss / weights.
    """
    return run_distributed(_train, args, getattr(args, "device", None), on_exit=release_run_locks)


def _train(args: Namespace, di: DistInfo) -> dict[str, Any]:
    setup_threads(args.threads, di)
    run = RunFolder(args.output, args.resume, vars(args), SEG_RESUME_LOCKED_ARGS, di,
                    ignore=("resume", "output", "max_steps", "device", "log_interval"))
    check_model_name(args.backbone)
    if args.decoder not in DECODERS:
        raise LinvisionError(f"--decoder must be one of {', '.join(DECODERS)}, got {args.decoder!r}")
    backbone_args, backbone_run, official = _backbone_source(args)
    run.check_writable()

    root = resolve_seg_root(args.data)
    meta = load_meta(root)
    train_loader, val, test, val_record = _seg_data(args, di, root, meta)
    palette = [list(c) for c in (meta.palette or default_palette(meta.num_classes))]
    config = {"model": f"{args.backbone}+{args.decoder}", "task": TASK, "backbone": args.backbone,
              "backbone_args": backbone_args, "decoder": args.decoder, "decoder_channels": args.decoder_channels,
              "pyramid_channels": args.pyramid_channels, "num_classes": meta.num_classes,
              "class_names": list(meta.classes), "palette": palette, "ignore_index": meta.ignore_index,
              "ignore_color": list(meta.ignore_color) if meta.ignore_color else None,
              "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
              "crop_size": list(args.crop_size), "data": str(root), "validation": val_record,
              "train_args": run.args}
    random_seed(args.seed)
    model = build_seg_model(config, official if run.state is None else None)
    if backbone_run is not None and run.state is None:
        counts = _load_backbone_run(model, backbone_run)
        _log.info("backbone weights from %s: %d tensors loaded, %d left out (head, final norm)%s", backbone_run,
                  counts["loaded"], counts["left_out"],
                  f", {counts['not_in_checkpoint']} encoder tensors not in it" if counts["not_in_checkpoint"] else "")
    model.to(di.device)
    trainer = build_trainer(model, di, steps_per_epoch=len(train_loader), epochs=args.epochs, opt=args.opt,
                            lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                            warmup_lr=args.warmup_lr, min_lr=args.min_lr,
                            ema_decay=args.ema_decay if args.ema else None, amp=bool(args.amp))
    window = tuple(args.window or args.crop_size)
    stride = tuple(args.stride or [max(1, (2 * w) // 3) for w in window])
    task = SegmentationTask(config, f"{args.backbone} + {args.decoder} on {Path(str(args.data)).name}",
                            args.inference, window, stride)
    _log.info("%s + %s-%d: %.2fM params, %d classes, %d train images, %s crops, %d steps/epoch, output %s",
              args.backbone, args.decoder, args.decoder_channels, sum(p.numel() for p in model.parameters()) / 1e6,
              meta.num_classes, len(train_loader.sampler.indices), "x".join(map(str, args.crop_size)),
              len(train_loader), run.out)
    _log.info("model choice: %s", f"{'raw/EMA' if args.ema else 'raw'} weights by mIoU on {val_record['n']} "
              f"validation images ({val_record['source']})" if val is not None else
              "no validation data: " + ("EMA weights kept" if args.ema else "raw weights kept"))
    cfg = LoopConfig(epochs=args.epochs, seed=args.seed, save_every=args.save_every_steps or 0,
                     max_steps=args.max_steps, log_interval=args.log_interval or 0, clip_grad=args.clip_grad,
                     amp=bool(args.amp), sync_bn=True)
    r = fit(task, trainer, run, train_loader, cfg, val=val, test=test)
    if di.is_main and r["choice"]:
        _log.info("kept the %s weights (%s%s)", r["weights"], r["choice"]["reason"],
                  f": {r['choice']['scores']}" if r["choice"].get("scores") else "")
    split = (test or val or ("val", None))[0]
    mious = [h[f"{split}_miou"] for h in r["history"] if h.get(f"{split}_miou", "") != ""]
    return {"output": str(run.out), "epoch": r["epoch"], "step": r["step"], "weights": r["weights"],
            "metrics": r["metrics"], "split": split, "best_miou": max(mious, default=float("nan"))}
