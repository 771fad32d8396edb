"""MACs of ViT-ResNAS networks: measured with ``torch.utils.flop_counter`` and an analytic estimator.

MACs (multiply-accumulates) = FLOPs / 2 of the matrix products and convolutions, the convention of the paper
and of the official estimator (``network_utils/compute_flop_mac.py``): normalization, softmax, activations,
pooling, biases and residual adds are not counted. :func:`count_macs` runs the model once under
``FlopCounterMode`` with the *math* attention backend (the fused CPU attention kernel is invisible to the flop
counter); :func:`analytic_macs` gives the same number from the architecture alone, in microseconds, for search.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..models.resnas import PATCH_SIZE, check_size, normalize_arch

__all__ = ["count_macs", "analytic_macs", "parse_macs"]


@torch.no_grad()
def count_macs(model: torch.nn.Module, input_size: Union[int, Sequence[int]] = 224, in_chans: int = 3) -> int:
    """MACs of one forward pass of ``model`` (eval mode, batch 1) on a ``[1, in_chans, H, W]`` input, counted by
    ``torch.utils.flop_counter`` (FLOPs / 2; attention through the math backend so that its matmuls count)."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)[-2:]
    p = next(iter(model.parameters()), None)
    x = torch.zeros(1, in_chans, h, w, device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None else None)
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def analytic_macs(arch: Dict[str, Any], img_size: Union[int, Tuple[int, int]] = 224, num_classes: int = 1000,
                  in_chans: int = 3, stem_chans: Optional[int] = None, normalized: bool = False) -> int:
    """MACs of the ViT-ResNAS network ``arch`` (blocks with ``present=False`` cost nothing) at ``img_size``.

    Per block with ``n`` tokens, width ``C``, attention width ``A = heads·head_dim`` and MLP hidden ``M``:
    ``qkv n·C·3A + scores n²·A + weighted sum n²·A + proj n·A·C + MLP 2·n·C·M``; stem convolutions; each
    residual spatial reduction ``(h/2·w/2)·9·C_in·C_out`` (conv) ``+ C_in·C_out`` (class token); head ``C3·classes``.
    Equals :func:`count_macs` of the built network (tested). ``stem_chans``: default the arch's, else 24.
    ``normalized=True`` skips re-validating ``arch``.
    """
    if not normalized:
        arch = normalize_arch(arch)
    stem_chans = stem_chans or arch.get("stem_chans", 24)
    H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    check_size(H, W, "img_size")
    h2, w2 = (H + 1) // 2, (W + 1) // 2                  # conv1: 3x3 stride 2 pad 1
    macs = h2 * w2 * 9 * stem_chans * (in_chans + 2 * stem_chans)
    gh, gw = H // PATCH_SIZE, W // PATCH_SIZE
    dims = arch["dims"]
    macs += gh * gw * 49 * stem_chans * dims[0]          # conv_proj 7x7 stride 7
    for s, C in enumerate(dims):
        if s > 0:
            gh, gw = gh // 2, gw // 2
            macs += gh * gw * 9 * dims[s - 1] * C + dims[s - 1] * C
        n = gh * gw + 1
        d = arch["head_dims"][s]
        for h, m, p in zip(arch["heads"][s], arch["mlp"][s], arch["present"][s]):
            if p:
                A = h * d
                macs += n * C * 4 * A + 2 * n * n * A + 2 * n * C * m
    return macs + dims[-1] * num_classes


def parse_macs(text: str | float) -> float:
    """``"1.79G"``, ``"850M"``, ``"2e9"`` → MACs. Raises ValueError."""
    s = str(text).strip().upper()
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(s[-1:], 1)
    try:
        v = float(s[:-1] if scale != 1 else s) * scale
    except ValueError:
        raise ValueError(f"cannot read a MACs value from {text!r} (e.g. 1.79G, 850M, 2e9)") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"a MACs budget must be a positive finite number, got {text!r}")
    return v
