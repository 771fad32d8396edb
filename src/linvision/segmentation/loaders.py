"""Data loaders for segmentation, on the classification loaders' machinery (:class:`linvision.data.SeededSampler`,
own-generator ``DataLoader``, unreadable samples dropped)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

from ..data import SeededSampler, default_workers
from ..errors import LinvisionError
from .dataset import SegMeta, SegmentationDataset, load_meta, resolve_seg_root, seg_split_dir
from .transforms import build_seg_transform

__all__ = ["SegCollate", "build_seg_train_loader", "build_seg_eval_loader", "build_seg_loaders"]


class SegCollate:
    """Collate ``(image [3, H, W], mask [H, W])`` samples into ``([B, 3, H, W], [B, H, W])``, dropping ``None``
    (unreadable) samples (``None`` if none is left). Samples of different sizes are padded at the bottom/right to
    the largest: images with 0, masks with ``ignore_index`` (so padding never counts in loss or metrics)."""

    def __init__(self, ignore_index: int):
        self.ignore_index = ignore_index

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
        batch = [b for b in batch if b is not None]
        if not batch:
            return None
        sizes = {tuple(img.shape[-2:]) for img, _ in batch}
        if len(sizes) == 1:
            return default_collate(batch)
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        imgs = [F.pad(img, (0, w - img.shape[-1], 0, h - img.shape[-2])) for img, _ in batch]
        masks = [F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2]), value=self.ignore_index) for _, m in batch]
        return torch.stack(imgs), torch.stack(masks)


def _loader(ds: SegmentationDataset, batch_size: int, sampler, num_workers: int | None, drop_last: bool,
            seed: int = 0) -> DataLoader:
    workers = default_workers() if num_workers is None else num_workers
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=SegCollate(ds.ignore_index), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed))


def build_seg_train_loader(
    root: str | Path,
    batch_size: int,
    crop_size: int | Sequence[int],
    *,
    meta: SegMeta | None = None,
    base_size: int | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    num_workers: int | None = None,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    **transform_kwargs,
) -> DataLoader:
    """Shuffled, augmented loader over ``root/train`` yielding ``(images [B, 3, crop_h, crop_w] float32, masks
    [B, crop_h, crop_w] int64)``. ``loader.sampler`` is a :class:`~linvision.data.SeededSampler` (call
    ``set_epoch(e)`` each epoch; ``num_replicas``/``rank`` shard it for DDP); ``loader.dataset.meta`` is the label
    set. The last incomplete batch is dropped when a full one exists. Extra keyword arguments (``hflip``, ``mean``,
    ``std``) go to :func:`build_seg_transform`."""
    meta = meta or load_meta(resolve_seg_root(root))
    tf = build_seg_transform(True, crop_size, base_size=base_size, scale_range=scale_range,
                             ignore_index=meta.ignore_index, **transform_kwargs)
    ds = SegmentationDataset(root, "train", tf, meta=meta)
    sampler = SeededSampler(range(len(ds)), seed, num_replicas=num_replicas, rank=rank)
    return _loader(ds, batch_size, sampler, num_workers, drop_last=sampler.num_samples >= batch_size, seed=seed)


def build_seg_eval_loader(
    root: str | Path,
    batch_size: int = 1,
    *,
    split: str = "eval",
    meta: SegMeta | None = None,
    num_workers: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    **transform_kwargs,
) -> DataLoader:
    """Ordered loader of whole, normalized images of ``split`` (``"eval"``: test, else val) yielding ``(images
    [B, 3, H, W], masks [B, H, W] int64)`` (mixed sizes padded, see :class:`SegCollate`). With ``num_replicas`` > 1
    rank ``r`` loads images ``r, r + num_replicas, ...``: each image once over all ranks, so the ranks' confusion
    matrices sum to the data set's (:class:`~linvision.segmentation.SegmentationMetrics` does that)."""
    meta = meta or load_meta(resolve_seg_root(root))
    tf = build_seg_transform(False, ignore_index=meta.ignore_index, **transform_kwargs)
    ds = SegmentationDataset(root, split, tf, meta=meta)
    sampler = range(rank, len(ds), num_replicas) if num_replicas > 1 else None
    return _loader(ds, batch_size, sampler, num_workers, drop_last=False)


def build_seg_loaders(root: str | Path, batch_size: int, crop_size: int | Sequence[int], *,
                      eval_batch_size: int = 1, eval_split: str | None = None, num_workers: int | None = None,
                      num_replicas: int = 1, rank: int = 0, **train_kwargs) -> tuple[DataLoader, DataLoader, SegMeta]:
    """``(train_loader, eval_loader, meta)`` sharing one label set (from ``classes.json`` or the train masks).
    ``eval_split`` defaults to ``val`` (model choice during training; report ``test`` with the eval command), or
    ``test`` when there is no val split."""
    root = resolve_seg_root(root)
    if eval_split is None:
        try:
            seg_split_dir(root, "val")
            eval_split = "val"
        except LinvisionError:
            eval_split = "test"
    meta = train_kwargs.pop("meta", None) or load_meta(root)
    train = build_seg_train_loader(root, batch_size, crop_size, meta=meta, num_workers=num_workers,
                                   num_replicas=num_replicas, rank=rank, **train_kwargs)
    ev = build_seg_eval_loader(root, eval_batch_size, split=eval_split, meta=meta, num_workers=num_workers,
                               num_replicas=num_replicas, rank=rank)
    return train, ev, meta
