"""Torchvision compatibility shim, imported before timm.

The only torchvision wheel matching torch 2.13.0 is a CUDA build; on a CPU-only torch its import fails with
``RuntimeError: operator torchvision::nms does not exist`` because the C++ extension that would register the
``torchvision::nms``/``qnms`` operator schemas does not load. timm imports torchvision, so we:

1. try ``import torchvision``; a working install is returned untouched;
2. only on that exact RuntimeError, drop the half-imported ``torchvision*`` modules from ``sys.modules``,
   define the two schemas with ``torch.library.Library("torchvision", "DEF")`` (no kernels: detection ops stay
   unusable, nothing in linvision needs them), and import again.
"""
from __future__ import annotations

import sys

import torch

_LIB = None  # keeps the torch.library definitions alive for the life of the process


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` work on CPU torch. Returns True if the shim had to be applied."""
    global _LIB
    try:
        import torchvision  # noqa: F401
        return False
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
    return True


APPLIED = ensure_torchvision()
