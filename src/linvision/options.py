"""One range check for every numeric command-line option of every ``linvision`` command.

argparse only checks an option's type; :func:`check_options` then checks each numeric value (a number or a list of
numbers) against its rule in :data:`RULES`, keyed by the option's destination name, so e.g. ``--batch-size 0``,
``--lr nan``, ``--img-size -32`` or ``--threads -1`` stop with one line naming the option instead of a traceback
or a silently skipped run. Every numeric option of the parser must have a rule (tests/test_options.py checks it).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from .errors import LinvisionError

__all__ = ["RULES", "check_options", "check_value"]

_SEED_MAX = 2 ** 32 - 1  # numpy's seed range

# rule name -> (test, what the value must be)
_TESTS: dict[str, tuple[Callable[[float], bool], str]] = {
    "positive": (lambda v: v > 0, "must be positive"),
    "nonneg": (lambda v: v >= 0, "must not be negative"),
    "unit": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    "below1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "upto1": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "seed": (lambda v: 0 <= v <= _SEED_MAX, f"must be between 0 and {_SEED_MAX}"),
}

# option destination -> rule (the same name means the same thing in every command)
RULES: dict[str, str] = {
    # sizes and counts
    "epochs": "positive", "batch_size": "positive", "img_size": "positive", "patch_size": "positive",
    "lr_base_size": "positive", "train_subset": "positive", "max_steps": "positive", "top_k": "positive",
    "archs_per_step": "positive", "population": "positive", "iterations": "positive", "latency_batch": "positive",
    "holdout_limit": "positive", "resolutions": "positive", "tokens": "positive", "channels": "positive",
    "heads": "positive", "iters": "positive", "threads": "nonneg", "workers": "nonneg",
    "save_every_steps": "nonneg", "log_interval": "nonneg", "mutations": "nonneg", "crossovers": "nonneg",
    "random_archs": "nonneg", "warmup": "nonneg", "max_pixels": "positive",
    "base_size": "positive", "crop_size": "positive", "decoder_channels": "positive", "eval_batch_size": "positive",
    "pyramid_channels": "positive", "scale_range": "positive", "stride": "positive", "window": "positive",
    "num_classes": "positive",
    # rates and schedules
    "lr": "nonneg", "min_lr": "nonneg", "warmup_lr": "nonneg", "weight_decay": "nonneg", "warmup_epochs": "nonneg",
    "choice_warmup_epochs": "nonneg", "clip_grad": "nonneg", "mixup_alpha": "nonneg", "cutmix_alpha": "nonneg",
    "val_split": "nonneg", "holdout": "nonneg",
    "smoothing": "below1", "drop_path": "below1", "re_prob": "unit", "ema_decay": "unit", "mutate_prob": "unit",
    "lower": "upto1",
    # budgets (seconds, milliseconds, MiB)
    "time_budget": "positive", "total_budget": "positive", "min_time": "positive", "latency_ms": "positive",
    "max_memory_mib": "positive",
    "seed": "seed", "holdout_seed": "seed",
}


def check_value(name: str, value: Any, rule: str) -> None:
    """Raise a one-line :class:`LinvisionError` naming ``--name`` if ``value`` (a number or a list of numbers) is
    not finite or breaks ``rule`` (a key of ``_TESTS``)."""
    flag = "--" + name.replace("_", "-")
    test, what = _TESTS[rule]
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise LinvisionError(f"{flag} must be a finite number (got {v})")
        if not test(v):
            shown = value if isinstance(value, (list, tuple)) else v
            raise LinvisionError(f"{flag} {what} (got {shown})")


def check_options(values: dict[str, Any]) -> None:
    """Check every numeric value in ``values`` (``vars(namespace)``) that has a rule in :data:`RULES`; a float
    without a rule must still be finite.

    Raises:
        LinvisionError: one line naming the first option out of range.
    """
    for name, value in values.items():
        if value is None:
            continue
        if name in RULES:
            check_value(name, value, RULES[name])
        elif isinstance(value, float) and not math.isfinite(value):
            raise LinvisionError(f"--{name.replace('_', '-')} must be a finite number (got {value})")
