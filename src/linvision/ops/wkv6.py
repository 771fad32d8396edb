"""Bidirectional WKV6: the token mixer of Vision-RWKV v6 (VRWKV6; RWKV-6 "Finch" WKV with data-dependent decay,
Peng et al., arXiv 2404.05892, Eqs. 15-18, made bidirectional by Vision-RWKV, arXiv 2403.02308), as the official
kernel computes it (OpenGVLab/Vision-RWKV ``classification/mmcls_custom/models/backbones/cuda_v6/wkv6_cuda.cu``,
``kernel_forward``).

Per batch, head (``N`` channels), key channel ``j`` and value channel ``i``, with the per-token decay factor
``a_t = exp(-exp(w_t))``::

    y_t[i] = sum_j r_t[j] * ( u[j] k_t[j] v_t[i]
                              + sum_{s<t} (prod_{m=s+1}^{t-1} a_m[j]) k_s[j] v_s[i]
                              + sum_{s>t} (prod_{m=t+1}^{s-1} a_m[j]) k_s[j] v_s[i] )

i.e. RWKV-6's causal WKV plus its mirror image, the bonus ``u`` once at ``s = t``; the decay between two tokens is
the product of the factors of the tokens strictly between them. No 1/T scaling (unlike v4), no denominator.

Two forms, same signature ``(r, k, v, w, u) -> y``:

* :func:`wkv6_ref` — float64, the kernel's two recurrences line by line (O(T) steps of ``[B, H, N, N]`` states).
* :func:`wkv6` — the fast form: chunked O(T) ("chunkwise parallel", as GLA/RWKV-6 chunked kernels): inside a
  chunk of ``L`` tokens the pairwise decays ``exp(sum of log a over the tokens strictly between)`` are formed in
  log space (cumulative sums in float64, every exponent ≤ 0, so nothing overflows and vanishing decays underflow to
  the true ~0 — a cumulative *product* ``prod a`` divided by another underflows in float32 for decays ~4e-4 per
  token: 0/0); across chunks a ``[N, N]`` state per head is carried. Backward is autograd through this form,
  checkpointed: only the inputs are kept for backward (as the official kernel keeps r, k, v, w, u), the chunked
  form is recomputed there; transient memory O(B·T·C·L) (the ``[L, L, N]`` pairwise decays of each chunk).
* :func:`wkv6_loop_free` — the same chunked form with the cross-chunk state recurrence as a fixed number of
  doubling steps (no loop whose length depends on T): the form ``torch.export`` / ONNX take, one graph for every
  image size (:mod:`linvision.export`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import needs_grad

__all__ = ["wkv6", "wkv6_ref", "wkv6_loop_free"]

SCAN_LEVELS = 15  # wkv6_loop_free: doubling steps, enough for 2**15 chunks (524,288 tokens at the default chunk)


def _check(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, fn: str):
    if r.dim() != 3 or not (r.shape == k.shape == v.shape == w.shape):
        raise ValueError(f"{fn}: r, k, v, w must all be [B, T, C], got {tuple(r.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(w.shape)}")
    if u.dim() != 2 or u.shape[0] * u.shape[1] != r.shape[-1]:
        raise ValueError(f"{fn}: u must be [H, N] with H*N == C={r.shape[-1]}, got {tuple(u.shape)}")


def _heads(x: torch.Tensor, H: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H*N]`` → ``[B, H, T, N]``."""
    B, T, C = x.shape
    return x.to(dtype).reshape(B, T, H, C // H).transpose(1, 2)


def wkv6_ref(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bidirectional WKV6 reference, float64, the official ``kernel_forward`` recurrences line by line.

    Loop 1, ``t = T-1 … 0``, ``S2 = 0``: ``y_t = r_t S2``; ``S2 = diag(a_t) S2 + k_t^T v_t``.
    Loop 2, ``t = 0 … T-1``, ``S1 = 0``: ``y_t += r_t (diag(u) k_t^T v_t + S1)``; ``S1 = diag(a_t) S1 + k_t^T v_t``.
    Here ``a_t = exp(-exp(w_t))``.

    Args:
        r, k, v: ``[B, T, C]`` receptance, key, value (C = H·N).
        w: ``[B, T, C]`` log-log decay (the official ``time_decay + LoRA``): factor ``exp(-exp(w))`` per token.
        u: ``[H, N]`` bonus (official ``time_faaaa``).

    Returns:
        ``[B, T, C]`` in ``r.dtype`` (computed in float64; differentiable).

    Raises:
        ValueError: on mismatched shapes.
    """
    _check(r, k, v, w, u, "wkv6_ref")
    B, T, C = r.shape
    H, N = u.shape
    r_, k_, v_, w_ = (_heads(x, H, torch.float64) for x in (r, k, v, w))
    a = torch.exp(-torch.exp(w_))
    u_ = u.to(torch.float64)[None, :, :, None]  # [1, H, N, 1]
    S = r_.new_zeros(B, H, N, N)
    back = [None] * T
    for t in range(T - 1, -1, -1):
        back[t] = torch.einsum("bhj,bhji->bhi", r_[:, :, t], S)
        S = S * a[:, :, t, :, None] + k_[:, :, t, :, None] * v_[:, :, t, None, :]
    S = r_.new_zeros(B, H, N, N)
    out = []
    for t in range(T):
        kv = k_[:, :, t, :, None] * v_[:, :, t, None, :]
        out.append(back[t] + torch.einsum("bhj,bhji->bhi", r_[:, :, t], u_ * kv + S))
        S = S * a[:, :, t, :, None] + kv
    y = torch.stack(out, dim=2) if T else r_.new_zeros(B, H, 0, N)  # [B, H, T, N]
    return y.transpose(1, 2).reshape(B, T, C).to(r.dtype)


def _cpu_kernel_applies(*tensors: torch.Tensor) -> bool:
    """The compiled CPU kernel of :mod:`.wkv6_cpu` runs for the within-chunk scores when nothing needs their
    gradient, the tensors are CPU float32/float64, and the compiled CPU path is on in eager mode
    (:func:`linvision.ops.biwkv.eager_cpu_kernel`: ``LINVISION_BIWKV_CPU``, not inside compile/export/dispatch
    modes)."""
    from .biwkv import eager_cpu_kernel

    x = tensors[0]
    if x.dtype not in (torch.float32, torch.float64):
        return False
    if needs_grad(*tensors):
        return False
    return eager_cpu_kernel(x)


def _intra_chunk(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, excl: torch.Tensor, incl: torch.Tensor,
                 lw: torch.Tensor) -> torch.Tensor:
    """Within each chunk ``[B', H, n, L, N]``: ``sum_{s<t} r_t diag(exp(excl_t - incl_s)) k_s^T v_s``, the
    log-decay between ``s < t`` being ``excl_t - incl_s = sum_{m=s+1}^{t-1} log a_m <= 0`` (float64 difference,
    then ``r.dtype``). Inference on CPU: the same scores (to rounding) by the compiled kernel of :mod:`.wkv6_cpu`
    from ``lw = log a``, no ``[L, L, N]`` tensor."""
    if _cpu_kernel_applies(r, k, v, lw):
        from .wkv6_cpu import intra_chunk_scores
        return intra_chunk_scores(r, k, lw) @ v
    L = r.shape[-2]
    mask = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)[:, :, None]  # [t, s, 1]
    D = (excl[..., :, None, :] - incl[..., None, :, :]).to(r.dtype).masked_fill_(~mask, float("-inf"))
    A = torch.einsum("bhctj,bhcsj,bhctsj->bhcts", r, k, torch.exp(D))  # [B', H, n, L, L]
    return A @ v


def _states_loop(chunk_decay: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Exclusive chunk states ``S_c = sum_{c'<c} (prod_{c'<m<c} d_m) U_{c'}`` of ``d = chunk_decay``
    ``[B', H, n, N, 1]`` and ``U`` ``[B', H, n, N, N]``: the recurrence ``S_{c+1} = d_c S_c + U_c``, chunk by chunk."""
    S = U.new_zeros(U[:, :, 0].shape)
    states = []
    for c in range(U.shape[2]):
        states.append(S)
        S = chunk_decay[:, :, c] * S + U[:, :, c]
    return torch.stack(states, dim=2)


def _states_scan(chunk_decay: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """:func:`_states_loop` without a loop over chunks: an inclusive Hillis–Steele scan of the pairs ``(d_c, U_c)``
    in :data:`SCAN_LEVELS` doubling steps (step ``j`` folds in the pair ``2**j`` chunks earlier; shifting pads with
    the identity ``(1, 0)``, so steps beyond n change nothing), then shifted by one chunk. Decay products only
    shrink (every factor <= 1): nothing overflows."""
    n = U.shape[2]
    d, S = chunk_decay, U
    for j in range(SCAN_LEVELS):
        s = 1 << j
        S = S + d * F.pad(S, (0, 0, 0, 0, s, 0))[:, :, :n]
        d = d * F.pad(d, (0, 0, 0, 0, s, 0), value=1.0)[:, :, :n]
    return F.pad(S, (0, 0, 0, 0, 1, 0))[:, :, :n]


def _causal_chunked(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lw: torch.Tensor, L: int,
                    loop_free: bool = False) -> torch.Tensor:
    """Strictly causal part ``sum_{s<t} r_t diag(prod_{m=s+1}^{t-1} a_m) k_s^T v_s`` of ``[B', H, T, N]`` inputs,
    ``lw = log a = -exp(w)`` (float64), in chunks of ``L`` tokens; result in ``r.dtype``. ``loop_free``: no Python
    control flow on T (always padded; chunk states by :func:`_states_scan`)."""
    Bq, H, T, N = r.shape
    pad = (-T) % L
    if loop_free or pad:  # trailing zero tokens (log-decay 0) change nothing before them
        r, k, v, lw = (F.pad(x, (0, 0, 0, pad)) for x in (r, k, v, lw))
    n = (T + pad) // L
    r, k, v, lw = (x.reshape(Bq, H, n, L, N) for x in (r, k, v, lw))
    incl = lw.cumsum(dim=3)  # float64: sum of log a over chunk tokens 0..t
    excl = incl - lw  # 0..t-1
    dt = r.dtype
    y = _intra_chunk(r, k, v, excl, incl, lw)
    # inter-chunk: chunk-end states S_c = sum over earlier chunks; all exponents <= 0
    k_end = k * torch.exp(incl[..., -1:, :] - incl).to(dt)  # decay from s to the chunk's end (exclusive of s)
    U = k_end.transpose(-1, -2) @ v  # [B', H, n, N, N]
    chunk_decay = torch.exp(incl[..., -1, :]).to(dt)[..., None]  # [B', H, n, N, 1]
    states = (_states_scan if loop_free else _states_loop)(chunk_decay, U)
    y = y + (r * torch.exp(excl).to(dt)) @ states
    return y.reshape(Bq, H, n * L, N)[:, :, :T]


def wkv6(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
         chunk_size: int = 16) -> torch.Tensor:
    """Bidirectional WKV6, chunked O(T) form (see the module docstring); same result as :func:`wkv6_ref`.

    Args:
        r, k, v: ``[B, T, C]`` receptance, key, value (C = H·N).
        w: ``[B, T, C]`` log-log decay: factor ``exp(-exp(w))`` per token and channel.
        u: ``[H, N]`` bonus.
        chunk_size: tokens per chunk ``L`` (memory O(B·T·C·L); any T, the last chunk is padded).

    Returns:
        ``[B, T, C]`` in ``r.dtype``; float16/bfloat16 inputs are computed in float32. Differentiable (autograd
        through the chunked form, checkpointed: only the inputs are kept for backward).

    Raises:
        ValueError: on mismatched shapes or ``chunk_size < 1``.
    """
    _check(r, k, v, w, u, "wkv6")
    if chunk_size < 1:
        raise ValueError(f"wkv6: chunk_size must be >= 1, got {chunk_size}")
    if needs_grad(r, k, v, w, u):
        # keep only the inputs for backward (as the official kernel does) and recompute the chunked form there
        return torch.utils.checkpoint.checkpoint(_wkv6_chunked, r, k, v, w, u, chunk_size, use_reentrant=False)
    return _wkv6_chunked(r, k, v, w, u, chunk_size)


def wkv6_loop_free(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                   chunk_size: int = 16) -> torch.Tensor:
    """Bidirectional WKV6 for ``torch.export`` / ONNX: :func:`wkv6`'s chunked form with no Python control flow on
    T — every T padded to whole chunks, the cross-chunk states by a fixed-depth doubling scan — so one exported
    graph serves every image size. Same contract and result as :func:`wkv6` (to rounding); up to
    ``chunk_size * 2**SCAN_LEVELS`` tokens. Not checkpointed (an inference form).

    Raises:
        ValueError: on mismatched shapes, ``chunk_size < 1`` or more tokens than the scan covers.
    """
    _check(r, k, v, w, u, "wkv6_loop_free")
    if chunk_size < 1:
        raise ValueError(f"wkv6_loop_free: chunk_size must be >= 1, got {chunk_size}")
    T = r.shape[1]
    if isinstance(T, int) and T > chunk_size * 2 ** SCAN_LEVELS:  # (symbolic under export: within the Dim range)
        raise ValueError(f"wkv6_loop_free: at most {chunk_size * 2 ** SCAN_LEVELS} tokens, got {T}")
    return _wkv6_chunked(r, k, v, w, u, chunk_size, loop_free=True)


def _wkv6_chunked(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                  chunk_size: int, loop_free: bool = False) -> torch.Tensor:
    B, T, C = r.shape
    H, N = u.shape
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    r_, k_, v_ = (_heads(x, H, dt) for x in (r, k, v))
    lw = -torch.exp(_heads(w, H, torch.float64))
    # forward and (time-flipped) backward direction in one batch
    both = [torch.cat([x, x.flip(2)], dim=0) for x in (r_, k_, v_, lw)]
    y2 = _causal_chunked(*both, L=chunk_size if loop_free else min(chunk_size, max(T, 1)), loop_free=loop_free)
    y = y2[:B] + y2[B:].flip(2)
    y = y + (r_ * u.to(dt)[None, :, None, :] * k_).sum(-1, keepdim=True) * v_  # bonus at s = t
    return y.transpose(1, 2).reshape(B, T, C).to(r.dtype)
