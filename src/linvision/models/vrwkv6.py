"""Vision-RWKV v6 (VRWKV6: Vision-RWKV, arXiv 2403.02308, with RWKV-6 "Finch" token mixing, arXiv 2404.05892), as
the official code builds it (OpenGVLab/Vision-RWKV ``classification/mmcls_custom/models/backbones/vrwkv6.py`` +
mmcls ``GlobalAveragePooling`` + ``LinearClsHead``; configs ``classification/configs/vrwkv6/``).

Same skeleton and timm contract as :mod:`linvision.models.vrwkv` (``forward_features -> [B, T, C]``,
``forward_head``, ``reset_classifier``, any input size with bicubic pos-embed resize and bottom/right padding);
the blocks use :class:`~linvision.layers.rwkv6.SpatialMixV6` (data-dependent shift and decay, bidirectional WKV6
:func:`linvision.ops.wkv6`, GroupNorm per head) and :class:`~linvision.layers.rwkv6.ChannelMixV6`. Heads are
``head_size = 64`` channels (the official ``HEAD_SIZE`` constant).

Official checkpoints (``backbone.layers.N.att.time_maa_x``, ``head.fc.*``) load through
:func:`checkpoint_filter_fn`::

    timm.create_model("vrwkv6_tiny", pretrained=True, pretrained_cfg_overlay=dict(file="vrwkv6_t_in1k_224.pth"))
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.models import generate_default_cfgs, register_model

from ..layers.rwkv6 import ChannelMixV6, SpatialMixV6
from ..ops.wkv6 import wkv6
from ._common import build, cfg
from .vrwkv import VisionRWKV, VRWKVBlock
from .vrwkv import checkpoint_filter_fn as _v4_filter

__all__ = ["VisionRWKV6", "checkpoint_filter_fn"]


class VisionRWKV6(VisionRWKV):
    """VRWKV6 classifier: patch embed + pos-embed → ``norm_pre`` (official ``ln0``) → ``depth`` v6 blocks → final
    LayerNorm → global average pool → head.

    Args:
        num_heads: heads; ``embed_dim`` must equal ``num_heads * head_size``.
        head_size: channels per head (official: 64, fixed).
        wkv_fn: WKV6 implementation ``(r, k, v, w, u) -> [B, T, C]`` (default :func:`linvision.ops.wkv6`).
        Others as :class:`~linvision.models.vrwkv.VisionRWKV` (``img_size``, ``patch_size``, ``in_chans``,
        ``num_classes``, ``global_pool``, ``embed_dim``, ``depth``, ``hidden_rate``, ``drop_rate``,
        ``drop_path_rate``, ``post_norm``, ``key_norm``, ``init_values``, ``shift_pixel``).

    Shapes: input ``[B, in_chans, H, W]`` float; ``forward`` → ``[B, num_classes]``.

    Raises:
        ValueError: if ``embed_dim != num_heads * head_size``.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: Union[int, Tuple[int, int]] = 16,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 192,
                 num_heads: int = 3, head_size: int = 64, depth: int = 12, hidden_rate: int = 4,
                 drop_rate: float = 0., drop_path_rate: float = 0., post_norm: bool = False, key_norm: bool = False,
                 init_values: Optional[float] = None, shift_pixel: int = 1, wkv_fn: Optional[Callable] = None):
        if embed_dim != num_heads * head_size:
            raise ValueError(f"VisionRWKV6: embed_dim={embed_dim} must be num_heads={num_heads} x "
                             f"head_size={head_size}")
        wkv_fn = wkv_fn or wkv6

        def block_fn(i: int, drop_path: float) -> VRWKVBlock:
            return VRWKVBlock(
                embed_dim, hidden_rate * embed_dim, i, depth, drop_path, init_values, post_norm,
                spatial_mix=SpatialMixV6(embed_dim, num_heads, i, depth, shift_pixel, key_norm, wkv_fn),
                channel_mix=ChannelMixV6(embed_dim, hidden_rate * embed_dim, head_size, i, depth, shift_pixel,
                                         key_norm))

        super().__init__(img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth, hidden_rate,
                         None, drop_rate, drop_path_rate, post_norm, key_norm, init_values, shift_pixel,
                         block_fn=block_fn)
        self.num_heads, self.head_size = num_heads, head_size


_FLAT = ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g", "time_decay")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionRWKV6) -> Dict[str, torch.Tensor]:
    """Map an official VRWKV6 state dict (mmcls keys: ``backbone.layers.N.att.*``, ``.ffn.*``, ``head.fc.*``;
    checkpoint ``{'state_dict': ...}``) to this model's keys: the v4 renames (``att`` → ``spatial_mix``, ``ffn`` →
    ``channel_mix``, ``ln0`` → ``norm_pre``, …), ``[1, 1, C]`` mixing/decay vectors flattened to ``[C]``;
    ``time_maa_w1/w2``, ``time_decay_w1/w2``, ``time_faaaa``, ``ln_x`` keep their names and shapes. Drops
    ``__*__`` entries; resizes ``pos_embed`` (bicubic). Linvision keys pass through.
    """
    out = _v4_filter(state_dict, model)
    for k, v in out.items():
        if k.rsplit(".", 1)[-1] in _FLAT:
            out[k] = v.reshape(-1)
    return out


_cfg = partial(cfg, first_conv="patch_embed.proj", paper_ids="arXiv:2403.02308", license="apache-2.0")
default_cfgs = generate_default_cfgs({
    "vrwkv6_tiny": _cfg(),
    "vrwkv6_small": _cfg(),
    "vrwkv6_base": _cfg(),
    "test_vrwkv6": _cfg(input_size=(3, 64, 64), num_classes=10),
    "test_vrwkv6_postnorm": _cfg(input_size=(3, 64, 64), num_classes=10),
})


def _model(name: str, pretrained: bool, defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> VisionRWKV6:
    return build(VisionRWKV6, checkpoint_filter_fn, name, pretrained, defaults, kwargs)


@register_model
def vrwkv6_tiny(pretrained: bool = False, **kwargs) -> VisionRWKV6:
    """VRWKV6-T: C 192 = 3 heads of 64, depth 12, pre-norm, no layer scale (official ``vrwkv6_tiny_8xb128_in1k``)."""
    return _model("vrwkv6_tiny", pretrained, dict(embed_dim=192, num_heads=3, depth=12), kwargs)


@register_model
def vrwkv6_small(pretrained: bool = False, **kwargs) -> VisionRWKV6:
    """VRWKV6-S: C 384 = 6 heads, depth 12, post_norm, layer scale 1e-5, drop path 0.3
    (official ``vrwkv6_small_8xb128_in1k``)."""
    return _model("vrwkv6_small", pretrained, dict(embed_dim=384, num_heads=6, depth=12, drop_path_rate=0.3,
                                                   post_norm=True, init_values=1e-5), kwargs)


@register_model
def vrwkv6_base(pretrained: bool = False, **kwargs) -> VisionRWKV6:
    """VRWKV6-B: C 768 = 12 heads, depth 12, post_norm, layer scale 1e-5, drop path 0.5
    (official ``vrwkv6_base_16xb64_in1k``)."""
    return _model("vrwkv6_base", pretrained, dict(embed_dim=768, num_heads=12, depth=12, drop_path_rate=0.5,
                                                  post_norm=True, init_values=1e-5), kwargs)


@register_model
def test_vrwkv6(pretrained: bool = False, **kwargs) -> VisionRWKV6:
    """Tiny test model = ``../shared/golden/vrwkv6_golden_small.json`` (64×64, patch 16, C 64 = 1 head, depth 4,
    10 classes)."""
    return _model("test_vrwkv6", pretrained, dict(img_size=64, embed_dim=64, num_heads=1, depth=4, num_classes=10),
                  kwargs)


@register_model
def test_vrwkv6_postnorm(pretrained: bool = False, **kwargs) -> VisionRWKV6:
    """Tiny test model = ``vrwkv6_golden_small_postnorm_rand.json`` (C 128 = 2 heads, depth 2, post_norm,
    key_norm, layer scale 1e-5)."""
    return _model("test_vrwkv6_postnorm", pretrained, dict(img_size=64, embed_dim=128, num_heads=2, depth=2,
                                                           num_classes=10, post_norm=True, key_norm=True,
                                                           init_values=1e-5), kwargs)
