"""Q-Shift + lerp (Vision-RWKV, arXiv 2403.02308, Eq. 2-3) as Triton kernels: the CUDA path of
:func:`linvision.ops.qshift.q_shift_lerp`.

``out[i] = s + μ_i (x - s)`` with ``s = q_shift(x)`` (the plain form is :func:`~linvision.ops.qshift.q_shift_ref`
then ``torch.lerp``), for all rows ``μ_i`` of ``mix`` in one pass: each program reads a tile of tokens × channels
of x and, per channel, its Q-Shift source token (left / right / above / below neighbour by channel quarter, zero
past the border, itself for the channels past ``4·int(C/4)``), and writes every output — in the dtype asked for
(the layers ask for the autocast dtype, which saves the cast before each projection). On a 2048² image
(vrwkv_tiny) the plain form's pad, cat and one lerp per output were ~30 % of the GPU time.

Backward (``g_i = ∂ℓ/∂out_i``): ``∂x = Σ_i μ_i g_i + q_shift^T(Σ_i (1 - μ_i) g_i)`` — ``q_shift^T`` reads each
quarter's neighbour in the opposite direction — and ``∂μ_i = Σ_{b,t} g_i (x - s)``, summed per program into
partials (deterministic; no atomics) and then over programs. fp32 arithmetic for every input dtype.

The kernels run inside the custom ops ``linvision::q_shift_lerp_triton`` / ``_bwd`` defined (Triton-free) in
:mod:`linvision.ops.qshift`; this module imports Triton at the top and is imported only when they run.
``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (the tests do that).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["q_shift_lerp_forward", "q_shift_lerp_backward"]

_BLOCK_T, _BLOCK_C = 32, 64


@triton.jit
def _neighbour(rows, cs, T, H, W, C, SHIFT, SIGN: tl.constexpr):
    """Per (token row, channel): the Q-Shift source row (SIGN = 1; SIGN = -1: its adjoint's) and whether it is
    inside the image. rows: flattened ``b·T + t`` ``[BT]``; cs: channels ``[BC]``."""
    q = C // 4
    quarter = tl.where(cs < 4 * q, cs // tl.maximum(q, 1), 4)[None, :]  # 0 left, 1 right, 2 above, 3 below, 4 self
    t = rows % T
    h, w = (t // W)[:, None], (t % W)[:, None]
    dw = tl.where(quarter == 0, -SHIFT, tl.where(quarter == 1, SHIFT, 0)) * SIGN
    dh = tl.where(quarter == 2, -SHIFT, tl.where(quarter == 3, SHIFT, 0)) * SIGN
    h2, w2 = h + dh, w + dw
    inside = (h2 >= 0) & (h2 < H) & (w2 >= 0) & (w2 < W)
    return rows[:, None] + dh * W + dw, inside


@triton.jit
def _fwd(x_ptr, mix_ptr, out_ptr, NROWS, T, H, W, C, SHIFT, N: tl.constexpr,
         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rows < NROWS)[:, None] & (cs < C)[None, :]
    src, inside = _neighbour(rows, cs, T, H, W, C, SHIFT, 1)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
    s = tl.load(x_ptr + src.to(tl.int64) * C + cs[None, :], mask=m & inside, other=0.0).to(tl.float32)
    d = x - s
    for i in tl.static_range(N):
        mu = tl.load(mix_ptr + i * C + cs, mask=cs < C, other=0.0).to(tl.float32)[None, :]
        o_ptr = out_ptr + (i * NROWS + rows.to(tl.int64))[:, None] * C + cs[None, :]
        tl.store(o_ptr, (s + mu * d).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd(x_ptr, mix_ptr, g_ptr, gx_ptr, gmix_ptr, NROWS, T, H, W, C, SHIFT, N: tl.constexpr,
         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """gx (x's dtype) and this program's partial ∂μ sums, gmix[program_id(0), i, c] (fp32)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    m = (rows < NROWS)[:, None] & cm[None, :]
    here = rows.to(tl.int64)[:, None] * C + cs[None, :]
    src, inside = _neighbour(rows, cs, T, H, W, C, SHIFT, 1)
    adj, adj_inside = _neighbour(rows, cs, T, H, W, C, SHIFT, -1)
    x = tl.load(x_ptr + here, mask=m, other=0.0).to(tl.float32)
    d = x - tl.load(x_ptr + src.to(tl.int64) * C + cs[None, :], mask=m & inside, other=0.0).to(tl.float32)
    adj_off = adj.to(tl.int64) * C + cs[None, :]
    gx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(N):
        mu = tl.load(mix_ptr + i * C + cs, mask=cm, other=0.0).to(tl.float32)[None, :]
        g = tl.load(g_ptr + i * NROWS * C + here, mask=m, other=0.0).to(tl.float32)
        ga = tl.load(g_ptr + i * NROWS * C + adj_off, mask=m & adj_inside, other=0.0).to(tl.float32)
        gx += mu * g + (1.0 - mu) * ga
        tl.store(gmix_ptr + (tl.program_id(0) * N + i) * C + cs, tl.sum(g * d, axis=0), mask=cm)
    tl.store(gx_ptr + here, gx.to(gx_ptr.dtype.element_ty), mask=m)


def _grid(nrows: int, C: int) -> Tuple[int, int]:
    return triton.cdiv(nrows, _BLOCK_T), triton.cdiv(C, _BLOCK_C)


def q_shift_lerp_forward(x: torch.Tensor, mix: torch.Tensor, H: int, W: int, shift: int,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """``[n, B, T, C]`` in ``out_dtype``: ``q_shift(x) + mix[i] (x - q_shift(x))``; x ``[B, T, C]``, mix ``[n, C]``."""
    B, T, C = x.shape
    x, mix = x.contiguous(), mix.contiguous()
    out = torch.empty(mix.shape[0], B, T, C, dtype=out_dtype, device=x.device)
    if out.numel():
        _fwd[_grid(B * T, C)](x, mix, out, B * T, T, H, W, C, shift, N=mix.shape[0], BLOCK_T=_BLOCK_T,
                              BLOCK_C=_BLOCK_C)
    return out


def q_shift_lerp_backward(g: torch.Tensor, x: torch.Tensor, mix: torch.Tensor, H: int, W: int,
                          shift: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(∂x [B, T, C] in x's dtype, ∂mix [n, C] fp32)`` from ``g = ∂ℓ/∂out`` ``[n, B, T, C]``."""
    B, T, C = x.shape
    x, mix, g = x.contiguous(), mix.contiguous(), g.contiguous()
    grid = _grid(B * T, C)
    gx = torch.empty_like(x)
    partial = torch.zeros(grid[0], mix.shape[0], C, dtype=torch.float32, device=x.device)
    if x.numel():
        _bwd[grid](x, mix, g, gx, partial, B * T, T, H, W, C, shift, N=mix.shape[0], BLOCK_T=_BLOCK_T,
                   BLOCK_C=_BLOCK_C)
    return gx, partial.sum(0)
