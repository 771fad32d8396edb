"""Pieces shared by the linvision model families."""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn

from .. import _compat  # noqa: F401
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg


def cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    """timm pretrained cfg with linvision's defaults (224², ImageNet mean/std, bicubic, crop 0.9, 1000 classes).

    Weights are never downloaded: load local/official files with
    ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)``.
    """
    return {"url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "classifier": "head", **kwargs}


def resize_pos_embed_2d(pos_embed: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """Resize a patch pos-embed ``[1, H*W, C]`` from ``old_grid`` to ``new_grid`` (bicubic, align_corners=False,
    no antialias — as mmcls ``resize_pos_embed`` and the official codes do). Returned unchanged when equal, except
    under ``torch.export`` (the comparison would pin the exported graph to the example size; resampling to the same
    grid is the identity)."""
    if not torch.compiler.is_exporting() and tuple(old_grid) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=0,
                                  interpolation="bicubic", antialias=False)


def square_grid(num_patches: int) -> Tuple[int, int]:
    """The square grid ``(n, n)`` of a checkpoint's ``num_patches`` pos-embed; ValueError if not a square."""
    n = int(round(num_patches ** 0.5))
    if n * n != num_patches:
        raise ValueError(f"checkpoint pos_embed has {num_patches} patches, not a square grid: cannot infer its "
                         "original grid; build the model with the checkpoint's img_size")
    return n, n


def build(model_cls: type, filter_fn: Callable, variant: str, pretrained: bool, defaults: Dict[str, Any],
          kwargs: Dict[str, Any]) -> nn.Module:
    """timm ``build_model_with_cfg`` for a registered variant: ``defaults`` overridden by the caller's ``kwargs``;
    pretrained files are mapped through the family's ``checkpoint_filter_fn``."""
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                feature_cfg=dict(out_indices=3, feature_cls="getter"), **{**defaults, **kwargs})


def init_linear_trunc_normal(m: nn.Module) -> None:
    """The official inits of both families: trunc-normal(std 0.02) Linear weights, zero biases (use with
    ``model.apply``)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
