"""Semantic segmentation: data sets of image/mask pairs, joint augmentation, mIoU metrics, whole-image and
sliding-window inference, and mask pictures. Models (backbone + decoder) live elsewhere; anything here works with
any ``model: [B, 3, H, W] -> logits [B, K, H, W]``.
"""
from .dataset import (DEFAULT_IGNORE_INDEX, META_FILE, SegMeta, SegmentationDataset, load_meta, read_mask,
                      resolve_seg_root, seg_split_dir)
from .inference import predict_slide, predict_whole, window_starts
from .loaders import SegCollate, build_seg_eval_loader, build_seg_loaders, build_seg_train_loader
from .metrics import SegmentationMetrics, metrics_from_confusion
from .transforms import RandomRescale, SegTransform, build_seg_transform
from .visualize import colorize, default_palette, denormalize, overlay, save_color_mask, save_side_by_side

__all__ = [
    "DEFAULT_IGNORE_INDEX", "META_FILE", "SegMeta", "SegmentationDataset", "load_meta", "read_mask",
    "resolve_seg_root", "seg_split_dir", "predict_slide", "predict_whole", "window_starts", "SegCollate",
    "build_seg_eval_loader", "build_seg_loaders", "build_seg_train_loader", "SegmentationMetrics",
    "metrics_from_confusion", "RandomRescale", "SegTransform", "build_seg_transform", "colorize", "default_palette",
    "denormalize", "overlay", "save_color_mask", "save_side_by_side",
]
