"""Whether the Triton kernels (:mod:`.biwkv_triton`, :mod:`.retention_triton`) may be used.

Nothing here imports Triton: the ops ask :func:`triton_enabled` only on their CUDA branch and import the kernel
modules lazily, so CPU users never load Triton. ``LINVISION_TRITON=0`` in the environment forces the plain-PyTorch
forms on CUDA too (for comparisons and as an escape hatch).
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["triton_enabled", "triton_importable"]


_IMPORTABLE = importlib.util.find_spec("triton") is not None  # checked once, at import, without importing it


def triton_importable() -> bool:
    """True when ``import triton`` would find a package."""
    return _IMPORTABLE


def triton_enabled(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on CUDA and not float64, Triton is installed, and ``LINVISION_TRITON`` is not
    ``0`` — the condition for the ops to take their Triton path (float64 stays on the PyTorch path: the
    kernels compute in float32)."""
    if not all(t.is_cuda and t.dtype != torch.float64 for t in tensors):  # first: CPU calls skip the lookup
        return False
    return os.environ.get("LINVISION_TRITON", "1") != "0" and _IMPORTABLE
