"""Training, evaluation and prediction loops (CPU or CUDA, deterministic, resumable, data-parallel under torchrun).

``train(args)`` builds a timm model, AdamW (``timm.optim``), a per-step cosine schedule with warmup
(``timm.scheduler``), optional EMA (``timm.utils.ModelEmaV3``) and mixup/cutmix (``timm.data.Mixup``), and after
every epoch evaluates on the test split and atomically writes ``model.safetensors``, ``config.json``,
``train_state.pt``, ``metrics.csv`` and ``curves.png`` to the output folder (``train_state.pt`` also every
``save_every_steps`` steps). ``--resume`` restores everything, including the position inside an epoch and the RNG
states, so a resumed run reproduces an uninterrupted one bit for bit on CPU. Under ``torchrun`` it trains with
DDP (:mod:`linvision.distributed`).
"""
from __future__ import annotations

import csv
import difflib
import io
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError
from tqdm import tqdm

from . import _compat  # noqa: F401  (before timm/torchvision)
import timm  # noqa: E402
from timm.data import Mixup, resolve_data_config  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import ModelEmaV3, random_seed  # noqa: E402

from .checkpoint import (STATE_FILE, atomic_write, check_locked_args, check_state_dict,  # noqa: E402
                         get_rng_states, load_train_state, remove_stale_temp_files, save_model,
                         save_train_state, set_rng_states)
from .data import (build_loaders, build_transforms, is_small_image_dataset, load_rgb,  # noqa: E402
                   resolve_data_root, IMAGE_ERRORS)
from .distributed import (DistInfo, all_gather_object, all_reduce_sum, cleanup_distributed,  # noqa: E402
                          init_distributed)
from .errors import LinvisionError  # noqa: E402
from .plots import atomic_write_png, new_figure  # noqa: E402

__all__ = ["setup_threads", "check_model_name", "create_model", "model_data_config", "evaluate", "predict", "train",
           "RESUME_LOCKED_ARGS", "METRIC_FIELDS"]

_log = logging.getLogger("linvision")

# Arguments that define the run; a resumed run must keep them (everything else may change, e.g. --epochs).
RESUME_LOCKED_ARGS = ("model", "img_size", "patch_size", "batch_size", "train_subset", "seed", "mixup", "ema")
METRIC_FIELDS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5", "test_top1_raw",
                 "test_top1_ema", "weights", "lr", "img_per_s", "epoch_seconds")


def setup_threads(n: int | None = None) -> int:
    """Set torch intra-op threads (default: all CPU cores) and flush denormal floats to zero; returns the threads.

    Flushing denormals matters on CPU: tiny gradients squared in Adam's second moment become denormal and make
    every kernel touching them several times slower (measured 2x on a whole deit_tiny training step).
    """
    n = n or os.cpu_count() or 1
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

    ``device``: where batches go (default: the model's). ``dist_info``: when distributed, each rank evaluates its
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
    names = list(class_names or getattr(loader.dataset, "classes", []))
    n = c1 = c5 = 0
    loss_sum = 0.0
    hits = counts = None
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr, dynamic_ncols=True):
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
    expected = len(loader.sampler) if loader.sampler is not None else n
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


# --------------------------------------------------------------------------------------------------- training
def write_metrics_csv(out: Path, history: list[dict[str, Any]], fields: Sequence[str] = METRIC_FIELDS) -> None:
    """Atomically (re)write ``out/metrics.csv``: one row per entry of ``history``, columns ``fields``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    atomic_write(out / "metrics.csv", buf.getvalue().encode())


def _plot_curves(out: Path, history: list[dict[str, Any]], title: str) -> None:
    ep = [h["epoch"] for h in history]
    fig = new_figure((10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(ep, [h["test_loss"] for h in history], "o-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax2.plot(ep, [h["train_acc"] for h in history], "o-", label="train (on un-mixed labels)")
    ax2.plot(ep, [h["test_top1"] for h in history], "o-", label="test top-1")
    ax2.plot(ep, [h["test_top5"] for h in history], "--", alpha=0.6, label="test top-5")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    atomic_write_png(out / "curves.png", fig)


def _json_ready(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _check_output(out: Path) -> None:
    """Prove the output folder writable before any work (a folder this creates for the probe is removed again, so
    a run that fails before its first checkpoint leaves nothing behind); drop temp files of killed writes."""
    if out.exists() and not out.is_dir():
        raise LinvisionError(f"--output {out} is a file, not a folder")
    created = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LinvisionError(f"cannot write to --output {out}: {e.strerror or e}") from None
    finally:
        for p in created:
            try:
                p.rmdir()
            except OSError:
                break
    if removed := remove_stale_temp_files(out) if out.is_dir() else []:
        _log.info("removed %d temporary file(s) left in %s by an interrupted write", len(removed), out)


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def train(args: Namespace) -> dict[str, Any]:
    """Train a model; returns ``{"output", "epoch", "step", "test": metrics of the saved weights, "best_top1"}``.

    ``args`` attributes (the CLI's ``train`` options): ``model, data, img_size, patch_size, epochs, batch_size,
    lr, lr_base_size, min_lr, warmup_lr, warmup_epochs, weight_decay, opt, mixup, mixup_alpha, cutmix_alpha,
    smoothing, ema, ema_decay, clip_grad, drop_path, auto_augment, re_prob, workers, threads, max_steps,
    train_subset, seed, output, resume`` and optionally ``save_every_steps`` (0/None: off), ``device``
    (``auto``/``cpu``/``cuda``) and ``amp``. ``max_steps`` counts optimizer steps of this invocation; reaching it
    ends the current epoch early (it is evaluated and saved as complete) and stops. With EMA, both raw and EMA
    weights are evaluated each epoch and the better is saved as ``model.safetensors`` (``metrics.csv`` column
    ``weights``); ``train_state.pt`` keeps both for resuming.

    Distributed: run under ``torchrun`` (``WORLD_SIZE`` > 1), every process calls this; see
    :mod:`linvision.distributed`. ``batch_size`` is per process; the peak learning rate is
    ``lr × global batch / lr_base_size`` with global batch = ``batch_size × WORLD_SIZE`` (the linear scaling rule,
    Goyal et al. 2017, arXiv 1706.02677), so a run with the same global batch gets the same schedule on any
    number of processes. Only rank 0 writes files and logs.

    Resume: ``train_state.pt`` is written at every epoch end and, with ``save_every_steps`` N, after every N-th
    optimizer step; it restores model, optimizer, scheduler, EMA, AMP grad scaler, epoch, step, the position inside
    the epoch (the sampler skips the batches already trained on) and every rank's RNG states, so a run killed at
    any moment and resumed trains exactly as if uninterrupted (bit for bit on CPU). Augmentations are seeded per
    sample by the sampler, so data-loader workers hold no RNG state that matters.

    Raises:
        LinvisionError: bad data/model/arguments, a resume whose locked arguments (``RESUME_LOCKED_ARGS``) or
        number of processes differ, an output folder that already holds another run or cannot be written, or a
        non-finite loss / gradient norm / weights (names the step; the last good checkpoint stays).
    """
    di = init_distributed(getattr(args, "device", None))
    level = _log.level
    if not di.is_main:
        _log.setLevel(logging.WARNING)
    try:
        return _train(args, di)
    finally:
        _log.setLevel(level)
        cleanup_distributed(di)


def _train(args: Namespace, di: DistInfo) -> dict[str, Any]:
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if di.distributed else 1
    setup_threads(args.threads or max(1, (os.cpu_count() or 1) // local_procs))
    out = Path(args.output or args.resume)
    state = load_train_state(args.resume) if args.resume else None
    if state is not None:
        check_locked_args(args.resume, state["args"], vars(args), RESUME_LOCKED_ARGS)
        if state.get("world_size", 1) != di.world_size:
            raise LinvisionError(f"cannot resume {args.resume} with {di.world_size} process(es): it was trained with "
                                 f"{state.get('world_size', 1)} (the global batch and data order depend on it)")
        if missing := [k for k in ("model", "optimizer", "scheduler", "step", "history") if k not in state]:
            raise LinvisionError(f"cannot resume from {out / STATE_FILE}: it lacks {', '.join(missing)}")
    elif (out / STATE_FILE).exists():
        raise LinvisionError(f"output folder {out} already holds a run; continue it with --resume {out} "
                             "or choose another --output")
    check_model_name(args.model)
    if di.is_main:
        _check_output(out)

    root = resolve_data_root(args.data)
    data_config = model_data_config(args.model, args.img_size, is_small_image_dataset(root))
    with warnings.catch_warnings():
        if not di.is_main:  # every rank lists the same files; rank 0 reports them
            warnings.simplefilter("ignore")
        train_loader, eval_loader, classes = build_loaders(
            root, data_config, args.batch_size, num_workers=args.workers, seed=args.seed,
            train_subset=args.train_subset, auto_augment=args.auto_augment, re_prob=args.re_prob,
            num_replicas=di.world_size, rank=di.rank)
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
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=args.ema_decay, use_warmup=True) if args.ema else None
    mixup = Mixup(mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, label_smoothing=args.smoothing,
                  num_classes=len(classes)) if args.mixup else None
    criterion = (SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(args.smoothing)
                 if args.smoothing > 0 else torch.nn.CrossEntropyLoss())
    amp = bool(getattr(args, "amp", False))
    amp_dtype = torch.float16 if di.device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(di.device.type, enabled=amp and di.device.type == "cuda")

    start_epoch, start_batch, step, best, history = 0, 0, 0, -1.0, []
    last_ckpt = ""  # what the last written train_state.pt holds, for the non-finite message
    if state is not None:
        f = out / STATE_FILE
        check_state_dict(model, state["model"], f)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if state["args"].get("epochs") == args.epochs:  # else: the new, longer/shorter cosine takes over
                scheduler.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise LinvisionError(f"cannot resume from {f}: its optimizer/scheduler/EMA state does not fit this run "
                                 f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") \
                from None
        start_epoch, step, best, history = state["epoch"], state["step"], state["best_top1"], state["history"]
        start_batch = state.get("batch_in_epoch", 0)
        scheduler.step_update(step)
        last_ckpt = (f"epoch {start_epoch}" if not start_batch else
                     f"epoch {start_epoch + 1} in progress, step {step}")
        _log.info("resumed %s at epoch %d%s, step %d", args.resume, start_epoch,
                  f" + {start_batch}/{steps_per_epoch} batches" if start_batch else "", step)
    net = model
    if di.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    run_args = _json_ready({k: v for k, v in vars(args).items() if k not in ("resume", "output", "max_steps",
                                                                            "device")})
    n_params = sum(p.numel() for p in model.parameters())
    non_images = len(train_loader.dataset.skipped) + len(eval_loader.dataset.skipped)
    _log.info("%s: %.2fM params, %d classes, %d train / %d test images%s, %d steps/epoch, output %s", args.model,
              n_params / 1e6, len(classes), len(train_loader.dataset) if args.train_subset is None else
              args.train_subset, len(eval_loader.dataset),
              f" ({non_images} non-image file(s) skipped)" if non_images else "", steps_per_epoch, out)
    if di.distributed or lr != args.lr:
        _log.info("%d process(es) on %s, global batch %d: peak lr %.4g (= --lr %g x %d / --lr-base-size %d)",
                  di.world_size, di.device.type, global_batch, lr, args.lr, global_batch, lr_base)

    def save_state(epoch_done: int, batch_in_epoch: int, stats: dict[str, Any] | None) -> None:
        """train_state.pt (a collective: every rank's RNG state and epoch statistics go in; rank 0 writes)."""
        if not _all_finite(model):
            raise LinvisionError(f"non-finite weights after step {step}; training stopped, not saved; the last good "
                                 f"checkpoint ({last_ckpt or 'none'}) is kept in {out}. Try a lower --lr")
        ranks = all_gather_object({"rng": get_rng_states(), "stats": stats}, di)
        if di.is_main:
            save_train_state(out, {
                "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch_done, "step": step, "batch_in_epoch": batch_in_epoch,
                "epoch_stats": [r["stats"] for r in ranks] if stats is not None else None, "best_top1": best,
                "rng": ranks[0]["rng"], "rng_per_rank": [r["rng"] for r in ranks], "world_size": di.world_size,
                "args": run_args, "history": history})

    def nonfinite(what: str, value: float, epoch: int, at: int | None = None) -> LinvisionError:
        where = (f"the last good checkpoint ({last_ckpt}) is kept in {out}" if last_ckpt else
                 "no checkpoint was written")
        return LinvisionError(f"non-finite {what} ({value}) at step {step + 1 if at is None else at} (epoch "
                              f"{epoch + 1}); training stopped, {where}. Try a lower --lr or --clip-grad")

    save_every = getattr(args, "save_every_steps", None) or 0
    steps_this_run, stop, result = 0, start_epoch >= args.epochs, {}
    for epoch in range(start_epoch, args.epochs):
        first = start_batch if epoch == start_epoch else 0
        train_loader.sampler.set_epoch(epoch, start=first * args.batch_size)
        random_seed(args.seed + 1_000_003 * (epoch + 1), di.rank)  # dropout/drop-path/mixup RNG: (seed, epoch, rank)
        if epoch == 0 and first == 0:
            # Runs before resumable mid-epoch checkpoints drew the loader's worker seed from this RNG when the
            # first epoch's (persistent) workers started; keep that draw so those runs' numbers reproduce.
            torch.empty((), dtype=torch.int64).random_()
        batches = iter(train_loader)
        if first:  # inside an epoch: continue the RNG streams exactly where the checkpoint left them
            set_rng_states(state["rng_per_rank"][di.rank] if "rng_per_rank" in state else state["rng"])
        net.train()
        stats = (dict(state["epoch_stats"][di.rank]) if first and state.get("epoch_stats") else
                 {"seen": 0, "loss_sum": 0.0, "correct": 0, "received": 0, "seconds": 0.0})
        t0 = time.perf_counter() - stats["seconds"]
        bar = tqdm(batches, total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{args.epochs}",
                   file=sys.stderr, dynamic_ncols=True, leave=False, disable=not di.is_main)
        batch_idx = first
        for batch in bar:
            batch_idx += 1
            x = y = None
            if batch is not None:
                x, y = batch
                stats["received"] += len(y)
                if mixup is not None and len(x) % 2:  # timm's Mixup needs an even batch
                    x, y = x[:-1], y[:-1]
            ready = x is not None and len(x) > 0
            if di.distributed:  # all ranks step together: skip the step if any rank has nothing to train on
                ready = all_reduce_sum([float(ready)], di).item() == di.world_size
            if not ready:
                continue
            x, y = x.to(di.device, non_blocking=True), y.to(di.device, non_blocking=True)
            xm, ym = mixup(x, y) if mixup is not None else (x, y)
            with torch.autocast(di.device.type, dtype=amp_dtype, enabled=amp):
                logits = net(xm)
                loss = criterion(logits, ym)
            loss_value = loss.item()
            global_loss = (all_reduce_sum([loss_value], di).item() / di.world_size if di.distributed
                           else loss_value)
            if not math.isfinite(global_loss):
                raise nonfinite("loss", global_loss, epoch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad or not scaler.is_enabled():
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or float("inf"))
                if not scaler.is_enabled() and not torch.isfinite(norm):  # the scaler skips such steps itself
                    raise nonfinite("gradient norm", float(norm), epoch)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            steps_this_run += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            stats["seen"] += len(y)
            stats["loss_sum"] += loss_value * len(y)
            stats["correct"] += int((logits.argmax(1) == y).sum())
            if di.is_main:
                seen = stats["seen"]
                bar.set_postfix(loss=f"{stats['loss_sum'] / seen:.3f}", acc=f"{100 * stats['correct'] / seen:.1f}",
                                img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if save_every and step % save_every == 0:
                stats["seconds"] = time.perf_counter() - t0
                save_state(epoch, batch_idx, stats)
                last_ckpt = f"epoch {epoch + 1} in progress, step {step}"
            if args.max_steps and steps_this_run >= args.max_steps:
                stop = True
                break
        bar.close()
        train_seconds = time.perf_counter() - t0
        scheduler.step(epoch + 1)
        expected = (batch_idx * args.batch_size if train_loader.drop_last else
                    min(batch_idx * args.batch_size, train_loader.sampler.num_samples))
        seen, loss_sum, correct, received, expected = all_reduce_sum(
            [stats["seen"], stats["loss_sum"], stats["correct"], stats["received"], expected], di).tolist()
        skipped = int(expected - received)

        kw = {"device": di.device, "dist_info": di, "progress": di.is_main}
        metrics = {"raw": evaluate(model, eval_loader, classes, desc="eval", **kw)}
        if ema is not None:
            metrics["ema"] = evaluate(ema.module, eval_loader, classes, desc="eval ema", **kw)
        which = max(metrics, key=lambda k: metrics[k]["top1"])
        result = metrics[which]
        best = max(best, result["top1"])
        history.append({
            "epoch": epoch + 1, "step": step, "train_loss": round(loss_sum / max(seen, 1), 5),
            "train_acc": round(100 * correct / max(seen, 1), 3), "test_loss": round(result["loss"], 5),
            "test_top1": round(result["top1"], 3), "test_top5": round(result["top5"], 3),
            "test_top1_raw": round(metrics["raw"]["top1"], 3),
            "test_top1_ema": round(metrics["ema"]["top1"], 3) if ema is not None else "", "weights": which,
            "lr": optimizer.param_groups[0]["lr"], "img_per_s": round(seen / max(train_seconds, 1e-9), 1),
            "epoch_seconds": round(time.perf_counter() - t0, 2)})
        config = {"model": args.model, "model_args": model_args, "class_names": classes, "data_config": data_config,
                  "weights": which, "epoch": epoch + 1, "step": step,
                  "metrics": {k: result[k] for k in ("top1", "top5", "loss", "n")}, "train_args": run_args,
                  "versions": {"torch": torch.__version__, "timm": timm.__version__}}
        best_module = ema.module if which == "ema" else model
        if not _all_finite(best_module):
            raise nonfinite("weights", float("nan"), epoch, at=step)
        if di.is_main:
            save_model(out, best_module, config)
        save_state(epoch + 1, 0, None)
        last_ckpt = f"epoch {epoch + 1}"
        if di.is_main:
            write_metrics_csv(out, history)
            _plot_curves(out, history, f"{args.model} on "
                                       f"{Path(str(args.data)).name if args.data else 'cifar10_subset'}")
            h = history[-1]
            unreadable = f", {skipped} unreadable image(s) skipped" if skipped else ""
            tqdm.write(f"epoch {h['epoch']}/{args.epochs} step {step}: train loss {h['train_loss']:.3f} "
                       f"acc {h['train_acc']:.1f}% | test loss {h['test_loss']:.3f} top1 {h['test_top1']:.2f}% "
                       f"top5 {h['test_top5']:.2f}% ({which}) | {h['img_per_s']:.0f} img/s, "
                       f"{h['epoch_seconds']:.0f} s{unreadable}", file=sys.stderr)
            if result.get("skipped"):
                _log.warning("%d unreadable test image(s) skipped", result["skipped"])
        if stop:
            break
    if not result and history:  # nothing left to train (resumed a finished run)
        result = {"top1": history[-1]["test_top1"], "top5": history[-1]["test_top5"], "loss": history[-1]["test_loss"]}
    return {"output": str(out), "epoch": history[-1]["epoch"] if history else 0, "step": step,
            "test": result, "best_top1": best}
