"""Compiled CPU kernel (numba) for the within-chunk part of :func:`linvision.ops.wkv6.wkv6` without gradients.

``A[t, s] = Σ_j r_t[j] k_s[j] exp(excl_t[j] - incl_s[j])`` for ``s < t`` (else 0), per chunk of L tokens and head —
the decayed scores of :func:`linvision.ops.wkv6._intra_chunk`. The torch form builds the ``[L, L, N]`` log-decay
differences of every chunk in float64, casts them, masks them and takes ``exp`` — five passes over a tensor L
times the size of the input (70 % of ``vrwkv6_tiny``'s CPU inference time at 512², profiled). This kernel stores
only the scores (``[L, L]`` per chunk and head): for each t it walks s down from t - 1, keeping the decay product
``Π_{s<m<t} a_m`` per channel in float64 and multiplying in one factor ``a_s = exp(lw_s)`` per step (one ``exp``
per token and channel, a torch op before the kernel) — products only ever shrink, nothing is divided, so vanishing
decays underflow to the true ~0 as in the log-space form; the sums over channels are float64. One parallel job per
(batch row, head, chunk) on ``torch.get_num_threads()`` threads. Inference only: with gradients the torch form
runs (autograd).

Compiled on first use per dtype and cached on disk by numba (see :mod:`linvision.ops.biwkv_cpu`).
"""
from __future__ import annotations

import numpy as np
import torch

from .biwkv_cpu import numba, threads

__all__ = ["intra_chunk_scores"]

if numba is not None:
    from numba import njit, prange

    @njit(parallel=True, cache=True, fastmath=False)
    def _scores(r, k, a, A):  # pragma: no cover - compiled
        """r, k ``[J, L, N]`` (J = batch rows × heads × chunks), decay factors a ``[J, L, N]`` float64; A ``[J, L, L]``.
        For each t, s runs down from t - 1 with the decay product ``d = Π_{s<m<t} a_m`` (1 at s = t - 1) updated by
        one multiply per step: no ``exp`` in the loops, which LLVM vectorises over the N channels."""
        J, L, N = r.shape
        for job in prange(J):
            d = np.empty(N, dtype=np.float64)
            for t in range(L):
                d[:] = 1.0
                for s in range(t - 1, -1, -1):
                    acc = 0.0
                    for j in range(N):
                        acc += r[job, t, j] * k[job, s, j] * d[j]
                    A[job, t, s] = acc
                    for j in range(N):
                        d[j] *= a[job, s, j]
                for s in range(t, L):
                    A[job, t, s] = 0.0


def intra_chunk_scores(r: torch.Tensor, k: torch.Tensor, lw: torch.Tensor) -> torch.Tensor:
    """``[..., L, L]`` scores in r's dtype from ``r, k`` ``[..., L, N]`` (float32/float64) and the float64 log decay
    factors ``lw = log a`` ``[..., L, N]`` of each chunk's tokens (see module docstring)."""
    *lead, L, N = r.shape
    flat = [x.detach().reshape(-1, L, N).contiguous() for x in (r, k, torch.exp(lw))]
    A = torch.empty(flat[0].shape[0], L, L, dtype=r.dtype)
    with threads("linvision::wkv6_intra_chunk (numba)"):
        _scores(*(x.numpy() for x in flat), A.numpy())
    return A.reshape(*lead, L, L)
