"""Chunkwise retention (RetNet Eq. 7; ViR, arXiv 2310.19731, Sec. 3) as Triton kernels: the CUDA path of
:func:`linvision.ops.retention_chunkwise`.

Same conventions as :mod:`linvision.ops.retention` (fla's: ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, decay
``gamma: [H]``, ``scale`` on q, ``initial_state``/``final_state: [B, H, K, V]``). With chunks of ``BT`` tokens,
``S_n`` the state entering chunk n (``S_0`` = initial state), i, j positions inside the chunk, ``L_n`` its length::

    o_i     = scale Σ_{j<=i} γ^{i-j} (q_i·k_j) v_j + scale γ^{i+1} q_i S_n
    S_{n+1} = γ^{L_n} S_n + Σ_j γ^{L_n-1-j} k_jᵀ v_j

Backward, with ``dH_n = ∂ℓ/∂S_{n+1}`` (``dH`` of the last chunk = the final state's gradient)::

    dH_{n-1} = γ^{L_n} dH_n + scale Σ_i γ^{i+1} q_iᵀ do_i            (dH_{-1} = ∂ℓ/∂S_0)
    dq = scale ((do vᵀ) ⊙ D) k + scale γ^{i+1} do S_nᵀ
    dk = scale ((do vᵀ) ⊙ D)ᵀ q + γ^{L_n-1-j} v dH_nᵀ
    dv = scale ((q kᵀ) ⊙ D)ᵀ do + γ^{L_n-1-j} k dH_n                (D_ij = γ^{i-j}, j <= i)

Kernels: ``_ret_states`` (one program per (b, h): the chunk states, sequentially over chunks, one ``[K, BT] x
[BT, V]`` dot per chunk), ``_ret_fwd`` (one program per (chunk, b, h): the output), ``_ret_dstates`` (the reverse
state-gradient scan) and ``_ret_bwd`` (per chunk: dq, dk, dv). The forward saves the chunk states (fp32,
``[B, H, T/BT, K, V]``). Dots in fp32 (IEEE for fp32 inputs, TF32 for bf16/fp16 inputs); K and V up to 128 in one
block (larger heads fall back to the PyTorch form). ``gamma`` and ``scale`` get no gradient (ViR keeps them fixed).

Imports Triton at the top: :func:`linvision.ops.retention_chunkwise` imports this module only for CUDA inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["retention_chunkwise_triton", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128


@triton.jit
def _load_tile(ptr, b, h, n, T, H, D, BT: tl.constexpr, BD: tl.constexpr):
    """``[BT, BD]`` fp32 tile of chunk n of ``ptr: [B, T, H, D]`` at head h (zeros outside)."""
    t = n * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    offs = ((b.to(tl.int64) * T + t[:, None]) * H + h) * D + d[None, :]
    m = (t[:, None] < T) & (d[None, :] < D)
    return tl.load(ptr + offs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, x, b, h, n, T, H, D, BT: tl.constexpr, BD: tl.constexpr):
    t = n * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    offs = ((b.to(tl.int64) * T + t[:, None]) * H + h) * D + d[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=(t[:, None] < T) & (d[None, :] < D))


@triton.jit
def _state_offs(bh, n, NT, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of the ``[BK, BV]`` state tile number n of ``[B*H, NT, K, V]``."""
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    offs = (bh.to(tl.int64) * NT + n) * K * V + kk[:, None] * V + vv[None, :]
    return offs, (kk[:, None] < K) & (vv[None, :] < V)


@triton.jit
def _ret_states(k_ptr, v_ptr, lg_ptr, h0_ptr, hs_ptr, ht_ptr, T, H, K, V, NT, USE_H0: tl.constexpr,
                STORE_FINAL: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    lg = tl.load(lg_ptr + h)
    o0, m0 = _state_offs(bh, 0, 1, K, V, BK, BV)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0_ptr + o0, mask=m0, other=0.0).to(tl.float32)
    j = tl.arange(0, BT)
    for n in range(NT):
        offs, m = _state_offs(bh, n, NT, K, V, BK, BV)
        tl.store(hs_ptr + offs, S, mask=m)
        kt = _load_tile(k_ptr, b, h, n, T, H, K, BT, BK)
        vt = _load_tile(v_ptr, b, h, n, T, H, V, BT, BV)
        Ln = tl.minimum(T - n * BT, BT)
        wj = tl.where(j < Ln, tl.exp2(tl.where(j < Ln, Ln - 1 - j, 0) * lg), 0.0)
        S = S * tl.exp2(Ln * lg) + tl.dot(tl.trans(kt * wj[:, None]), vt, input_precision=PREC)
    if STORE_FINAL:
        tl.store(ht_ptr + o0, S, mask=m0)


@triton.jit
def _decay_matrix(lg, BT: tl.constexpr):
    """``D[i, j] = γ^{i-j}`` for j <= i, else 0; and ``γ^{i+1}``."""
    i = tl.arange(0, BT)
    diff = i[:, None] - i[None, :]
    D = tl.where(diff >= 0, tl.exp2(tl.where(diff >= 0, diff, 0) * lg), 0.0)
    return D, tl.exp2((i + 1) * lg)


@triton.jit
def _ret_fwd(q_ptr, k_ptr, v_ptr, lg_ptr, hs_ptr, o_ptr, scale, T, H, K, V, NT, BT: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    lg = tl.load(lg_ptr + h)
    D, gi = _decay_matrix(lg, BT)
    qt = _load_tile(q_ptr, b, h, n, T, H, K, BT, BK)
    kt = _load_tile(k_ptr, b, h, n, T, H, K, BT, BK)
    vt = _load_tile(v_ptr, b, h, n, T, H, V, BT, BV)
    offs, m = _state_offs(bh, n, NT, K, V, BK, BV)
    S = tl.load(hs_ptr + offs, mask=m, other=0.0)
    A = tl.dot(qt, tl.trans(kt), input_precision=PREC) * D * scale
    o = tl.dot(A, vt, input_precision=PREC) + tl.dot(qt, S, input_precision=PREC) * (gi * scale)[:, None]
    _store_tile(o_ptr, o, b, h, n, T, H, V, BT, BV)


@triton.jit
def _ret_dstates(q_ptr, do_ptr, lg_ptr, dht_ptr, dhs_ptr, dh0_ptr, scale, T, H, K, V, NT, USE_DHT: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    lg = tl.load(lg_ptr + h)
    o0, m0 = _state_offs(bh, 0, 1, K, V, BK, BV)
    dH = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dH += tl.load(dht_ptr + o0, mask=m0, other=0.0).to(tl.float32)
    i = tl.arange(0, BT)
    for r in range(NT):
        n = NT - 1 - r
        offs, m = _state_offs(bh, n, NT, K, V, BK, BV)
        tl.store(dhs_ptr + offs, dH, mask=m)
        qt = _load_tile(q_ptr, b, h, n, T, H, K, BT, BK)
        dot = _load_tile(do_ptr, b, h, n, T, H, V, BT, BV)
        Ln = tl.minimum(T - n * BT, BT)
        gi = tl.exp2((i + 1) * lg) * scale
        dH = dH * tl.exp2(Ln * lg) + tl.dot(tl.trans(qt * gi[:, None]), dot, input_precision=PREC)
    tl.store(dh0_ptr + o0, dH, mask=m0)


@triton.jit
def _ret_bwd(q_ptr, k_ptr, v_ptr, do_ptr, lg_ptr, hs_ptr, dhs_ptr, dq_ptr, dk_ptr, dv_ptr, scale, T, H, K, V, NT,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    lg = tl.load(lg_ptr + h)
    D, gi = _decay_matrix(lg, BT)
    qt = _load_tile(q_ptr, b, h, n, T, H, K, BT, BK)
    kt = _load_tile(k_ptr, b, h, n, T, H, K, BT, BK)
    vt = _load_tile(v_ptr, b, h, n, T, H, V, BT, BV)
    dot = _load_tile(do_ptr, b, h, n, T, H, V, BT, BV)
    offs, m = _state_offs(bh, n, NT, K, V, BK, BV)
    S = tl.load(hs_ptr + offs, mask=m, other=0.0)
    dH = tl.load(dhs_ptr + offs, mask=m, other=0.0)
    j = tl.arange(0, BT)
    Ln = tl.minimum(T - n * BT, BT)
    gj = tl.where(j < Ln, tl.exp2(tl.where(j < Ln, Ln - 1 - j, 0) * lg), 0.0)
    A = tl.dot(qt, tl.trans(kt), input_precision=PREC) * D * scale
    dA = tl.dot(dot, tl.trans(vt), input_precision=PREC) * D * scale
    dq = tl.dot(dA, kt, input_precision=PREC) + tl.dot(dot, tl.trans(S), input_precision=PREC) * (gi * scale)[:, None]
    dk = tl.dot(tl.trans(dA), qt, input_precision=PREC) + tl.dot(vt, tl.trans(dH), input_precision=PREC) * gj[:, None]
    dv = tl.dot(tl.trans(A), dot, input_precision=PREC) + tl.dot(kt, dH, input_precision=PREC) * gj[:, None]
    _store_tile(dq_ptr, dq, b, h, n, T, H, K, BT, BK)
    _store_tile(dk_ptr, dk, b, h, n, T, H, K, BT, BK)
    _store_tile(dv_ptr, dv, b, h, n, T, H, V, BT, BV)


def _blocks(K: int, V: int):
    return max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _RetentionChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lg, scale, h0, output_final_state, BT):
        B, T, H, K = q.shape
        V = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        NT, (BK, BV), prec = triton.cdiv(T, BT), _blocks(K, V), _prec(q.dtype)
        hs = torch.empty(B * H, NT, K, V, dtype=torch.float32, device=q.device)
        ht = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else hs
        h0c = h0.contiguous() if h0 is not None else hs
        nw = 4 if BK * BV <= 64 * 64 else 8
        _ret_states[(B * H,)](k, v, lg, h0c, hs, ht, T, H, K, V, NT, USE_H0=h0 is not None,
                              STORE_FINAL=output_final_state, BT=BT, BK=BK, BV=BV, PREC=prec, num_warps=nw)
        o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
        _ret_fwd[(NT, B * H)](q, k, v, lg, hs, o, scale, T, H, K, V, NT, BT=BT, BK=BK, BV=BV, PREC=prec,
                              num_warps=nw)
        ctx.save_for_backward(q, k, v, lg, hs)
        ctx.scale, ctx.BT, ctx.has_h0, ctx.h0_dtype = scale, BT, h0 is not None, (h0.dtype if h0 is not None
                                                                                   else None)
        if output_final_state:
            return o, ht.to(q.dtype)
        return o, None

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, lg, hs = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        BT, NT, (BK, BV), prec = ctx.BT, hs.shape[1], _blocks(K, V), _prec(q.dtype)
        nw = 4 if BK * BV <= 64 * 64 else 8
        do = do.contiguous()
        dhs = torch.empty_like(hs)
        dh0 = q.new_empty(B, H, K, V, dtype=torch.float32)
        dhtc = dht.contiguous() if dht is not None else hs
        _ret_dstates[(B * H,)](q, do, lg, dhtc, dhs, dh0, ctx.scale, T, H, K, V, NT, USE_DHT=dht is not None,
                               BT=BT, BK=BK, BV=BV, PREC=prec, num_warps=nw)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _ret_bwd[(NT, B * H)](q, k, v, do, lg, hs, dhs, dq, dk, dv, ctx.scale, T, H, K, V, NT, BT=BT, BK=BK, BV=BV,
                              PREC=prec, num_warps=8)  # ~13 tiles live: 8 warps keep registers in bounds
        dh0 = dh0.to(ctx.h0_dtype) if ctx.has_h0 else None
        return dq, dk, dv, None, None, dh0, None, None


def retention_chunkwise_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                               scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                               output_final_state: bool = False,
                               chunk_size: int = 64) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunkwise retention by the Triton kernels; same contract as :func:`linvision.ops.retention_chunkwise`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (fp32/bf16/fp16, K, V <= 128; CUDA, or CPU under
            ``TRITON_INTERPRET=1``); gamma: ``[H]``; scale: q multiplier (default ``K ** -0.5``);
            initial_state: ``[B, H, K, V]`` or None; output_final_state: also return the final state;
            chunk_size: rounded to a power of two in [16, 64] (32 for heads over 64; speed and rounding
            only).

    Returns:
        ``(o [B, T, H, V] in q's dtype, final_state [B, H, K, V] in q's dtype or None)``; differentiable in q, k,
        v and initial_state (not gamma or scale).

    Raises:
        ValueError: T = 0 or a head dimension above 128 (use the PyTorch form).
    """
    B, T, H, K = q.shape
    if T == 0 or K > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"retention_chunkwise_triton: needs T >= 1 and K, V <= {MAX_HEAD_DIM}; got T={T}, "
                         f"K={K}, V={v.shape[-1]}")
    scale = K ** -0.5 if scale is None else float(scale)
    BT = min(64 if max(K, v.shape[-1]) <= 64 else 32, max(16, triton.next_power_of_2(int(chunk_size))))
    lg = torch.log2(gamma.detach().to(device=q.device, dtype=torch.float64)).float().contiguous()
    return _RetentionChunk.apply(q, k, v, lg, scale, initial_state, bool(output_final_state), BT)
