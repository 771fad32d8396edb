"""Training, evaluation and prediction loops (CPU-friendly, deterministic, resumable).

``train(args)`` builds a timm model, AdamW (``timm.optim``), a per-step cosine schedule with warmup
(``timm.scheduler``), optional EMA (``timm.utils.ModelEmaV3``) and mixup/cutmix (``timm.data.Mixup``), and after
every epoch evaluates on the test split and atomically writes ``model.safetensors``, ``config.json``,
``train_state.pt``, ``metrics.csv`` and ``curves.png`` to the output folder. ``--resume`` restores everything;
each epoch reseeds all RNGs from ``(seed, epoch)``, so a resumed run reproduces an uninterrupted one.
"""
from __future__ import annotations

import csv
import difflib
import io
import logging
import os
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import _compat  # noqa: F401  (before timm/torchvision)
import timm  # noqa: E402
from timm.data import Mixup, resolve_data_config  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import ModelEmaV3, random_seed  # noqa: E402

from .checkpoint import (STATE_FILE, atomic_write, get_rng_states, load_train_state, save_model,  # noqa: E402
                         save_train_state, set_rng_states)
from .data import (build_loaders, build_transforms, is_small_image_dataset, load_rgb,  # noqa: E402
                   resolve_data_root, IMAGE_ERRORS)
from .errors import LinvisionError  # noqa: E402

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
             progress: bool = True, desc: str = "eval") -> dict[str, Any]:
    """Evaluate a classifier on a loader of ``(images [B,3,H,W], targets [B])`` batches (``None`` batches skipped).

    Returns:
        ``{"top1": %, "top5": %, "loss": mean cross-entropy (nats), "per_class": {class: top-1 %}, "n": images}``
        (top-5 is top-k with k = min(5, classes); ``per_class`` lists classes that have images).

    Raises:
        LinvisionError: the loader yields no readable image.
    """
    model.eval()
    names = list(class_names or getattr(loader.dataset, "classes", []))
    n = c1 = c5 = 0
    loss_sum = 0.0
    hits = counts = None
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr, dynamic_ncols=True):
        if batch is None:
            continue
        x, y = batch
        out = model(x).float()
        if hits is None:
            hits, counts = torch.zeros(out.shape[1]), torch.zeros(out.shape[1])
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        ok1 = top[:, 0] == y
        c1, c5, n = c1 + int(ok1.sum()), c5 + int((top == y[:, None]).any(1).sum()), n + len(y)
        counts += torch.bincount(y, minlength=len(counts)).float()
        hits += torch.bincount(y[ok1], minlength=len(hits)).float()
    if n == 0:
        raise LinvisionError("no readable images to evaluate")
    per_class = {(names[i] if i < len(names) else str(i)): round(100.0 * float(hits[i] / counts[i]), 4)
                 for i in range(len(counts)) if counts[i] > 0}
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "per_class": per_class, "n": n}


@torch.inference_mode()
def predict(model: torch.nn.Module, config: dict[str, Any], image_paths: Sequence[str | Path], top_k: int = 5,
            batch_size: int = 64) -> list[dict[str, Any]]:
    """Classify image files with a checkpoint's model and ``config`` (from :func:`linvision.checkpoint.load_model`).

    Returns:
        One dict per image, in order: ``{"image": path, "predictions": [{"class": name, "index": i,
        "prob": p}, ...]}`` with the ``top_k`` most probable classes (softmax probabilities in [0, 1]).

    Raises:
        LinvisionError: an image is missing or cannot be decoded (the message names it).
    """
    dc, names = config["data_config"], config.get("class_names") or []
    tf = build_transforms(dc["input_size"][-1], False, dc["mean"], dc["std"], crop_pct=dc.get("crop_pct"),
                          interpolation=dc.get("interpolation", "bicubic"), small_images=dc.get("small_images", False))
    tensors = []
    for p in image_paths:
        if not Path(p).is_file():
            raise LinvisionError(f"image not found: {p}")
        try:
            tensors.append(tf(load_rgb(p)))
        except IMAGE_ERRORS as e:
            raise LinvisionError(f"cannot decode image {p}: {e}") from None
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
def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    atomic_write(out / "metrics.csv", buf.getvalue().encode())


def _plot_curves(out: Path, history: list[dict[str, Any]], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out / "curves.png", buf.getvalue())


def _json_ready(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def train(args: Namespace) -> dict[str, Any]:
    """Train a model; returns ``{"output", "epoch", "step", "test": metrics of the saved weights, "best_top1"}``.

    ``args`` attributes (the CLI's ``train`` options, all required): ``model, data, img_size, patch_size, epochs,
    batch_size, lr, min_lr, warmup_lr, warmup_epochs, weight_decay, opt, mixup, mixup_alpha, cutmix_alpha,
    smoothing, ema, ema_decay, clip_grad, drop_path, auto_augment, re_prob, workers, threads, max_steps,
    train_subset, seed, output, resume``. ``max_steps`` counts optimizer steps of this invocation; reaching it ends
    the current epoch early (it is evaluated and saved as complete) and stops. With EMA, both raw and EMA weights
    are evaluated each epoch and the better is saved as ``model.safetensors`` (``metrics.csv`` column ``weights``);
    ``train_state.pt`` keeps both for resuming.

    Raises:
        LinvisionError: bad data/model/arguments, a resume whose locked arguments (``RESUME_LOCKED_ARGS``) differ,
        an output folder that already holds another run, or a non-finite loss (names the step; the last good
        checkpoint stays).
    """
    setup_threads(args.threads)
    out = Path(args.output or args.resume)
    state = load_train_state(args.resume) if args.resume else None
    if state is not None:
        changed = [k for k in RESUME_LOCKED_ARGS if state["args"].get(k) != getattr(args, k)]
        if changed:
            raise LinvisionError(f"cannot resume {args.resume} with different " + ", ".join(
                f"--{k.replace('_', '-')} ({state['args'].get(k)} -> {getattr(args, k)})" for k in changed))
    elif (out / STATE_FILE).exists():
        raise LinvisionError(f"output folder {out} already holds a run; continue it with --resume {out} "
                             "or choose another --output")
    check_model_name(args.model)

    root = resolve_data_root(args.data)
    data_config = model_data_config(args.model, args.img_size, is_small_image_dataset(root))
    train_loader, eval_loader, classes = build_loaders(
        root, data_config, args.batch_size, num_workers=args.workers, seed=args.seed, train_subset=args.train_subset,
        auto_augment=args.auto_augment, re_prob=args.re_prob)
    random_seed(args.seed)
    model, model_args = create_model(args.model, len(classes), args.img_size, args.patch_size, args.drop_path,
                                     {"arch": args.arch} if getattr(args, "arch", None) else None)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=args.ema_decay, use_warmup=True) if args.ema else None
    mixup = Mixup(mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, label_smoothing=args.smoothing,
                  num_classes=len(classes)) if args.mixup else None
    criterion = (SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(args.smoothing)
                 if args.smoothing > 0 else torch.nn.CrossEntropyLoss())

    start_epoch, step, best, history = 0, 0, -1.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["args"].get("epochs") == args.epochs:  # else: the new, longer/shorter cosine takes over
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step, best, history = state["epoch"], state["step"], state["best_top1"], state["history"]
        set_rng_states(state["rng"])
        scheduler.step_update(step)
        _log.info("resumed %s at epoch %d, step %d", args.resume, start_epoch, step)
    run_args = _json_ready({k: v for k, v in vars(args).items() if k not in ("resume", "output", "max_steps")})
    n_params = sum(p.numel() for p in model.parameters())
    _log.info("%s: %.2fM params, %d classes, %d train / %d test images, %d steps/epoch, output %s", args.model,
              n_params / 1e6, len(classes), len(train_loader.sampler), len(eval_loader.dataset), steps_per_epoch, out)

    steps_this_run, stop, result = 0, start_epoch >= args.epochs, {}
    for epoch in range(start_epoch, args.epochs):
        random_seed(args.seed + 1_000_003 * (epoch + 1))  # dropout/drop-path/mixup RNG: a function of (seed, epoch)
        train_loader.sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        seen = loss_sum = correct = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr, dynamic_ncols=True,
                   leave=False)
        for batch in bar:
            if batch is None:
                continue
            x, y = batch
            if mixup is not None and len(x) % 2:  # timm's Mixup needs an even batch
                x, y = x[:-1], y[:-1]
            if len(x) == 0:
                continue
            xm, ym = mixup(x, y) if mixup is not None else (x, y)
            logits = model(xm)
            loss = criterion(logits, ym)
            if not torch.isfinite(loss):
                where = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept in {out}" if history
                         else "no checkpoint was written")
                raise LinvisionError(f"non-finite loss ({loss.item()}) at step {step + 1} (epoch {epoch + 1}); "
                                     f"training stopped, {where}. Try a lower --lr or --clip-grad")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            step += 1
            steps_this_run += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if args.max_steps and steps_this_run >= args.max_steps:
                stop = True
                break
        bar.close()
        train_seconds = time.perf_counter() - t0
        scheduler.step(epoch + 1)

        metrics = {"raw": evaluate(model, eval_loader, classes, desc="eval")}
        if ema is not None:
            metrics["ema"] = evaluate(ema.module, eval_loader, classes, desc="eval ema")
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
        save_model(out, ema.module if which == "ema" else model, config)
        save_train_state(out, {
            "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
            "step": step, "best_top1": best, "rng": get_rng_states(), "args": run_args, "history": history})
        _write_metrics(out, history)
        _plot_curves(out, history, f"{args.model} on {Path(str(args.data)).name if args.data else 'cifar10_subset'}")
        h = history[-1]
        tqdm.write(f"epoch {h['epoch']}/{args.epochs} step {step}: train loss {h['train_loss']:.3f} "
                   f"acc {h['train_acc']:.1f}% | test loss {h['test_loss']:.3f} top1 {h['test_top1']:.2f}% "
                   f"top5 {h['test_top5']:.2f}% ({which}) | {h['img_per_s']:.0f} img/s, {h['epoch_seconds']:.0f} s",
                   file=sys.stderr)
        if stop:
            break
    if not result and history:  # nothing left to train (resumed a finished run)
        result = {"top1": history[-1]["test_top1"], "top5": history[-1]["test_top5"], "loss": history[-1]["test_loss"]}
    return {"output": str(out), "epoch": history[-1]["epoch"] if history else 0, "step": step,
            "test": result, "best_top1": best}
