"""ViT-ResNAS (Liao et al., "Searching for Efficient Multi-Stage Vision Transformers", arXiv 2109.00642), as the
official code builds it (yilunliao/vit-search ``nets/vit_sr_supernet.py``, ``nets/supernet_blocks.py``,
``nets/patch_conv.py``).

A multi-stage ViT: a convolutional stem (patch 14), a learned class token and pos-embed, then three stages of
pre-norm transformer blocks joined by **residual spatial reduction** (paper Sec. 3.1, Fig. 2). Each block's
attention width is ``heads × head_dim``, decoupled from the model width; MLP hidden sizes are free. Blocks,
widths, heads and MLP sizes of the searched networks come from the super-network search (``linvision.nas``).

An architecture ("arch") is a JSON-ready dict::

    {"dims": [C1, C2, C3],              # stage widths, C1 <= C2 <= C3
     "head_dims": [d1, d2, d3],         # per-stage head dimension
     "heads": [[h, ...], [...], [...]], # per block
     "mlp": [[m, ...], [...], [...]],   # per block MLP hidden size
     "present": [[bool, ...], ...],     # optional: blocks with False are left out (super-network sub-networks)
     "stem_chans": 24}                  # optional: conv-stem mid channels (default 24)

Model contract as timm's: ``forward_features -> [B, 1 + N, C3]`` (final-normed tokens, class token first),
``forward_head(pre_logits=)``, ``reset_classifier``, ``no_weight_decay``; the training-only per-token head of the
official code (``patch_output=True``) is applied by :meth:`ResNAS.forward_patch_head`. The official sizes are
multiples of 56 (patch 14, then two 2× reductions); ``img_size`` (the pos-embed grids) and the run-time input may
be any size: sides not divisible by 14 are zero-padded bottom/right (as timm's ``PatchEmbed(dynamic_img_pad=True)``),
a reduction of an odd patch grid yields ``ceil(n/2)`` (its stride-2 conv zero-pads; its average-pool skip averages
the tokens of the clipped border window), and pos-embeds are resized bicubically; for multiples of 56 this is
exactly the official computation. timm's feature API (``forward_intermediates``, ``features_only=True``) returns
the three stages' maps (strides 14/28/56, widths C1/C2/C3). Official checkpoints load through
:func:`checkpoint_filter_fn`::

    timm.create_model("vit_resnas_tiny", pretrained=True, pretrained_cfg_overlay=dict(file="checkpoint.pth"))
"""
from __future__ import annotations

import copy
import json
import re
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import ConvNormAct, DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Attention

from timm.models._features import feature_take_indices

from ..layers.inplace import GELU
from ._common import (build, cfg, check_output_fmt, finish_intermediates, init_linear_trunc_normal, resize_pos_embed_2d,
                      square_grid)

__all__ = ["ResNAS", "ResNASBlock", "ResidualSpatialReduction", "ConvStem", "checkpoint_filter_fn",
           "normalize_arch", "load_arch", "arch_from_network_def", "SIZE_MULTIPLE", "PATCH_SIZE"]

PATCH_SIZE = 14      # conv stem: stride 2 then 7×7 stride 7
SIZE_MULTIPLE = 56   # patch 14 × two 2× spatial reductions
LN_EPS = 1e-6        # the official MaskedLayerNorm eps

LayerNorm = partial(nn.LayerNorm, eps=LN_EPS)


# --------------------------------------------------------------------------------------------------- arch specs
def normalize_arch(arch: Dict[str, Any]) -> Dict[str, Any]:
    """Validated copy of an architecture dict (see the module docstring) with ``present`` filled in.

    Raises:
        ValueError: missing keys, lists of the wrong lengths, non-positive sizes, or stage widths that shrink
            (the residual spatial reduction zero-pads channels, so ``C_{s+1} >= C_s``).
    """
    if not isinstance(arch, dict):
        raise ValueError(f"arch must be a dict, got {type(arch).__name__}")
    missing = [k for k in ("dims", "head_dims", "heads", "mlp") if k not in arch]
    if missing:
        raise ValueError(f"arch lacks {', '.join(missing)} (needs dims, head_dims, heads, mlp[, present])")
    dims, head_dims = [int(c) for c in arch["dims"]], [int(d) for d in arch["head_dims"]]
    heads, mlp = [[int(h) for h in s] for s in arch["heads"]], [[int(m) for m in s] for s in arch["mlp"]]
    n = len(dims)
    if n < 1 or len(head_dims) != n or len(heads) != n or len(mlp) != n:
        raise ValueError(f"arch: dims, head_dims, heads and mlp need one entry per stage; got {len(dims)}, "
                         f"{len(head_dims)}, {len(heads)}, {len(mlp)}")
    present = arch.get("present")
    present = [[True] * len(h) for h in heads] if present is None else [[bool(p) for p in s] for s in present]
    for s in range(n):
        if len(mlp[s]) != len(heads[s]) or len(present[s]) != len(heads[s]):
            raise ValueError(f"arch stage {s}: heads, mlp and present must have one entry per block")
    if min(dims + head_dims + [x for s in heads + mlp for x in s] or [1]) < 1:
        raise ValueError("arch: every width, head count, head_dim and MLP size must be >= 1")
    if any(b < a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"arch: stage widths must not shrink (residual spatial reduction zero-pads): {dims}")
    out = {"dims": dims, "head_dims": head_dims, "heads": heads, "mlp": mlp, "present": present}
    if arch.get("stem_chans") is not None:
        out["stem_chans"] = int(arch["stem_chans"])
    return out


def load_arch(arch: Union[str, Path, Dict[str, Any]]) -> Dict[str, Any]:
    """An arch dict, or a JSON file holding one (either the arch itself or ``{"arch": {...}, ...}`` as written
    by ``linvision search``), validated with :func:`normalize_arch`.

    Raises:
        ValueError: unreadable file, invalid JSON or an invalid arch (the message names the file).
    """
    if isinstance(arch, (str, Path)):
        try:
            data = json.loads(Path(arch).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read arch file {arch}: {e}") from None
        data = data.get("arch", data) if isinstance(data, dict) else data
        try:
            return normalize_arch(data)
        except ValueError as e:
            raise ValueError(f"arch file {arch}: {e}") from None
    return normalize_arch(arch)


def arch_from_network_def(network_def: Sequence) -> Dict[str, Any]:
    """Convert an official ``network_def`` (``((4, C), (1, (C, heads, head_dim), (C, mlp), exists), ...,
    (3, C_in, C_out), ..., (2, C, classes))``) into an arch dict (blocks with ``exists=0`` become
    ``present=False``)."""
    dims, head_dims, heads, mlp, present = [int(network_def[0][1])], [], [[]], [[]], [[]]
    for d in network_def[1:]:
        if d[0] == 1:
            if len(head_dims) < len(dims):
                head_dims.append(int(d[1][2]))
            heads[-1].append(int(d[1][1]))
            mlp[-1].append(int(d[2][1]))
            present[-1].append(bool(d[3]))
        elif d[0] == 3:
            dims.append(int(d[2]))
            heads.append([]), mlp.append([]), present.append([])
    head_dims += [head_dims[-1] if head_dims else 64] * (len(dims) - len(head_dims))
    return normalize_arch({"dims": dims, "head_dims": head_dims, "heads": heads, "mlp": mlp, "present": present})


def _half(grid: Tuple[int, int]) -> Tuple[int, int]:
    """Patch grid after a residual spatial reduction: ``ceil(n/2)`` per side."""
    return (grid[0] + 1) // 2, (grid[1] + 1) // 2


def check_size(h: int, w: int, what: str) -> None:
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h <= 0 or w <= 0:
        raise ValueError(f"ViT-ResNAS needs {what} sides that are multiples of {SIZE_MULTIPLE} (patch {PATCH_SIZE}, "
                         f"then two 2x spatial reductions), e.g. 56, 112, 224, 280; got {h}x{w}")


# --------------------------------------------------------------------------------------------------- layers
class ConvStem(nn.Module):
    """Official conv stem (``PatchConvEmbed``, patch 14): ``c1 = ReLU(BN(conv3×3 s2(x)))``,
    ``c = c1 + ReLU(BN(conv3×3(ReLU(BN(conv3×3(c1))))))``, then ``conv_proj`` 7×7 stride 7 (with bias) to
    ``embed_dim``. ``[B, in_chans, H, W] -> [B, embed_dim, H/14, W/14]``."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 192, mid_chans: int = 24):
        super().__init__()
        cna = partial(ConvNormAct, kernel_size=3, padding=1, bias=False, act_layer=nn.ReLU)
        self.conv1 = cna(in_chans, mid_chans, stride=2)
        self.conv2 = cna(mid_chans, mid_chans)
        self.conv3 = cna(mid_chans, mid_chans)
        self.conv_proj = nn.Conv2d(mid_chans, embed_dim, kernel_size=PATCH_SIZE // 2, stride=PATCH_SIZE // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x + self.conv3(self.conv2(x))
        return self.conv_proj(x)


class ResNASBlock(nn.Module):
    """Pre-norm transformer block with a decoupled attention width: ``x + dp(attn(norm1(x)))``, then
    ``x + dp(mlp(norm2(x)))``; attention has ``num_heads`` heads of ``head_dim`` (qkv ``C -> 3·h·d`` with bias,
    scale ``d^-0.5``, proj ``h·d -> C``), the MLP ``C -> mlp_hidden -> C`` with GELU. ``[B, T, C]`` in/out."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, drop_path: float = 0.,
                 proj_drop: float = 0., attn_drop: float = 0.):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_head_dim=head_dim, qkv_bias=True, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden, act_layer=GELU, drop=proj_drop)  # GELU: in place where no gradient flows
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ResidualSpatialReduction(nn.Module):
    """Residual spatial reduction between stages (paper Sec. 3.1; official ``SpatialReductionPatchEmbedding``).

    Main branch: LayerNorm on the whole sequence; patches reshaped to 2D → ``Conv2d(C_in, C_out, 3, s2, p1)`` →
    flattened + a new pos-embed (patches only); class token → ``Linear(C_in, C_out)``. Skip branch from the
    *un-normalized* input: ``AvgPool2d(2, 2)`` on patches and zero-padding of channels to ``C_out`` (class token
    zero-padded likewise). Output = main + skip.

    An odd grid side gives ``ceil(n/2)``: the conv zero-pads (its own padding), the average pool averages the
    tokens inside the clipped border window (``ceil_mode``); even sides are the official computation.

    ``forward(x [B, 1 + h·w, C_in], grid (h, w)) -> [B, 1 + ceil(h/2)·ceil(w/2), C_out]``.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: Tuple[int, int]):
        super().__init__()
        if out_dim < in_dim:
            raise ValueError(f"residual spatial reduction needs out_dim >= in_dim, got {in_dim} -> {out_dim}")
        self.in_dim, self.out_dim, self.grid = in_dim, out_dim, tuple(grid)  # grid: input tokens at img_size
        self.norm = LayerNorm(in_dim)
        self.patch_reduce = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.token_transform = nn.Linear(in_dim, out_dim)
        half = _half(grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, half[0] * half[1], out_dim))
        if self.pos_embed.device.type != "meta":  # built on meta: weights are loaded afterwards
            trunc_normal_(self.pos_embed, std=.02)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        B, T, C = x.shape
        h, w = grid
        patches = x[:, 1:].transpose(1, 2).reshape(B, C, h, w)
        skip = torch.cat([x[:, :1], F.avg_pool2d(patches, 2, 2, ceil_mode=True).flatten(2).transpose(1, 2)], dim=1)
        skip = F.pad(skip, (0, self.out_dim - C))                                  # [B, 1 + hw/4, C_out]
        x = self.norm(x)
        p = self.patch_reduce(x[:, 1:].transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
        p = p + resize_pos_embed_2d(self.pos_embed, _half(self.grid), _half((h, w)))
        return torch.cat([self.token_transform(x[:, :1]), p], dim=1) + skip


class ResNASStage(nn.Module):
    """One stage: an optional :class:`ResidualSpatialReduction` (``reduction``, stages ≥ 1) then ``blocks``."""

    def __init__(self, reduction: Optional[ResidualSpatialReduction], blocks: List[ResNASBlock]):
        super().__init__()
        self.reduction = reduction
        self.blocks = nn.ModuleList(blocks)


# --------------------------------------------------------------------------------------------------- model
class ResNAS(nn.Module):
    """ViT-ResNAS classifier built from an architecture dict (see the module docstring).

    Args:
        arch: the architecture (dict, or a JSON file path; blocks with ``present=False`` are left out).
        img_size: default input size (sets the pos-embed grids: ``ceil(img_size/14)``, then ``ceil(n/2)`` per
            reduction; the official sizes are multiples of 56). Inputs of any size work at run time (see the
            module docstring).
        in_chans, num_classes: input channels, classes (0: no head).
        global_pool: ``'token'`` (official: the class token) or ``'avg'`` (mean of patch tokens) or ``''``.
        stem_chans: mid channels of the conv stem (default: the arch's ``stem_chans``, else the official 24).
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate: dropouts (head, pos-embed, projections,
            attention weights).
        drop_path_rate: stochastic depth, linear from 0 over all blocks.
        patch_output: add the official training-only per-token head ``patch_head`` (token-labeling style mixup);
            see :meth:`forward_patch_head`.

    Shapes: input ``[B, in_chans, H, W]``, any H, W; ``forward_features`` → ``[B, 1 + ceil(H/56)·ceil(W/56), C3]``;
    ``forward`` → ``[B, num_classes]``; ``forward_intermediates`` → maps ``[B, C_s, ceil(H/r_s), ceil(W/r_s)]``,
    ``r_s`` = 14, 28, 56.
    """

    def __init__(self, arch: Union[Dict[str, Any], str, Path], img_size: Union[int, Tuple[int, int]] = 224,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "token",
                 stem_chans: Optional[int] = None,
                 drop_rate: float = 0., pos_drop_rate: float = 0., proj_drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0., patch_output: bool = False):
        super().__init__()
        self.arch = arch = load_arch(arch)
        img_size = to_2tuple(img_size)
        assert global_pool in ("", "avg", "token"), f"unknown global_pool {global_pool!r}"
        self.img_size, self.num_classes, self.global_pool = tuple(img_size), num_classes, global_pool
        dims = arch["dims"]
        self.embed_dim = dims[0]
        self.num_features = self.head_hidden_size = dims[-1]
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.patch_embed = ConvStem(in_chans, dims[0], stem_chans or arch.get("stem_chans", 24))
        grid = (-(-img_size[0] // PATCH_SIZE), -(-img_size[1] // PATCH_SIZE))  # ceil, as the run-time padding
        self.grid_size = grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, dims[0]))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        kept = [[j for j, p in enumerate(pr) if p] for pr in arch["present"]]
        dpr = iter(torch.linspace(0, drop_path_rate, max(sum(map(len, kept)), 1), device="cpu").tolist())
        stages = []
        for s, c in enumerate(dims):
            red = None
            if s > 0:
                red = ResidualSpatialReduction(dims[s - 1], c, grid)
                grid = _half(grid)
            blocks = [ResNASBlock(c, arch["heads"][s][j], arch["head_dims"][s], arch["mlp"][s][j], next(dpr),
                                  proj_drop_rate, attn_drop_rate) for j in kept[s]]
            stages.append(ResNASStage(red, blocks))
        self.stages = nn.ModuleList(stages)
        self.feature_info = [dict(module=f"stages.{s}", num_chs=c, reduction=PATCH_SIZE * 2 ** s)
                             for s, c in enumerate(dims)]
        self.norm = LayerNorm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.patch_head = nn.Linear(dims[-1], num_classes) if patch_output and num_classes > 0 else None
        # official init: trunc-normal(0.02) tokens / pos-embeds / Linear weights, zero Linear biases,
        # LayerNorm 1/0, Conv2d & BatchNorm torch defaults
        if self.pos_embed.device.type != "meta":  # built on meta: weights are loaded afterwards
            trunc_normal_(self.pos_embed, std=.02)
            trunc_normal_(self.cls_token, std=.02)
            self.apply(init_linear_trunc_normal)

    # ------------------------------------------------------------------ timm contract
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"cls_token", "pos_embed"} | {f"stages.{s}.reduction.pos_embed" for s in range(1, len(self.stages))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.reduction", (0,)),
                                                             (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                                                             (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head (and the patch head, if any) with fresh ``Linear(C3, num_classes)`` (Identity for 0)."""
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ("", "avg", "token")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.patch_head is not None:
            self.patch_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else None

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``[B, in_chans, H, W]`` → tokens ``[B, 1 + ceil(H/14)·ceil(W/14), C1]`` (class token first, pos-embed
        added); sides not divisible by 14 are zero-padded bottom/right first."""
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % PATCH_SIZE, 0, -H % PATCH_SIZE))
        x = self.patch_embed(x)
        B, C, h, w = x.shape
        pos = torch.cat([self.pos_embed[:, :1],
                         resize_pos_embed_2d(self.pos_embed[:, 1:], self.grid_size, (h, w))], dim=1)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + pos
        return self.pos_drop(x), (h, w)

    def _run_stage(self, stage: ResNASStage, x: torch.Tensor,
                   grid: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if stage.reduction is not None:
            x = stage.reduction(x, grid)
            grid = _half(grid)
        for blk in stage.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x, grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` → final-normed tokens ``[B, 1 + ceil(H/56)·ceil(W/56), C3]`` (class token
        first)."""
        x, grid = self._embed(x)
        for stage in self.stages:
            x, grid = self._run_stage(stage, x, grid)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              stop_early: bool = False, return_prefix_tokens: bool = False):
        """timm's feature API (hierarchical, as timm's Swin): the outputs of the stages as maps, class token
        excluded.

        Args:
            x: ``[B, in_chans, H, W]``, any size.
            indices: stages to return — None: all, int n: the last n, list: those (negative from the end).
            norm: apply the final norm to the last stage's output (the norm is C3 wide; other stages unnormed).
            output_fmt: ``'NCHW'`` → ``[B, C_s, ceil(H/r_s), ceil(W/r_s)]`` (``r_s`` 14/28/56); ``'NLC'`` → tokens.
            intermediates_only: return only the list; else ``(tokens [B, 1 + N, C], list)``, final-normed when
                the last stage ran.
            stop_early: do not run the stages after the last wanted one.
            return_prefix_tokens: each entry is ``(map, class token [B, 1, C_s])``.

        Raises:
            ValueError: a bad ``output_fmt``; AssertionError (timm's): an index out of range.
        """
        check_output_fmt(output_fmt)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        x, grid = self._embed(x)
        intermediates = []
        for i, stage in enumerate(self.stages[:max_index + 1] if stop_early else self.stages):
            x, grid = self._run_stage(stage, x, grid)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates += finish_intermediates([y], grid, output_fmt, 1, False, return_prefix_tokens)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates  # the final norm is C3 wide

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices`` (timm semantics); the final norm goes with the last stage
        (or with ``prune_norm``); ``prune_head`` replaces the classifier(s) by Identity. Returns the kept
        absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if prune_norm or max_index < len(self.stages) - 1:
            self.norm = nn.Identity()
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, 1 + N, C3]`` → logits ``[B, num_classes]`` (pooled features ``[B, C3]`` if ``pre_logits``)."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_patch_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, 1 + N, C3]`` → per-patch logits ``[B, N, num_classes]`` (official ``patch_head``, used in
        training with patch-token mixup). Raises RuntimeError if the model was built without ``patch_output``."""
        if self.patch_head is None:
            raise RuntimeError("this model has no patch head; build it with patch_output=True")
        return self.patch_head(x[:, 1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` → logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------------- checkpoints
_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _official_to_linvision(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename official keys: ``tokens`` → ``cls_token`` (distillation token dropped), ``cls_head`` → ``head``,
    ``blocks.i`` → ``stages.s.blocks.j`` / ``stages.s.reduction`` (bypass blocks have no keys and are skipped)."""
    kinds: Dict[int, str] = {}
    for k in state_dict:
        m = _OFFICIAL_BLOCK.match(k)
        if m:
            i = int(m.group(1))
            if m.group(2).startswith(("patch_reduce.", "token_transform.")):
                kinds[i] = "sr"
            else:
                kinds.setdefault(i, "block")
    where, s, j = {}, 0, 0
    for i in sorted(kinds):
        if kinds[i] == "sr":
            s, j = s + 1, 0
            where[i] = f"stages.{s}.reduction"
        else:
            where[i] = f"stages.{s}.blocks.{j}"
            j += 1
    out = {}
    for k, v in state_dict.items():
        m = _OFFICIAL_BLOCK.match(k)
        if m:
            k = f"{where[int(m.group(1))]}.{m.group(2)}"
        elif k == "tokens":
            v = v[:, :1]
            k = "cls_token"
        elif k.startswith("cls_head."):
            k = "head." + k[len("cls_head."):]
        elif k.startswith("dst_head."):
            continue
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ResNAS) -> Dict[str, torch.Tensor]:
    """Map an official ViT-ResNAS state dict (``{'model': ...}``, ``{'model_ema': ...}``, ``{'state_dict': ...}``
    or flat; keys of ``nets/vit_sr_supernet.py``) — or a linvision one — to ``model``.

    Drops ``__*__`` golden entries, the distillation token/head, and ``patch_head`` when ``model`` has none;
    resizes pos-embeds (bicubic, as the official ``finetune_state_dict``) to the model's grids.
    """
    for key in ("model", "model_ema", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()
                  if not k.startswith("__")}
    if "tokens" in state_dict or any(_OFFICIAL_BLOCK.match(k) for k in state_dict):
        state_dict = _official_to_linvision(state_dict)
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.startswith("patch_head.") and getattr(model, "patch_head", None) is None:
            continue
        if k.endswith("pos_embed") and k in own and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            if k == "pos_embed":
                v = torch.cat([v[:, :1], resize_pos_embed_2d(v[:, 1:], square_grid(v.shape[1] - 1),
                                                             model.grid_size)], dim=1)
            else:
                g = model.stages[int(k.split(".")[1])].reduction.grid
                v = resize_pos_embed_2d(v, square_grid(v.shape[1]), _half(g))
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------------- registry
def _arch(dims, head_dims, heads, mlp) -> Dict[str, Any]:
    return normalize_arch({"dims": dims, "head_dims": head_dims, "heads": heads, "mlp": mlp})


# Official architectures: scripts/vit-sr-nas/{reference_net,searched_net}/*.sh of yilunliao/vit-search.
ARCHS: Dict[str, Dict[str, Any]] = {
    "vit_res_tiny": _arch([192, 384, 768], [64, 64, 64], [[3] * 4, [6] * 4, [12] * 4],
                          [[768] * 4, [1536] * 4, [3072] * 4]),
    "vit_resnas_tiny": _arch([176, 352, 704], [32, 48, 64],
                             [[3, 3, 3, 4, 4], [10, 8, 8, 8, 10, 10], [10, 10, 10, 8, 8]],
                             [[704, 576, 640, 576, 704], [1408, 1408, 1280, 1408, 1280, 1024],
                              [2560, 1792, 2816, 2816, 2560]]),
    "vit_resnas_small": _arch([220, 440, 880], [32, 48, 64],
                              [[5, 5, 7, 5, 5, 5], [10, 10, 10, 10, 12, 12], [16, 12, 16, 12, 14]],
                              [[880, 880, 800, 720, 720, 720], [1760, 1440, 1920, 1600, 1600, 1440],
                               [3200, 3200, 2880, 2240, 2560]]),
    "vit_resnas_medium": _arch([240, 640, 880], [32, 48, 64],
                               [[7, 6, 7, 8, 7, 8, 6], [10, 14, 14, 16, 14, 16, 16], [16, 10, 16, 12, 16, 14]],
                               [[960, 960, 800, 960, 880, 880, 800], [1120, 1760, 1920, 1760, 1440, 1760, 1920],
                                [3200, 3840, 3840, 3200, 3520, 3520]]),
    # = ../shared/golden/resnas_golden_small.json (official network_def, 112x112, 10 classes)
    "test_resnas": _arch([32, 64, 128], [8, 8, 16], [[2, 2], [2, 2], [2, 2]], [[64, 64], [128, 128], [256, 256]]),
}

_cfg = partial(cfg, first_conv="patch_embed.conv1.conv", paper_ids="arXiv:2109.00642", license="other")
default_cfgs = generate_default_cfgs({
    "vit_res_tiny": _cfg(),
    "vit_resnas_tiny": _cfg(),
    "vit_resnas_small": _cfg(),
    "vit_resnas_medium": _cfg(),
    "test_resnas": _cfg(input_size=(3, 112, 112), num_classes=10),
})


def _model(name: str, pretrained: bool, defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> ResNAS:
    defaults = {"arch": copy.deepcopy(ARCHS[name]), **defaults}
    return build(ResNAS, checkpoint_filter_fn, name, pretrained, defaults, kwargs)


@register_model
def vit_res_tiny(pretrained: bool = False, **kwargs) -> ResNAS:
    """ViT-Res-Tiny, the hand-designed reference (paper Table 1): 4/4/4 blocks, widths 192/384/768, heads
    3/6/12 of 64, MLP ratio 4; drop path 0.2 (official recipe)."""
    return _model("vit_res_tiny", pretrained, dict(drop_path_rate=0.2), kwargs)


@register_model
def vit_resnas_tiny(pretrained: bool = False, **kwargs) -> ResNAS:
    """ViT-ResNAS-Tiny (searched, ~1.8 GMACs at 224²): widths 176/352/704, head_dim 32/48/64, 5/6/5 blocks;
    drop path 0.2."""
    return _model("vit_resnas_tiny", pretrained, dict(drop_path_rate=0.2), kwargs)


@register_model
def vit_resnas_small(pretrained: bool = False, **kwargs) -> ResNAS:
    """ViT-ResNAS-Small (searched under 2.9 GMACs): widths 220/440/880, 6/6/5 blocks; drop path 0.3."""
    return _model("vit_resnas_small", pretrained, dict(drop_path_rate=0.3), kwargs)


@register_model
def vit_resnas_medium(pretrained: bool = False, **kwargs) -> ResNAS:
    """ViT-ResNAS-Medium (searched under 4.6 GMACs): widths 240/640/880, 7/7/6 blocks; drop path 0.3."""
    return _model("vit_resnas_medium", pretrained, dict(drop_path_rate=0.3), kwargs)


@register_model
def test_resnas(pretrained: bool = False, **kwargs) -> ResNAS:
    """Tiny test model = ``../shared/golden/resnas_golden_small.json`` (112×112, widths 32/64/128, 2 heads of
    8/8/16, 2 blocks per stage, 10 classes)."""
    return _model("test_resnas", pretrained, dict(img_size=112, num_classes=10), kwargs)
