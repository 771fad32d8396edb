"""ViR: Vision Retention Networks (Hatamizadeh et al., arXiv 2310.19731), with retention as the paper means it:
softmax-free and causal, class token appended **last** so it retains every patch, pos-embed on patches only.

The authors' code (anom63931/ViR ``models/vir.py``) applies a softmax after the decay mask in its parallel path,
which makes that path non-causal and different from its own recurrent/chunkwise paths; the golden files and
this model follow the recurrent (softmax-free) definition, which all three forms agree on. Keys match the
authors' (timm-style) names, so their checkpoints load through :func:`checkpoint_filter_fn`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model

from ..layers.inplace import GELU, LayerScale
from ..layers.linear import use_packed_linears_
from ..layers.retention import RETENTION2D_MODES, RETENTION_MODES, MultiScaleRetention, MultiScaleRetention2D
from ..ops.retention import auto_chunk_size, auto_form
from timm.models._features import feature_take_indices

from ._common import (PaddedPatchEmbed, build, cfg, check_output_fmt, finish_intermediates, init_linear_trunc_normal,
                      plain_feature_info, prune_blocks, resize_pos_embed_2d, square_grid)

__all__ = ["VisionRetention", "VisionRetention2D", "ViRBlock", "checkpoint_filter_fn"]


class ViRBlock(nn.Module):
    """Pre-norm block: ``x + dp(ls1(retention(norm1(x))))``, then ``x + dp(ls2(mlp(norm2(x))))``.

    ``forward(x [B, T, C], mode, state, output_final_state, **kw) -> (x [B, T, C], retention state or None)``;
    only retention mixes tokens, so a sequence fed in pieces with the state carried over gives the same tokens.
    ``retention_layer`` is :class:`MultiScaleRetention` (1D) or :class:`MultiScaleRetention2D` (which takes
    ``width=`` through ``**kw``).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., init_values: Optional[float] = 1e-5,
                 drop_path: float = 0., proj_drop: float = 0., retention_norm: bool = False,
                 chunk_size: Optional[int] = None, norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6),
                 retention_layer: type = MultiScaleRetention):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.retention = (MultiScaleRetention(dim, num_heads, retention_norm, chunk_size)
                          if retention_layer is MultiScaleRetention else retention_layer(dim, num_heads, retention_norm))
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        # GELU and LayerScale overwrite their (temporary) inputs where no gradient flows: same results, less memory
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=GELU, drop=proj_drop)
        use_packed_linears_([self.mlp])  # its fc1/fc2: packed weights for large CPU inference (layers/linear.py)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, mode: str = "parallel", state: Optional[torch.Tensor] = None,
                output_final_state: bool = False, **kw) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        r, state = self.retention(self.norm1(x), mode=mode, state=state, output_final_state=output_final_state, **kw)
        x = x + self.drop_path1(self.ls1(r))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), state


class VisionRetention(nn.Module):
    """ViR classifier: patch embed + patch pos-embed, class token appended last, ``depth`` retention blocks,
    final LayerNorm (eps 1e-6), head on the last (class) token.

    Args:
        img_size: default input size (pos-embed grid); other sizes work at run time (pos-embed resized
            bicubically; sides not divisible by the patch are zero-padded bottom/right).
        patch_size, in_chans, num_classes: as timm's ViT.
        global_pool: ``'token_last'`` (paper: the class token, last), ``'avg'`` (mean of patch tokens) or ``''``.
        embed_dim, depth, num_heads, mlp_ratio: width, blocks, heads, MLP hidden ratio.
        init_values: LayerScale init (None disables it).
        retention_norm: per-head RMSNorm of the retention output (off = the authors' variant).
        drop_rate, pos_drop_rate, proj_drop_rate, drop_path_rate: dropouts and stochastic depth.
        mode: default retention form: ``'auto'`` (the default: ``'parallel'`` up to 320 tokens, ``'chunkwise'``
            above, :func:`linvision.ops.retention.auto_form`), ``'parallel'``, ``'chunkwise'`` or ``'recurrent'``;
            override per call with ``model(x, mode=...)``. All forms give the same logits (up to float rounding).
            ``'chunkwise'``/``'recurrent'`` feed the token sequence through **all** blocks ``chunk_size``
            tokens (or one token) at a time, with one retention state ``[B, H, d, d]`` per block, so token-mixing
            memory does not grow with the number of tokens.
        chunk_size: tokens per chunk for ``'chunkwise'`` and streaming (also the retention op's chunk length);
            default ``None``: automatic — ``'chunkwise'`` from the token count, head size and device (one pass on
            CUDA; :func:`linvision.ops.retention.auto_chunk_size`), streaming and the op's chunk from the head size
            alone (:func:`~linvision.ops.retention.op_chunk_size`: 64 for heads of 64), so that streaming memory
            stays constant in the image size. An explicit value wins.

    Shapes: input ``[B, in_chans, H, W]``; ``forward_features`` → ``[B, T + 1, C]`` (class token last);
    ``forward`` → ``[B, num_classes]``.

    Streaming (an image of any size, read row by row, never held whole) is
    ``linvision.stream.forward_stream(model, source)``; the model stays free of I/O and offers the pure-tensor
    step it loops over, :meth:`forward_blocks`.
    """

    modes = RETENTION_MODES + ("auto",)
    retention_layer: type = MultiScaleRetention
    class_token = True  # appended last
    pools = ("", "avg", "token_last")

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: Union[int, Tuple[int, int]] = 16,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "token_last", embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4., init_values: Optional[float] = 1e-5,
                 retention_norm: bool = False, drop_rate: float = 0., pos_drop_rate: float = 0.,
                 proj_drop_rate: float = 0., drop_path_rate: float = 0., mode: str = "auto",
                 chunk_size: Optional[int] = None):
        super().__init__()
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {self.modes}, got {mode!r}")
        if global_pool not in self.pools:
            raise ValueError(f"global_pool must be one of {self.pools}, got {global_pool!r}")
        self.mode, self.chunk_size, self.head_dim = mode, chunk_size, embed_dim // num_heads
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = int(self.class_token)  # the class token (it is appended last, not prefixed)
        self.grad_checkpointing = False
        self.patch_embed = PaddedPatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=True, output_fmt="NHWC")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches, embed_dim) * .02)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta-device build
        self.blocks = nn.ModuleList([
            ViRBlock(embed_dim, num_heads, mlp_ratio, init_values, dpr[i], proj_drop_rate, retention_norm,
                     chunk_size, norm_layer, self.retention_layer) for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.feature_info = plain_feature_info(depth, embed_dim, self.patch_embed.patch_size[0])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # authors' init (timm ViT 'init_weights_vit_timm'): trunc-normal 0.02 Linear, zero bias; cls N(0, 1e-6)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_linear_trunc_normal)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh ``Linear(embed_dim, num_classes)`` (Identity for 0)."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in self.pools:
                raise ValueError(f"global_pool must be one of {self.pools}, got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``[B, in_chans, H, W]`` → (patch tokens + pos-embed, class token last ``[B, T + 1, C]``, grid)."""
        x = self.patch_embed(x)
        B, H, W, C = x.shape
        # pos first: the sum is then laid out contiguously (x, a view of the conv's NCHW output, is not)
        x = resize_pos_embed_2d(self.pos_embed, self.patch_embed.grid_size, (H, W)) + x.reshape(B, H * W, C)
        x = torch.cat([x, self.cls_token.expand(B, -1, -1)], dim=1)  # class token LAST
        return self.pos_drop(x), (H, W)

    def _run_blocks(self, x: torch.Tensor, mode: str, grid: Tuple[int, int], take: Sequence[int] = (),
                    num_blocks: Optional[int] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Tokens through the first ``num_blocks`` blocks (default: all) in retention form ``mode``; returns the
        last block's tokens and the outputs of the blocks in ``take`` (ascending). ``'chunkwise'``/``'recurrent'``
        feed ``chunk_size`` tokens (or one) at a time through all blocks, one retention state per block."""
        blocks = self.blocks[:num_blocks] if num_blocks is not None else self.blocks
        if mode == "auto":
            mode = auto_form(x.shape[1])
        if mode == "parallel":
            inter = []
            for i, blk in enumerate(blocks):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)[0]
                else:
                    x = blk(x)[0]
                if i in take:
                    inter.append(x)
            return x, inter
        step = 1 if mode == "recurrent" else (self.chunk_size
                                              or auto_chunk_size(x.shape[1], self.head_dim, x.device))
        states: list = [None] * len(blocks)
        outs, inter = [], {i: [] for i in take}
        for s in range(0, x.shape[1], step):
            h = x[:, s:s + step]
            for i, blk in enumerate(blocks):
                h, states[i] = blk(h, mode, states[i], output_final_state=True)
                if i in inter:
                    inter[i].append(h)
            outs.append(h)
        return torch.cat(outs, dim=1), [torch.cat(inter[i], dim=1) for i in sorted(inter)]

    def forward_features(self, x: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """``[B, in_chans, H, W]`` → final-normed tokens ``[B, T + 1, C]`` (patches row-major, class token last).

        ``mode`` (default: the model's ``mode``) picks the retention form; see the class docstring."""
        mode = mode or self.mode  # an unknown mode is rejected by the retention layer
        x, grid = self._tokens(x)
        return self.norm(self._run_blocks(x, mode, grid)[0])

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              stop_early: bool = False, return_prefix_tokens: bool = False,
                              mode: Optional[str] = None):
        """timm's feature API: block outputs as maps (class token excluded), in any retention ``mode``.

        Args:
            x: ``[B, in_chans, H, W]``, any size (sides not divisible by the patch are zero-padded).
            indices: blocks to return — None: all, int n: the last n, list: those (negative from the end).
            norm: apply the final norm to each returned block output.
            output_fmt: ``'NCHW'`` → ``[B, C, ceil(H/p), ceil(W/p)]`` each; ``'NLC'`` → ``[B, T, C]``.
            intermediates_only: return only the list; else ``(final-normed tokens [B, T (+1), C], list)``.
            stop_early: do not run the blocks after the last wanted one.
            return_prefix_tokens: each entry is ``(map, class token [B, 1, C])`` (as timm's ViT; used by
                smp's DPT readout); plain maps for a model without class token.
            mode: retention form (default: the model's); all modes give the same maps.

        Raises:
            ValueError: a bad ``output_fmt``; AssertionError (timm's): an index out of range.
        """
        check_output_fmt(output_fmt)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._tokens(x)
        x, inter = self._run_blocks(x, mode or self.mode, grid, take_indices, max_index + 1 if stop_early else None)
        inter = finish_intermediates([self.norm(y) if norm else y for y in inter], grid, output_fmt,
                                     self.num_prefix_tokens, prefix_last=True,
                                     return_prefix_tokens=return_prefix_tokens)
        return inter if intermediates_only else (self.norm(x), inter)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last of ``indices`` (timm semantics); ``prune_norm``/``prune_head`` replace
        the final norm / classifier by Identity. Returns the kept absolute indices."""
        return prune_blocks(self, indices, prune_norm, prune_head)

    def forward_blocks(self, x: torch.Tensor, states: list, mode: str = "parallel", **kw) -> torch.Tensor:
        """One piece ``x [B, t, C]`` of the token sequence through **all** blocks (no final norm), each block's
        retention carrying in ``states[i]`` (None: zero state) and leaving its final state there (``states``, one
        entry per block, is updated in place). Feeding a sequence piece by piece with the same ``states`` list
        gives the tokens of the whole sequence: the chunkwise/recurrent forward and
        :func:`linvision.stream.forward_stream` are loops over this. ``mode`` is the retention form used *within*
        the piece; ``**kw`` goes to the retention layer (2D: ``width=`` patches per row).

        Returns: ``[B, t, C]``."""
        for i, blk in enumerate(self.blocks):
            x, states[i] = blk(x, mode, states[i], output_final_state=True, **kw)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, T + 1, C]`` → logits ``[B, num_classes]`` (pooled features if ``pre_logits``)."""
        if self.global_pool == "token_last":
            x = x[:, -1]
        elif self.global_pool == "avg":
            x = x[:, :x.shape[1] - self.num_prefix_tokens].mean(dim=1)  # patch tokens only
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """``[B, in_chans, H, W]`` → logits ``[B, num_classes]``; ``mode`` as in :meth:`forward_features`."""
        return self.forward_head(self.forward_features(x, mode))



class VisionRetention2D(VisionRetention):
    """ViR with **2D retention** (ViR v2, arXiv 2310.19731 v2): decay γ_h^(|Δrow| + |Δcol|) over the causal
    quadrant of the patch grid (:class:`~linvision.layers.retention.MultiScaleRetention2D`), no class token,
    classification from the mean of the final-normed patch tokens (``global_pool='avg'``).

    Same arguments as :class:`VisionRetention` except ``mode``: ``'parallel'`` (training; one ``[T, T]`` decayed
    score matrix per head) or ``'recurrent'`` (row by row through **all** blocks with one state
    ``[B, H, cols, d, d]`` per block: memory constant in the number of rows). ``chunk_size`` is unused.

    Shapes: input ``[B, in_chans, H, W]``; ``forward_features`` → ``[B, T, C]`` (patches row-major);
    ``forward`` → ``[B, num_classes]``.
    """
    modes = RETENTION2D_MODES
    retention_layer = MultiScaleRetention2D
    class_token = False
    pools = ("", "avg")

    def __init__(self, *args, global_pool: str = "avg", mode: str = "parallel", **kwargs):
        super().__init__(*args, global_pool=global_pool, mode=mode, **kwargs)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``[B, in_chans, H, W]`` → (patch tokens + pos-embed ``[B, T, C]``, row-major; grid)."""
        x = self.patch_embed(x)  # [B, rows, cols, C]
        B, R, W, C = x.shape
        x = resize_pos_embed_2d(self.pos_embed, self.patch_embed.grid_size, (R, W)) + x.reshape(B, R * W, C)
        return self.pos_drop(x), (R, W)

    def _run_blocks(self, x: torch.Tensor, mode: str, grid: Tuple[int, int], take: Sequence[int] = (),
                    num_blocks: Optional[int] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """As :meth:`VisionRetention._run_blocks`; ``'recurrent'`` goes row by row through all blocks with one
        per-column state per block."""
        blocks = self.blocks[:num_blocks] if num_blocks is not None else self.blocks
        R, W = grid
        if mode == "parallel":
            inter = []
            for i, blk in enumerate(blocks):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = torch.utils.checkpoint.checkpoint(blk, x, mode, None, False, use_reentrant=False,
                                                          width=W)[0]
                else:
                    x = blk(x, mode, width=W)[0]
                if i in take:
                    inter.append(x)
            return x, inter
        states: list = [None] * len(blocks)
        outs, inter = [], {i: [] for i in take}
        for r in range(R):  # row by row through all blocks, one per-column state per block
            h = x[:, r * W:(r + 1) * W]
            for i, blk in enumerate(blocks):
                h, states[i] = blk(h, mode, states[i], output_final_state=True, width=W)
                if i in inter:
                    inter[i].append(h)
            outs.append(h)
        return torch.cat(outs, dim=1), [torch.cat(inter[i], dim=1) for i in sorted(inter)]

    def forward_features(self, x: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """``[B, in_chans, H, W]`` → final-normed patch tokens ``[B, T, C]`` (row-major); ``mode`` (default: the
        model's) is ``'parallel'`` or ``'recurrent'``."""
        x, grid = self._tokens(x)
        return self.norm(self._run_blocks(x, mode or self.mode, grid)[0])



def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionRetention) -> Dict[str, torch.Tensor]:
    """Map an authors' ViR state dict (``{'model': ...}``, ``{'state_dict': ...}`` or flat; timm-style keys) to
    this model: drops ``__*__`` golden entries and the authors' unused buffers, resizes ``pos_embed`` (bicubic)
    to the model's patch grid."""
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    out = {}
    for k, v in state_dict.items():
        if k.startswith("__") or k.startswith("decay_mask."):
            continue
        k = k[len("module."):] if k.startswith("module.") else k
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            v = resize_pos_embed_2d(v, square_grid(v.shape[1]), model.patch_embed.grid_size)
        out[k] = v
    return out


_cfg = partial(cfg, first_conv="patch_embed.proj", paper_ids="arXiv:2310.19731", license="other")
default_cfgs = generate_default_cfgs({
    "vir_tiny": _cfg(),
    "vir_small": _cfg(),
    "vir_base": _cfg(),
    "test_vir": _cfg(input_size=(3, 64, 64), num_classes=10),
    "vir2d_tiny": _cfg(),
    "vir2d_small": _cfg(),
    "vir2d_base": _cfg(),
    "test_vir2d": _cfg(input_size=(3, 64, 64), num_classes=10),
})


def _model(name: str, pretrained: bool, defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> VisionRetention:
    cls = VisionRetention2D if name.startswith(("vir2d", "test_vir2d")) else VisionRetention
    return build(cls, checkpoint_filter_fn, name, pretrained, defaults, kwargs)


@register_model
def vir_tiny(pretrained: bool = False, **kwargs) -> VisionRetention:
    """ViR-T/16: C 192, 3 heads, depth 12, MLP ratio 4, LayerScale 1e-5."""
    return _model("vir_tiny", pretrained, dict(embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vir_small(pretrained: bool = False, **kwargs) -> VisionRetention:
    """ViR-S/16: C 384, 6 heads, depth 12."""
    return _model("vir_small", pretrained, dict(embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vir_base(pretrained: bool = False, **kwargs) -> VisionRetention:
    """ViR-B/16: C 768, 12 heads, depth 12."""
    return _model("vir_base", pretrained, dict(embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def test_vir(pretrained: bool = False, **kwargs) -> VisionRetention:
    """Tiny test model = ``../shared/golden/vir_golden_small.json`` (64×64, patch 16, C 64, 2 heads, depth 2)."""
    return _model("test_vir", pretrained, dict(img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=10),
                  kwargs)


@register_model
def vir2d_tiny(pretrained: bool = False, **kwargs) -> VisionRetention2D:
    """ViR-T/16 with 2D retention: C 192, 3 heads, depth 12, average-pooled head."""
    return _model("vir2d_tiny", pretrained, dict(embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vir2d_small(pretrained: bool = False, **kwargs) -> VisionRetention2D:
    """ViR-S/16 with 2D retention: C 384, 6 heads, depth 12."""
    return _model("vir2d_small", pretrained, dict(embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vir2d_base(pretrained: bool = False, **kwargs) -> VisionRetention2D:
    """ViR-B/16 with 2D retention: C 768, 12 heads, depth 12."""
    return _model("vir2d_base", pretrained, dict(embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def test_vir2d(pretrained: bool = False, **kwargs) -> VisionRetention2D:
    """Tiny 2D-retention test model (64×64, patch 16, C 64, 2 heads, depth 2)."""
    return _model("test_vir2d", pretrained, dict(img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=10),
                  kwargs)
