"""Joint image/mask transforms for segmentation, built from torchvision v2 transforms and ``tv_tensors.Mask``.

The image is a ``tv_tensors.Image`` and the mask a ``tv_tensors.Mask``, so every geometric v2 transform moves both
the same way, resizes the mask with nearest-neighbour interpolation (labels are never blended) and leaves it alone
in photometric ones (``ToDtype`` of the image, ``Normalize``).

Training (the torchvision segmentation reference / mmseg recipe): random rescale by a factor in ``scale_range`` of
a base size, random crop to ``crop_size`` (padded where the rescaled image is smaller: image with 0, mask with
``ignore_index``, so padding never counts in loss or metrics), horizontal flip, ``ToDtype(float32, scale=True)``,
``Normalize(mean, std)``. Evaluation: whole image at its own size, only ``ToDtype`` + ``Normalize``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .dataset import DEFAULT_IGNORE_INDEX

__all__ = ["RandomRescale", "SegTransform", "build_seg_transform"]


def _pair(x: int | Sequence[int], what: str) -> tuple[int, int]:
    t = (x, x) if isinstance(x, int) else tuple(x)
    if len(t) != 2 or not all(isinstance(v, int) and v > 0 for v in t):
        raise ValueError(f"{what} must be a positive int or (height, width), got {x!r}")
    return t


class RandomRescale(v2.Transform):
    """Resize image and mask together by a random factor ``s ~ U(scale_range)`` of a base size, keeping the aspect
    ratio: the shorter side becomes ``round(s * base_size)``, or ``round(s * shorter side)`` when ``base_size`` is
    ``None`` (a scale of the image's own size). Images use bilinear interpolation (antialiased), masks nearest.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0), base_size: int | None = None):
        super().__init__()
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
        self.scale_range, self.base_size = tuple(scale_range), base_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        s = lo + float(torch.rand(())) * (hi - lo)
        short = max(1, round(s * (self.base_size or min(h, w))))
        size = (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short)
        return {"size": list(size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


class SegTransform:
    """``(image, mask) -> (image [3, H, W] float32 normalized, mask [H, W] int64)``; ``image`` a PIL RGB image or a
    uint8 tensor ``[3, H, W]``, ``mask`` a tensor or array ``[H, W]`` of class indices. ``pipeline`` is the v2
    ``Compose`` applied to ``(tv_tensors.Image, tv_tensors.Mask)``."""

    def __init__(self, pipeline: v2.Transform, ignore_index: int = DEFAULT_IGNORE_INDEX):
        self.pipeline, self.ignore_index = pipeline, ignore_index

    def __call__(self, image: Image.Image | torch.Tensor, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        img = tv_tensors.Image(TF.pil_to_tensor(image) if isinstance(image, Image.Image) else image)
        m = torch.as_tensor(mask)
        if m.dtype == torch.uint8 and not 0 <= self.ignore_index <= 255:  # room for the crop's padding value
            m = m.long()
        m = tv_tensors.Mask(m)
        img, m = self.pipeline(img, m)
        return img.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"SegTransform({self.pipeline})"


def build_seg_transform(
    is_training: bool,
    crop_size: int | Sequence[int] = 512,
    *,
    base_size: int | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> SegTransform:
    """Segmentation transform (see the module docstring).

    Args:
        is_training: random rescale + crop + flip if True; whole-image normalization only if False.
        crop_size: training crop, ``int`` or ``(height, width)``; ignored for evaluation.
        base_size: shorter side the rescale factor applies to (e.g. 512 for ADE20K-style 2048x512 scales);
            ``None``: each image's own shorter side. ``scale_range=(1, 1)`` with ``base_size=None`` disables it.
        hflip: probability of a horizontal flip.
        ignore_index: mask value of the crop's padding.
        mean, std: per-channel normalization of the [0, 1] image (default ImageNet's).

    Raises:
        ValueError: bad ``crop_size`` / ``scale_range``.
    """
    tail = [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(list(mean), list(std))]
    if not is_training:
        return SegTransform(v2.Compose(tail), ignore_index)
    crop = _pair(crop_size, "crop_size")
    steps = [] if tuple(scale_range) == (1, 1) and base_size is None else [RandomRescale(scale_range, base_size)]
    steps += [v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
              v2.RandomHorizontalFlip(hflip)]
    return SegTransform(v2.Compose(steps + tail), ignore_index)
