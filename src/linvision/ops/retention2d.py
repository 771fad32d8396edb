"""2D retention (ViR v2, Hatamizadeh et al., arXiv 2310.19731 v2): retention over a grid of patches whose decay is
γ^(|Δrow| + |Δcol|) on the causal quadrant (row' <= row and col' <= col).

Conventions as :mod:`linvision.ops.retention` (fla): ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]`` with the T tokens
of ``T / width`` full grid rows in row-major order, per-head decay ``gamma: [H]``, ``scale`` on q (default
``K ** -0.5``). The state is per column: ``S: [B, H, width, K, V]``, the state of the last row seen.

Parallel definition (what :func:`retention2d_ref` computes), token n = (r, c)::

    o[r, c] = Σ_{r' <= r, c' <= c} γ^((r - r') + (c - c')) (q[r, c] · k[r', c']) v[r', c']

The decay factorizes, γ^(Δr + Δc) = γ^Δr γ^Δc, so with X[r, c] = k[r, c]ᵀ v[r, c] the quadrant sums
S[r, c] = Σ_{r' <= r, c' <= c} γ^((r - r') + (c - c')) X[r', c'] obey (inclusion–exclusion of the three
neighbouring quadrants, each one step further away)::

    S[r, c] = γ S[r-1, c] + γ S[r, c-1] - γ² S[r-1, c-1] + X[r, c],          o[r, c] = q[r, c] S[r, c]

Grouping the terms as S[r, c] = γ S[r-1, c] + Σ_{c' <= c} γ^(c - c') X[r, c'] gives the **row-recurrent form**
(:func:`retention2d_recurrent`): one row at a time, a decayed prefix sum along the row plus the decayed state of
the row above. A state S[-1, ·] carried in from rows above contributes γ^(r+1) q[r, c] S[-1, c] (the
differences S[-1, c] - γ S[-1, c-1] decay by γ per row and re-sum to S[-1, c]), so rows can be fed in pieces,
which is what streaming inference does.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .retention import decay_powers

__all__ = ["retention2d_ref", "retention2d_parallel", "retention2d_recurrent"]

Out = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _check(q, k, v, gamma, width, initial_state) -> int:
    B, T, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != (B, T, H):
        raise ValueError(f"retention2d: q, k must be [B, T, H, K] and v [B, T, H, V]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if width < 1 or T % width:
        raise ValueError(f"retention2d: T={T} tokens are not whole rows of width={width}")
    if gamma.shape != (H,):
        raise ValueError(f"retention2d: gamma must be [H={H}], got {tuple(gamma.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, width, K, v.shape[-1]):
        raise ValueError(f"retention2d: initial_state must be [B, H, width, K, V]={(B, H, width, K, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")
    return T // width


def retention2d_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, width: int,
                    scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                    output_final_state: bool = False) -> Out:
    """2D retention by the parallel definition, in float64 (the reference; O(T²) time and memory).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; T = rows × ``width``, row-major.
        gamma: ``[H]`` decay; width: grid columns; scale: q multiplier (default ``K ** -0.5``).
        initial_state: ``[B, H, width, K, V]``, the state S of the row above the first row, or None.
        output_final_state: also return S of the last row.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [B, H, width, K, V] float64 or None)``.

    Raises:
        ValueError: on mismatched shapes or T not a multiple of ``width``.
    """
    R = _check(q, k, v, gamma, width, initial_state)
    dtype, K = v.dtype, q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g = q.double() * scale, k.double(), v.double(), gamma.double()
    r = torch.arange(R, dtype=torch.float64, device=q.device).repeat_interleave(width)  # row of token n
    c = torch.arange(width, dtype=torch.float64, device=q.device).repeat(R)              # column of token n
    dr, dc = r[:, None] - r[None, :], c[:, None] - c[None, :]
    D = torch.where((dr >= 0) & (dc >= 0), g[:, None, None] ** (dr + dc).clamp(min=0),
                    torch.zeros((), dtype=torch.float64, device=q.device))  # [H, T, T]
    o = torch.einsum("bnhk,bmhk,hnm,bmhv->bnhv", q, k, D, v)
    S = None
    if initial_state is not None:
        S0 = initial_state.double()[:, :, c.long()]  # [B, H, T, K, V]: the column state above each token
        o = o + torch.einsum("bnhk,hn,bhnkv->bnhv", q, g[:, None] ** (r + 1), S0)
    if output_final_state:
        # S[R-1, c] = Σ_{r', c' <= c} γ^((R-1-r') + (c-c')) k[r',c']ᵀ v[r',c']  (+ γ^R S0[c])
        col = torch.arange(width, dtype=torch.float64, device=q.device)
        w = (g[:, None, None] ** ((R - 1 - r)[None, None, :] + (col[:, None] - c[None, :]).clamp(min=0))
             * (col[:, None] >= c[None, :]))  # [H, width, T]
        S = torch.einsum("hcm,bmhk,bmhv->bhckv", w, k, v)
        if initial_state is not None:
            S = S + (g ** R)[None, :, None, None, None] * initial_state.double()
    return o.to(dtype), S


def _decay(gamma: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Lower-triangular decay ``[H, n, n]``: γ^(i-j) for j <= i else 0, built in log space (no γ ** inf), powers
    below e^-60 exactly 0 (no denormals; :func:`~linvision.ops.retention.decay_powers`)."""
    i = torch.arange(n, device=gamma.device, dtype=dtype)
    return decay_powers(torch.log(gamma.to(dtype)), i[:, None] - i[None, :], dtype)


def retention2d_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, width: int,
                         scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                         output_final_state: bool = False) -> Out:
    """Parallel (training) form: one ``[B, H, T, T]`` masked score matrix with the separable decay
    ``D = D_row ⊗ D_col``, computed in q's dtype. Same arguments, returns (final state in q's dtype) and errors
    as :func:`retention2d_ref`."""
    R = _check(q, k, v, gamma, width, initial_state)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    Dr, Dc = _decay(gamma, R, q.dtype), _decay(gamma, width, q.dtype)  # [H, R, R], [H, W, W]
    D = (Dr[:, :, None, :, None] * Dc[:, None, :, None, :]).reshape(H, T, T)  # kron per head
    qh, kh, vh = (t.transpose(1, 2) for t in (q * scale, k, v))  # [B, H, T, *]
    o = ((qh @ kh.transpose(-1, -2)) * D) @ vh  # [B, H, T, V]
    log_g = torch.log(gamma.to(q.dtype))
    rows = torch.arange(R, device=q.device, dtype=q.dtype)
    if initial_state is not None:
        qr = qh.reshape(B, H, R, width, K)
        above = torch.einsum("bhrck,bhckv->bhrcv", qr, initial_state.to(q.dtype))
        o = o + (torch.exp(log_g[:, None] * (rows + 1))[None, :, :, None, None] * above).reshape(B, H, T, -1)
    S = None
    if output_final_state:
        # column sums decayed to the last row, then a decayed prefix sum along the row
        wr = torch.exp(log_g[:, None] * (R - 1 - rows))  # [H, R]
        X = torch.einsum("hr,bhrck,bhrcv->bhckv", wr, kh.reshape(B, H, R, width, K),
                         vh.reshape(B, H, R, width, -1))
        S = torch.einsum("hcd,bhdkv->bhckv", Dc, X)
        if initial_state is not None:
            S = S + torch.exp(log_g * R)[None, :, None, None, None] * initial_state.to(q.dtype)
    return o.transpose(1, 2), S


def _row_prefix(x: torch.Tensor, gamma: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Decayed prefix sum along dim 2 of ``x: [B, H, W, K, V]``: ``y[c] = Σ_{c' <= c} γ_h^(c - c') x[c']``.

    Two levels, no Python loop and only factors γ^n <= 1 (stable): a ``block × block`` decay matmul inside blocks of
    columns, then the same over the blocks' totals with decay γ^block, carried into each block by γ^(i+1).
    """
    B, H, W, K, V = x.shape
    nb = -(-W // block)
    xp = torch.nn.functional.pad(x.reshape(B, H, W, K * V), (0, 0, 0, nb * block - W)).view(B, H, nb, block, K * V)
    y = torch.einsum("hij,bhnjd->bhnid", _decay(gamma, block, x.dtype), xp)  # inside each block
    if nb > 1:
        carry = torch.einsum("hij,bhjd->bhid", _decay(gamma ** block, nb, x.dtype), y[:, :, :, -1])  # block totals
        into = torch.exp(torch.log(gamma.to(x.dtype))[:, None] * torch.arange(1, block + 1, device=x.device,
                                                                               dtype=x.dtype))  # [H, block]
        y = y.clone()
        y[:, :, 1:] += into[None, :, None, :, None] * carry[:, :, :-1, None, :]
    return y.reshape(B, H, nb * block, K, V)[:, :, :W]


def retention2d_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, width: int,
                          scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                          output_final_state: bool = False) -> Out:
    """Row-recurrent form: for each row r, ``S_r[c] = γ S_{r-1}[c] + Σ_{c' <= c} γ^(c - c') k[r, c']ᵀ v[r, c']``
    and ``o[r, c] = q[r, c] S_r[c]`` (the four-term recurrence of the module docstring, summed along the row).

    Memory O(B H width K V) for the state, independent of the number of rows. Same arguments, returns (final
    state in q's dtype) and errors as :func:`retention2d_ref`.
    """
    R = _check(q, k, v, gamma, width, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    g = gamma.to(q.dtype)[None, :, None, None, None]
    S = q.new_zeros(B, H, width, K, V) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for r in range(R):
        sl = slice(r * width, (r + 1) * width)
        qr, kr, vr = (t[:, sl].transpose(1, 2) for t in (q, k, v))  # [B, H, W, *]
        S = g * S + _row_prefix(kr[..., :, None] * vr[..., None, :], gamma)
        outs.append(torch.einsum("bhck,bhckv->bchv", qr * scale, S))
    o = torch.cat(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, (S if output_final_state else None)
