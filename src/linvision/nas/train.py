"""Super-network training (``linvision supernet train``): multi-architecture sampling with progressive warm-up
and rewiring, on the training split minus a held-out part that the search uses for fitness.

A short task on the engine's one training loop (:func:`linvision.engine.loop.fit`): the step samples
sub-networks, the epoch hook rewires; the loop gives it DDP with a padded sampler (every rank takes the same
number of steps), mid-epoch resume, the number-of-processes and checkpoint-compatibility checks, non-finite
checks, and the run folder's atomic files.
"""
from __future__ import annotations

import logging
import random
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

import timm
from timm.loss import LabelSmoothingCrossEntropy
from timm.utils import random_seed

from ..checkpoint import MODEL_FILE, check_state_dict, load_config, load_state_dict, load_train_state
from ..data import (ImageFolder, build_eval_loader, build_train_loader, holdout_split,
                    is_small_image_dataset, resolve_data_root, split_dir)
from ..distributed import DistInfo, run_distributed
from ..engine import evaluate, model_data_config, setup_threads
from ..engine.loop import LoopConfig, StepInfo, Trainer, build_trainer, fit
from ..engine.run import Panel, RunFolder, release_run_locks
from ..errors import LinvisionError
from ..untrusted import check_finite, check_header
from .space import SPACES, get_space
from .supernet import ResNASSuperNet

__all__ = ["SUPERNET_DEFAULTS", "train_supernet", "load_supernet", "holdout_split", "SupernetTask"]

_log = logging.getLogger("linvision")

# Defaults of `linvision supernet train` (scaled for CPU; the paper: 120 epochs, 15 warm-up epochs, 64 images per
# sub-network, batch 1024 over 8 GPUs).
SUPERNET_DEFAULTS: Dict[str, Any] = {
    "space": "demo",
    "data": None,
    "img_size": None,           # None: the space's img_size
    "epochs": 10,
    "batch_size": 64,           # per process
    "archs_per_step": 4,        # sub-networks per process and step (each on batch_size / archs_per_step images)
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
    "save_every_steps": 0,      # 0: train_state.pt only at epoch ends; N: also after every N-th optimizer step
    "log_interval": 0,          # without a terminal: also a progress line every N steps
    "output": None,
    "resume": None,
}
LOCKED = ("space", "img_size", "batch_size", "archs_per_step", "holdout", "holdout_seed", "train_subset", "seed")
METRICS = ("epoch", "step", "train_loss", "train_acc", "holdout_top1_largest", "holdout_top1_smallest", "lr",
           "img_per_s", "epoch_seconds")


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
    space, img, k = config.get("space"), config.get("img_size"), config.get("num_classes")
    # the folder is input: a space by name or as a dict (never a file path), sizes typed and ranged, then the
    # network is built on the meta device and compared with the weights' header before any allocation
    if not (isinstance(space, dict) or (isinstance(space, str) and space in SPACES)):
        raise LinvisionError(f"{d / 'config.json'}: space must be one of {', '.join(SPACES)} or a space object, "
                             f"got {space!r}")
    if not (isinstance(img, int) and 56 <= img <= 8192 and img % 56 == 0):
        raise LinvisionError(f"{d / 'config.json'}: img_size must be a multiple of 56 in [56, 8192], got {img!r}")
    if not (isinstance(k, int) and 1 <= k <= 100_000):
        raise LinvisionError(f"{d / 'config.json'}: num_classes must be an integer in [1, 100000], got {k!r}")
    try:
        with torch.device("meta"):
            meta = ResNASSuperNet(get_space(space), img_size=img, num_classes=k)
    except (TypeError, ValueError, KeyError) as e:
        raise LinvisionError(f"{d / 'config.json'} does not describe a super-network: {e}") from None
    check_header(meta.state_dict(), d / MODEL_FILE, "ResNASSuperNet")
    sd = load_state_dict(d / MODEL_FILE)
    check_finite(sd, d / MODEL_FILE)
    net = ResNASSuperNet(get_space(space), img_size=img, num_classes=k)
    check_state_dict(net, sd, d / MODEL_FILE)
    net.load_state_dict(sd)
    return net.to(device).eval(), config


# --------------------------------------------------------------------------------------------------- the task
class SupernetTask:
    """The super-network on the engine's loop (:class:`linvision.engine.loop.Task`).

    Step: ``K = archs_per_step × world_size`` sub-networks are drawn from an RNG seeded by ``(seed, step)`` (the
    same on every rank, so the draw depends neither on the rank nor on resuming), and the image at position ``p``
    of the global batch runs sub-network ``p mod K``. Rank ``r`` holds positions ``r, r + world_size, ...`` (the
    sampler's sharding), so it runs ``archs_per_step`` of them. One process with the same global batch and
    ``K`` sub-networks per step therefore trains the same sub-networks on the same images. Epoch hook: rewiring
    during the choice warm-up. Evaluation: the largest and smallest sub-networks on the held-out images
    (``score``: the largest's top-1)."""

    score_name = "top1_largest"
    metric_fields = METRICS
    panels = (Panel("loss", "train loss (sampled sub-networks)", (("train_loss", "train"),)),
              Panel("held-out accuracy", "held-out top-1 (%)", (("holdout_top1_largest", "largest sub-network"),
                                                                 ("holdout_top1_smallest", "smallest sub-network"))))

    def __init__(self, net: ResNASSuperNet, args: Namespace, config: Dict[str, Any]):
        self.net, self.args, self.config = net, args, config
        self.criterion = (LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0
                          else torch.nn.CrossEntropyLoss())
        self.title = f"super-network ({net.space.name} space)"

    def prepare(self, batch: Any) -> Tuple[Any, int]:
        return (batch if len(batch[1]) > 0 else None), len(batch[1])

    def train_step(self, net: torch.nn.Module, batch: Any, info: StepInfo
                   ) -> Tuple[torch.Tensor, int, Dict[str, float]]:
        x, y = (t.to(info.device, non_blocking=True) for t in batch)
        K = min(self.args.archs_per_step, len(x)) * info.world_size
        rng = random.Random(self.args.seed * 1_000_003 + info.step)
        archs = self.net.sample_archs(K, info.position, self.args.choice_warmup_epochs, rng)
        logits = net(x, [archs[(info.rank + info.world_size * j) % K] for j in range(len(x))])  # one per image
        return self.criterion(logits, y), len(y), {"correct": int((logits.argmax(1) == y).sum())}

    def train_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        return {"train_acc": 100 * sums.get("correct", 0) / max(sums["seen"], 1)}

    def evaluate(self, model: torch.nn.Module, loader: Any, di: DistInfo, desc: str) -> Dict[str, Any]:
        space = self.net.space
        m = {f"top1_{which}": evaluate(self.net.extract_subnet(a).to(di.device), loader, progress=False,
                                       device=di.device, dist_info=di)["top1"]
             for which, a in (("largest", space.largest()), ("smallest", space.smallest()))}
        return {**m, "score": m["top1_largest"]}

    def on_epoch_start(self, epoch: int, trainer: Trainer) -> None:
        if self.args.choice_warmup_epochs > 0 and epoch <= self.args.choice_warmup_epochs:
            self.net.rewire(trainer.optimizer)

    def model_config(self, epoch: int, step: int, weights: str, metrics: Dict[str, Any],
                     choice: Dict[str, Any]) -> Dict[str, Any]:
        return {**self.config, "epoch": epoch, "step": step,
                "metrics": {f"holdout_{k}": round(v, 3) for k, v in metrics.items() if k.startswith("top1")},
                "versions": {"torch": torch.__version__, "timm": timm.__version__}}


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

    Each step samples sub-networks (:meth:`ResNASSuperNet.sample_archs`, warm-up position = fractional epoch;
    see :class:`SupernetTask`) and trains them together, each on its slice of the batch; during the choice
    warm-up (epochs ``0 .. choice_warmup_epochs``) heads and MLP neurons are rewired at each epoch start. After
    every epoch the largest and smallest sub-networks are evaluated on the held-out split and
    ``model.safetensors``, ``config.json``, ``train_state.pt``, ``metrics.csv`` and ``curves.png`` are written
    atomically. Under ``torchrun`` ``batch_size`` and ``archs_per_step`` are per process.

    Raises:
        LinvisionError: bad data/space/arguments, a resume with different locked arguments or number of
        processes, an output folder holding another run, or a non-finite loss (the last good checkpoint stays).
    """
    return run_distributed(_train_supernet, args, on_exit=release_run_locks)


def _train_supernet(args: Namespace, di: DistInfo) -> Dict[str, Any]:
    setup_threads(args.threads, di)
    run = RunFolder(args.output, args.resume, vars(args), LOCKED, di,
                    ignore=("resume", "output", "max_steps", "log_interval"))
    try:
        space = get_space(args.space)
    except ValueError as e:
        raise LinvisionError(str(e)) from None
    img_size = args.img_size or space.img_size
    if img_size % 56:
        raise LinvisionError(f"--img-size must be a multiple of 56 for ViT-ResNAS, got {img_size}")
    if args.archs_per_step < 1 or args.archs_per_step > args.batch_size:
        raise LinvisionError(f"--archs-per-step must be between 1 and --batch-size ({args.batch_size})")
    run.check_writable()

    root = resolve_data_root(args.data)
    data_config = model_data_config("vit_resnas_tiny", img_size, is_small_image_dataset(root))
    targets = ImageFolder(split_dir(root, "train")).targets
    train_idx, held_idx = holdout_split(targets, args.holdout, args.holdout_seed)
    kw = {"num_workers": args.workers, "num_replicas": di.world_size, "rank": di.rank}
    loader = build_train_loader(root, data_config, args.batch_size, seed=args.seed, subset=args.train_subset,
                                auto_augment=args.auto_augment, indices=train_idx, **kw)
    classes = loader.dataset.classes
    held_loader = build_eval_loader(root, data_config, max(args.batch_size, 128), classes=classes, split="train",
                                    indices=held_idx, **kw)

    random_seed(args.seed)
    net = ResNASSuperNet(space, img_size=img_size, num_classes=len(classes), drop_path_rate=args.drop_path)
    net.to(di.device)
    trainer = build_trainer(net, di, steps_per_epoch=len(loader), epochs=args.epochs, opt=args.opt, lr=args.lr,
                            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                            warmup_lr=args.warmup_lr, min_lr=args.min_lr)
    config = {"model": "resnas_supernet", "supernet": True, "space": space.to_dict(), "img_size": img_size,
              "num_classes": len(classes), "class_names": classes, "data_config": data_config, "data": str(root),
              "holdout": {"holdout": args.holdout, "seed": args.holdout_seed, "n": len(held_idx)},
              "train_args": run.args}
    _log.info("super-network %s: %.2fM params (largest sub-network), %s sub-networks, %d classes, %d train / "
              "%d held-out images, %d steps/epoch x %d rank(s), output %s", space.name,
              sum(p.numel() for p in net.parameters()) / 1e6, f"{space.size():.3g}", len(classes),
              len(loader.sampler.indices), len(held_idx), len(loader), di.world_size, run.out)
    cfg = LoopConfig(epochs=args.epochs, seed=args.seed, save_every=getattr(args, "save_every_steps", 0) or 0,
                     max_steps=args.max_steps, log_interval=getattr(args, "log_interval", 0) or 0,
                     clip_grad=args.clip_grad, sync_bn=True)  # the stem's BatchNorm over the global batch (CUDA)
    r = fit(SupernetTask(net, args, config), trainer, run, loader, cfg, val=("holdout", held_loader))
    last = {k: r["history"][-1][k] for k in ("holdout_top1_largest", "holdout_top1_smallest")} if r["history"] \
        else {}
    return {"output": str(run.out), "epoch": r["epoch"], "step": r["step"], **last}
