"""Segmentation inference on whole images or by overlapping sliding windows.

``predict_slide`` follows mmseg's ``EncoderDecoder.slide_inference`` (mmsegmentation, ``mmseg/models/segmentors/
encoder_decoder.py``): windows of ``window`` size every ``stride`` pixels, the last row/column of windows shifted
back to end at the image border, each window's logits added into a full-size sum, then divided by the number of
windows that covered each pixel.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["predict_whole", "predict_slide", "window_starts"]


def _pair(x: int | Sequence[int], what: str) -> tuple[int, int]:
    t = (x, x) if isinstance(x, int) else tuple(x)
    if len(t) != 2 or not all(isinstance(v, int) and v > 0 for v in t):
        raise ValueError(f"{what} must be a positive int or (height, width), got {x!r}")
    return t


def _logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if out.ndim != 4 or out.shape[0] != x.shape[0]:
        raise ValueError(f"a segmentation model must map [B, 3, H, W] to logits [B, K, H, W]; got "
                         f"{tuple(out.shape)} for input {tuple(x.shape)}")
    if out.shape[-2:] != x.shape[-2:]:  # decoders at a lower stride: upsample as mmseg's resize does
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out


@torch.no_grad()
def predict_whole(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """Logits of whole images: ``image`` ``[B, 3, H, W]`` (or ``[3, H, W]``), any H, W the model accepts →
    ``[B, K, H, W]`` (or ``[K, H, W]``), float as the model returns it. A lower-resolution output is upsampled
    bilinearly to ``H x W``. Put the model in eval mode first.

    Raises:
        ValueError: the model's output is not ``[B, K, h, w]``.
    """
    single = image.ndim == 3
    out = _logits(model, image[None] if single else image)
    return out[0] if single else out


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of length ``size`` (mmseg's grid: ``max(size - window +
    stride - 1, 0) // stride + 1`` windows at ``i * stride``, each moved back to end by ``size``; a window
    longer than the axis covers it once from 0)."""
    n = max(size - window + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + window, size) - window, 0) for i in range(n)})


@torch.no_grad()
def predict_slide(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int,
    *,
    batch_windows: int = 8,
) -> torch.Tensor:
    """Sliding-window logits ``[B, K, H, W]`` of ``image`` ``[B, 3, H, W]`` (or ``[K, H, W]`` of ``[3, H, W]``).

    Args:
        model: ``[b, 3, h, w] -> [b, K, h, w]`` logits (eval mode).
        window: ``(h, w)`` window size (or one int); an image smaller than it is one window of its own size.
        stride: ``(h, w)`` step between windows; ``stride < window`` overlaps them (mmseg's default:
            ``window = 2/3 .. 1 x`` training crop, ``stride = window * 2/3``).
        num_classes: K (the output's channels).
        batch_windows: windows passed to the model at once (memory vs speed); the result does not depend on it.

    Every pixel is covered at least once. The sum of overlapping windows' logits is divided by their count, so a
    model whose output at a pixel depends only on that pixel (e.g. a 1x1 conv) gives exactly ``predict_whole``.

    Raises:
        ValueError: bad window/stride (``stride > window`` would leave pixels uncovered), or model outputs with
            other than K channels.
    """
    (wh, ww), (sh, sw) = _pair(window, "window"), _pair(stride, "stride")
    if sh > wh or sw > ww:
        raise ValueError(f"stride {(sh, sw)} larger than window {(wh, ww)} would leave pixels uncovered")
    single = image.ndim == 3
    x = image[None] if single else image
    b, _, h, w = x.shape
    wh, ww = min(wh, h), min(ww, w)
    boxes = [(y, xx) for y in window_starts(h, wh, sh) for xx in window_starts(w, ww, sw)]
    logits = count = None
    for i in range(0, len(boxes), max(1, batch_windows)):
        chunk = boxes[i:i + max(1, batch_windows)]
        crops = torch.cat([x[:, :, y:y + wh, xx:xx + ww] for y, xx in chunk])  # [len(chunk) * B, 3, wh, ww]
        out = _logits(model, crops)
        if out.shape[1] != num_classes:
            raise ValueError(f"model returned {out.shape[1]} channels, expected num_classes={num_classes}")
        if logits is None:
            logits = x.new_zeros((b, num_classes, h, w), dtype=out.dtype)
            count = x.new_zeros((1, 1, h, w), dtype=out.dtype)
        for j, (y, xx) in enumerate(chunk):
            logits[:, :, y:y + wh, xx:xx + ww] += out[j * b:(j + 1) * b]
            count[:, :, y:y + wh, xx:xx + ww] += 1
    logits = logits / count
    return logits[0] if single else logits
