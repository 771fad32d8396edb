"""Multi-scale retention (RetNet, Sun et al. 2023; used by ViR, Hatamizadeh et al., arXiv 2310.19731, Sec. 3).

Conventions follow fla (``fla.ops.retention``): ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, per-head decay
``gamma: [H]`` (0 < γ < 1), ``scale`` multiplies q (default ``K ** -0.5``), an optional ``initial_state:
[B, H, K, V]``, and every form returns ``(o: [B, T, H, V], final_state: [B, H, K, V] | None)``.

Parallel definition (what :func:`retention_ref` computes)::

    o = ((q kᵀ) ⊙ D) v,   D[h, n, m] = γ_h^(n - m) if m <= n else 0          (causal, no softmax)

and with a state S_0 carried in from earlier tokens::

    o_n += γ^(n+1) q_n S_0,     S_T = γ^T S_0 + Σ_m γ^(T-1-m) k_mᵀ v_m

which is exactly the recurrence S_n = γ S_{n-1} + k_nᵀ v_n, o_n = q_n S_n unrolled.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Tuple, Union

import torch

from ._common import needs_grad
from ._triton import triton_enabled

__all__ = ["retention_ref", "retention_parallel", "retention_recurrent", "retention_chunkwise",
           "retention_chunkwise_batched", "decay_powers", "decay_gammas",
           "op_chunk_size", "auto_chunk_size", "auto_form", "AUTO_PARALLEL_MAX_TOKENS"]

Out = Tuple[torch.Tensor, Optional[torch.Tensor]]


def decay_gammas(num_heads: int) -> torch.Tensor:
    """ViR/RetNet per-head decay γ_h = 1 - exp(linspace(log 1/32, log 1/512, H)), float32 ``[H]``.

    Computed in float32 exactly as the authors' code does (the golden files were made that way).
    """
    return 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads))


AUTO_CHUNK_MAX_TOKENS = 4096
AUTO_PARALLEL_MAX_TOKENS = 320


def op_chunk_size(head_dim: int) -> int:
    """Chunk length for :func:`retention_chunkwise` from the head size K (= V): a power of two near K in
    [16, 128]. Per token the intra-chunk part costs ~``c (K + V)`` multiply-adds and the state part ~``2 K V``;
    they balance at ``c ≈ K`` (64 for ViR's heads of 64, the former fixed default)."""
    return int(min(128, max(16, 2 ** round(math.log2(max(head_dim, 1))))))


def auto_chunk_size(num_tokens: int, head_dim: int, device: Union[str, torch.device, None] = None) -> int:
    """Tokens per pass for ViR's chunkwise and streaming forwards (sequence fed through all blocks a chunk at a
    time): whole op chunks (:func:`op_chunk_size`) covering the sequence, at least one op chunk, and on CPU at most
    ``AUTO_CHUNK_MAX_TOKENS`` = 4096 (activations of one pass stay bounded; fewer, larger passes cost fewer kernel
    launches). E.g. 197 tokens, K = 64 -> 256 (one pass); 16,385 tokens -> 4096 (5 passes) on CPU, 16,448 (one
    pass) on CUDA, where launches, not memory, are what passes cost: at 2048² (vir_tiny, batch 4, H200) the GPU was
    busy for 19 of the step's 48 ms with 5 passes; one pass holds O(T·C) activations (nothing T×T)."""
    c = op_chunk_size(head_dim)
    whole = -(-int(num_tokens) // c) * c
    if device is not None and torch.device(device).type == "cuda":
        return int(max(c, whole))
    return int(max(c, min(AUTO_CHUNK_MAX_TOKENS // c * c, whole)))


def auto_form(num_tokens: int) -> str:
    """Retention form for ViR's ``mode='auto'``: ``'parallel'`` (one ``[T, T]`` decayed score matrix per head: a
    few large matmuls, fastest for short sequences) up to ``AUTO_PARALLEL_MAX_TOKENS`` = 320 tokens, ``'chunkwise'``
    (linear in T) above. Measured on a 2-core CPU (ViR-T inference, fp32, batch 1; parallel ÷ chunkwise time):
    0.94 at 197 tokens (224²), 1.07 at 401 (320²), 1.24 at 577, 1.84 at 1,025 (512²) — they cross near 300."""
    return "parallel" if int(num_tokens) <= AUTO_PARALLEL_MAX_TOKENS else "chunkwise"


def _check(q, k, v, gamma, initial_state) -> None:
    B, T, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != (B, T, H):
        raise ValueError(f"retention: q, k must be [B, T, H, K] and v [B, T, H, V]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if gamma.shape != (H,):
        raise ValueError(f"retention: gamma must be [H={H}], got {tuple(gamma.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"retention: initial_state must be [B, H, K, V]={(B, H, K, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")


def retention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                  scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                  output_final_state: bool = False) -> Out:
    """Retention by the parallel definition, in float64 (the reference; O(T^2) time and memory).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; gamma: ``[H]`` decay; scale: q multiplier
            (default ``K ** -0.5``); initial_state: ``[B, H, K, V]`` or None; output_final_state: return S_T.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float64 or None)``.

    Raises:
        ValueError: on mismatched shapes.
    """
    _check(q, k, v, gamma, initial_state)
    dtype = v.dtype
    T, K = q.shape[1], q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g = q.double() * scale, k.double(), v.double(), gamma.double()
    n = torch.arange(T, device=q.device, dtype=torch.float64)
    diff = n[:, None] - n[None, :]  # [T, T]  n - m
    D = torch.where(diff >= 0, g[:, None, None] ** diff.clamp(min=0), torch.zeros((), dtype=torch.float64,
                                                                                      device=q.device))
    o = torch.einsum("bnhk,bmhk,hnm,bmhv->bnhv", q, k, D, v)
    S = None
    if initial_state is not None:
        S0 = initial_state.double()
        o = o + torch.einsum("bnhk,hn,bhkv->bnhv", q, g[:, None] ** (n + 1), S0)
    if output_final_state:
        S = torch.einsum("hm,bmhk,bmhv->bhkv", g[:, None] ** (T - 1 - n), k, v)
        if initial_state is not None:
            S = S + (g ** T)[None, :, None, None] * initial_state.double()
    return o.to(dtype), S


# Decay factors depend only on (γ, T, scale, dtype, device): built once and reused (ViR calls the op with the same
# T in every block and every chunk). Exponents below _LOG_TINY are set to exactly 0 rather than left to underflow
# into denormal floats, which make CPU kernels many times slower (γ^n < e^-60 ≈ 1e-26 is zero at fp32 precision).
_LOG_TINY = -60.0
_FACTOR_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_FACTOR_CACHE_MAX_ELEMS = 2 ** 22  # cache masks up to 16 MiB (fp32); larger T is rebuilt per call


def _decay_factors(gamma: torch.Tensor, T: int, scale: float, dtype: torch.dtype, device: torch.device):
    """``(D·scale [H, T, T], γ^(n+1)·scale [H, T, 1], γ^(T-1-n) [H, T, 1], γ^T [H, 1, 1])`` in ``dtype``."""
    key = None
    if not gamma.requires_grad and not torch.compiler.is_compiling():
        key = (tuple(gamma.tolist()), T, float(scale), dtype, str(device))  # by value: H floats
        hit = _FACTOR_CACHE.get(key)
        if hit is not None:
            _FACTOR_CACHE.move_to_end(key)
            return hit
    # built as normal tensors even under inference_mode, so a cached entry can later be saved for backward
    with torch.inference_mode(False), torch.no_grad():
        out = _build_decay_factors(gamma, T, scale, dtype, device)
    if key is not None and gamma.shape[0] * T * T <= _FACTOR_CACHE_MAX_ELEMS:
        _FACTOR_CACHE[key] = out
        while len(_FACTOR_CACHE) > 8:
            _FACTOR_CACHE.popitem(last=False)
    return out


def _build_decay_factors(gamma: torch.Tensor, T: int, scale: float, dtype: torch.dtype, device: torch.device):
    # float64 for masks small enough to cache (built once); larger ones are rebuilt per call, in the compute dtype
    wide = torch.float64 if gamma.shape[0] * T * T <= _FACTOR_CACHE_MAX_ELEMS or dtype == torch.float64 else dtype
    log_g = torch.log(gamma.to(device=device, dtype=wide))  # [H]
    n = torch.arange(T, device=device, dtype=wide)

    def power(diff: torch.Tensor) -> torch.Tensor:  # γ^diff [H, *diff.shape], in the wide dtype
        return decay_powers(log_g, diff, wide)

    return ((power(n[:, None] - n[None, :]) * scale).to(dtype), (power((n + 1)[:, None]) * scale).to(dtype),
            power((T - 1 - n)[:, None]).to(dtype), power(n.new_full((1, 1), T)).to(dtype))


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                       scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                       output_final_state: bool = False) -> Out:
    """Parallel (training) form: one ``[B, H, T, T]`` masked score matrix, computed in q's dtype.

    The decay mask (with ``scale`` folded in) is built once per (γ, T, dtype) in float64 log space and cached;
    decays below e^-60 are exactly 0 (no denormals). Same arguments, returns and errors as
    :func:`retention_ref`; the final state is returned in q's dtype.
    """
    _check(q, k, v, gamma, initial_state)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    D, inner, tail, gT = _decay_factors(gamma, T, scale, q.dtype, q.device)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, *]
    o = ((q @ k.transpose(-1, -2)) * D) @ v  # [B, H, T, V]
    S = None
    if initial_state is not None:
        o = o + inner * (q @ initial_state.to(q.dtype))
    if output_final_state:
        S = (k * tail).transpose(-1, -2) @ v  # [B, H, K, V]
        if initial_state is not None:
            S = S + gT * initial_state.to(q.dtype)
    return o.transpose(1, 2), S


def retention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                        scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                        output_final_state: bool = False) -> Out:
    """Recurrent form, token by token: ``S_n = γ S_{n-1} + k_nᵀ v_n``, ``o_n = q_n S_n`` (constant memory in T).

    Same arguments, returns and errors as :func:`retention_ref`; computed in q's dtype.
    """
    _check(q, k, v, gamma, initial_state)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    g = gamma.to(q.dtype)[None, :, None, None]  # [1, H, 1, 1]
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for n in range(T):
        S = g * S + k[:, n, :, :, None] * v[:, n, :, None, :]  # [B, H, K, V]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, n] * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, (S if output_final_state else None)


@torch.compiler.disable  # the kernels run eagerly (torch.compile breaks the graph here rather than trace them)
def _chunkwise_triton(*args) -> Out:
    from .retention_triton import retention_chunkwise_triton  # CUDA only: Triton is imported here

    return retention_chunkwise_triton(*args)


def retention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                        scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                        output_final_state: bool = False, chunk_size: int = 64) -> Out:
    """Chunkwise form: parallel inside chunks of ``chunk_size`` tokens, recurrent across them.

    For a chunk of L tokens with incoming state S (RetNet Eq. 7)::

        o_i   = Σ_{j<=i} γ^(i-j) (q_i · k_j) v_j  +  γ^(i+1) q_i S          (intra-chunk + cross-chunk)
        S_out = γ^L S + Σ_j γ^(L-1-j) k_jᵀ v_j

    which is :func:`retention_parallel` with ``initial_state`` applied to each chunk in turn — computed for all
    chunks at once (:func:`retention_chunkwise_batched`: batched matmuls, the chunk states from one ``[nc, nc]`` decay
    matmul; no Python loop over chunks). The last chunk may be shorter (T need not be a multiple of
    ``chunk_size``). Memory O(B H T chunk) instead of O(B H T²).
    On CUDA (float32/bf16/fp16, head dims <= 128, gamma without gradient, Triton installed, ``LINVISION_TRITON``
    not ``0``) the Triton kernels of :mod:`linvision.ops.retention_triton` run instead (chunk length
    ``chunk_size`` rounded to a power of two in [16, 64]; the final state in q's dtype).
    Same arguments, returns and errors as :func:`retention_ref`, plus ``chunk_size >= 1``.
    """
    _check(q, k, v, gamma, initial_state)
    if chunk_size < 1:
        raise ValueError(f"retention_chunkwise: chunk_size must be >= 1, got {chunk_size}")
    T, K = q.shape[1], q.shape[-1]
    if (T > 0 and max(K, v.shape[-1]) <= 128 and not gamma.requires_grad
            and triton_enabled(q, k, v, *([] if initial_state is None else [initial_state]))):
        return _chunkwise_triton(q, k, v, gamma, scale, initial_state, output_final_state, chunk_size)
    scale = K ** -0.5 if scale is None else scale
    if T == 0:
        S = initial_state.to(q.dtype) if initial_state is not None else q.new_zeros(q.shape[0], q.shape[2], K,
                                                                                   v.shape[-1])
        return v.new_zeros(v.shape), (S if output_final_state else None)
    return retention_chunkwise_batched(q, k, v, gamma, scale, initial_state, output_final_state,
                                       min(int(chunk_size), T))


def decay_powers(log_g: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[H, *diff.shape]``: ``γ^diff`` (from ``log_g = log γ``, ``[H]``) where ``diff >= 0``, else 0; powers below
    e^-60 exactly 0 (no denormals). Plain tensor ops: traceable by ``torch.export``."""
    ex = log_g.to(dtype).view(-1, *([1] * diff.dim())) * diff.clamp(min=0).to(dtype)
    keep = (diff >= 0) & (ex > _LOG_TINY)
    return torch.where(keep, torch.exp(ex), torch.zeros((), dtype=dtype, device=ex.device))


def _head_chunks(t: torch.Tensor, padded: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, d]`` → contiguous head-major ``[B, H, padded, d]`` in ``dtype``, zeros after T: one copy (a
    padded transpose keeps the token-major strides, and every batched matmul on it would copy it again)."""
    B, T, H, d = t.shape
    out = t.new_empty((B, H, padded, d), dtype=dtype)
    out[:, :, :T] = t.transpose(1, 2)
    if padded > T:  # only the padding is zeroed (no fill of the whole tensor first)
        out[:, :, T:] = 0
    return out


def retention_chunkwise_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                                scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                                output_final_state: bool = False, chunk_size: int = 64) -> Out:
    """The chunkwise form (:func:`retention_chunkwise`'s equations) with every chunk computed at once, no Python
    loop over chunks (also the ``torch.export`` form of ViR's retention: :mod:`linvision.export`).

    T is zero-padded to ``n`` chunks of ``L = chunk_size`` (padded keys and values add nothing); inside a chunk
    the ``[L, L]`` decayed scores, for all chunks in one batched matmul; each chunk's total
    ``K_j = Σ_l γ^(L-1-l) k_lᵀ v_l`` likewise; the state entering chunk j, ``Σ_{j'<j} γ^(L (j-1-j')) K_{j'}
    + γ^(L j) S_0``, by one matmul with the ``[n, n]`` decay matrix; token l of chunk j adds ``γ^(l+1) q_l S_j``
    (the order of fla's ``chunk`` retention). The final state is taken after the true last token. Decays are
    built in float64 (:func:`decay_powers`) and cast to q's dtype; the output is in v's dtype, the final state in
    q's. Same arguments, returns and errors as :func:`retention_ref`, T >= 1.
    """
    B, T, H, K = q.shape
    V, L, dt = v.shape[-1], int(chunk_size), q.dtype
    scale = K ** -0.5 if scale is None else scale
    n = (T + L - 1) // L
    qc, kc, vc = (_head_chunks(t, n * L, dt).view(B, H, n, L, t.shape[-1]) for t in (q, k, v))  # [B, H, n, L, *]
    log_g = torch.log(gamma.detach().to(torch.float64))
    # [H, L, L] decayed mask · scale, γ^(l+1) · scale and γ^(L-1-l) as [H, 1, L, 1] (cached across calls)
    D, head, tail, _ = _decay_factors(gamma.detach(), L, scale, dt, q.device)
    head, tail = head[:, None], tail[:, None]
    o = (qc @ kc.transpose(-1, -2)).mul_(D[:, None]) @ vc  # intra-chunk [B, H, n, L, V]
    totals = (kc * tail).transpose(-1, -2) @ vc  # [B, H, n, K, V]
    ci = torch.arange(n, device=q.device)
    Dn = decay_powers(log_g * L, ci[:, None] - 1 - ci[None, :], torch.float64).to(dt)  # [H, n, n], j' < j
    S = (Dn @ totals.reshape(B, H, n, K * V)).reshape(B, H, n, K, V)  # state entering each chunk
    if initial_state is not None:
        S = S + decay_powers(log_g * L, ci, torch.float64).to(dt)[:, :, None, None] * initial_state.to(dt)[:, :, None]
    # + the cross-chunk part, accumulated into o by the product itself (no separate pass); in o's dtype (under
    # autocast the products above are in the low-precision dtype, the elementwise products not)
    # qc, a fresh copy needed no more, is scaled in place when no gradient is computed (the product above saves it)
    grads = needs_grad(q, k, v, initial_state)
    qh = qc * head if grads else qc.mul_(head)
    o.view(-1, L, V).baddbmm_(qh.view(-1, L, K).to(o.dtype), S.view(-1, K, V).to(o.dtype))
    o = o.view(B, H, n * L, V)[:, :, :T].transpose(1, 2).to(v.dtype)
    final = None
    if output_final_state:  # the last chunk holds r = T - (n - 1) L true tokens
        r = T - (n - 1) * L
        lr = torch.arange(r, device=q.device)
        tail_r = decay_powers(log_g, r - 1 - lr, torch.float64)[:, :, None].to(dt)  # [H, r, 1]
        g_r = decay_powers(log_g, torch.tensor(r, device=q.device), torch.float64).to(dt)[:, None, None]
        final = (kc[:, :, -1, :r] * tail_r).transpose(-1, -2) @ vc[:, :, -1, :r] + g_r * S[:, :, -1]
    return o, final
