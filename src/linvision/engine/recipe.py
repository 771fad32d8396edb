"""Training recipes and the schedule that follows from the run's length (``linvision train --recipe``).

The defaults of ``linvision train`` used to be DeiT's long-schedule recipe (Touvron et al., arXiv 2012.12877:
warm-up, drop path, EMA tuned for 300 epochs on ImageNet) whatever the run. On small data with a few epochs that
wastes the run: the learning rate is still warming up when it ends, drop path regularises a model that has not
fitted yet, and an EMA with decay 0.998 averages over ~500 steps, longer than the run. So the options that depend
on the run's length are left unset (``None``) by default and derived here from the number of optimizer steps the
run will take; an option given on the command line always wins.

Recipes (``--recipe``):

* ``deit``: DeiT's optimizer and regularisers (AdamW, drop path 0.1, label smoothing 0.1, weight decay 0.05, peak
  lr 1e-3 at batch 128), warm-up ``min(2 epochs, 10 % of the run)``, EMA decay ``0.998`` capped to a horizon of
  10 % of the run.
* ``short``: for short runs on small data — no drop path, warm-up ``min(1 epoch, 10 % of the run)``, EMA horizon
  10 % of the run, peak lr 2e-3 for linear-token-mixer models (Vision-RWKV, ViR: Bi-WKV and retention) and 1e-3
  for the others (softmax attention: DeiT, ViT-ResNAS, ...) — measured: at 3 epochs ``vrwkv_tiny`` 38.4 % at 2e-3 vs
  35.8 % at 1e-3, ``deit_tiny`` 31.3 % vs 34.5 % — and for Vision-RWKV models timm's NAdamW (AdamW with Nesterov
  momentum), AdamW for the others: ``vrwkv_tiny`` at 3 epochs 40.4 / 40.9 / 39.6 % vs 38.4 / 39.2 / 38.0 % with
  AdamW (seeds 0 / 1 / 2); ``vir_tiny`` 33.2 vs 35.5 %, ``deit_tiny`` 34.7 vs 34.5 % (seed 0). Measured in the
  README ("Training defaults follow the run").
* ``auto`` (default): ``short`` for runs of at most :data:`AUTO_SHORT_MAX_EPOCHS` epochs (passes over the
  data: what decides whether the model can overfit, whatever the data size), else ``deit``.

Batch size (every recipe, when ``--batch-size`` is not given): 128 images per step (the global batch), halved
while an epoch would have fewer than :data:`MIN_STEPS_PER_EPOCH` steps (down to 8), so a run on a few thousand
images takes more, smaller steps (measured: batch 64 beat 128 on the embedded subset at equal epochs); the peak
lr follows by the linear scaling rule (``--lr-base-size``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Recipe", "RECIPES", "RECIPE_CHOICES", "AUTO_SHORT_MAX_EPOCHS", "MIN_STEPS_PER_EPOCH", "DERIVED_KEYS",
           "linear_mixer", "default_batch_size", "choose_recipe", "resolve_schedule", "describe"]


@dataclass(frozen=True)
class Recipe:
    """One recipe: fixed values plus the rules that scale with the run (fractions of its optimizer steps)."""

    name: str
    lr: float                 # peak lr at a global batch of --lr-base-size (128)
    drop_path: float
    smoothing: float
    warmup_epochs_max: float  # warm-up = min(this, warmup_frac x epochs)
    warmup_frac: float
    ema_decay_max: float      # EMA decay = min(this, 1 - 1 / (ema_frac x run steps)), at least EMA_DECAY_MIN
    ema_frac: float
    lr_linear_mixer: float | None = None  # peak lr for Vision-RWKV / ViR models, when it differs from ``lr``
    opt: str = "adamw"        # timm optimizer name
    opt_vrwkv: str | None = None  # optimizer for Vision-RWKV models (``models/vrwkv.py``), when it differs

    def peak_lr(self, model: str | None) -> float:
        """The recipe's peak lr (at global batch 128) for timm model name ``model``."""
        return self.lr_linear_mixer if self.lr_linear_mixer is not None and linear_mixer(model) else self.lr

    def optimizer(self, model: str | None) -> str:
        """The recipe's timm optimizer name for timm model name ``model``."""
        return self.opt_vrwkv if self.opt_vrwkv is not None and _in_modules(model, ("vrwkv",)) else self.opt


RECIPES: dict[str, Recipe] = {
    "deit": Recipe("deit", lr=1e-3, drop_path=0.1, smoothing=0.1, warmup_epochs_max=2.0, warmup_frac=0.1,
                   ema_decay_max=0.998, ema_frac=0.1),
    "short": Recipe("short", lr=1e-3, drop_path=0.0, smoothing=0.1, warmup_epochs_max=1.0, warmup_frac=0.1,
                    ema_decay_max=0.998, ema_frac=0.1, lr_linear_mixer=2e-3, opt_vrwkv="nadamw"),
}
RECIPE_CHOICES = ("auto", *RECIPES)
AUTO_SHORT_MAX_EPOCHS = 20    # auto: runs of up to this many epochs use "short" (measured: 3 and 10, README)
MIN_STEPS_PER_EPOCH = 64      # default batch: halved (from 128, down to 8) until an epoch has this many steps
DEFAULT_GLOBAL_BATCH = 128
EMA_DECAY_MIN = 0.9
# The options a recipe or the run's length decides when left unset (None).
DERIVED_KEYS = ("opt", "lr", "drop_path", "smoothing", "warmup_epochs", "ema_decay")


LINEAR_MIXER_MODULES = ("vrwkv", "vrwkv6", "vir")  # linvision model files whose token mixer is linear


def linear_mixer(model: str | None) -> bool:
    """True for models registered by linvision's Vision-RWKV / ViR files (``vrwkv_*``, ``vrwkv6_*``, ``vir_*``,
    ``vir2d_*`` and their ``test_*`` variants)."""
    return _in_modules(model, LINEAR_MIXER_MODULES)


def _in_modules(model: str | None, modules: tuple[str, ...]) -> bool:
    if not model:
        return False
    from timm.models import is_model_in_modules
    return is_model_in_modules(model, modules)


def default_batch_size(n_train: int, world_size: int = 1) -> int:
    """Per-process batch when ``--batch-size`` is not given: a global batch of 128 halved while
    ``n_train // global_batch < MIN_STEPS_PER_EPOCH`` (not below 8 per process), divided by ``world_size``.

    >>> default_batch_size(4750), default_batch_size(50000), default_batch_size(500), default_batch_size(4750, 4)
    (64, 128, 8, 16)
    """
    world_size = max(1, int(world_size))
    batch = DEFAULT_GLOBAL_BATCH
    while batch > 8 * world_size and n_train // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return max(1, batch // world_size)


def choose_recipe(name: str | None, epochs: int) -> tuple[Recipe, str]:
    """``(recipe, why)`` for ``--recipe name`` (``None`` = ``auto``) and a run of ``epochs`` epochs.

    Raises:
        ValueError: an unknown recipe name.
    """
    name = (name or "auto").lower()
    if name == "auto":
        short = epochs <= AUTO_SHORT_MAX_EPOCHS
        return RECIPES["short" if short else "deit"], (f"auto: {epochs} epochs "
                                                       f"{'<=' if short else '>'} {AUTO_SHORT_MAX_EPOCHS}")
    if name not in RECIPES:
        raise ValueError(f"--recipe must be one of {RECIPE_CHOICES}, got {name!r}")
    return RECIPES[name], "--recipe"


def resolve_schedule(args: Mapping[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """The values of :data:`DERIVED_KEYS` for this run: each given one (not ``None``) as it is, the others from
    the recipe and the run's ``epochs x steps_per_epoch`` optimizer steps. Returns them plus ``recipe``,
    ``recipe_reason``, ``total_steps``, ``warmup_steps``, ``ema_horizon_steps`` (``1 / (1 - decay)``) and
    ``given`` (the keys the user set).

    Warm-up: ``min(warmup_epochs_max, warmup_frac x epochs)`` epochs. EMA decay: ``1 - 1 / H`` with the horizon
    ``H = ema_frac x total steps``, clamped to ``[0.9, ema_decay_max]``; timm's ``ModelEmaV3`` warm-up (decay
    ``1 - (1 + step)^(-2/3)`` while smaller) still applies on top, as before.

    >>> r = resolve_schedule({"recipe": "short", "epochs": 10, "model": "vrwkv_tiny"}, 37)
    >>> r["recipe"], r["opt"], r["lr"], r["warmup_epochs"], round(r["ema_decay"], 4), r["total_steps"]
    ('short', 'nadamw', 0.002, 1.0, 0.973, 370)
    """
    epochs = int(args.get("epochs") or 1)
    total = max(1, epochs * int(steps_per_epoch))
    recipe, why = choose_recipe(args.get("recipe"), epochs)
    given = [k for k in DERIVED_KEYS if args.get(k) is not None]
    out: dict[str, Any] = {k: args[k] for k in given}
    out.setdefault("opt", recipe.optimizer(args.get("model")))
    out.setdefault("lr", recipe.peak_lr(args.get("model")))
    out.setdefault("drop_path", recipe.drop_path)
    out.setdefault("smoothing", recipe.smoothing)
    out.setdefault("warmup_epochs", min(recipe.warmup_epochs_max, recipe.warmup_frac * epochs))
    if "ema_decay" not in out:
        horizon = max(1.0, recipe.ema_frac * total)
        out["ema_decay"] = min(recipe.ema_decay_max, max(EMA_DECAY_MIN, 1.0 - 1.0 / horizon))
    out.update(recipe=recipe.name, recipe_reason=why, total_steps=total, given=given,
               warmup_steps=int(round(out["warmup_epochs"] * steps_per_epoch)),
               ema_horizon_steps=round(1.0 / max(1e-12, 1.0 - out["ema_decay"]), 1))
    return out


def describe(s: Mapping[str, Any], global_batch: int, ema: bool = True, peak_lr: float | None = None,
             lr_base_size: int | None = None) -> str:
    """One log line for a resolved schedule (``(given)`` marks values set on the command line); ``peak_lr``: the
    rate used at ``global_batch`` after linear scaling from ``lr_base_size``."""
    g = set(s.get("given", ()))

    def mark(k: str) -> str:
        return " (given)" if k in g else ""

    parts = [f"recipe {s['recipe']} ({s['recipe_reason']})", f"{s['total_steps']} steps at global batch {global_batch}",
             f"optimizer {s['opt']}{mark('opt')}",
             f"peak lr {s['lr']:g}{mark('lr')}" + (f" at batch {lr_base_size} = {peak_lr:g} at {global_batch}"
                                                   if peak_lr is not None and lr_base_size != global_batch else ""),
             f"warm-up {s['warmup_epochs']:g} epochs = {s['warmup_steps']} steps{mark('warmup_epochs')}",
             f"drop path {s['drop_path']:g}{mark('drop_path')}",
             f"label smoothing {s['smoothing']:g}{mark('smoothing')}"]
    if ema:
        parts.append(f"EMA decay {s['ema_decay']:.4g} (horizon {s['ema_horizon_steps']:g} steps){mark('ema_decay')}")
    return ", ".join(parts)
