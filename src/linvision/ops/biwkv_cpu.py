"""Compiled CPU kernels (numba) for the Bi-WKV custom op ``linvision::bi_wkv_fwd`` / ``bi_wkv_bwd``.

The same equations, stabilisation and saved tensors as the torch-ops path in :mod:`linvision.ops.biwkv` (see
:func:`linvision.ops.biwkv.bi_wkv` for the derivation), written as two sequential scans per batch item and channel
block instead of one vectorised torch op per position: each step of a scan is a loop over a contiguous block of
channels (vectorisable), the blocks run in parallel (``numba.prange``) on ``torch.get_num_threads()`` threads.

Forward (per channel, ``a = e^{k - max_t k}``, ``x^n = a v``, ``x^d = a``, ``r = e^{-w}``): a forward pass builds
the signals and the exclusive prefix ``P`` (stored in place of what becomes ``δ'``), a reverse pass rolls the
exclusive suffix ``S`` and writes ``wkv = (P^n + S^n + e^u x^n) / (P^d + S^d + e^u x^d)``, ``den`` and
``δ' = e^u (x^n (P^d + S^d) - a (P^n + S^n)) / den``. The saved tensors are exactly those of the torch path (any
chunk layout ``[2B, L, nc, C]``, chunk carries included), so either path's backward accepts either forward's
saved tensors.

Backward (``α = g / den``, ``β = α wkv``): a forward pass rolls the prefix ``Q'`` of ``(α, β)`` (stored in the
``dk``/``dv`` buffers), the prefix ``P`` of the signals and ``R``, the prefix scan of ``P``, accumulating
``Σ_j P_j Q_j = Σ_m (α, β)_m R_m``; a reverse pass rolls ``S`` and ``Q`` and writes ``dk``, ``dv`` and
``Σ_j S_j Q'_j``. ``∂ℓ/∂w`` and ``∂ℓ/∂u`` are accumulated in float64 per (batch, channel) and summed by the caller.

The decays ``e^{-w}``, ``e^u`` and all running states are float64 in both kernels (the fp32 signals are stored
as fp32): a sequential scan over T tokens would otherwise accumulate the fp32 rounding of ``e^{-w}`` T times;
this way the fp32 output and gradients are within ~1e-7 relative RMS of the float64 reference at any T.

float32 and float64 kernels (compiled on first use per dtype, cached on disk by numba: beside this file, or in the
user-wide numba cache when the package directory is read-only, or in ``NUMBA_CACHE_DIR``). ``fastmath`` is off:
results differ from the torch path only by the order of the additions.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

try:  # optional at import time: without numba the op uses the torch-ops path
    import numba
    from numba import njit, prange
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # pragma: no cover - exercised on machines without numba
    numba = None
    _IMPORT_ERROR = e

__all__ = ["available", "forward", "backward"]


def available() -> bool:
    """True when numba imported (the compiled CPU kernels can run)."""
    return numba is not None


def import_error() -> Optional[BaseException]:
    return _IMPORT_ERROR


if numba is not None:

    @njit(parallel=True, cache=True, fastmath=False)
    def _fwd_kernel(w, u, k, v, y, X, PS, car, cb):  # pragma: no cover - compiled; tested through the op
        B, Tp, C = k.shape  # k, v (and y) padded to the Tp = L * nc tokens of the layout: k with -inf, v with 0
        L = X.shape[1]
        nblk = (C + cb - 1) // cb
        for job in prange(B * nblk):
            b = job // nblk
            c0 = (job % nblk) * cb
            n = min(cb, C - c0)
            r = np.exp(-w[c0:c0 + n].astype(np.float64))  # decay and states in float64 whatever the dtype
            eu = np.exp(u[c0:c0 + n].astype(np.float64))
            kmax = k[b, 0, c0:c0 + n].copy()
            for t in range(1, Tp):
                for c in range(n):
                    kmax[c] = max(kmax[c], k[b, t, c0 + c])
            pn = np.zeros_like(r)
            pd = np.zeros_like(r)
            for t in range(Tp):  # signals and the exclusive prefix P (into PS)
                l, j = t % L, t // L
                if l == 0:
                    for c in range(n):
                        car[0, b, j, c0 + c] = pn[c]
                        car[0, B + b, j, c0 + c] = pd[c]
                for c in range(n):
                    a = np.exp(k[b, t, c0 + c] - kmax[c])
                    xn = a * v[b, t, c0 + c]
                    X[b, l, j, c0 + c] = xn
                    X[B + b, l, j, c0 + c] = a
                    PS[b, l, j, c0 + c] = pn[c]
                    PS[B + b, l, j, c0 + c] = pd[c]
                    pn[c] = r[c] * pn[c] + xn
                    pd[c] = r[c] * pd[c] + a
            sn = np.zeros_like(r)
            sd = np.zeros_like(r)
            for t in range(Tp - 1, -1, -1):  # the exclusive suffix S rolled; wkv, den, δ'
                l, j = t % L, t // L
                if l == L - 1:
                    for c in range(n):
                        car[1, b, j, c0 + c] = sn[c]
                        car[1, B + b, j, c0 + c] = sd[c]
                for c in range(n):
                    xn = X[b, l, j, c0 + c]
                    a = X[B + b, l, j, c0 + c]
                    psn = PS[b, l, j, c0 + c] + sn[c]
                    psd = PS[B + b, l, j, c0 + c] + sd[c]
                    den = psd + eu[c] * a
                    y[b, t, c0 + c] = (psn + eu[c] * xn) / den
                    PS[b, l, j, c0 + c] = eu[c] * (xn * psd - a * psn) / den
                    PS[B + b, l, j, c0 + c] = den
                    sn[c] = r[c] * sn[c] + xn
                    sd[c] = r[c] * sd[c] + a

    @njit(parallel=True, cache=True, fastmath=False)
    def _bwd_kernel(gy, w, u, y, X, DD, dk, dv, dw, du, cb):  # pragma: no cover - compiled
        B, T, C = gy.shape
        L = X.shape[1]
        nblk = (C + cb - 1) // cb
        for job in prange(B * nblk):
            b = job // nblk
            c0 = (job % nblk) * cb
            n = min(cb, C - c0)
            r = np.exp(-w[c0:c0 + n].astype(np.float64))  # decay and states in float64 whatever the dtype
            eu = np.exp(u[c0:c0 + n].astype(np.float64))
            pn, pd = np.zeros_like(r), np.zeros_like(r)  # prefix of the signals
            rn, rd = np.zeros_like(r), np.zeros_like(r)  # prefix of P
            qa, qb = np.zeros_like(r), np.zeros_like(r)  # prefix (Q'), then suffix (Q) of α, β
            acc_wn = np.zeros(n, np.float64)
            acc_wd = np.zeros(n, np.float64)
            acc_u = np.zeros(n, np.float64)
            for t in range(T):
                l, j = t % L, t // L
                for c in range(n):
                    xn = X[b, l, j, c0 + c]
                    a = X[B + b, l, j, c0 + c]
                    al = gy[b, t, c0 + c] / DD[B + b, l, j, c0 + c]
                    be = al * y[b, t, c0 + c]
                    acc_u[c] += al * DD[b, l, j, c0 + c]
                    acc_wn[c] += al * rn[c]
                    acc_wd[c] += be * rd[c]
                    dv[b, t, c0 + c] = qa[c]
                    dk[b, t, c0 + c] = qb[c]
                    rn[c] = r[c] * rn[c] + pn[c]
                    rd[c] = r[c] * rd[c] + pd[c]
                    pn[c] = r[c] * pn[c] + xn
                    pd[c] = r[c] * pd[c] + a
                    qa[c] = r[c] * qa[c] + al
                    qb[c] = r[c] * qb[c] + be
            sn, sd = pn, pd  # reuse the buffers: suffix of the signals
            sn[:] = 0.0
            sd[:] = 0.0
            qa[:] = 0.0
            qb[:] = 0.0
            for t in range(T - 1, -1, -1):
                l, j = t % L, t // L
                for c in range(n):
                    xn = X[b, l, j, c0 + c]
                    a = X[B + b, l, j, c0 + c]
                    al = gy[b, t, c0 + c] / DD[B + b, l, j, c0 + c]
                    be = al * y[b, t, c0 + c]
                    qpa = dv[b, t, c0 + c]
                    qpb = dk[b, t, c0 + c]
                    acc_wn[c] += sn[c] * qpa
                    acc_wd[c] += sd[c] * qpb
                    sa = qpa + qa[c]
                    sb = qpb + qb[c]
                    dk[b, t, c0 + c] = xn * sa - a * sb + al * DD[b, l, j, c0 + c]
                    dv[b, t, c0 + c] = a * (sa + eu[c] * al)
                    sn[c] = r[c] * sn[c] + xn
                    sd[c] = r[c] * sd[c] + a
                    qa[c] = r[c] * qa[c] + al
                    qb[c] = r[c] * qb[c] + be
            for c in range(n):
                dw[b, c0 + c] = -r[c] * (acc_wn[c] - acc_wd[c])
                du[b, c0 + c] = acc_u[c]


@contextmanager
def threads() -> Iterator[None]:
    """Run a compiled kernel on ``torch.get_num_threads()`` threads (numba's count := torch's, capped by numba's
    pool, so ``--threads`` holds), and leave torch's count as it was. numba's OpenMP threading layer shares the
    OpenMP runtime with torch and sets its thread count to numba's pool size when it starts (the first parallel
    kernel in a process): without the restore, everything torch computed after that first kernel ran on another
    thread count, with another order of additions, than the same computation later in the process — so a training
    run was not bit-identical to its resumed copy (tests/test_biwkv.py::test_numba_keeps_torch_thread_count)."""
    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _block(B: int, C: int) -> int:
    """Channels per parallel job: 8–64 (a multiple of 8), small enough that there are >= 2 jobs per thread."""
    per = (B * C) // (2 * numba.get_num_threads())
    return int(min(64, max(8, 8 * (per // 8))))


def _np(x: torch.Tensor):
    return x.detach().numpy()


def forward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, L: int, nc: int,
            cd: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's forward on CPU with the compiled kernel: ``(y [B, T, C] in v's dtype, X, [δ' ; den]
    [2B, L, nc, C], carries [2, 2B, nc, C])`` in the compute dtype ``cd`` (float32 or float64), exactly the layout
    of the torch path for chunking ``(L, nc)``."""
    B, T, C = k.shape
    Tp = L * nc
    w, u, k32, v32 = (t.to(cd).contiguous() for t in (w, u, k, v))
    if Tp != T:
        k32 = F.pad(k32, (0, 0, 0, Tp - T), value=float("-inf"))
        v32 = F.pad(v32, (0, 0, 0, Tp - T))
    y = torch.empty(B, Tp, C, dtype=cd)
    X = torch.empty(2 * B, L, nc, C, dtype=cd)
    PS = torch.empty_like(X)
    car = torch.empty(2, 2 * B, nc, C, dtype=cd)
    with threads():
        _fwd_kernel(_np(w), _np(u), _np(k32), _np(v32), _np(y), _np(X), _np(PS), _np(car), _block(B, C))
    return y[:, :T].to(v.dtype).contiguous(), X, PS, car


def backward(gy: torch.Tensor, w: torch.Tensor, u: torch.Tensor, y: torch.Tensor, X: torch.Tensor,
             DD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward on CPU with the compiled kernel: ``(dw [C], du [C], dk, dv [B, T, C])`` in X's dtype."""
    cd = X.dtype
    B, T, C = gy.shape
    gy, w, u, y = (t.to(cd).contiguous() for t in (gy, w, u, y))
    X, DD = X.contiguous(), DD.contiguous()
    dk = torch.empty(B, T, C, dtype=cd)
    dv = torch.empty_like(dk)
    dw = torch.empty(B, C, dtype=torch.float64)
    du = torch.empty_like(dw)
    with threads():
        _bwd_kernel(_np(gy), _np(w), _np(u), _np(y), _np(X), _np(DD), _np(dk), _np(dv), _np(dw), _np(du),
                    _block(B, C))
    return dw.sum(0).to(cd), du.sum(0).to(cd), dk, dv
