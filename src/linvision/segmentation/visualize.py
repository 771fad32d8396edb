"""Pictures of segmentation masks: colour masks and image | overlay | ground-truth strips, written as PNG.

Files are written atomically (:func:`linvision.checkpoint.atomic_write`). Colour masks are saved as palette ("P")
PNGs when every label fits in 8 bits, so the file both shows the colours and still holds the class indices
(``read_mask`` / the data set read it back unchanged); otherwise as RGB.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..checkpoint import atomic_write

__all__ = ["default_palette", "colorize", "save_color_mask", "overlay", "save_side_by_side", "denormalize",
           "IGNORE_COLOR"]

IGNORE_COLOR = (0, 0, 0)  # ignored pixels in colour masks; left as the image in overlays
GAP = 4  # white pixels between the panels of a side-by-side picture


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """``num_classes`` distinct colours: the PASCAL VOC colour map (bits of the class index spread over the high
    bits of R, G, B; Everingham et al. 2010, VOCdevkit ``labelcolormap``) without its class 0 black (kept for
    ignored pixels), i.e. class k gets VOC colour k + 1."""
    out = []
    for k in range(1, num_classes + 1):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def _labels(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    a = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if a.ndim != 2:
        raise ValueError(f"mask must be [H, W] class indices, got shape {a.shape}")
    return a.astype(np.int64)


def _lut(palette: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """``[max(n, len(palette)), 3]`` uint8 table: the palette's colours, then IGNORE_COLOR."""
    lut = np.tile(np.array(IGNORE_COLOR, np.uint8), (max(n, len(palette)), 1))
    lut[:len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    return lut


def colorize(mask: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]] | None = None,
             num_classes: int | None = None) -> np.ndarray:
    """Colour image ``[H, W, 3]`` uint8 of a class-index mask ``[H, W]``: class k gets ``palette[k]`` (default
    :func:`default_palette` of ``num_classes``, or of 1 + the largest label), any label without a colour
    (e.g. ``ignore_index``) :data:`IGNORE_COLOR`.

    Raises:
        ValueError: the mask is not 2-D or has negative labels.
    """
    a = _labels(mask)
    if a.size and a.min() < 0:
        raise ValueError(f"mask has negative label {int(a.min())}")
    top = int(a.max(initial=-1)) + 1
    k = num_classes or (len(palette) if palette is not None else top)
    return _lut(palette if palette is not None else default_palette(k), top)[a]


def save_color_mask(path: str | Path, mask: torch.Tensor | np.ndarray,
                    palette: Sequence[Sequence[int]] | None = None, num_classes: int | None = None) -> Path:
    """Write :func:`colorize`'s picture of ``mask`` ``[H, W]`` to the PNG ``path`` (palette PNG holding the class
    indices when all labels are < 256, else RGB) atomically; returns ``path``."""
    a = _labels(mask)
    if a.size and 0 <= a.min() and a.max() < 256:
        k = num_classes or (len(palette) if palette is not None else int(a.max()) + 1)
        lut = _lut(palette if palette is not None else default_palette(k), 256)
        im = Image.fromarray(a.astype(np.uint8), "P")
        im.putpalette(lut[:256].reshape(-1).tolist())
    else:
        im = Image.fromarray(colorize(a, palette, num_classes), "RGB")
    return _write_png(path, im)


def _write_png(path: str | Path, im: Image.Image) -> Path:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return Path(path)


def denormalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                std: Sequence[float] = IMAGENET_DEFAULT_STD) -> np.ndarray:
    """Normalized float image ``[3, H, W]`` (as the eval transform makes it) → uint8 ``[H, W, 3]``."""
    x = image.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()


def _rgb(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        return denormalize(image) if image.is_floating_point() else image.permute(1, 2, 0).cpu().numpy()
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {a.dtype} {a.shape}")
    return a


def overlay(image: Image.Image | np.ndarray | torch.Tensor, mask: torch.Tensor | np.ndarray,
            palette: Sequence[Sequence[int]] | None = None, num_classes: int | None = None,
            alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colour mask`` as uint8 ``[H, W, 3]``; pixels whose label has no colour
    (labels ≥ the palette/``num_classes``, e.g. ``ignore_index``) show the plain image. ``image``: PIL, uint8
    ``[H, W, 3]`` array, uint8 ``[3, H, W]`` tensor or a normalized float tensor (see :func:`denormalize`)."""
    img, a = _rgb(image), _labels(mask)
    if img.shape[:2] != a.shape:
        raise ValueError(f"image {img.shape[:2]} and mask {a.shape} differ in size")
    k = num_classes or (len(palette) if palette is not None else int(a.max(initial=-1)) + 1)
    col = colorize(a, palette, k).astype(np.float32)
    out = img.astype(np.float32)
    has_colour = (a >= 0) & (a < k)
    out[has_colour] = (1 - alpha) * out[has_colour] + alpha * col[has_colour]
    return (out + 0.5).astype(np.uint8)


def save_side_by_side(path: str | Path, image: Image.Image | np.ndarray | torch.Tensor,
                      pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray | None = None,
                      palette: Sequence[Sequence[int]] | None = None, num_classes: int | None = None,
                      alpha: float = 0.5) -> Path:
    """Write ``image | overlay(pred) | overlay(target)`` (the last panel only with ``target``), panels ``H x W``
    separated by :data:`GAP` white pixels, to the PNG ``path`` atomically; returns ``path``. Picture size:
    ``W * n + GAP * (n - 1)`` by ``H`` with ``n`` = 2 or 3 panels."""
    img = _rgb(image)
    panels = [img, overlay(img, pred, palette, num_classes, alpha)]
    if target is not None:
        panels.append(overlay(img, target, palette, num_classes, alpha))
    h, w = img.shape[:2]
    canvas = np.full((h, w * len(panels) + GAP * (len(panels) - 1), 3), 255, np.uint8)
    for i, p in enumerate(panels):
        canvas[:, i * (w + GAP):i * (w + GAP) + w] = p
    return _write_png(path, Image.fromarray(canvas, "RGB"))
