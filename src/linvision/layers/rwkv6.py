"""Vision-RWKV v6 (VRWKV6) token and channel mixers, as the official code computes them (OpenGVLab/Vision-RWKV
``classification/mmcls_custom/models/backbones/vrwkv6.py``: ``VRWKV_SpatialMix_V6``, ``VRWKV_ChannelMix``,
``q_shift_multihead``); the spatial mix is RWKV-6's time mix (Peng et al., arXiv 2404.05892, Sec. 4: data-dependent
token shift "ddlerp" and data-dependent decay, Eqs. 10-18) with Q-Shift and the bidirectional WKV6.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.wkv6 import wkv6
from .linear import PackedLinear
from .rwkv import ChannelMix, _ratio_init, q_shift

__all__ = ["q_shift_multihead", "SpatialMixV6", "ChannelMixV6"]

TIME_MIX_EXTRA_DIM = 32  # official LoRA rank of the ddlerp (for w, k, v, r, g)
TIME_DECAY_EXTRA_DIM = 64  # official LoRA rank of the data-dependent decay


def q_shift_multihead(x: torch.Tensor, grid: Tuple[int, int], head_size: int, shift: int = 1) -> torch.Tensor:
    """Q-Shift per head (official ``q_shift_multihead``): :func:`~linvision.layers.rwkv.q_shift` applied to each
    head's ``head_size`` channels separately (quarters of each head take the left / right / upper / lower
    neighbour, zeros at borders).

    Args:
        x: ``[B, T, C]`` tokens in row-major order over ``grid``, ``C % head_size == 0``, ``head_size % 4 == 0``.
        grid: ``(H, W)`` with ``H * W == T``.
        head_size: channels per head.
        shift: distance in patches.

    Returns:
        ``[B, T, C]``, same dtype.

    Raises:
        ValueError: if ``C`` is not a multiple of ``head_size`` or ``head_size`` of 4.
    """
    B, T, C = x.shape
    if C % head_size or head_size % 4:
        raise ValueError(f"q_shift_multihead: C={C} must be a multiple of head_size={head_size}, itself of 4")
    nh = C // head_size
    xh = x.reshape(B, T, nh, head_size).transpose(1, 2).reshape(B * nh, T, head_size)
    return q_shift(xh, grid, shift).reshape(B, nh, T, head_size).transpose(1, 2).reshape(B, T, C)


class SpatialMixV6(nn.Module):
    """VRWKV6 spatial mix (official ``VRWKV_SpatialMix_V6``). ``[B, T, C]`` in/out.

    ``xx = q_shift_multihead(x) - x``; ddlerp: ``m_{w,k,v,r,g} = tanh((x + xx μ_x) W1) W2`` (LoRA, rank 32 each),
    ``x_* = x + xx (μ_* + m_*)``; ``r, k, v = W_r x_r, W_k x_k, W_v x_v``, ``g = silu(W_g x_g)``; data-dependent
    decay ``w = d + tanh(x_w D1) D2`` (rank 64); ``y = WKV6(r, k, v, w, u)``; ``out = W_o(GroupNorm_H(norm(y)) ⊙ g)``
    with the optional ``key_norm`` LayerNorm ``norm``.

    Args:
        dim: channels C (``num_heads * head_size``).
        num_heads: heads H (per-head Q-Shift, WKV state and GroupNorm).
        layer_id, num_layers: for the official "fancy" init.
        shift_pixel: Q-Shift distance.
        key_norm: LayerNorm(C) on the WKV output before ``ln_x``.
        wkv_fn: the WKV6 implementation ``(r, k, v, w, u) -> [B, T, C]``.
    """

    def __init__(self, dim: int, num_heads: int, layer_id: int = 0, num_layers: int = 1, shift_pixel: int = 1,
                 key_norm: bool = False, wkv_fn: Callable = wkv6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SpatialMixV6: dim={dim} is not a multiple of num_heads={num_heads}")
        self.dim, self.num_heads, self.head_size = dim, num_heads, dim // num_heads
        self.shift_pixel, self.wkv_fn = shift_pixel, wkv_fn
        r0, r1 = _ratio_init(layer_id, num_layers)
        c = torch.arange(dim, dtype=torch.float32)
        ddd = c / dim
        self.time_maa_x = nn.Parameter(1.0 - ddd ** r1)
        self.time_maa_w = nn.Parameter(1.0 - ddd ** r1)
        self.time_maa_k = nn.Parameter(1.0 - ddd ** r1)
        self.time_maa_v = nn.Parameter(1.0 - (ddd ** r1 + 0.3 * r0))
        self.time_maa_r = nn.Parameter(1.0 - ddd ** (0.5 * r1))
        self.time_maa_g = nn.Parameter(1.0 - ddd ** (0.5 * r1))
        self.time_maa_w1 = nn.Parameter(torch.empty(dim, TIME_MIX_EXTRA_DIM * 5).uniform_(-1e-4, 1e-4))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, TIME_MIX_EXTRA_DIM, dim).uniform_(-1e-4, 1e-4))
        self.time_decay = nn.Parameter(-6 + 5 * (c / max(dim - 1, 1)) ** (0.7 + 1.3 * r0))
        self.time_decay_w1 = nn.Parameter(torch.empty(dim, TIME_DECAY_EXTRA_DIM).uniform_(-1e-4, 1e-4))
        self.time_decay_w2 = nn.Parameter(torch.empty(TIME_DECAY_EXTRA_DIM, dim).uniform_(-1e-4, 1e-4))
        zigzag = (((c + 1) % 3) - 1) * 0.1
        self.time_faaaa = nn.Parameter((r0 * (1 - c / max(dim - 1, 1)) + zigzag).reshape(num_heads, -1))
        self.key = PackedLinear(dim, dim, bias=False)
        self.value = PackedLinear(dim, dim, bias=False)
        self.receptance = PackedLinear(dim, dim, bias=False)
        self.gate = PackedLinear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim) if key_norm else nn.Identity()
        self.output = PackedLinear(dim, dim, bias=False)
        self.ln_x = nn.GroupNorm(num_heads, dim, eps=1e-5)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        B, T, C = x.shape
        xx = q_shift_multihead(x, grid, self.head_size, self.shift_pixel) - x
        m = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B, T, 5, TIME_MIX_EXTRA_DIM)
        mw, mk, mv, mr, mg = torch.einsum("btfe,fec->fbtc", m, self.time_maa_w2).unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        y = self.key_norm(self.wkv_fn(r, k, v, w, self.time_faaaa))
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g)


class ChannelMixV6(ChannelMix):
    """VRWKV6 channel mix: v4's :class:`~linvision.layers.rwkv.ChannelMix` (same parameters and init) with the
    per-head Q-Shift :func:`q_shift_multihead`. ``[B, T, C]`` in/out."""

    def __init__(self, dim: int, hidden_dim: int, head_size: int, layer_id: int = 0, num_layers: int = 1,
                 shift_pixel: int = 1, key_norm: bool = False):
        super().__init__(dim, hidden_dim, layer_id, num_layers, shift_pixel, key_norm)
        self.head_size = head_size

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        xx = q_shift_multihead(x, grid, self.head_size, self.shift_pixel)
        return self._gated(torch.lerp(xx, x, self.mix_k), torch.lerp(xx, x, self.mix_r))
