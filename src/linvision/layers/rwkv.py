"""Vision-RWKV token and channel mixers (Duan et al., arXiv 2403.02308, Sec. 3.2), as the official code computes
them (OpenGVLab/Vision-RWKV ``classification/mmcls_custom/models/backbones/vrwkv.py``).
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._common import needs_grad
from ..ops.biwkv import bi_wkv
from ..ops.qshift import q_shift_lerp
from .inplace import overwritable
from .linear import PackedLinear

__all__ = ["q_shift", "SpatialMix", "ChannelMix"]


def q_shift(x: torch.Tensor, grid: Tuple[int, int], shift: int = 1) -> torch.Tensor:
    """Q-Shift (paper Eq. 2): each channel quarter takes its value from a neighbouring patch, zero at borders.

    Channels ``[0:C/4]`` take the left neighbour ``x[h, w-s]``, ``[C/4:C/2]`` the right ``x[h, w+s]``,
    ``[C/2:3C/4]`` the one above ``x[h-s, w]``, ``[3C/4:C]`` the one below ``x[h+s, w]``; channels past
    ``4*int(C/4)`` are passed through unshifted (as the official code does).

    Args:
        x: ``[B, T, C]`` tokens in row-major order over ``grid``.
        grid: ``(H, W)`` patch grid, ``H * W == T``.
        shift: shift in patches.

    Returns:
        ``[B, T, C]``, same dtype.
    """
    B, T, C = x.shape
    H, W = grid
    if H * W != T:
        raise ValueError(f"q_shift: grid {grid} does not match T={T}")
    q = int(C / 4)
    x = x.view(B, H, W, C)
    p = F.pad(x, (0, 0, shift, shift, shift, shift))  # zero border of `shift` on H and W: [B, H+2s, W+2s, C]
    s = shift
    out = torch.cat([
        p[:, s:s + H, 0:W, 0:q],                   # from the left:  x[h, w - s]
        p[:, s:s + H, 2 * s:2 * s + W, q:2 * q],   # from the right: x[h, w + s]
        p[:, 0:H, s:s + W, 2 * q:3 * q],           # from above:     x[h - s, w]
        p[:, 2 * s:2 * s + H, s:s + W, 3 * q:4 * q],  # from below:  x[h + s, w]
        x[..., 4 * q:],
    ], dim=-1)
    return out.reshape(B, T, C)


def _proj_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the projections will compute in: autocast's when it is on for x's device (the Q-Shift op then
    writes its outputs in it directly), else None (x's)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


# module -> (key, parameter pointers and versions, the parameters, derived tensors); outside the module, so that
# copies, pickles and state dicts never carry it
_DERIVED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _derived(module: nn.Module, key, params: Tuple[torch.Tensor, ...], build: Callable[[], tuple]) -> tuple:
    """``build()``: a tuple of small tensors derived from ``params`` (the stacked μ's ``[n, C]``, ``w / T`` and
    ``u / T`` ``[C]``), kept for ``module``'s next call with the same ``key`` (e.g. T) when no gradient flows
    through ``params`` — two or three ops (~10 µs each at 224², measured) less a mixer per forward; the same values.

    Built again whenever a parameter changes: an in-place update (an optimizer step, ``load_state_dict``,
    ``.copy_``) bumps its version, new storage (``.to()``, ``.data =``) changes its pointer, a new ``Parameter``
    its identity. Built outside inference mode, so a later no-grad or frozen forward can use (and save) it. While
    autograd needs the graph, or under ``torch.compile`` / ``torch.export`` / ``torch.jit`` tracing, ``build()``
    runs every call."""
    if needs_grad(*params) or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return build()
    state = tuple((p.data_ptr(), p._version) for p in params)
    cache = _DERIVED.get(module)
    if cache is None or cache[0] != key or cache[1] != state or any(a is not b for a, b in zip(cache[2], params)):
        with torch.inference_mode(False), torch.no_grad():
            _DERIVED[module] = cache = (key, state, params, build())
    return cache[3]


def _ratio_init(layer_id: int, num_layers: int) -> Tuple[float, float]:
    """Official "fancy" init ratios: r0 = l/(L-1) (0 → 1), r1 = 1 - l/L (1 → ~0)."""
    r0 = layer_id / (num_layers - 1) if num_layers > 1 else 0.0
    return r0, 1.0 - layer_id / num_layers


class SpatialMix(nn.Module):
    """Vision-RWKV spatial mix: Q-Shift interpolation, bias-free k/v/r projections, Bi-WKV, σ(r) gate, output.

    ``out = W_o(σ(r) ⊙ norm(BiWKV(w/T, u/T, k, v)))`` with ``k = W_k(x μ_k + q_shift(x)(1 - μ_k))`` and likewise
    v, r. ``norm`` is the optional ``key_norm`` LayerNorm. Input/output ``[B, T, C]``.

    Args:
        dim: channels C.
        layer_id, num_layers: position of this block, for the official "fancy" init of ``spatial_decay``,
            ``spatial_first`` and the μ's.
        shift_pixel: Q-Shift distance in patches (0 disables Q-Shift).
        key_norm: LayerNorm on the Bi-WKV output.
        wkv_fn: the Bi-WKV implementation ``(w, u, k, v) -> [B, T, C]``.
    """

    def __init__(self, dim: int, layer_id: int = 0, num_layers: int = 1, shift_pixel: int = 1,
                 key_norm: bool = False, wkv_fn: Callable = bi_wkv):
        super().__init__()
        self.dim, self.shift_pixel, self.wkv_fn = dim, shift_pixel, wkv_fn
        r0, r1 = _ratio_init(layer_id, num_layers)
        c = torch.arange(dim, dtype=torch.float32)
        self.spatial_decay = nn.Parameter(-5 + 8 * (c / max(dim - 1, 1)) ** (0.7 + 1.3 * r0))
        self.spatial_first = nn.Parameter(math.log(0.3) + 0.5 * (((c + 1) % 3) - 1))
        frac = c / dim
        self.mix_k = nn.Parameter(frac ** r1)
        self.mix_v = nn.Parameter(frac ** r1 + 0.3 * r0)
        self.mix_r = nn.Parameter(frac ** (0.5 * r1))
        self.key = PackedLinear(dim, dim, bias=False)
        self.value = PackedLinear(dim, dim, bias=False)
        self.receptance = PackedLinear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim) if key_norm else nn.Identity()
        self.output = PackedLinear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        T = x.shape[1]
        mk, mv, mr, sd, sf = self.mix_k, self.mix_v, self.mix_r, self.spatial_decay, self.spatial_first
        mix, w, u = _derived(self, (T, self.shift_pixel > 0), (mk, mv, mr, sd, sf),
                             lambda: (torch.stack([mk, mv, mr]) if self.shift_pixel > 0 else None, sd / T, sf / T))
        if self.shift_pixel > 0:
            # x μ + shift(x) (1 - μ) for the three μ's, one op (one pass over x with numba on CPU)
            xk, xv, xr = q_shift_lerp(x, mix, grid, self.shift_pixel, _proj_dtype(x))
        else:
            xk = xv = xr = x
        k, v, r = self.key(xk), self.value(xv), self.receptance(xr)
        x = self.key_norm(self.wkv_fn(w, u, k, v))
        return self.output(torch.sigmoid_(r).mul_(x) if overwritable(r) else torch.sigmoid(r) * x)


class ChannelMix(nn.Module):
    """Vision-RWKV channel mix: ``σ(W_r x_r) ⊙ W_v(norm(relu(W_k x_k)^2))`` with Q-Shift interpolated inputs.

    Input/output ``[B, T, C]``; hidden size ``hidden_dim``; ``key_norm`` adds a LayerNorm on the hidden.
    """

    def __init__(self, dim: int, hidden_dim: int, layer_id: int = 0, num_layers: int = 1, shift_pixel: int = 1,
                 key_norm: bool = False):
        super().__init__()
        self.shift_pixel = shift_pixel
        _, r1 = _ratio_init(layer_id, num_layers)
        frac = torch.arange(dim, dtype=torch.float32) / dim
        self.mix_k = nn.Parameter(frac ** r1)
        self.mix_r = nn.Parameter(frac ** r1)
        self.key = PackedLinear(dim, hidden_dim, bias=False)
        self.key_norm = nn.LayerNorm(hidden_dim) if key_norm else nn.Identity()
        self.receptance = PackedLinear(dim, dim, bias=False)
        self.value = PackedLinear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        if self.shift_pixel > 0:
            mk, mr = self.mix_k, self.mix_r
            mix, = _derived(self, None, (mk, mr), lambda: (torch.stack([mk, mr]),))
            xk, xr = q_shift_lerp(x, mix, grid, self.shift_pixel, _proj_dtype(x))
        else:
            xk = xr = x
        return self._gated(xk, xr)

    def _gated(self, xk: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
        """``σ(W_r x_r) ⊙ W_v(norm(relu(W_k x_k)^2))`` from the interpolated inputs (shared with VRWKV6's mix)."""
        k, r = self.key(xk), self.receptance(xr)
        if overwritable(k):  # in place: no new [B, T, 4C] tensors
            return torch.sigmoid_(r).mul_(self.value(self.key_norm(torch.relu_(k).square_())))
        return torch.sigmoid(r) * self.value(self.key_norm(torch.square(torch.relu(k))))
