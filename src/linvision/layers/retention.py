"""Multi-scale retention layer of ViR (Hatamizadeh et al., arXiv 2310.19731, Sec. 3.1), softmax-free and causal."""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..ops.retention import (decay_gammas, op_chunk_size, retention_chunkwise, retention_parallel,
                             retention_recurrent)
from ..ops.retention2d import retention2d_parallel, retention2d_recurrent
from .linear import PackedLinear

__all__ = ["MultiScaleRetention", "MultiScaleRetention2D", "RETENTION_MODES", "RETENTION2D_MODES"]

RETENTION_MODES = ("parallel", "chunkwise", "recurrent")
RETENTION2D_MODES = ("parallel", "recurrent")


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
        chunk_size: chunk length of the ``'chunkwise'`` form (default: from the head size,
            :func:`~linvision.ops.retention.op_chunk_size`).

    ``forward(x, mode='parallel', state=None, output_final_state=False)`` takes ``x: [B, T, C]`` and a state
    ``[B, H, d, d]`` carried in from earlier tokens (or None), and returns ``(out [B, T, C], final state
    [B, H, d, d] or None)``; every mode
    (``'parallel'``, ``'chunkwise'``, ``'recurrent'``: :mod:`linvision.ops.retention`) gives the same result.
    """

    def __init__(self, dim: int, num_heads: int = 8, retention_norm: bool = False, chunk_size: Optional[int] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.forms = {"parallel": retention_parallel, "recurrent": retention_recurrent,
                      "chunkwise": partial(retention_chunkwise, chunk_size=chunk_size or op_chunk_size(self.head_dim))}
        self.qkv = PackedLinear(dim, dim * 3, bias=True)
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-6) if retention_norm else nn.Identity()
        self.out_proj = PackedLinear(dim, dim, bias=True)
        self.register_buffer("gamma", decay_gammas(num_heads), persistent=False)

    def forward(self, x: torch.Tensor, mode: str = "parallel", state: Optional[torch.Tensor] = None,
                output_final_state: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if mode not in self.forms:
            raise ValueError(f"retention mode must be one of {RETENTION_MODES}, got {mode!r}")
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, T, H, d]
        o, state = self.forms[mode](q, k, v, self.gamma, scale=self.scale, initial_state=state,
                                    output_final_state=output_final_state)
        return self.out_proj(self.norm(o).reshape(B, T, C)), state


class MultiScaleRetention2D(MultiScaleRetention):
    """2D multi-scale retention (ViR v2, arXiv 2310.19731 v2): :class:`MultiScaleRetention` with the decay
    γ_h^(|Δrow| + |Δcol|) over the causal quadrant of a grid of tokens (:mod:`linvision.ops.retention2d`).

    ``forward(x, width, mode='parallel', state=None, output_final_state=False)`` takes ``x: [B, T, C]`` holding
    ``T / width`` whole rows (row-major) and the state ``[B, H, width, d, d]`` of the row above (or None);
    returns ``(out [B, T, C], state of the last row or None)``. Modes: ``'parallel'`` (one ``[T, T]`` decayed
    score matrix) and ``'recurrent'`` (row by row); they give the same result.
    """

    def __init__(self, dim: int, num_heads: int = 8, retention_norm: bool = False):
        super().__init__(dim, num_heads, retention_norm)
        self.forms = {"parallel": retention2d_parallel, "recurrent": retention2d_recurrent}

    def forward(self, x: torch.Tensor, width: int, mode: str = "parallel", state: Optional[torch.Tensor] = None,
                output_final_state: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if mode not in self.forms:
            raise ValueError(f"2D retention mode must be one of {RETENTION2D_MODES}, got {mode!r}")
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, T, H, d]
        o, state = self.forms[mode](q, k, v, self.gamma, width, scale=self.scale, initial_state=state,
                                    output_final_state=output_final_state)
        return self.out_proj(self.norm(o).reshape(B, T, C)), state
