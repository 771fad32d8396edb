"""Vision-RWKV (Duan et al., "Vision-RWKV: Efficient and Scalable Visual Perception with RWKV-Like
Architectures", arXiv 2403.02308), as the official code builds it (OpenGVLab/Vision-RWKV,
``classification/mmcls_custom/models/backbones/vrwkv.py`` + mmcls ``GlobalAveragePooling`` + ``LinearClsHead``).

Model contract as timm's: ``forward_features -> [B, T, C]`` (final-normed tokens), ``forward_head(pre_logits=)``,
``reset_classifier``, ``no_weight_decay``, ``num_features``, ``pretrained_cfg``/``default_cfg``; any input size
(pos-embed resized bicubically; sides not divisible by the patch are zero-padded bottom/right, as the official
mmcv ``PatchEmbed(padding='corner')`` does).

Official checkpoints (mmcls: ``backbone.layers.N.att.*``, ``head.fc.*``; VRWKV-L's InternImage-code checkpoint:
``{'model': {backbone.*, head.0.*, head.2.*}}``) load through :func:`checkpoint_filter_fn`::

    timm.create_model("vrwkv_tiny", pretrained=True, pretrained_cfg_overlay=dict(file="vrwkv_t_in1k_224.pth"))

Note on Bi-WKV: the models use paper Eq. 5 (:func:`linvision.ops.bi_wkv`) by default. The official CUDA kernel's
arithmetic differs from Eq. 5 (``|t-i|`` instead of ``|t-i|-1`` across its 32 token chunks, leftover terms inside
a chunk, EPS); the released checkpoints were trained with it, so load them with ``wkv_variant="official_kernel"``
to reproduce the authors' logits exactly (on the golden files Eq. 5 differs by up to 6e-3 in the logits).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model

from ..layers.inplace import LayerScale
from ..layers.rwkv import ChannelMix, SpatialMix
from ..ops.biwkv import BI_WKV_VARIANTS, bi_wkv
from timm.models._features import feature_take_indices

from ._common import (PaddedPatchEmbed, build, cfg, check_output_fmt, finish_intermediates, init_linear_trunc_normal,
                      plain_feature_info, prune_blocks, resize_pos_embed_2d, square_grid)

__all__ = ["VisionRWKV", "VRWKVBlock", "checkpoint_filter_fn"]


class VRWKVBlock(nn.Module):
    """One Vision-RWKV block: spatial mix then channel mix, each residual.

    Pre-norm: ``x + drop_path(ls(mix(norm(x))))``; ``post_norm``: ``x + drop_path(ls(norm(mix(x))))``.
    ``init_values`` enables layer scale (``ls1``/``ls2``, official ``gamma1``/``gamma2``). ``[B, T, C]`` in/out.
    ``spatial_mix``/``channel_mix``: prebuilt mixers (``(x, grid) -> x``; VRWKV6's) instead of the v4 ones.
    """

    def __init__(self, dim: int, hidden_dim: int, layer_id: int, num_layers: int, drop_path: float = 0.,
                 init_values: Optional[float] = None, post_norm: bool = False, key_norm: bool = False,
                 shift_pixel: int = 1, wkv_fn: Callable = bi_wkv, spatial_mix: Optional[nn.Module] = None,
                 channel_mix: Optional[nn.Module] = None):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim)
        self.spatial_mix = spatial_mix or SpatialMix(dim, layer_id, num_layers, shift_pixel, key_norm, wkv_fn)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mix = channel_mix or ChannelMix(dim, hidden_dim, layer_id, num_layers, shift_pixel, key_norm)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        if self.post_norm:
            x = x + self.drop_path(self.ls1(self.norm1(self.spatial_mix(x, grid))))
            x = x + self.drop_path(self.ls2(self.norm2(self.channel_mix(x, grid))))
        else:
            x = x + self.drop_path(self.ls1(self.spatial_mix(self.norm1(x), grid)))
            x = x + self.drop_path(self.ls2(self.channel_mix(self.norm2(x), grid)))
        return x


class VisionRWKV(nn.Module):
    """Vision-RWKV classifier: patch embed (conv, bias) + learnable pos-embed (no class token) → ``norm_pre``
    (official ``ln0``) → ``depth`` blocks → final LayerNorm → global average pool → head.

    Args:
        img_size: default input size (pos-embed grid); other sizes work at run time.
        patch_size: patch side in pixels.
        in_chans: input channels.
        num_classes: classes of the head (0: no head, ``forward`` returns pooled features).
        global_pool: ``'avg'`` (official) or ``''`` (no pooling: ``forward_head`` returns tokens).
        embed_dim, depth: width C and number of blocks.
        hidden_rate: channel-mix hidden = ``hidden_rate * embed_dim``.
        head_hidden_size: if set, head is ``Linear(C, hidden) - Tanh - Linear`` (official L model).
        drop_rate, drop_path_rate: head dropout, stochastic depth (linear over blocks).
        post_norm, key_norm, init_values: official block options (see :class:`VRWKVBlock`).
        shift_pixel: Q-Shift distance.
        wkv_variant: ``'eq5'`` (default: paper Eq. 5) or ``'official_kernel'`` (the arithmetic of the authors'
            CUDA kernel, which the released checkpoints were trained with; reproduces their logits exactly — use
            it to evaluate or fine-tune published weights; see :func:`linvision.ops.bi_wkv_official_kernel_ref`).
        wkv_fn: a custom Bi-WKV implementation ``(w, u, k, v) -> [B, T, C]``; overrides ``wkv_variant``.
        block_fn: a factory ``(layer_id, drop_path) -> block`` replacing :class:`VRWKVBlock` (used by VRWKV6).

    Shapes: input ``[B, in_chans, H, W]`` float; ``forward`` → ``[B, num_classes]``.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: Union[int, Tuple[int, int]] = 16,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 192,
                 depth: int = 12, hidden_rate: int = 4, head_hidden_size: Optional[int] = None,
                 drop_rate: float = 0., drop_path_rate: float = 0., post_norm: bool = False,
                 key_norm: bool = False, init_values: Optional[float] = None, shift_pixel: int = 1,
                 wkv_variant: str = "eq5", wkv_fn: Optional[Callable] = None,
                 block_fn: Optional[Callable[[int, float], nn.Module]] = None):
        super().__init__()
        if wkv_variant not in BI_WKV_VARIANTS:
            raise ValueError(f"wkv_variant must be one of {BI_WKV_VARIANTS}, got {wkv_variant!r}")
        wkv_fn = wkv_fn or partial(bi_wkv, variant=wkv_variant)
        assert global_pool in ("", "avg"), f"global_pool must be 'avg' or '', got {global_pool!r}"
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.embed_dim = embed_dim
        self.head_hidden_size = head_hidden_size or embed_dim
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        self.patch_embed = PaddedPatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=True, output_fmt="NHWC")
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim)  # official layers[0].ln0
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta-device build
        block_fn = block_fn or (lambda i, dp: VRWKVBlock(embed_dim, hidden_rate * embed_dim, i, depth, dp, init_values,
                                                         post_norm, key_norm, shift_pixel, wkv_fn))
        self.blocks = nn.ModuleList([block_fn(i, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature_info = plain_feature_info(depth, embed_dim, self.patch_embed.patch_size[0])
        self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(embed_dim, head_hidden_size), act=nn.Tanh())) \
            if head_hidden_size else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        # official init_cfg: TruncNormal(std=0.02, bias=0) on every Linear; LayerNorms (1, 0), the conv its PyTorch
        # default, pos_embed zeros and the mixers their "fancy" init are already so at construction
        self.apply(init_linear_trunc_normal)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^pos_embed|patch_embed|norm_pre", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh ``Linear(head_hidden_size, num_classes)`` (Identity for 0)."""
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ("", "avg")
            self.global_pool = global_pool
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        B, H, W, C = x.shape
        pos = resize_pos_embed_2d(self.pos_embed, self.patch_embed.grid_size, (H, W))
        # pos first: the sum is then laid out contiguously (x, a view of the conv's NCHW output, is not), and
        # norm_pre need not copy it (1.8 ms of a 1024² forward on a 2-core CPU)
        return pos + x.reshape(B, H * W, C), (H, W)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` → final-normed tokens ``[B, T, C]``, T = ceil(H/p) * ceil(W/p)."""
        x, grid = self._pos_embed(self.patch_embed(x))
        return self.norm(self._run_blocks(self.norm_pre(x), grid)[0])

    def _run_blocks(self, x: torch.Tensor, grid: Tuple[int, int], take: Sequence[int] = (),
                    num_blocks: Optional[int] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Tokens through the first ``num_blocks`` blocks (default: all); returns the last block's tokens and the
        outputs of the blocks in ``take`` (ascending)."""
        inter = []
        for i, blk in enumerate(self.blocks[:num_blocks] if num_blocks is not None else self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
            if i in take:
                inter.append(x)
        return x, inter

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              stop_early: bool = False, return_prefix_tokens: bool = False):
        """timm's feature API: block outputs as maps (any input size; padded sides included).

        Args:
            x: ``[B, in_chans, H, W]``.
            indices: blocks to return — None: all, int n: the last n, list: those (negative from the end).
            norm: apply the final norm to each returned block output.
            output_fmt: ``'NCHW'`` → ``[B, C, ceil(H/p), ceil(W/p)]`` each; ``'NLC'`` → ``[B, T, C]``.
            intermediates_only: return only the list; else ``(final-normed tokens [B, T, C], list)``.
            stop_early: do not run the blocks after the last wanted one (then the final tokens are those of
                that block).
            return_prefix_tokens: accepted for timm/smp compatibility (no prefix tokens: plain maps returned).

        Raises:
            ValueError: a bad ``output_fmt``; AssertionError (timm's): an index out of range.
        """
        check_output_fmt(output_fmt)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._pos_embed(self.patch_embed(x))
        x, inter = self._run_blocks(self.norm_pre(x), grid, take_indices, max_index + 1 if stop_early else None)
        intermediates = finish_intermediates([self.norm(y) if norm else y for y in inter], grid, output_fmt)
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last of ``indices`` (timm semantics); ``prune_norm``/``prune_head`` replace
        the final norm / classifier by Identity. Returns the kept absolute indices."""
        return prune_blocks(self, indices, prune_norm, prune_head)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, T, C]`` → logits ``[B, num_classes]`` (or pooled features if ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(self.pre_logits(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_BLOCK_RENAMES = [(".att.", ".spatial_mix."), (".ffn.", ".channel_mix."), ("spatial_mix_", "mix_"),
                  (".gamma1", ".ls1.gamma"), (".gamma2", ".ls2.gamma"), (".ln1.", ".norm1."), (".ln2.", ".norm2.")]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionRWKV) -> Dict[str, torch.Tensor]:
    """Map an official Vision-RWKV state dict to this model's keys.

    Two official formats: mmcls (``classification/``: ``backbone.*``, ``head.fc.*`` or, with a hidden head,
    ``head.layers.{pre_logits,head}.*``; checkpoint ``{'state_dict': ...}``) and the InternImage code base
    (``classification_internimage/models/vrwkv.py``, VRWKV-L ``vrwkv_l_22kto1k_384.pth``: checkpoint
    ``{'model': ...}``, the same ``backbone.*`` keys, head ``nn.Linear`` → ``head.*`` for depth ≤ 12, else
    ``nn.Sequential(Linear(C, hidden), Tanh, Linear(hidden, classes))`` → ``head.0.*``, ``head.2.*``).
    Drops ``__*__`` entries (golden files); resizes ``pos_embed`` to the model's grid (bicubic, as mmcls
    ``resize_pos_embed``). A state dict already in linvision's keys passes through (pos-embed still resized).
    """
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    out = {}
    for k, v in state_dict.items():
        if k.startswith("__"):
            continue
        k = k.replace("backbone.", "", 1) if k.startswith("backbone.") else k
        if k.startswith("layers.0.ln0."):
            k = k.replace("layers.0.ln0.", "norm_pre.")
        elif k.startswith("layers."):
            k = "blocks." + k[len("layers."):]
            for a, b in _BLOCK_RENAMES:
                k = k.replace(a, b)
            if ".mix_" in k:
                v = v.reshape(-1)
        elif k.startswith("ln1."):
            k = "norm." + k[len("ln1."):]
        elif k.startswith("patch_embed.projection."):
            k = k.replace("patch_embed.projection.", "patch_embed.proj.")
        elif k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
        elif k.startswith("head.layers.pre_logits."):
            k = "pre_logits.fc." + k[len("head.layers.pre_logits."):]
        elif k.startswith("head.layers.head."):
            k = "head." + k[len("head.layers.head."):]
        elif k.startswith("head.0."):  # InternImage nn.Sequential head: 0 Linear(C, hidden), 1 Tanh, 2 Linear
            k = "pre_logits.fc." + k[len("head.0."):]
        elif k.startswith("head.2."):
            k = "head." + k[len("head.2."):]
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            v = resize_pos_embed_2d(v, square_grid(v.shape[1]), model.patch_embed.grid_size)
        out[k] = v
    return out


_cfg = partial(cfg, first_conv="patch_embed.proj", paper_ids="arXiv:2403.02308",
               license="apache-2.0")
default_cfgs = {
    "vrwkv_tiny": _cfg(),
    "vrwkv_small": _cfg(),
    "vrwkv_base": _cfg(),
    "vrwkv_large": _cfg(),
    "test_vrwkv": _cfg(input_size=(3, 64, 64), num_classes=10),
    "test_vrwkv_postnorm": _cfg(input_size=(3, 64, 64), num_classes=10),
}
default_cfgs = generate_default_cfgs(default_cfgs)


def _model(name: str, pretrained: bool, defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> VisionRWKV:
    return build(VisionRWKV, checkpoint_filter_fn, name, pretrained, defaults, kwargs)


@register_model
def vrwkv_tiny(pretrained: bool = False, **kwargs) -> VisionRWKV:
    """VRWKV-T: C 192, hidden 768, depth 12, pre-norm, no layer scale (official ``vrwkv_tiny_8xb128_in1k``)."""
    return _model("vrwkv_tiny", pretrained, dict(embed_dim=192, depth=12, drop_path_rate=0.), kwargs)


@register_model
def vrwkv_small(pretrained: bool = False, **kwargs) -> VisionRWKV:
    """VRWKV-S: C 384, hidden 1536, depth 12, post_norm, layer scale 1.0, drop path 0.3."""
    return _model("vrwkv_small", pretrained, dict(embed_dim=384, depth=12, drop_path_rate=0.3, post_norm=True,
                                                  init_values=1.0), kwargs)


@register_model
def vrwkv_base(pretrained: bool = False, **kwargs) -> VisionRWKV:
    """VRWKV-B: C 768, hidden 3072, depth 12, post_norm, layer scale 1e-5, drop path 0.5."""
    return _model("vrwkv_base", pretrained, dict(embed_dim=768, depth=12, drop_path_rate=0.5, post_norm=True,
                                                 init_values=1e-5), kwargs)


@register_model
def vrwkv_large(pretrained: bool = False, **kwargs) -> VisionRWKV:
    """VRWKV-L: C 1024, hidden 4096, depth 24, post_norm, key_norm, layer scale 1e-5, drop path 0.1,
    head Linear(1024→3072)–Tanh–Linear."""
    return _model("vrwkv_large", pretrained, dict(embed_dim=1024, depth=24, drop_path_rate=0.1, post_norm=True,
                                                  key_norm=True, init_values=1e-5, head_hidden_size=3072), kwargs)


@register_model
def test_vrwkv(pretrained: bool = False, **kwargs) -> VisionRWKV:
    """Tiny test model = ``../shared/golden/vrwkv_golden_small.json`` (64×64, patch 16, C 64, depth 4, 10 classes)."""
    return _model("test_vrwkv", pretrained, dict(img_size=64, embed_dim=64, depth=4, num_classes=10), kwargs)


@register_model
def test_vrwkv_postnorm(pretrained: bool = False, **kwargs) -> VisionRWKV:
    """Tiny test model = ``vrwkv_golden_small_postnorm.json``."""
    return _model("test_vrwkv_postnorm", pretrained, dict(img_size=64, embed_dim=64, depth=4, num_classes=10,
                                                          post_norm=True, key_norm=True, init_values=1e-5), kwargs)
