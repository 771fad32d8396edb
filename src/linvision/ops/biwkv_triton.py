"""Bi-WKV (Vision-RWKV, arXiv 2403.02308, Eq. 5) as Triton kernels: the CUDA path of :func:`linvision.ops.bi_wkv`.

Same arithmetic as the PyTorch op in :mod:`linvision.ops.biwkv` (read its docstring for the equations and the
gradient derivation): per channel, ``a_i = e^{k_i - max_j k_j}``, two signals ``x = [a v ; a]``, their exclusive
decayed prefix ``P`` and suffix ``S`` scans (decay ``r = e^{-w}``), ``wkv = (P^n + S^n + e^u a v) / (P^d + S^d +
e^u a)``; the backward scans ``[α = g / den ; β = α wkv]`` the same way and forms ``dk, dv, du, dw`` from the
scans' products. fp32 inside for every input dtype; no token limit.

Kernels (grid over chunks of L tokens × batch × blocks of channels; each program scans its chunk sequentially):

1. ``_wkv_totals``: each chunk's decayed totals ``Σ_l r^{L-1-l} x_l`` and ``Σ_l r^l x_l`` of the two signals;
2. ``_wkv_carries``: a sequential scan over the chunks (decay ``r^L``) turns them into each chunk's carries (the
   decayed sum of everything before / after it);
3. ``_wkv_fwd_chunk`` / ``_wkv_bwd_chunk``: the chunk's prefix scan (kept in scratch), then its suffix scan,
   which combines both and writes ``wkv``, ``den`` (forward) or ``dk``, ``dv`` and per-chunk partial sums of
   ``du``, ``dw`` (backward).

The forward saves ``den`` (fp32), ``max_j k_j`` and the carries; the backward recomputes the signals from
``k, v``. The kernels run inside the custom op pair ``linvision::bi_wkv_triton_fwd`` / ``_bwd`` defined in
:mod:`.biwkv_triton_op` (which explains why a separate op); this module imports Triton at the top and is
imported only when that op runs (CUDA inputs, or CPU ones under the interpreter).
``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (the tests do that).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import biwkv_triton_op  # noqa: F401  (the custom op pair)
from .biwkv import _check, wkv_chunk_len

__all__ = ["bi_wkv_triton", "triton_forward", "triton_backward"]

_BLOCK_C = 32


@triton.jit
def _signals(p1, p2, p3, mx, offs, m, MODE: tl.constexpr):
    """MODE 0: ``(a v, a)`` from k = p1, v = p2, mx = max k; MODE 1: ``(α, β) = (g / den, α y)`` from g = p1,
    den = p2, y = p3. Zero where ``m`` is false."""
    if MODE == 0:
        k = tl.load(p1 + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(p2 + offs, mask=m, other=0.0).to(tl.float32)
        a = tl.exp(tl.where(m, k - mx, float("-inf")))
        return a * v, a
    else:
        g = tl.load(p1 + offs, mask=m, other=0.0).to(tl.float32)
        den = tl.load(p2 + offs, mask=m, other=1.0)
        y = tl.load(p3 + offs, mask=m, other=0.0).to(tl.float32)
        al = g / den
        return al, al * y


@triton.jit
def _wkv_totals(p1, p2, p3, kmax_ptr, w_ptr, z_ptr, T, C, L, NC, MODE: tl.constexpr, BLOCK_C: tl.constexpr):
    """z[0:2, b, j] = Σ_l r^{L-1-l} x_l, z[2:4, b, j] = Σ_l r^l x_l for chunk j of batch b (z: [4, B, NC, C])."""
    j, b, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    B = tl.num_programs(1)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    r = tl.exp(-tl.load(w_ptr + cs, mask=cm, other=0.0))
    mx = tl.load(kmax_ptr + b * C + cs, mask=cm, other=0.0)
    base = b.to(tl.int64) * T * C
    zp1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    zp2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    zs1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    zs2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    pw = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    for l in range(L):
        t = j * L + l
        m = cm & (cs * 0 + t < T)  # (block & scalar mask: int32 under the interpreter)
        x1, x2 = _signals(p1, p2, p3, mx, base + t * C + cs, m, MODE)
        zp1 = r * zp1 + x1
        zp2 = r * zp2 + x2
        zs1 += pw * x1
        zs2 += pw * x2
        pw = pw * r
    zo = (b * NC + j) * C + cs
    st = B * NC * C
    tl.store(z_ptr + zo, zp1, mask=cm)
    tl.store(z_ptr + st + zo, zp2, mask=cm)
    tl.store(z_ptr + 2 * st + zo, zs1, mask=cm)
    tl.store(z_ptr + 3 * st + zo, zs2, mask=cm)


@triton.jit
def _wkv_carries(z_ptr, w_ptr, C, L, NC, BLOCK_C: tl.constexpr):
    """In place: chunk totals ``z`` -> carries (exclusive scans over the chunks with decay r^L): z[0:2, b, j] becomes
    the prefix at chunk j's first token, z[2:4, b, j] the suffix at its last token."""
    b, cb = tl.program_id(0), tl.program_id(1)
    B = tl.num_programs(0)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    rl = tl.exp(-tl.load(w_ptr + cs, mask=cm, other=0.0) * L)
    st = B * NC * C
    a1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(NC):
        o = (b * NC + j) * C + cs
        z1 = tl.load(z_ptr + o, mask=cm, other=0.0)
        z2 = tl.load(z_ptr + st + o, mask=cm, other=0.0)
        tl.store(z_ptr + o, a1, mask=cm)
        tl.store(z_ptr + st + o, a2, mask=cm)
        a1 = rl * a1 + z1
        a2 = rl * a2 + z2
    a1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(NC):
        o = (b * NC + NC - 1 - i) * C + cs
        z1 = tl.load(z_ptr + 2 * st + o, mask=cm, other=0.0)
        z2 = tl.load(z_ptr + 3 * st + o, mask=cm, other=0.0)
        tl.store(z_ptr + 2 * st + o, a1, mask=cm)
        tl.store(z_ptr + 3 * st + o, a2, mask=cm)
        a1 = rl * a1 + z1
        a2 = rl * a2 + z2


@triton.jit
def _wkv_fwd_chunk(k_ptr, v_ptr, kmax_ptr, w_ptr, u_ptr, car_ptr, y_ptr, den_ptr, pn_ptr, T, C, L, NC,
                   BLOCK_C: tl.constexpr):
    """wkv and den of chunk j: prefix scan P (kept in pn / den), then the suffix scan S combining both."""
    j, b, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    B = tl.num_programs(1)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    r = tl.exp(-tl.load(w_ptr + cs, mask=cm, other=0.0))
    eu = tl.exp(tl.load(u_ptr + cs, mask=cm, other=0.0))
    mx = tl.load(kmax_ptr + b * C + cs, mask=cm, other=0.0)
    base = b.to(tl.int64) * T * C
    co = (b * NC + j) * C + cs
    st = B * NC * C
    p1 = tl.load(car_ptr + co, mask=cm, other=0.0)
    p2 = tl.load(car_ptr + st + co, mask=cm, other=0.0)
    s1 = tl.load(car_ptr + 2 * st + co, mask=cm, other=0.0)
    s2 = tl.load(car_ptr + 3 * st + co, mask=cm, other=0.0)
    for l in range(L):
        t = j * L + l
        m = cm & (cs * 0 + t < T)  # (block & scalar mask: int32 under the interpreter)
        offs = base + t * C + cs
        x1, x2 = _signals(k_ptr, v_ptr, v_ptr, mx, offs, m, 0)
        tl.store(pn_ptr + offs, p1, mask=m)
        tl.store(den_ptr + offs, p2, mask=m)
        p1 = r * p1 + x1
        p2 = r * p2 + x2
    for i in range(L):
        t = j * L + L - 1 - i
        m = cm & (cs * 0 + t < T)  # (block & scalar mask: int32 under the interpreter)
        offs = base + t * C + cs
        x1, x2 = _signals(k_ptr, v_ptr, v_ptr, mx, offs, m, 0)
        num = tl.load(pn_ptr + offs, mask=m, other=0.0) + s1 + eu * x1
        den = tl.load(den_ptr + offs, mask=m, other=1.0) + s2 + eu * x2
        tl.store(y_ptr + offs, (num / den).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(den_ptr + offs, den, mask=m)
        s1 = r * s1 + x1
        s2 = r * s2 + x2


@triton.jit
def _wkv_bwd_chunk(k_ptr, v_ptr, kmax_ptr, g_ptr, y_ptr, den_ptr, w_ptr, u_ptr, car_ptr, carg_ptr, dk_ptr, dv_ptr,
                   qa_ptr, qb_ptr, dw_ptr, du_ptr, T, C, L, NC, BLOCK_C: tl.constexpr):
    """dk, dv of chunk j and its partial sums of du and of ``-e^w dw``: the prefix scans P (of x) and Q' (of
    [α ; β]) kept in dk, dv, qa, qb; then the suffix scans S, Q, combining everything."""
    j, b, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    B = tl.num_programs(1)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    r = tl.exp(-tl.load(w_ptr + cs, mask=cm, other=0.0))
    eu = tl.exp(tl.load(u_ptr + cs, mask=cm, other=0.0))
    mx = tl.load(kmax_ptr + b * C + cs, mask=cm, other=0.0)
    base = b.to(tl.int64) * T * C
    co = (b * NC + j) * C + cs
    st = B * NC * C
    p1 = tl.load(car_ptr + co, mask=cm, other=0.0)
    p2 = tl.load(car_ptr + st + co, mask=cm, other=0.0)
    q1 = tl.load(carg_ptr + co, mask=cm, other=0.0)
    q2 = tl.load(carg_ptr + st + co, mask=cm, other=0.0)
    for l in range(L):
        t = j * L + l
        m = cm & (cs * 0 + t < T)  # (block & scalar mask: int32 under the interpreter)
        offs = base + t * C + cs
        x1, x2 = _signals(k_ptr, v_ptr, v_ptr, mx, offs, m, 0)
        g1, g2 = _signals(g_ptr, den_ptr, y_ptr, mx, offs, m, 1)
        tl.store(dk_ptr + offs, p1, mask=m)
        tl.store(dv_ptr + offs, p2, mask=m)
        tl.store(qa_ptr + offs, q1, mask=m)
        tl.store(qb_ptr + offs, q2, mask=m)
        p1 = r * p1 + x1
        p2 = r * p2 + x2
        q1 = r * q1 + g1
        q2 = r * q2 + g2
    s1 = tl.load(car_ptr + 2 * st + co, mask=cm, other=0.0)
    s2 = tl.load(car_ptr + 3 * st + co, mask=cm, other=0.0)
    q1 = tl.load(carg_ptr + 2 * st + co, mask=cm, other=0.0)
    q2 = tl.load(carg_ptr + 3 * st + co, mask=cm, other=0.0)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(L):
        t = j * L + L - 1 - i
        m = cm & (cs * 0 + t < T)  # (block & scalar mask: int32 under the interpreter)
        offs = base + t * C + cs
        x1, x2 = _signals(k_ptr, v_ptr, v_ptr, mx, offs, m, 0)
        g1, g2 = _signals(g_ptr, den_ptr, y_ptr, mx, offs, m, 1)
        pp1 = tl.load(dk_ptr + offs, mask=m, other=0.0)
        pp2 = tl.load(dv_ptr + offs, mask=m, other=0.0)
        qp1 = tl.load(qa_ptr + offs, mask=m, other=0.0)
        qp2 = tl.load(qb_ptr + offs, mask=m, other=0.0)
        den = tl.load(den_ptr + offs, mask=m, other=1.0)
        acc_w += pp1 * q1 + s1 * qp1 - pp2 * q2 - s2 * qp2
        qa = qp1 + q1
        qb = qp2 + q2
        bonus = eu * g1 * ((x1 * (pp2 + s2) - x2 * (pp1 + s1)) / den)  # e^u α δ
        acc_u += bonus
        tl.store(dk_ptr + offs, x1 * qa - x2 * qb + bonus, mask=m)
        tl.store(dv_ptr + offs, x2 * (qa + eu * g1), mask=m)
        s1 = r * s1 + x1
        s2 = r * s2 + x2
        q1 = r * q1 + g1
        q2 = r * q2 + g2
    tl.store(dw_ptr + co, acc_w, mask=cm)
    tl.store(du_ptr + co, acc_u, mask=cm)


def _grid(T: int, B: int, C: int, L: int):
    return (triton.cdiv(T, L), B, triton.cdiv(C, _BLOCK_C))


def _carries(p1, p2, p3, kmax, w, T, C, L, mode):
    B, NC = kmax.shape[0], triton.cdiv(T, L)
    z = torch.empty(4, B, NC, C, dtype=torch.float32, device=kmax.device)
    _wkv_totals[_grid(T, B, C, L)](p1, p2, p3, kmax, w, z, T, C, L, NC, MODE=mode, BLOCK_C=_BLOCK_C, num_warps=1)
    _wkv_carries[(B, triton.cdiv(C, _BLOCK_C))](z, w, C, L, NC, BLOCK_C=_BLOCK_C, num_warps=1)
    return z


def triton_forward(w, u, k, v, chunk_len):
    """The kernels of ``linvision::bi_wkv_triton_fwd`` (see :mod:`.biwkv_triton_op`)."""
    B, T, C = k.shape
    k, v = k.contiguous(), v.contiguous()
    w, u = w.float().contiguous(), u.float().contiguous()
    kmax = k.amax(1).float().contiguous()
    car = _carries(k, v, v, kmax, w, T, C, chunk_len, 0)
    y = torch.empty(B, T, C, dtype=v.dtype, device=v.device)
    den = torch.empty(B, T, C, dtype=torch.float32, device=v.device)
    pn = torch.empty(B, T, C, dtype=torch.float32, device=v.device)
    _wkv_fwd_chunk[_grid(T, B, C, chunk_len)](k, v, kmax, w, u, car, y, den, pn, T, C, chunk_len, car.shape[2],
                                              BLOCK_C=_BLOCK_C, num_warps=1)
    return y, den, kmax, car


def triton_backward(gy, w, u, k, v, y, den, kmax, car, L):
    """The kernels of ``linvision::bi_wkv_triton_bwd``."""
    B, T, C = k.shape
    k, v, gy = k.contiguous(), v.contiguous(), gy.contiguous()
    w, u = w.float().contiguous(), u.float().contiguous()
    carg = _carries(gy, den, y, kmax, w, T, C, L, 1)
    dk = torch.empty(B, T, C, dtype=torch.float32, device=k.device)
    dv, qa, qb = torch.empty_like(dk), torch.empty_like(dk), torch.empty_like(dk)
    dwp = torch.empty(B, car.shape[2], C, dtype=torch.float32, device=k.device)
    dup = torch.empty_like(dwp)
    _wkv_bwd_chunk[_grid(T, B, C, L)](k, v, kmax, gy, y, den, w, u, car, carg, dk, dv, qa, qb, dwp, dup, T, C, L,
                                      car.shape[2], BLOCK_C=_BLOCK_C, num_warps=1)
    dw = -torch.exp(-w) * dwp.sum((0, 1))
    return dw, dup.sum((0, 1)), dk, dv


def bi_wkv_triton(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  chunk_size: Optional[int] = None) -> torch.Tensor:
    """Bi-WKV (paper Eq. 5) by the Triton kernels; same contract as :func:`linvision.ops.bi_wkv_ref`.

    Args:
        w, u: ``[C]`` decay and bonus (already divided by T).
        k, v: ``[B, T, C]``; float32, bfloat16 or float16 (computed in float32), CUDA tensors (or CPU tensors under
            ``TRITON_INTERPRET=1``).
        chunk_size: tokens per chunk (default :func:`wkv_chunk_len`); speed only.

    Returns:
        ``[B, T, C]`` in v's dtype; gradients in each input's dtype.

    Raises:
        ValueError: mismatched shapes.
    """
    _check(w, u, k, v)
    L = wkv_chunk_len(k.shape[1]) if chunk_size is None else max(int(chunk_size), 1)
    return torch.ops.linvision.bi_wkv_triton_fwd(w, u, k, v, L)[0]
