"""Bi-WKV: the bidirectional linear attention of Vision-RWKV (Duan et al., arXiv 2403.02308, Eq. 5).

For one channel c (all channels are independent), with per-channel decay ``w`` and bonus ``u`` and per-token
key ``k_i`` and value ``v_i`` (i = 0..T-1)::

    wkv_t = ( sum_{i != t} exp(-(|t-i| - 1) * w + k_i) * v_i  +  exp(u + k_t) * v_t )
          / ( sum_{i != t} exp(-(|t-i| - 1) * w + k_i)        +  exp(u + k_t)       )

The model passes ``w = spatial_decay / T`` and ``u = spatial_first / T`` (the official code divides both by the
token count T). ``w`` may be negative (weight then grows with distance).

Three forms share one signature ``(w, u, k, v) -> [B, T, C]``:

* :func:`bi_wkv_ref` — Eq. 5 written plainly: the full ``[B, T, T, C]`` logit tensor in float64, max-subtracted
  per output token. O(T^2 C B) time and memory. The reference every other form is tested against.
* :func:`bi_wkv` — the form the models use: decayed prefix and suffix sums computed in chunks (batched matmuls
  inside a chunk, a state recurrence across chunks), ``exp(k - max_i k)`` and a per-channel shift of the decay
  exponent for stability, fp32 inside for low-precision inputs. O(T) memory, O(T · chunk) time.
* :func:`bi_wkv_official_kernel_ref` (``bi_wkv(..., variant="official_kernel")``) — the arithmetic of the
  authors' CUDA kernel, which differs from Eq. 5 and which the released checkpoints were trained with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bi_wkv_ref", "bi_wkv", "bi_wkv_official_kernel_ref", "BI_WKV_VARIANTS"]

BI_WKV_VARIANTS = ("eq5", "official_kernel")


def _check(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"bi_wkv: k and v must both be [B, T, C], got {tuple(k.shape)} and {tuple(v.shape)}")
    C = k.shape[-1]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"bi_wkv: w and u must be [C={C}], got {tuple(w.shape)} and {tuple(u.shape)}")


def bi_wkv_ref(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV by the definition (paper Eq. 5), in float64.

    Args:
        w: ``[C]`` decay per channel (already divided by T), any float dtype.
        u: ``[C]`` bonus of the token itself (already divided by T).
        k: ``[B, T, C]`` keys.
        v: ``[B, T, C]`` values.

    Returns:
        ``[B, T, C]`` in the dtype of ``v``. Differentiable (autograd through the O(T^2) graph).

    Raises:
        ValueError: on mismatched shapes.
    """
    _check(w, u, k, v)
    out_dtype = v.dtype
    w, u, k, v = (t.double() for t in (w, u, k, v))
    T = k.shape[1]
    idx = torch.arange(T, device=k.device)
    dist = (idx[:, None] - idx[None, :]).abs().double()  # [T, T]
    eye = dist == 0
    # logits[b, t, i, c] = -(|t-i|-1) w_c + k_i,c  (i != t);  u_c + k_t,c  (i == t)
    logits = -(dist - 1)[None, :, :, None] * w + k[:, None, :, :]
    logits = torch.where(eye[None, :, :, None], (u + k)[:, :, None, :].expand_as(logits), logits)
    p = torch.exp(logits - logits.amax(dim=2, keepdim=True))  # max-subtracted over i
    return ((p * v[:, None, :, :]).sum(2) / p.sum(2)).to(out_dtype)


def _decayed_prefix(x: torch.Tensor, w: torch.Tensor, m: torch.Tensor, chunk: int) -> torch.Tensor:
    """``P[c, t] = Σ_{i<t} exp(-(t-i-1) w_c - m_c) x[c, i]`` for ``x: [C, T, N]``, in chunks of ``chunk`` tokens.

    Inside a chunk: one ``[L, L]`` lower-triangular decay matrix per channel (a batched matmul). Across chunks:
    the state at chunk start ``S_j = Σ_{i<s_j} exp(-(s_j-i-1) w) x_i`` by the recurrence
    ``S_{j+1} = exp(-L w) S_j + Z_j`` with ``Z_j = Σ_{l<L} exp(-(L-1-l) w) x_{j,l}``; token ``s_j + l`` then adds
    ``exp(-l w - m) S_j``. O(T·L) work, O(T) memory (nothing T×T).
    """
    C, T, N = x.shape
    L = max(1, min(chunk, T))
    nc = -(-T // L)
    x = F.pad(x, (0, 0, 0, nc * L - T)).view(C, nc, L, N)
    pos = torch.arange(L, device=x.device, dtype=x.dtype)
    d = pos[:, None] - pos[None, :]  # t - i within a chunk
    intra = torch.exp((-(d - 1) * w[:, None, None] - m[:, None, None]).masked_fill(d < 1, float("-inf")))
    out = torch.matmul(intra[:, None], x)  # [C, 1, L, L] @ [C, nc, L, N] -> [C, nc, L, N]
    if nc > 1:
        z = torch.einsum("cl,cjln->cjn", torch.exp(-(L - 1 - pos) * w[:, None]), x)  # [C, nc, N]
        step, state, states = torch.exp(-L * w)[:, None], torch.zeros_like(z[:, 0]), []
        for j in range(nc):
            states.append(state)
            state = step * state + z[:, j]
        S = torch.stack(states, dim=1)  # [C, nc, N]: state at each chunk start
        out = out + torch.exp(-pos * w[:, None] - m[:, None])[:, None, :, None] * S[:, :, None, :]
    return out.reshape(C, nc * L, N)[:, :T]


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "eq5",
           chunk_size: int = 64) -> torch.Tensor:
    """Bi-WKV (paper Eq. 5) in O(T) memory and O(T · chunk_size) time; same contract as :func:`bi_wkv_ref`.

    Eq. 5 splits into the token itself, a decayed prefix ``P_t = Σ_{i<t} e^{-(t-i-1)w} e^{k_i} v_i`` and the same
    suffix ``N_t`` (a prefix of the reversed sequence): ``wkv_t = (P_t + N_t + e^{u+k_t} v_t) / (P'_t + N'_t +
    e^{u+k_t})`` with primes for ``v = 1``. Each prefix is computed in chunks (:func:`_decayed_prefix`):
    matmuls inside a chunk, a recurrence over chunk states across chunks. Nothing T×T is formed, in the
    forward or (through autograd) the backward.

    Stability: the ratio is unchanged when all terms of one output token are scaled by a common factor, so keys
    use ``exp(k_i - max_i k)`` (per batch, channel) and decay weights ``exp(-(|t-i|-1) w_c - m_c)`` with ``m_c``
    the largest decay exponent of channel c (``0`` for ``w_c >= 0``, ``(T-2)|w_c|`` for ``w_c < 0``); the bonus
    term is scaled by the same ``exp(-m_c)``. Finite for any k when ``|w_c| T`` stays below ~80 (fp32 range;
    the model passes ``w = spatial_decay / T``, so this is ``|spatial_decay| < 80``).

    ``variant="official_kernel"`` computes instead what the authors' CUDA kernel computes (the arithmetic the
    released checkpoints were trained with), via :func:`bi_wkv_official_kernel_ref`.

    Args:
        w, u: ``[C]``; k, v: ``[B, T, C]``. bf16/fp16 inputs are computed in fp32.
        chunk_size: tokens per chunk (T <= chunk_size: one ``[T, T]`` matmul per channel).

    Returns:
        ``[B, T, C]`` in the dtype of ``v``.

    Raises:
        ValueError: mismatched shapes or an unknown ``variant``.
    """
    if variant == "official_kernel":
        return bi_wkv_official_kernel_ref(w, u, k, v)
    if variant != "eq5":
        raise ValueError(f"bi_wkv: variant must be one of {BI_WKV_VARIANTS}, got {variant!r}")
    _check(w, u, k, v)
    out_dtype = v.dtype
    cd = torch.promote_types(v.dtype, torch.float32)
    w, u, k, v = (t.to(cd) for t in (w, u, k, v))
    B, T, C = k.shape
    m = (-w).clamp(min=0) * max(T - 2, 0)  # [C] max off-diagonal decay exponent
    k, v = k.permute(2, 1, 0), v.permute(2, 1, 0)  # [C, T, B]: matmuls batched over channels
    ek = torch.exp(k - k.amax(dim=1, keepdim=True))
    x = torch.cat([ek * v, ek], dim=2)  # [C, T, 2B]: numerator and denominator terms together
    side = _decayed_prefix(x, w, m, chunk_size) + _decayed_prefix(x.flip(1), w, m, chunk_size).flip(1)
    bonus = torch.exp(u - m)[:, None, None] * ek  # [C, T, B]
    out = (side[..., :B] + bonus * v) / (side[..., B:] + bonus)
    return out.permute(2, 1, 0).to(out_dtype)


def bi_wkv_official_kernel_ref(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               token_split: int = 32, eps: float = 1e-6) -> torch.Tensor:
    """What the official Vision-RWKV CUDA kernel (``cuda/wkv_cuda.cu``, ``cuda_new/bi_wkv_kernel.cu``) computes,
    written as an explicit weight matrix in float64 (O(T^2); differentiable; for loading published weights).

    The kernel splits T into ``token_split`` = 32 chunks of ``L = ceil(T / 32)`` tokens. For output token t in the
    chunk starting at s, token n gets weight ``W[t, n] * exp(k_n)`` with::

        n == t:            exp(u)                      (+ (1 - exp(w)) if t > s: the chunk's leftover term)
        n > t:             exp(-(n - t) w)             (|t-n|, not |t-n| - 1 as in Eq. 5)
        n < s:             exp(-(t - n) w)
        s <= n < t:        exp(-(t - n - 1) w)  (+ exp((t - n) w) (1 - exp(w)) if n > s: leftover term)

    and ``wkv_t = Σ W e^k v / (Σ W e^k + eps e^{m_t})``, where ``m_t`` is the kernel's running max exponent
    (reproduced here) so the ``EPS = 1e-6`` it adds to the max-subtracted denominator has the same effect. For
    T <= 32 (one token per chunk) this is Eq. 5 with ``u -> u + w`` plus EPS.

    Args and returns as :func:`bi_wkv_ref` (``[B, T, C]`` in v's dtype).
    """
    _check(w, u, k, v)
    out_dtype = v.dtype
    w, u, k, v = (t.double() for t in (w, u, k, v))
    B, T, C = k.shape
    L = -(-T // token_split)  # tokens per chunk
    t_idx = torch.arange(T, device=k.device)
    s_idx = (t_idx // L) * L  # first token of each token's chunk
    tt, nn = t_idx[:, None], t_idx[None, :]
    ss = s_idx[:, None]
    d = (tt - nn).double()[..., None]  # [T, T, 1], t - n
    ew = torch.exp(w)
    W = torch.where((nn > tt)[..., None], torch.exp(d * w), torch.zeros((), dtype=torch.float64, device=k.device))
    W = W + torch.where((nn < ss)[..., None], torch.exp(-d * w), torch.zeros_like(W))
    W = W + torch.where(((nn >= ss) & (nn < tt))[..., None], torch.exp(-(d - 1) * w), torch.zeros_like(W))
    W = W + torch.where(((nn > ss) & (nn <= tt))[..., None], torch.exp(d * w) * (1 - ew), torch.zeros_like(W))
    W = W + torch.where((nn == tt)[..., None], torch.exp(u).expand(T, T, C), torch.zeros_like(W))  # [T, T, C]
    # the kernel's max exponents: o1 (later tokens + leftovers), o2 (earlier tokens), and u + k_t
    big_neg = torch.full((B, C), -1e38, dtype=torch.float64, device=k.device)
    m = torch.empty(B, T, C, dtype=torch.float64, device=k.device)
    n = t_idx.double()[:, None]  # [T, 1]
    for s in range(0, T, L):
        o1 = (k[:, s:] - w * (n[s:] - s)).amax(1)  # [B, C]
        o2 = (k[:, :s] - w * (s - n[:s])).amax(1) if s > 0 else big_neg
        for t in range(s, min(s + L, T)):
            m[:, t] = torch.maximum(torch.maximum(o1, u + k[:, t]), o2)
            o2 = torch.maximum(o2 - w, k[:, t])
            if t + 1 < T:
                o1 = torch.maximum(o1 + w, k[:, t + 1] + w)
    ek = torch.exp(k[:, None, :, :] - m[:, :, None, :])  # [B, t, n, C], scaled by the kernel's max
    num = (W * ek * v[:, None]).sum(2)
    den = (W * ek).sum(2) + eps
    return (num / den).to(out_dtype)
