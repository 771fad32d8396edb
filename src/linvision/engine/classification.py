"""Image classification on the engine's loop: timm models, evaluation, prediction and ``train(args)``.

``train(args)`` builds a timm model, AdamW (``timm.optim``), a per-step cosine schedule with warmup
(``timm.scheduler``), optional EMA (``timm.utils.ModelEmaV3``) and mixup/cutmix (``timm.data.Mixup``) and runs
:func:`linvision.engine.loop.fit` with :class:`ClassificationTask`: after every epoch the raw/EMA choice is made on
the validation data (``val/`` or a held-out part of ``train/``), the kept weights are reported on the test split,
and ``model.safetensors``, ``config.json``, ``train_state.pt``, ``metrics.csv`` and ``curves.png`` are written
atomically to the output folder (``train_state.pt`` also every ``save_every_steps`` steps). ``--resume``
restores everything, including the position inside an epoch and the RNG states, so a resumed run reproduces an
uninterrupted one bit for bit on CPU. Under ``torchrun`` it trains with DDP (:mod:`linvision.distributed`).
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import timm
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import random_seed

from ..data import (IMAGE_ERRORS, DeclaredSizeError, ImageFolder, build_eval_loader,
                    build_train_loader, build_transforms, holdout_split, is_small_image_dataset, load_rgb,
                    resolve_data_root, split_dir,
                    validation_split_dir)
from ..distributed import DistInfo, all_gather_object, run_distributed
from ..errors import LinvisionError
from .loop import LoopConfig, StepInfo, Trainer, build_trainer, fit, progress_enabled
from .recipe import DERIVED_KEYS, default_batch_size, describe, resolve_schedule
from .run import Panel, RunFolder, release_run_locks

__all__ = ["setup_threads", "check_model_name", "create_model", "model_data_config", "evaluate", "predict", "train",
           "ClassificationTask", "RESUME_LOCKED_ARGS", "METRIC_FIELDS"]

_log = logging.getLogger("linvision")

# Arguments that define the run; a resumed run must keep them (everything else may change, e.g. --epochs).
RESUME_LOCKED_ARGS = ("model", "img_size", "patch_size", "batch_size", "train_subset", "seed", "mixup", "ema",
                      "val_split")
# metrics.csv columns: validation (model choice) and test (report of the kept weights) metrics per epoch.
METRIC_FIELDS = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_top1", "val_top1_raw", "val_top1_ema",
                 "weights", "test_loss", "test_top1", "test_top5", "lr", "img_per_s", "epoch_seconds")


def setup_threads(n: int | None = None, di: DistInfo | None = None) -> int:
    """Set torch intra-op threads and flush denormal floats to zero; returns the threads. Default (``n`` None):
    all CPU cores, shared by the node's processes under torchrun (``di.distributed``: cores // LOCAL_WORLD_SIZE).

    Flushing denormals matters on CPU: tiny gradients squared in Adam's second moment become denormal and make
    every kernel touching them several times slower (measured 2x on a whole deit_tiny training step).
    """
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if di is not None and di.distributed else 1
    n = n or max(1, (os.cpu_count() or 1) // local_procs)
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    return n


def check_model_name(name: str) -> None:
    """Raise :class:`LinvisionError` (with up to 5 close matches) if timm has no model ``name``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise LinvisionError(f"unknown model {name!r}" + (f"; did you mean: {', '.join(close)}?" if close else
                                                            "; see timm.list_models() for the names"))


def create_model(name: str, num_classes: int, img_size: int | None = None, patch_size: int | None = None,
                 drop_path_rate: float = 0.0, extra_kwargs: dict[str, Any] | None = None
                 ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``timm.create_model(name, pretrained=False, ...)`` → ``(model, model_args)``.

    ``img_size``/``patch_size``/``drop_path_rate`` are passed only when set (``drop_path_rate`` only if > 0);
    ``extra_kwargs`` (e.g. a ViT-ResNAS ``arch``) are passed as given.
    A model without an ``img_size`` or ``patch_size`` argument (a CNN) is built without it (logged): it takes
    any input size, which the data transform sets. ``model_args`` are the keyword arguments actually used (stored
    in ``config.json`` to rebuild the model).

    Raises:
        LinvisionError: unknown model, or an argument the model does not accept.
    """
    check_model_name(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, **(extra_kwargs or {})}
    for k, v in (("img_size", img_size), ("patch_size", patch_size), ("drop_path_rate", drop_path_rate or None)):
        if v is not None:
            kwargs[k] = v
    while True:
        try:
            return timm.create_model(name, pretrained=False, **kwargs), kwargs
        except TypeError as e:
            bad = next((k for k in kwargs if f"'{k}'" in str(e)), None)
            if bad in ("img_size", "patch_size"):
                _log.info("%s takes no %s argument; building it without (%s=%s)", name, bad, bad, kwargs.pop(bad))
                continue
            flag = "--" + (bad or "").replace("_", "-").replace("drop-path-rate", "drop-path")
            raise LinvisionError(f"model {name!r} does not accept {flag if bad else 'these arguments'}: {e}") \
                from None
        except (ValueError, AssertionError) as e:
            raise LinvisionError(f"cannot build model {name!r} with {kwargs}: {e}") from None


def model_data_config(name: str, img_size: int | None, small_images: bool) -> dict[str, Any]:
    """JSON-ready data config for a model: ``mean``/``std``/``interpolation``/``crop_pct`` from the model's timm
    ``pretrained_cfg`` (ImageNet defaults if none), ``input_size`` ``[3, img_size, img_size]`` (model default if
    ``img_size`` is None), ``crop_pct`` 1.0 for small (CIFAR-like) images, and ``small_images``."""
    cfg = timm.models.get_pretrained_cfg(name)
    dc = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
    size = img_size or dc["input_size"][-1]
    return {"input_size": [3, size, size], "mean": list(dc["mean"]), "std": list(dc["std"]),
            "crop_pct": 1.0 if small_images else dc["crop_pct"], "interpolation": dc["interpolation"],
            "small_images": small_images}


# --------------------------------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Any, class_names: Sequence[str] | None = None,
             progress: bool = True, desc: str = "eval", *, device: str | torch.device | None = None,
             dist_info: DistInfo | None = None) -> dict[str, Any]:
    """Evaluate a classifier on a loader of ``(images [B,3,H,W], targets [B])`` batches (``None`` batches skipped).

    ``device``: where batches go (default: the model's). ``progress``: a tqdm bar when stderr is a terminal.
    ``dist_info``: when distributed, each rank evaluates its
    shard (``build_eval_loader(..., num_replicas, rank)``) and the sums are reduced, so every rank returns the
    metrics of the whole split.

    Returns:
        ``{"top1": %, "top5": %, "loss": mean cross-entropy (nats), "per_class": {class: top-1 %}, "n": images,
        "skipped": unreadable images}`` (top-5 is top-k with k = min(5, classes); ``per_class`` lists classes
        that have images).

    Raises:
        LinvisionError: the loader yields no readable image.
    """
    model.eval()
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    names = list(class_names or getattr(getattr(loader, "dataset", None), "classes", []))
    n = c1 = c5 = 0
    loss_sum = 0.0
    hits = counts = None
    bar = progress and sys.stderr.isatty()  # no carriage-return lines in logs
    for batch in tqdm(loader, desc=desc, leave=False, disable=not bar, file=sys.stderr, dynamic_ncols=True):
        if batch is None:
            continue
        x, y = batch[0].to(device), batch[1].to(device)
        out = model(x).float()
        if hits is None:
            hits = torch.zeros(out.shape[1], device=device)
            counts = torch.zeros(out.shape[1], device=device)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        ok1 = top[:, 0] == y
        c1, c5, n = c1 + int(ok1.sum()), c5 + int((top == y[:, None]).any(1).sum()), n + len(y)
        counts += torch.bincount(y, minlength=len(counts)).float()
        hits += torch.bincount(y[ok1], minlength=len(hits)).float()
    sampler = getattr(loader, "sampler", None)  # a plain list of batches has none
    expected = len(sampler) if sampler is not None else n
    if dist_info is not None and dist_info.distributed:
        parts = all_gather_object((n, c1, c5, loss_sum, expected, None if hits is None else hits.tolist(),
                                   None if counts is None else counts.tolist()), dist_info)
        n, c1, c5, expected = (sum(p[i] for p in parts) for i in (0, 1, 2, 4))
        loss_sum = sum(p[3] for p in parts)
        h = [torch.tensor(p[5]) for p in parts if p[5] is not None]
        hits, counts = (sum(h), sum(torch.tensor(p[6]) for p in parts if p[6] is not None)) if h else (None, None)
    if n == 0:
        raise LinvisionError("no readable images to evaluate")
    hits, counts = hits.cpu(), counts.cpu()
    per_class = {(names[i] if i < len(names) else str(i)): round(100.0 * float(hits[i] / counts[i]), 4)
                 for i in range(len(counts)) if counts[i] > 0}
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "per_class": per_class, "n": n,
            "skipped": max(0, expected - n)}


@torch.inference_mode()
def predict(model: torch.nn.Module, config: dict[str, Any], image_paths: Sequence[str | Path], top_k: int = 5,
            batch_size: int = 64) -> list[dict[str, Any]]:
    """Classify image files with a checkpoint's model and ``config`` (from :func:`linvision.checkpoint.load_model`).

    Returns:
        One dict per image, in order: ``{"image": path, "predictions": [{"class": name, "index": i,
        "prob": p}, ...]}`` with the ``top_k`` most probable classes (softmax probabilities in [0, 1]).

    Raises:
        LinvisionError: an image is missing or cannot be decoded (the message names it). Images of any PIL mode
        are converted to RGB; images smaller than the model input are upscaled with a warning.
    """
    dc, names = config["data_config"], config.get("class_names") or []
    tf = build_transforms(dc["input_size"][-1], False, dc["mean"], dc["std"], crop_pct=dc.get("crop_pct"),
                          interpolation=dc.get("interpolation", "bicubic"), small_images=dc.get("small_images", False))
    tensors, size = [], dc["input_size"][-1]
    for p in image_paths:
        if not Path(p).is_file():
            raise LinvisionError(f"image not found: {p}" if not Path(p).exists() else f"not an image file: {p}")
        try:
            img = load_rgb(p)
            tensors.append(tf(img))
        except IMAGE_ERRORS as e:
            why = ("not an image (PIL cannot identify its format)" if isinstance(e, UnidentifiedImageError) else
                   str(e) if isinstance(e, (DeclaredSizeError, Image.DecompressionBombError)) else
                   f"corrupt or truncated image file ({e})")
            raise LinvisionError(f"cannot decode image {p}: {why}") from None
        if min(img.size) < size:
            warnings.warn(f"{p} is {img.size[0]}x{img.size[1]}, smaller than the model input {size}x{size}; "
                          "upscaled", stacklevel=2)
    model.eval()
    results = []
    for i in range(0, len(tensors), batch_size):
        probs = model(torch.stack(tensors[i:i + batch_size])).float().softmax(dim=1)
        top = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for j, (ps, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            results.append({"image": str(image_paths[i + j]), "predictions": [
                {"class": names[k] if k < len(names) else str(k), "index": k, "prob": p} for p, k in zip(ps, idx)]})
    return results


# --------------------------------------------------------------------------------------------------- the task
class ClassificationTask:
    """Image classification on the engine's loop (:class:`linvision.engine.loop.Task`): cross-entropy (label
    smoothing, or soft targets with mixup/cutmix), training accuracy on the un-mixed labels, and
    :func:`evaluate` (``score`` = top-1 %) for model choice and the test report."""

    score_name = "top1"
    metric_fields = METRIC_FIELDS
    panels = (Panel("loss", "cross-entropy loss", (("train_loss", "train"), ("val_loss", "validation"),
                                                   ("test_loss", "test"))),
              Panel("accuracy", "accuracy (%)", (("train_acc", "train (on un-mixed labels)"),
                                                 ("val_top1", "validation top-1"), ("test_top1", "test top-1"),
                                                 ("test_top5", "test top-5"))))

    def __init__(self, criterion: torch.nn.Module, mixup: Mixup | None, config: dict[str, Any], title: str):
        self.criterion, self.mixup, self.config, self.title = criterion, mixup, config, title

    def prepare(self, batch: Any) -> tuple[Any, int]:
        x, y = batch
        received = len(y)
        if self.mixup is not None and len(x) % 2:  # timm's Mixup needs an even batch
            x, y = x[:-1], y[:-1]
        return ((x, y) if len(x) > 0 else None), received

    def train_step(self, net: torch.nn.Module, batch: Any, info: StepInfo
                   ) -> tuple[torch.Tensor, int, dict[str, float]]:
        x, y = (t.to(info.device, non_blocking=True) for t in batch)
        xm, ym = self.mixup(x, y) if self.mixup is not None else (x, y)
        logits = net(xm)
        loss = self.criterion(logits, ym)
        return loss, len(y), {"correct": int((logits.argmax(1) == y).sum())}

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"train_acc": 100 * sums.get("correct", 0) / max(sums["seen"], 1)}

    def evaluate(self, model: torch.nn.Module, loader: Any, di: DistInfo, desc: str) -> dict[str, Any]:
        m = evaluate(model, loader, self.config["class_names"], progress=progress_enabled(di), desc=desc,
                     device=di.device, dist_info=di)
        return {**m, "score": m["top1"]}

    def on_epoch_start(self, epoch: int, trainer: Trainer) -> None:
        pass

    def model_config(self, epoch: int, step: int, weights: str, metrics: dict[str, Any],
                     choice: dict[str, Any]) -> dict[str, Any]:
        return {**self.config, "weights": weights, "epoch": epoch, "step": step,
                "metrics": {k: metrics[k] for k in ("top1", "top5", "loss", "n")}, "model_choice": choice,
                "versions": {"torch": torch.__version__, "timm": timm.__version__}}


# --------------------------------------------------------------------------------------------------- training
def train(args: Namespace) -> dict[str, Any]:
    """Train a model; returns ``{"output", "epoch", "step", "test": metrics of the saved weights, "best_top1"}``.

    ``args`` attributes (the CLI's ``train`` options): ``model, data, img_size, patch_size, epochs, batch_size,
    lr, lr_base_size, min_lr, warmup_lr, warmup_epochs, weight_decay, opt, mixup, mixup_alpha, cutmix_alpha,
    smoothing, ema, ema_decay, clip_grad, drop_path, auto_augment, re_prob, workers, threads, max_steps,
    train_subset, seed, output, resume`` and optionally ``val_split`` (default 0: none), ``save_every_steps``
    (0/None: off), ``log_interval``, ``device`` (``auto``/``cpu``/``cuda``) and ``amp``. ``max_steps`` counts
    optimizer steps of this invocation; reaching it ends the current epoch early (it is evaluated and saved as
    complete) and stops.

    Model choice: with EMA, the raw and EMA weights are evaluated each epoch on the validation data and the one
    with the higher top-1 is saved as ``model.safetensors`` (``metrics.csv`` column ``weights``, ``config.json``
    ``model_choice``); ``train_state.pt`` keeps both. The validation data is the data set's ``val/`` split when it
    also has ``test/``, else ``val_split`` training images held out (a fraction if < 1, else a count;
    class-balanced, seeded by ``seed``; at least one per class). Without validation data (``val_split`` 0) the EMA
    weights are kept. The test split is evaluated for the kept weights only and only reported.

    Distributed: run under ``torchrun`` (``WORLD_SIZE`` > 1), every process calls this; see
    :mod:`linvision.distributed`. ``batch_size`` is per process; the peak learning rate is
    ``lr × global batch / lr_base_size`` with global batch = ``batch_size × WORLD_SIZE`` (the linear scaling rule,
    Goyal et al. 2017, arXiv 1706.02677), so a run with the same global batch gets the same schedule on any
    number of processes. Only rank 0 writes files and logs.

    Resume: see :func:`linvision.engine.loop.fit` — a run killed at any moment and resumed trains exactly as if
    uninterrupted (bit for bit on CPU).

    Raises:
        LinvisionError: bad data/model/arguments, a resume whose locked arguments (``RESUME_LOCKED_ARGS``) or
        number of processes differ, an output folder that already holds another run or cannot be written, or a
        non-finite loss / gradient norm / weights (names the step; the last good checkpoint stays).
    """
    return run_distributed(_train, args, getattr(args, "device", None), on_exit=release_run_locks)


def _data(args: Namespace, di: DistInfo, data_config: dict[str, Any]
          ) -> tuple[Any, tuple[str, Any] | None, Any, list[str], dict[str, Any]]:
    """``(train loader, (name, validation loader) or None, test loader, classes, validation record)``."""
    root = resolve_data_root(args.data)
    val_dir, val_split = validation_split_dir(root), getattr(args, "val_split", None) or 0
    kw = {"num_workers": args.workers, "num_replicas": di.world_size, "rank": di.rank}
    with warnings.catch_warnings():
        if not di.is_main:  # every rank lists the same files; rank 0 reports them
            warnings.simplefilter("ignore")
        train_idx = held = None
        if val_dir is None and val_split:
            targets = ImageFolder(split_dir(root, "train")).targets
            train_idx, held = holdout_split(targets, val_split, args.seed, what="--val-split", min_per_class=True)
        # without --batch-size the batch follows the number of training images (engine/recipe.py)
        batch = args.batch_size or (lambda n: default_batch_size(n, di.world_size))
        train_loader = build_train_loader(root, data_config, batch, seed=args.seed, subset=args.train_subset,
                                          auto_augment=args.auto_augment, re_prob=args.re_prob, indices=train_idx,
                                          **kw)
        args.batch_size = train_loader.batch_size
        classes = train_loader.dataset.classes
        test_loader = build_eval_loader(root, data_config, args.batch_size, classes=classes, **kw)
        val = None
        if val_dir is not None:
            val = ("val", build_eval_loader(root, data_config, args.batch_size, classes=classes, split=val_dir.name,
                                            **kw))
            record = {"source": f"{val_dir.name}/ split", "n": len(val[1].dataset)}
        elif held is not None:
            val = ("val", build_eval_loader(root, data_config, args.batch_size, classes=classes, split="train",
                                            indices=held, **kw))
            record = {"source": "held out of train/", "val_split": val_split, "seed": args.seed, "n": len(held)}
        else:
            record = {"source": None, "n": 0}
    return train_loader, val, test_loader, classes, record


def _train(args: Namespace, di: DistInfo) -> dict[str, Any]:
    setup_threads(args.threads, di)
    run = RunFolder(args.output, args.resume, vars(args), RESUME_LOCKED_ARGS, di,
                    ignore=("resume", "output", "max_steps", "device", "log_interval"))
    check_model_name(args.model)
    run.check_writable()

    root = resolve_data_root(args.data)
    data_config = model_data_config(args.model, args.img_size, is_small_image_dataset(root))
    train_loader, val, test_loader, classes, val_record = _data(args, di, data_config)
    steps_per_epoch = len(train_loader)
    schedule = resolve_schedule(vars(args), steps_per_epoch)  # recipe + run length -> lr, warm-up, EMA, ...
    for k in DERIVED_KEYS:
        setattr(args, k, schedule[k])
    run.args["recipe"] = schedule["recipe"]  # a resumed (e.g. extended) run keeps the recipe auto chose
    random_seed(args.seed)
    model, model_args = create_model(args.model, len(classes), args.img_size, args.patch_size, args.drop_path,
                                     {"arch": args.arch} if getattr(args, "arch", None) else None)
    size = data_config["input_size"][-1]
    if "patch_size" in model_args and size % model_args["patch_size"]:
        p = model_args["patch_size"]
        raise LinvisionError(f"--img-size {size} is not divisible by --patch-size {p}; use e.g. --img-size "
                             f"{max(p, size - size % p)} or {size - size % p + p}")
    model.to(di.device)
    global_batch = args.batch_size * di.world_size
    lr_base = getattr(args, "lr_base_size", None) or global_batch
    lr = args.lr if global_batch == lr_base else args.lr * global_batch / lr_base
    trainer = build_trainer(model, di, steps_per_epoch=steps_per_epoch, epochs=args.epochs, opt=args.opt, lr=lr,
                            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                            warmup_lr=args.warmup_lr, min_lr=args.min_lr,
                            ema_decay=args.ema_decay if args.ema else None, amp=bool(getattr(args, "amp", False)))
    mixup = Mixup(mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, label_smoothing=args.smoothing,
                  num_classes=len(classes)) if args.mixup else None
    criterion = (SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(args.smoothing)
                 if args.smoothing > 0 else torch.nn.CrossEntropyLoss())
    config = {"model": args.model, "model_args": model_args, "class_names": classes, "data_config": data_config,
              "validation": val_record, "train_args": run.args,
              "schedule": {**schedule, "batch_size": args.batch_size, "global_batch": global_batch, "peak_lr": lr}}
    task = ClassificationTask(criterion, mixup, config,
                              f"{args.model} on {Path(str(args.data)).name if args.data else 'cifar10_subset'}")
    n_params = sum(p.numel() for p in model.parameters())
    non_images = len(train_loader.dataset.skipped) + len(test_loader.dataset.skipped)
    n_train = len(train_loader.sampler.indices)
    _log.info("%s: %.2fM params, %d classes, %d train / %d test images%s, %d steps/epoch, output %s", args.model,
              n_params / 1e6, len(classes), n_train, len(test_loader.dataset),
              f" ({non_images} non-image file(s) skipped)" if non_images else "", steps_per_epoch, run.out)
    _log.info("model choice: %s", f"{'raw/EMA' if args.ema else 'raw'} weights by top-1 on {val_record['n']} "
              f"validation images ({val_record['source']})" if val is not None else
              "no validation data (--val-split 0): " + ("EMA weights kept" if args.ema else "raw weights kept"))
    _log.info("%s", describe(schedule, global_batch, bool(args.ema), lr, lr_base))
    if di.distributed:
        _log.info("%d process(es) on %s, global batch %d: peak lr %.4g (= --lr %g x %d / --lr-base-size %d)",
                  di.world_size, di.device.type, global_batch, lr, args.lr, global_batch, lr_base)
    cfg = LoopConfig(epochs=args.epochs, seed=args.seed, save_every=getattr(args, "save_every_steps", None) or 0,
                     max_steps=args.max_steps, log_interval=getattr(args, "log_interval", None) or 0,
                     clip_grad=args.clip_grad, amp=bool(getattr(args, "amp", False)))
    r = fit(task, trainer, run, train_loader, cfg, val=val, test=("test", test_loader))
    if di.is_main and r["choice"]:
        _log.info("kept the %s weights (%s%s)", r["weights"], r["choice"]["reason"],
                  f": {r['choice']['scores']}" if r["choice"].get("scores") else "")
    tops = [h["test_top1"] for h in r["history"] if h.get("test_top1", "") != ""]
    return {"output": str(run.out), "epoch": r["epoch"], "step": r["step"], "test": r["metrics"],
            "best_top1": max(tops, default=-1.0)}
