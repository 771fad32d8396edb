"""Dense prediction (semantic segmentation) on any timm backbone — linvision's or timm's own — with the decoders
of segmentation-models-pytorch (smp).

smp's own timm encoder (``smp.UPerNet(encoder_name="tu-NAME")``) needs feature strides 4/8/16/32 (or 2/4/…/32);
a plain (single-scale) ViT-like backbone — Vision-RWKV, ViR, DeiT — has one stride (16), and ViT-ResNAS has
14/28/56, so smp rejects both with ``ValueError: Unsupported model downsampling pattern.`` Here:

* :class:`SimpleFeaturePyramid` — ViTDet's simple feature pyramid (Li et al., "Exploring Plain Vision
  Transformer Backbones for Object Detection", arXiv 2203.16527, Sec. 3 "Simple feature pyramid", Fig. 2c):
  finer levels by stride-2 transposed convs, coarser ones by max-pooling; generalised to extend a
  hierarchical backbone with fewer than four stages (ViT-ResNAS: one finer level, strides 7/14/28/56).
* :class:`DenseEncoder` — a timm model's ``forward_intermediates`` → four NCHW maps, each half the size of the
  previous one (or, for DPT on a plain backbone, four block outputs with their prefix tokens, as smp's
  ``TimmViTEncoder``).
* :func:`create_segmentation_model` — encoder + smp decoder (``UPerNetDecoder``, ``FPNDecoder`` or
  ``DPTDecoder``) + smp segmentation head; ``[B, 3, H, W] → [B, num_classes, H, W]`` for any H, W (the input is
  zero-padded bottom/right to the pyramid's coarsest stride and the logits, bilinearly resized to the padded
  size, are cropped back).

smp's ``smp.DPT(encoder_name="tu-vrwkv_tiny" / "tu-vir_tiny" / "tu-vir2d_tiny")`` works directly (inputs
multiples of 32), since those models have timm's ``forward_intermediates``.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.layers import LayerNorm2d
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.base.initialization import initialize_decoder, initialize_head
from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder, DPTSegmentationHead
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

__all__ = ["SimpleFeaturePyramid", "DenseEncoder", "SegmentationModel", "create_segmentation_model", "DECODERS"]

DECODERS = ("upernet", "fpn", "dpt")
NUM_LEVELS = 4  # smp's decoders take strides 4/8/16/32 (relative: each level half the size of the previous)


def _up_branch(dim: int, n: int) -> Tuple[nn.Module, int]:
    """``n`` 2×2 stride-2 transposed convs halving the channels, LayerNorm2d + GELU between (ViTDet)."""
    layers: List[nn.Module] = []
    for k in range(n):
        if k:
            layers += [LayerNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, max(dim // 2, 1), kernel_size=2, stride=2))
        dim = max(dim // 2, 1)
    return nn.Sequential(*layers), dim


class SimpleFeaturePyramid(nn.Module):
    """ViTDet simple feature pyramid, generalised to 1–4 input levels.

    From ``len(in_channels)`` maps whose sizes halve from one to the next (one map for a plain backbone),
    build ``num_up`` finer levels from the finest map (level k: k transposed convs 2×2/2, channels halved
    each, LayerNorm2d + GELU between) and ``num_down`` coarser ones from the coarsest map (level j: max-pool
    ``2^j``, stride ``2^j``), in ViTDet's layout for a stride-16 ViT: ``num_up=2, num_down=1`` → scales 4, 2,
    1, 1/2. With ``out_channels`` each level gets ViTDet's projection (1×1 conv + LN, 3×3 conv + LN, no bias);
    without, the levels keep their widths (smp's decoders have their own 1×1 lateral convs).

    Shapes: ``forward([B, C_i, h·2^-i, w·2^-i] ...) -> [num_up + L + num_down maps]``, finest first; the sizes
    halve exactly when the coarsest output side is an integer (pad the image to a multiple of the coarsest
    stride).
    """

    def __init__(self, in_channels: Sequence[int], num_up: int, num_down: int, out_channels: Optional[int] = None):
        super().__init__()
        if not in_channels or num_up < 0 or num_down < 0:
            raise ValueError(f"SimpleFeaturePyramid needs >= 1 input level and num_up, num_down >= 0; got "
                             f"{list(in_channels)}, {num_up}, {num_down}")
        self.num_up, self.num_down = num_up, num_down
        ups, chans = [], []
        for k in range(num_up, 0, -1):  # finest first
            branch, c = _up_branch(in_channels[0], k)
            ups.append(branch)
            chans.append(c)
        self.up = nn.ModuleList(ups)
        chans += list(in_channels) + [in_channels[-1]] * num_down
        self.proj = None
        if out_channels is not None:
            self.proj = nn.ModuleList([nn.Sequential(
                nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
                for c in chans])
            chans = [out_channels] * len(chans)
        self.out_channels: List[int] = chans

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        out = [up(features[0]) for up in self.up] + list(features)
        out += [F.max_pool2d(features[-1], 2 ** j, 2 ** j) for j in range(1, self.num_down + 1)]
        if self.proj is not None:
            out = [p(y) for p, y in zip(self.proj, out)]
        return out


def _create_backbone(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """``timm.create_model`` without a head; timm's fixed-size models (ViT, Swin) get ``dynamic_img_size=True``
    unless the caller set it (retried without for models that do not take it)."""
    kwargs = {"num_classes": 0, **kwargs}
    if "dynamic_img_size" not in kwargs:
        try:
            return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=pretrained, **kwargs)


class DenseEncoder(nn.Module):
    """A timm backbone as a dense-prediction encoder.

    Args:
        backbone: a timm model name (linvision's ``vrwkv_*``, ``vir_*``, ``vir2d_*``, ``vit_res*`` or timm's, e.g.
            ``deit_tiny_patch16_224``, ``swin_tiny_patch4_window7_224``); it must have ``forward_intermediates``.
        out_indices: blocks/stages to use (default: plain — the last block, or for ``dpt=True`` four blocks
            spread over the depth as smp's DPT; hierarchical — the last four stages).
        dpt: plain backbones give their four block outputs (same stride) and prefix tokens for smp's
            ``DPTDecoder``; hierarchical ones (and ``dpt=False``) give the four pyramid levels.
        pyramid_channels: optional common width of the pyramid levels (:class:`SimpleFeaturePyramid`).
        pretrained, **backbone_kwargs: passed to ``timm.create_model``.

    Attributes: ``out_channels`` (per returned map), ``strides`` (nominal output strides for the decoder:
    4/8/16/32 for the pyramid, the backbone's for DPT on a plain backbone), ``size_multiple`` (pad input sides to
    a multiple of it), ``has_prefix_tokens``.

    Raises:
        ValueError: a backbone without ``forward_intermediates``, or whose feature strides neither are all equal
            nor double from stage to stage; DPT on a plain backbone whose stride is not a power of 2.
    """

    def __init__(self, backbone: str, out_indices: Optional[Sequence[int]] = None, dpt: bool = False,
                 pyramid_channels: Optional[int] = None, pretrained: bool = False, **backbone_kwargs: Any):
        super().__init__()
        model = _create_backbone(backbone, pretrained, backbone_kwargs)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
            raise ValueError(f"backbone {backbone!r} has no forward_intermediates/prune_intermediate_layers "
                             "(timm's feature API): it cannot be used for dense prediction")
        info = list(model.feature_info)
        strides = [int(d["reduction"]) for d in info]
        self.plain = len(set(strides)) == 1
        if not self.plain and any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"backbone {backbone!r}: feature strides {strides} are neither all equal nor doubling")
        n = len(info)
        self.dpt_plain = dpt and self.plain
        if out_indices is None:
            if self.dpt_plain:  # as smp's sample_block_indices_uniformly
                out_indices = [int(n / NUM_LEVELS * k) - 1 for k in range(1, NUM_LEVELS + 1)]
            else:
                out_indices = [n - 1] if self.plain else list(range(max(0, n - NUM_LEVELS), n))
        self.out_indices = model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.model = model
        self.has_prefix_tokens = self.dpt_plain and getattr(model, "num_prefix_tokens", 0) > 0
        in_chs, in_strides = [info[i]["num_chs"] for i in self.out_indices], [strides[i] for i in self.out_indices]
        self.pyramid = None
        if self.dpt_plain:
            s = in_strides[0]
            if s & (s - 1):
                raise ValueError(f"DPT on plain backbone {backbone!r} needs a power-of-2 patch stride, got {s}")
            self.out_channels, self.strides = in_chs, in_strides
            self.size_multiple = max(s, 32)  # smp's DPT reassembles to strides 4..32
            return
        if len(self.out_indices) > NUM_LEVELS or (not self.plain and
                                                  any(b != 2 * a for a, b in zip(in_strides, in_strides[1:]))):
            raise ValueError(f"backbone {backbone!r}: out_indices {list(out_indices)} must pick 1-{NUM_LEVELS} "
                             "consecutive stages (or one block of a plain backbone)")
        if self.plain and len(self.out_indices) != 1:
            raise ValueError(f"plain backbone {backbone!r}: the pyramid is built from one block; got out_indices "
                             f"{list(out_indices)} (use dpt=True for several blocks)")
        missing = NUM_LEVELS - len(in_chs)
        num_up = min(missing, max(0, round(math.log2(in_strides[0] / 4))))
        self.pyramid = SimpleFeaturePyramid(in_chs, num_up, missing - num_up, pyramid_channels)
        self.out_channels = self.pyramid.out_channels
        self.strides = [4, 8, 16, 32]
        self.size_multiple = in_strides[-1] * 2 ** (missing - num_up)

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """``[B, C, H, W]`` (sides multiples of ``size_multiple``) → (maps finest first, prefix tokens or None)."""
        feats = self.model.forward_intermediates(x, indices=self.out_indices, norm=False, output_fmt="NCHW",
                                                 intermediates_only=True,
                                                 **({"return_prefix_tokens": True} if self.has_prefix_tokens else {}))
        if self.has_prefix_tokens:
            return [f for f, _ in feats], [p for _, p in feats]
        if self.pyramid is not None:
            feats = self.pyramid(feats)
        return list(feats), [None] * len(feats)


class SegmentationModel(nn.Module):
    """:class:`DenseEncoder` + smp decoder + smp segmentation head; ``forward([B, C, H, W]) -> [B, K, H, W]``
    logits for any H, W: zero-pads bottom/right to ``encoder.size_multiple``, resizes the head's logits
    bilinearly to the padded size and crops them to H × W."""

    def __init__(self, encoder: DenseEncoder, decoder: nn.Module, head: nn.Module, kind: str):
        super().__init__()
        self.encoder, self.decoder, self.segmentation_head, self.kind = encoder, decoder, head, kind
        initialize_decoder(self.decoder)  # smp's inits (as its SegmentationModel.initialize)
        initialize_head(self.segmentation_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        m = self.encoder.size_multiple
        xp = F.pad(x, (0, -W % m, 0, -H % m))
        feats, prefix = self.encoder(xp)
        if self.kind == "dpt":
            y = self.decoder(feats, prefix)
        else:  # smp's layout: [image, stride-2 placeholder, stride 4, 8, 16, 32]
            y = self.decoder([xp, xp.new_empty(0)] + feats)
        y = self.segmentation_head(y)
        y = F.interpolate(y, size=xp.shape[-2:], mode="bilinear", align_corners=False)
        return y[..., :H, :W]


def create_segmentation_model(backbone: str, decoder: str = "upernet", num_classes: int = 1,
                              decoder_channels: int = 64, pyramid_channels: Optional[int] = None,
                              out_indices: Optional[Sequence[int]] = None, pretrained: bool = False,
                              dpt_readout: Optional[str] = None, **backbone_kwargs: Any) -> SegmentationModel:
    """A segmentation model: timm ``backbone`` → (simple feature pyramid) → smp ``decoder`` → smp head.

    Args:
        backbone: timm model name (linvision or timm; see :class:`DenseEncoder`).
        decoder: ``'upernet'`` (smp ``UPerNetDecoder``, width ``decoder_channels``), ``'fpn'`` (smp
            ``FPNDecoder``, pyramid and segmentation widths ``decoder_channels``, a multiple of 32 for its
            GroupNorm) or ``'dpt'`` (smp ``DPTDecoder``, fusion width ``decoder_channels``, reassemble widths
            ``(1, 2, 4, 4) × decoder_channels`` as smp's default ratios).
        num_classes: K output channels (logits).
        decoder_channels: decoder width (smp's defaults are 256; 64–128 suit CPU).
        pyramid_channels: optional ViTDet projection width of the pyramid levels.
        out_indices: backbone blocks/stages used (see :class:`DenseEncoder`).
        pretrained: load the backbone's weights (timm; for linvision pass ``pretrained_cfg_overlay=dict(file=...)``).
        dpt_readout: DPT prefix-token readout ``'cat'``/``'add'``/``'ignore'`` (default: ``'cat'`` when the
            backbone has a class token and DPT uses its blocks directly, else ``'ignore'``).
        **backbone_kwargs: passed to ``timm.create_model`` (e.g. ``patch_size=8``, ``mode='chunkwise'``).

    Returns:
        :class:`SegmentationModel`: ``[B, in_chans, H, W] → [B, num_classes, H, W]`` float logits.

    Raises:
        ValueError: an unknown decoder, a bad width, or a backbone unusable for dense prediction.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder_channels < 1 or (decoder == "fpn" and decoder_channels % 32):
        raise ValueError(f"decoder_channels must be >= 1 (a multiple of 32 for 'fpn'), got {decoder_channels}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    enc = DenseEncoder(backbone, out_indices, dpt=decoder == "dpt", pyramid_channels=pyramid_channels,
                       pretrained=pretrained, **backbone_kwargs)
    c = decoder_channels
    if decoder == "upernet":
        dec = UPerNetDecoder([3, 0] + enc.out_channels, encoder_depth=5, decoder_channels=c)
        head = SegmentationHead(c, num_classes, kernel_size=1, upsampling=1)
    elif decoder == "fpn":
        dec = FPNDecoder([3, 0] + enc.out_channels, encoder_depth=5, pyramid_channels=c, segmentation_channels=c)
        head = SegmentationHead(dec.out_channels, num_classes, kernel_size=1, upsampling=1)
    else:
        readout = dpt_readout or ("cat" if enc.has_prefix_tokens else "ignore")
        dec = DPTDecoder(enc.out_channels, enc.strides, enc.has_prefix_tokens, readout,
                         intermediate_channels=(c, 2 * c, 4 * c, 4 * c), fusion_channels=c)
        head = DPTSegmentationHead(c, num_classes, kernel_size=3, upsampling=1)
    return SegmentationModel(enc, dec, head, decoder)


def complexity(model: nn.Module, size: Tuple[int, int] = (360, 480), in_chans: int = 3) -> dict:
    """Parameters and forward GMACs of ``model`` on one ``[1, in_chans, *size]`` input (``torch.utils.flop_counter``
    via :func:`linvision.bench.count_flops`, MACs = FLOPs / 2; counted, not timed). Runs one forward in eval mode."""
    from .bench import count_flops
    was_training = model.training
    model.eval()
    with torch.no_grad():
        flops = count_flops(lambda: model(torch.zeros(1, in_chans, *size)))
    model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()), "gmacs": flops / 2e9}
