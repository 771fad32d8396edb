"""Semantic-segmentation metrics: per-class IoU, mIoU, pixel accuracy, per-class and mean accuracy.

All of them come from one K x K confusion matrix accumulated by torchmetrics'
``MulticlassConfusionMatrix`` (pixels whose target is ``ignore_index`` are left out), so that summing it over
batches and over DDP ranks (torchmetrics all-reduces its state at ``compute()`` when ``torch.distributed`` is
initialized; a single process needs nothing) gives exactly the data set's numbers. Definitions as in mmseg's
``IoUMetric`` and Long et al. 2015 (FCN), Sec. 5: with ``C[t, p]`` the count of pixels of true class t predicted p,

- ``IoU_k = C[k, k] / (sum_p C[k, p] + sum_t C[t, k] - C[k, k])`` (NaN if class k is neither in target nor in
  prediction), ``mIoU`` = mean over classes with a defined IoU;
- pixel accuracy ``aAcc = trace(C) / sum(C)``; class accuracy ``Acc_k = C[k, k] / sum_p C[k, p]`` (NaN if class k
  is absent from the target), ``mAcc`` = mean over defined ones.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from torchmetrics.classification import MulticlassConfusionMatrix

__all__ = ["SegmentationMetrics", "metrics_from_confusion"]


def metrics_from_confusion(confmat: torch.Tensor) -> dict[str, Any]:
    """Metrics of a confusion matrix ``[K, K]`` (rows: target, columns: prediction).

    Returns:
        ``{"miou", "acc", "macc", "score"}`` as floats (fractions in [0, 1]; ``score`` = ``miou``; NaN when nothing
        was counted) and ``"iou"``, ``"class_acc"``: lists of K floats (NaN for undefined classes).
    """
    c = confmat.double()
    tp, gt, pred = c.diagonal(), c.sum(1), c.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
    cls_acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.nan)
    total = c.sum()
    miou, macc = (float(v.nanmean()) if (~v.isnan()).any() else math.nan for v in (iou, cls_acc))
    return {"miou": miou, "acc": float(tp.sum() / total) if total > 0 else math.nan, "macc": macc,
            "iou": iou.tolist(), "class_acc": cls_acc.tolist(), "score": miou}


class SegmentationMetrics:
    """Accumulates a confusion matrix over batches (and DDP ranks) and reports mIoU & co.

    Args:
        num_classes: K.
        ignore_index: target label left out of every metric (``None``: none).
        device: where the ``[K, K]`` int64 state lives (that of the predictions).

    ``update(preds, target)``: ``preds`` logits ``[B, K, H, W]`` (arg-maxed over K) or labels ``[B, H, W]``;
    ``target`` labels ``[B, H, W]`` int in ``[0, K)`` or ``ignore_index`` (other values are not checked here —
    the data set checks them — and would corrupt the counts). ``compute()`` returns
    :func:`metrics_from_confusion`'s dict, summed over ranks when ``torch.distributed`` is initialized (every
    rank must call it). ``reset()`` clears the counts.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, device: str | torch.device = "cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False).to(device)

    @torch.no_grad()
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.ndim == target.ndim + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"logits have {preds.shape[1]} channels, expected num_classes={self.num_classes}")
            preds = preds.argmax(1)
        if preds.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} differs from target shape {tuple(target.shape)}")
        self.confmat.update(preds, target.to(preds.device))

    def confusion(self) -> torch.Tensor:
        """The ``[K, K]`` int64 confusion matrix so far (synced across ranks; zeros before any update)."""
        with warnings.catch_warnings():  # a rank may have had no batch: its zeros still take part in the sum
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
            return self.confmat.compute()

    def compute(self) -> dict[str, Any]:
        return metrics_from_confusion(self.confusion())

    def reset(self) -> None:
        self.confmat.reset()

    def to(self, device: str | torch.device) -> "SegmentationMetrics":
        self.confmat = self.confmat.to(device)
        return self
