"""Super-network training (``linvision supernet train``): multi-architecture sampling with progressive warm-up
and rewiring, on the training split minus a held-out part that the search uses for fitness.

Reuses the package's data pipeline (``linvision.data``), timm's optimizer/scheduler/loss, and the checkpoint
helpers (atomic files, resumable ``train_state.pt``). Under ``torchrun`` the model is wrapped in
``DistributedDataParallel`` and every rank trains on its own shard of each epoch with its own sub-networks.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from .. import _compat  # noqa: F401
import timm  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import random_seed  # noqa: E402

from ..checkpoint import (MODEL_FILE, STATE_FILE, check_locked_args, check_state_dict,  # noqa: E402
                          get_rng_states, load_config, load_state_dict, load_train_state, save_model,
                          save_train_state, set_rng_states)
from ..data import (ImageFolder, SeededSampler, build_transforms, collate_skip_none, default_workers,  # noqa: E402
                    is_small_image_dataset, resolve_data_root, split_dir, stratified_subset)
from ..engine import model_data_config, setup_threads, write_metrics_csv  # noqa: E402
from ..errors import LinvisionError  # noqa: E402
from ..plots import atomic_write_png, new_figure  # noqa: E402
from . import dist  # noqa: E402
from .space import get_space  # noqa: E402
from .supernet import ResNASSuperNet  # noqa: E402

__all__ = ["SUPERNET_DEFAULTS", "train_supernet", "load_supernet", "holdout_split", "eval_transform_dataset",
           "accuracy"]

_log = logging.getLogger("linvision")

# Defaults of `linvision supernet train` (scaled for CPU; the paper: 120 epochs, 15 warm-up epochs, 64 images per
# sub-network, batch 1024 over 8 GPUs).
SUPERNET_DEFAULTS: Dict[str, Any] = {
    "space": "demo",
    "data": None,
    "img_size": None,           # None: the space's img_size
    "epochs": 10,
    "batch_size": 64,
    "archs_per_step": 4,        # sub-networks per forward-backward pass (each on batch_size / archs_per_step images)
    "choice_warmup_epochs": 2.0,  # progressive warm-up of the choice sets; rewiring at each epoch start until then
    "lr": 1e-3,
    "min_lr": 1e-5,
    "warmup_lr": 1e-5,
    "warmup_epochs": 1.0,       # learning-rate warm-up
    "weight_decay": 0.05,
    "opt": "adamw",
    "smoothing": 0.1,
    "clip_grad": 1.0,
    "drop_path": 0.1,
    "holdout": 0.1,             # held out of the training split for the search: a fraction (< 1) or a count
    "holdout_seed": 0,
    "train_subset": None,
    "auto_augment": None,
    "seed": 0,
    "workers": None,
    "threads": None,
    "max_steps": None,
    "output": None,
    "resume": None,
}
LOCKED = ("space", "img_size", "batch_size", "archs_per_step", "holdout", "holdout_seed", "train_subset", "seed")
METRICS = ("epoch", "step", "train_loss", "train_acc", "holdout_top1_largest", "holdout_top1_smallest", "lr",
           "img_per_s", "epoch_seconds")


# --------------------------------------------------------------------------------------------------- data
def holdout_split(targets: Sequence[int], holdout: float, seed: int = 0) -> Tuple[List[int], List[int]]:
    """``(train_indices, holdout_indices)`` of a training split: a class-balanced seeded hold-out of
    ``holdout`` images (a fraction if < 1, else a count), the rest for training.

    Raises:
        LinvisionError: the hold-out would be empty or take every image.
    """
    n = int(round(holdout * len(targets))) if holdout < 1 else int(holdout)
    if not 0 < n < len(targets):
        raise LinvisionError(f"--holdout {holdout} gives {n} of {len(targets)} training images; it must leave "
                             "both a held-out and a training part")
    held = stratified_subset(targets, n, seed)
    hs = set(held)
    return [i for i in range(len(targets)) if i not in hs], held


class _ShardedSampler(Sampler):
    """:class:`SeededSampler`'s ``(index, seed)`` order, every ``world``-th item from ``rank`` (torchrun)."""

    def __init__(self, base: SeededSampler, rank: int, world: int):
        self.base, self.rank, self.world = base, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.base), self.world))

    def __iter__(self):
        return iter(list(self.base)[self.rank::self.world])


def _loader(ds, batch_size: int, sampler=None, workers: Optional[int] = None, drop_last: bool = False) -> DataLoader:
    workers = default_workers() if workers is None else workers
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_skip_none, persistent_workers=workers > 0)


def eval_transform_dataset(root: Path, data_config: Dict[str, Any], classes: Optional[Sequence[str]] = None
                           ) -> ImageFolder:
    """The training split with the evaluation transform (for held-out fitness)."""
    tf = build_transforms(data_config["input_size"][-1], False, data_config["mean"], data_config["std"],
                          small_images=data_config.get("small_images", False), crop_pct=data_config.get("crop_pct"),
                          interpolation=data_config.get("interpolation", "bicubic"))
    return ImageFolder(split_dir(root, "train"), tf, classes)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, batches, device: torch.device) -> Dict[str, float]:
    """``{"top1": %, "loss": mean cross-entropy, "n": images}`` of a classifier over ``(x, y)`` batches."""
    model.eval()
    n = correct = 0
    loss = 0.0
    for batch in batches:
        if batch is None:
            continue
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        out = model(x).float()
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    if n == 0:
        raise LinvisionError("no readable held-out images to evaluate")
    return {"top1": 100.0 * correct / n, "loss": loss / n, "n": n}


# --------------------------------------------------------------------------------------------------- checkpoints
def load_supernet(path: str | Path, device: str | torch.device = "cpu") -> Tuple[ResNASSuperNet, Dict[str, Any]]:
    """Rebuild a trained super-network from its run folder (``model.safetensors`` + ``config.json``).

    Raises:
        LinvisionError: missing/invalid files, or a folder that does not hold a super-network.
    """
    config = load_config(path)
    if not config.get("supernet"):
        raise LinvisionError(f"{path} does not hold a super-network (train one with `linvision supernet train`)")
    d = Path(path) if Path(path).is_dir() else Path(path).parent
    sd = load_state_dict(d / MODEL_FILE)
    net = ResNASSuperNet(get_space(config["space"]), img_size=config["img_size"], num_classes=config["num_classes"])
    check_state_dict(net, sd, d / MODEL_FILE)
    net.load_state_dict(sd)
    return net.to(device).eval(), config


def _plot(out: Path, history: List[Dict[str, Any]], title: str) -> None:
    ep = [h["epoch"] for h in history]
    fig = new_figure((10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [h["train_loss"] for h in history], "o-")
    ax1.set(xlabel="epoch", ylabel="train loss (sampled sub-networks)", title="loss")
    ax2.plot(ep, [h["holdout_top1_largest"] for h in history], "o-", label="largest sub-network")
    ax2.plot(ep, [h["holdout_top1_smallest"] for h in history], "o-", label="smallest sub-network")
    ax2.set(xlabel="epoch", ylabel="held-out top-1 (%)", title="held-out accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle(title)
    atomic_write_png(out / "curves.png", fig)


# --------------------------------------------------------------------------------------------------- training
def supernet_args(given: Dict[str, Any]) -> Namespace:
    """``SUPERNET_DEFAULTS`` overridden by a resumed run's stored arguments, then by ``given``."""
    merged = dict(SUPERNET_DEFAULTS)
    if given.get("resume"):
        merged.update(load_train_state(given["resume"])["args"])
        merged["output"] = given["resume"]
    merged.update({k: v for k, v in given.items() if k in SUPERNET_DEFAULTS})
    if merged["output"] is None:
        merged["output"] = str(Path("runs") / f"supernet-{merged['space']}-{time.strftime('%Y%m%d-%H%M%S')}")
    return Namespace(**merged)


def train_supernet(args: Namespace) -> Dict[str, Any]:
    """Train a super-network; returns ``{"output", "epoch", "step", "holdout_top1_largest",
    "holdout_top1_smallest"}``.

    Each step samples ``archs_per_step`` sub-networks (:meth:`ResNASSuperNet.sample_archs`, warm-up position =
    fractional epoch) and trains them together, each on its slice of the batch; during the choice warm-up
    (epochs ``0 .. choice_warmup_epochs``) heads and MLP neurons are rewired at each epoch start. After every
    epoch the largest and smallest sub-networks are evaluated on the held-out split and ``model.safetensors``,
    ``config.json``, ``train_state.pt``, ``metrics.csv`` and ``curves.png`` are written atomically.

    Raises:
        LinvisionError: bad data/space/arguments, a resume with different locked arguments, an output folder
        holding another run, or a non-finite loss (the last good checkpoint stays).
    """
    rank, world = dist.init()
    device = dist.device()
    setup_threads(args.threads)
    out = Path(args.output or args.resume)
    state = load_train_state(args.resume) if args.resume else None
    if state is not None:
        check_locked_args(args.resume, state["args"], vars(args), LOCKED)
    elif (out / STATE_FILE).exists():
        raise LinvisionError(f"output folder {out} already holds a run; continue it with --resume {out} "
                             "or choose another --output")
    try:
        space = get_space(args.space)
    except ValueError as e:
        raise LinvisionError(str(e)) from None
    img_size = args.img_size or space.img_size
    if img_size % 56:
        raise LinvisionError(f"--img-size must be a multiple of 56 for ViT-ResNAS, got {img_size}")
    if args.archs_per_step < 1 or args.archs_per_step > args.batch_size:
        raise LinvisionError(f"--archs-per-step must be between 1 and --batch-size ({args.batch_size})")

    root = resolve_data_root(args.data)
    data_config = model_data_config("vit_resnas_tiny", img_size, is_small_image_dataset(root))
    train_tf = build_transforms(img_size, True, data_config["mean"], data_config["std"],
                                small_images=data_config["small_images"], interpolation=data_config["interpolation"],
                                auto_augment=args.auto_augment)
    train_ds = ImageFolder(split_dir(root, "train"), train_tf)
    classes = train_ds.classes
    train_idx, held_idx = holdout_split(train_ds.targets, args.holdout, args.holdout_seed)
    if args.train_subset:
        train_idx = [train_idx[i] for i in stratified_subset([train_ds.targets[i] for i in train_idx],
                                                             args.train_subset, args.seed)]
    sampler = _ShardedSampler(SeededSampler(train_idx, args.seed), rank, world)
    per_rank = len(sampler)
    loader = _loader(train_ds, args.batch_size, sampler, args.workers, drop_last=per_rank >= args.batch_size)
    held_ds = Subset(eval_transform_dataset(root, data_config, classes), held_idx)
    held_loader = _loader(held_ds, max(args.batch_size, 128), None, args.workers)

    random_seed(args.seed)
    net = ResNASSuperNet(space, img_size=img_size, num_classes=len(classes), drop_path_rate=args.drop_path).to(device)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    optimizer = create_optimizer_v2(net, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(loader)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                       min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else torch.nn.CrossEntropyLoss()

    start_epoch, step, history = 0, 0, []
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["args"].get("epochs") == args.epochs:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        set_rng_states(state["rng"])
        scheduler.step_update(step)
        _log.info("resumed %s at epoch %d, step %d", args.resume, start_epoch, step)
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("resume", "output", "max_steps")}
    if dist.is_main():
        _log.info("super-network %s: %.2fM params (largest sub-network), %s sub-networks, %d classes, %d train / "
                  "%d held-out images, %d steps/epoch x %d rank(s), output %s", space.name,
                  sum(p.numel() for p in net.parameters()) / 1e6, f"{space.size():.3g}", len(classes),
                  len(train_idx), len(held_idx), steps_per_epoch, world, out)

    steps_this_run, stop, last = 0, start_epoch >= args.epochs, {}
    for epoch in range(start_epoch, args.epochs):
        random_seed(args.seed + 1_000_003 * (epoch + 1) + rank)
        rng = random.Random(args.seed * 1_000_003 + epoch * 1009 + rank)
        sampler.set_epoch(epoch)
        if args.choice_warmup_epochs > 0 and epoch <= args.choice_warmup_epochs:
            net.rewire(optimizer)
        model.train()
        t0 = time.perf_counter()
        seen = loss_sum = correct = 0
        bar = tqdm(loader, desc=f"supernet epoch {epoch + 1}/{args.epochs}", file=sys.stderr, dynamic_ncols=True,
                   leave=False, disable=not dist.is_main())
        for i, batch in enumerate(bar):
            if batch is None:
                continue
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            archs = net.sample_archs(min(args.archs_per_step, len(x)), epoch + i / max(steps_per_epoch, 1),
                                     args.choice_warmup_epochs, rng)
            logits = model(x, archs)
            loss = criterion(logits, y)
            if not torch.isfinite(loss):
                where = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept in {out}" if history
                         else "no checkpoint was written")
                raise LinvisionError(f"non-finite loss ({loss.item()}) at step {step + 1} (epoch {epoch + 1}); "
                                     f"training stopped, {where}. Try a lower --lr or --clip-grad")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_grad)
            optimizer.step()
            step += 1
            steps_this_run += 1
            scheduler.step_update(step)
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            img_s=f"{world * seen / (time.perf_counter() - t0):.0f}")
            if args.max_steps and steps_this_run >= args.max_steps:
                stop = True
                break
        bar.close()
        train_seconds = time.perf_counter() - t0
        scheduler.step(epoch + 1)
        if dist.is_main():
            last = {f"holdout_top1_{which}": round(accuracy(net.extract_subnet(a), held_loader, device)["top1"], 3)
                    for which, a in (("largest", space.largest()), ("smallest", space.smallest()))}
            history.append({"epoch": epoch + 1, "step": step, "train_loss": round(loss_sum / max(seen, 1), 5),
                            "train_acc": round(100 * correct / max(seen, 1), 3), **last,
                            "lr": optimizer.param_groups[0]["lr"],
                            "img_per_s": round(world * seen / max(train_seconds, 1e-9), 1),
                            "epoch_seconds": round(time.perf_counter() - t0, 2)})
            config = {"model": "resnas_supernet", "supernet": True, "space": space.to_dict(), "img_size": img_size,
                      "num_classes": len(classes), "class_names": classes, "data_config": data_config,
                      "data": str(root), "holdout": {"holdout": args.holdout, "seed": args.holdout_seed,
                                                     "n": len(held_idx)},
                      "epoch": epoch + 1, "step": step, "metrics": last, "train_args": run_args,
                      "versions": {"torch": torch.__version__, "timm": timm.__version__}}
            save_model(out, net, config)
            save_train_state(out, {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step,
                                   "rng": get_rng_states(), "args": run_args, "history": history})
            write_metrics_csv(out, history, METRICS)
            _plot(out, history, f"super-network ({space.name} space)")
            h = history[-1]
            tqdm.write(f"supernet epoch {h['epoch']}/{args.epochs} step {step}: train loss {h['train_loss']:.3f} | "
                       f"held-out top-1 largest {h['holdout_top1_largest']:.2f}% smallest "
                       f"{h['holdout_top1_smallest']:.2f}% | {h['img_per_s']:.0f} img/s", file=sys.stderr)
        dist.barrier()
        if stop:
            break
    if not last and history:
        last = {k: history[-1][k] for k in ("holdout_top1_largest", "holdout_top1_smallest")}
    return {"output": str(out), "epoch": history[-1]["epoch"] if history else 0, "step": step, **last}
