"""Multi-scale retention layer of ViR (Hatamizadeh et al., arXiv 2310.19731, Sec. 3.1), softmax-free and causal."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..ops.retention import decay_gammas, retention_parallel

__all__ = ["MultiScaleRetention"]


class MultiScaleRetention(nn.Module):
    """``out_proj(norm(Retention(q, k, v)))`` with a single biased ``qkv`` Linear and per-head decay γ_h.

    q is scaled by ``head_dim ** -0.5``; γ_h = 1 - exp(linspace(log 1/32, log 1/512, H)) (a non-persistent
    float32 buffer, not a parameter). ``norm`` is an optional per-head RMSNorm of the retention output
    (``retention_norm=True``; per token, so every form of retention stays equivalent); off for the authors'
    variant.

    Args:
        dim: channels C (``num_heads`` must divide it).
        num_heads: heads H.
        retention_norm: per-head RMSNorm on the retention output.
        retention_fn: the retention form ``(q, k, v, gamma, scale) -> (o, state)`` with fla's
            ``[B, T, H, K]`` layout (default :func:`linvision.ops.retention_parallel`).

    Shapes: ``[B, T, C]`` in and out.
    """

    def __init__(self, dim: int, num_heads: int = 8, retention_norm: bool = False,
                 retention_fn: Callable = retention_parallel):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.retention_fn = retention_fn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-6) if retention_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim, bias=True)
        self.register_buffer("gamma", decay_gammas(num_heads), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, T, H, d]
        o, _ = self.retention_fn(q, k, v, self.gamma, scale=self.scale)
        return self.out_proj(self.norm(o).reshape(B, T, C))
