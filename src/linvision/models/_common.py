"""Pieces shared by the linvision model families."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.layers.format import nchw_to
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices


def cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    """timm pretrained cfg with linvision's defaults (224², ImageNet mean/std, bicubic, crop 0.9, 1000 classes).

    Weights are never downloaded: load local/official files with
    ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)``.
    """
    return {"url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "classifier": "head", **kwargs}


class PaddedPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed(dynamic_img_pad=True, strict_img_size=False)``: images of any size, sides not divisible
    by the patch zero-padded bottom/right (as the official mmcv ``PatchEmbed(padding='corner')``). Same parameters,
    state dict and results; only, where the sizes are plain ints (eager, or a static-shape compile), an image
    that needs no padding is not copied (``F.pad`` with zero pads still copies the whole image: 4.6 ms of a 1024²
    ``vrwkv_tiny`` forward on a 2-core CPU, ~1 %).
    ``[B, in_chans, H, W]`` → ``[B, ceil(H/p), ceil(W/p), C]`` (``output_fmt="NHWC"``) or as ``output_fmt`` says."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, strict_img_size=False, dynamic_img_pad=True, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if (self.flatten or not isinstance(H, int) or not isinstance(W, int)  # symbolic sizes: timm's path
                or H % self.patch_size[0] or W % self.patch_size[1]):
            return super().forward(x)
        return self.norm(nchw_to(self.proj(x), self.output_fmt))


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


# ------------------------------------------------------------------ timm feature contract (forward_intermediates)
OUTPUT_FMTS = ("NCHW", "NLC")


def check_output_fmt(output_fmt: str) -> None:
    """ValueError unless ``output_fmt`` is ``'NCHW'`` (maps ``[B, C, h, w]``) or ``'NLC'`` (tokens ``[B, h*w, C]``)."""
    if output_fmt not in OUTPUT_FMTS:
        raise ValueError(f"output_fmt must be one of {OUTPUT_FMTS}, got {output_fmt!r}")


def plain_feature_info(num_blocks: int, num_chs: int, reduction: int, prefix: str = "blocks") -> List[Dict[str, Any]]:
    """timm ``feature_info`` of a plain (single-scale) backbone: one entry per block, all ``num_chs`` wide at stride
    ``reduction`` (as timm's ``VisionTransformer``)."""
    return [dict(module=f"{prefix}.{i}", num_chs=num_chs, reduction=reduction) for i in range(num_blocks)]


def tokens_to_fmt(x: torch.Tensor, grid: Tuple[int, int], output_fmt: str) -> torch.Tensor:
    """Patch tokens ``[B, h*w, C]`` (row-major) → ``[B, C, h, w]`` for ``'NCHW'``; unchanged for ``'NLC'``."""
    if output_fmt == "NLC":
        return x
    B, T, C = x.shape
    if T != grid[0] * grid[1]:
        raise ValueError(f"{T} patch tokens do not fill the {grid[0]}x{grid[1]} patch grid")
    return x.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2).contiguous()


def finish_intermediates(intermediates: Sequence[torch.Tensor], grid: Tuple[int, int], output_fmt: str,
                         num_prefix_tokens: int = 0, prefix_last: bool = False,
                         return_prefix_tokens: bool = False) -> List[Any]:
    """timm's post-processing of ``forward_intermediates``: split off the prefix tokens (class token; linvision's
    ViR appends it **last**: ``prefix_last=True``), reshape the patch tokens ``[B, h*w, C]`` to ``output_fmt``;
    with ``return_prefix_tokens`` each entry is ``(map, prefix [B, num_prefix_tokens, C])`` as in timm's ViT."""
    out = []
    for y in intermediates:
        n = num_prefix_tokens
        if n and prefix_last:
            patches, prefix = y[:, :y.shape[1] - n], y[:, y.shape[1] - n:]
        elif n:
            patches, prefix = y[:, n:], y[:, :n]
        else:
            patches, prefix = y, None
        fmap = tokens_to_fmt(patches, grid, output_fmt)
        out.append((fmap, prefix) if return_prefix_tokens and prefix is not None else fmap)
    return out


def prune_blocks(model: nn.Module, indices: Union[int, List[int]], prune_norm: bool, prune_head: bool) -> List[int]:
    """timm ``prune_intermediate_layers`` for a plain model with ``blocks``, ``norm`` and a classifier: keep the
    blocks up to the last wanted index, optionally replace the final norm / head by Identity (pooling ``''``).
    Returns the absolute indices kept (see ``timm.models.feature_take_indices``)."""
    take_indices, max_index = feature_take_indices(len(model.blocks), indices)
    model.blocks = model.blocks[:max_index + 1]
    if prune_norm:
        model.norm = nn.Identity()
    if prune_head:
        if isinstance(getattr(model, "pre_logits", None), nn.Module):
            model.pre_logits = nn.Identity()
        model.reset_classifier(0, "")
    return take_indices
