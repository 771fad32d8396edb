"""Small helpers shared by the ops."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["needs_grad"]


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """True when autograd is on and any of ``tensors`` (``None`` entries skipped) requires grad: an op must then
    keep what its backward needs (no in-place reuse of its temporaries, no inference-only kernel)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
