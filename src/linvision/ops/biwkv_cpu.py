"""Compiled CPU kernels (numba) for the Bi-WKV custom op ``linvision::bi_wkv_fwd`` / ``bi_wkv_bwd``.

The same equations, stabilisation and saved tensors as the torch-ops path in :mod:`linvision.ops.biwkv` (see
:func:`linvision.ops.biwkv.bi_wkv` for the derivation), written as sequential scans over whole token rows instead
of one vectorised torch op per position. Each scan is one parallel job (``numba.prange``, on
``torch.get_num_threads()`` threads) per batch item and *signal*; each step of a scan is a few short loops over
the C contiguous channels of one token, written so that LLVM vectorises them (one array written per loop, no
branch, no ``exp``: numba has no vectorised ``exp`` without Intel SVML, so ``a = e^{k - max_t k}`` is one torch op
before the kernel). Measured on a 2-core AVX2 machine (T = 197, C = 192): 4–5× faster than the previous layout
(both signals of a 48-channel block per job, one long scalar loop per step).

Forward (per channel, ``x^n = a v``, ``x^d = a``, ``r = e^{-w}``): job (signal, b) writes its signal into ``X``,
rolls the exclusive prefix ``P`` (stored in place of what becomes ``δ'``/``den``), then the exclusive suffix ``S``,
leaving ``P + S`` (the neighbour sums); a second parallel loop over tokens writes ``wkv = (P^n + S^n + e^u x^n) /
(P^d + S^d + e^u x^d)``, ``den`` and ``δ' = e^u (x^n (P^d + S^d) - a (P^n + S^n)) / den``. The saved tensors are
exactly those of the torch path (any chunk layout ``[2B, L, nc, C]``, chunk carries included), so either path's
backward accepts either forward's saved tensors.

Backward (``α = g / den``, ``β = α wkv``): job (track, b) — track α pairs with ``x^n``, β with ``x^d`` — rolls
forward the prefix ``Q'`` of its track (into the ``dv`` / ``dk`` buffer), the prefix ``P`` of its signal and
``R``, the prefix scan of ``P``, accumulating ``Σ_j P_j Q_j = Σ_m (α, β)_m R_m``; then backward ``S`` and ``Q``,
accumulating ``Σ_j S_j Q'_j`` and leaving ``Q' + Q`` in the buffer; a last loop over tokens writes ``dk = x^n
(Q'^α + Q^α) - a (Q'^β + Q^β) + α δ'`` and ``dv = a (Q'^α + Q^α + e^u α)``. ``∂ℓ/∂w`` and ``∂ℓ/∂u`` are
accumulated in float64 per (track, batch item, channel) and summed by the caller.

The decays ``e^{-w}``, ``e^u`` and all running states are float64 in both kernels (signals, neighbour sums and
buffers are stored in the compute dtype): a sequential scan over T tokens would otherwise accumulate the fp32
rounding of ``e^{-w}`` T times; this way the fp32 output and gradients are within ~1e-7 relative RMS of the
float64 reference at any T.

float32 and float64 kernels (compiled on first use per dtype, cached on disk by numba: beside this file, or in the
user-wide numba cache when the package directory is read-only, or in ``NUMBA_CACHE_DIR``). ``fastmath`` is off:
results differ from the torch path only by the order of the additions.
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Tuple

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
    def _fwd_kernel(w, u, a, v, y, X, PS, car, saves):  # pragma: no cover - compiled; tested through the op
        B, Tp, C = a.shape  # a = e^{k - max k} and v padded to the Tp = L * nc tokens of the layout (with 0)
        L = X.shape[1]
        r = np.exp(-w.astype(np.float64))  # decay and states in float64 whatever the dtype
        eu = np.exp(u.astype(np.float64))
        for job in prange(2 * B):  # (signal, batch item): row i of X / PS / car; signal 0: a v, 1: a
            s, b = job // B, job % B
            i = s * B + b
            p = np.zeros(C)
            for t in range(Tp):  # the signal, and the exclusive prefix P (into PS)
                l, j = t % L, t // L
                if l == 0:
                    cr = car[0, i, j]
                    for c in range(C):
                        cr[c] = p[c]
                xr, pr, ar = X[i, l, j], PS[i, l, j], a[b, t]
                if s == 0:
                    vr = v[b, t]
                    for c in range(C):
                        xr[c] = ar[c] * vr[c]
                else:
                    for c in range(C):
                        xr[c] = ar[c]
                for c in range(C):
                    pr[c] = p[c]
                for c in range(C):
                    p[c] = r[c] * p[c] + xr[c]
            p[:] = 0.0
            for t in range(Tp - 1, -1, -1):  # the exclusive suffix S, added: PS = P + S
                l, j = t % L, t // L
                if l == L - 1:
                    cr = car[1, i, j]
                    for c in range(C):
                        cr[c] = p[c]
                xr, pr = X[i, l, j], PS[i, l, j]
                for c in range(C):
                    pr[c] += p[c]
                for c in range(C):
                    p[c] = r[c] * p[c] + xr[c]
        for row in prange(B * Tp):  # wkv (and, for the backward, den and δ') of each token from both signals' sums
            b, t = row // Tp, row % Tp
            l, j = t % L, t // L
            xn, xd, pn, pd, yr = X[b, l, j], X[B + b, l, j], PS[b, l, j], PS[B + b, l, j], y[b, t]
            if saves:
                for c in range(C):
                    psn, psd = np.float64(pn[c]), np.float64(pd[c])
                    den = psd + eu[c] * xd[c]
                    yr[c] = (psn + eu[c] * xn[c]) / den
                    pn[c] = eu[c] * (xn[c] * psd - xd[c] * psn) / den
                    pd[c] = den
            else:  # inference: wkv alone (the same arithmetic; one division instead of two)
                for c in range(C):
                    yr[c] = (np.float64(pn[c]) + eu[c] * xn[c]) / (np.float64(pd[c]) + eu[c] * xd[c])

    @njit(cache=True, inline="always")
    def _track(al, g, den, yr, s):  # pragma: no cover - compiled
        """One token's α = g / den (track 0) or β = α wkv (track 1) into ``al``."""
        if s == 0:
            for c in range(al.shape[0]):
                al[c] = g[c] / den[c]
        else:
            for c in range(al.shape[0]):
                al[c] = g[c] / den[c] * yr[c]

    @njit(parallel=True, cache=True, fastmath=False)
    def _bwd_kernel(gy, w, u, y, X, DD, dk, dv, dwp, du):  # pragma: no cover - compiled
        B, T, C = gy.shape
        L = X.shape[1]
        r = np.exp(-w.astype(np.float64))  # decay and states in float64 whatever the dtype
        eu = np.exp(u.astype(np.float64))
        for job in prange(2 * B):  # (track, batch item): track 0 = α with x^n (Q' + Q into dv), 1 = β with x^d (dk)
            s, b = job // B, job % B
            i = s * B + b
            buf = dv if s == 0 else dk
            al = np.empty(C)  # α or β of the token
            p, rr, q = np.zeros(C), np.zeros(C), np.zeros(C)  # prefix of the signal, prefix of P, prefix of α/β
            acc_w, acc_u = np.zeros(C), np.zeros(C)
            for t in range(T):
                l, j = t % L, t // L
                xr, br = X[i, l, j], buf[b, t]
                _track(al, gy[b, t], DD[B + b, l, j], y[b, t], s)
                if s == 0:
                    dl = DD[b, l, j]
                    for c in range(C):
                        acc_u[c] += al[c] * dl[c]
                for c in range(C):
                    acc_w[c] += al[c] * rr[c]
                for c in range(C):
                    br[c] = q[c]
                for c in range(C):
                    q[c] = r[c] * q[c] + al[c]
                for c in range(C):
                    rr[c] = r[c] * rr[c] + p[c]
                for c in range(C):
                    p[c] = r[c] * p[c] + xr[c]
            p[:] = 0.0
            q[:] = 0.0
            for t in range(T - 1, -1, -1):
                l, j = t % L, t // L
                xr, br = X[i, l, j], buf[b, t]
                _track(al, gy[b, t], DD[B + b, l, j], y[b, t], s)
                for c in range(C):
                    acc_w[c] += p[c] * br[c]
                for c in range(C):
                    br[c] = br[c] + q[c]
                for c in range(C):
                    q[c] = r[c] * q[c] + al[c]
                for c in range(C):
                    p[c] = r[c] * p[c] + xr[c]
            for c in range(C):
                dwp[i, c] = acc_w[c]
            if s == 0:
                for c in range(C):
                    du[b, c] = acc_u[c]
        for row in prange(B * T):  # dk, dv of each token from both tracks
            b, t = row // T, row % T
            l, j = t % L, t // L
            g, den, dl, xn, xd = gy[b, t], DD[B + b, l, j], DD[b, l, j], X[b, l, j], X[B + b, l, j]
            dkr, dvr = dk[b, t], dv[b, t]
            for c in range(C):
                al = np.float64(g[c] / den[c])
                sa, sb = np.float64(dvr[c]), np.float64(dkr[c])
                dkr[c] = xn[c] * sa - xd[c] * sb + al * dl[c]
                dvr[c] = xd[c] * (sa + eu[c] * al)


_TLS = threading.local()  # numba's thread count as last set from this Python thread (numba's count is per thread)


class threads:
    """``with threads(name):`` run a compiled kernel on ``torch.get_num_threads()`` threads (numba's count := torch's,
    capped by numba's pool, so ``--threads`` holds), and leave torch's count as it was. numba's OpenMP threading
    layer sets the OpenMP thread count to numba's pool size when it starts (the first parallel kernel in a
    process): without the restore, everything torch computed after that first kernel ran on another thread count,
    with another order of additions, than the same computation later in the process — so a training run was not
    bit-identical to its resumed copy (tests/test_biwkv.py::test_numba_keeps_torch_thread_count). While a
    ``torch.profiler`` runs, the kernel shows in its tables under ``name``. A class, not a generator context
    manager, and numba's count is set only when it changes: this runs around every kernel call (~2 µs, was ~9)."""

    __slots__ = ("name", "n", "rf")

    def __init__(self, name: str = "linvision::numba_kernel"):
        self.name = name

    def __enter__(self) -> None:
        n = self.n = torch.get_num_threads()
        want = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
        if getattr(_TLS, "n", None) != want:
            numba.set_num_threads(want)
            _TLS.n = want
        self.rf = torch.profiler.record_function(self.name) if torch.autograd._profiler_enabled() else None
        if self.rf is not None:
            self.rf.__enter__()

    def __exit__(self, *exc) -> None:
        if self.rf is not None:
            self.rf.__exit__(*exc)
        if torch.get_num_threads() != self.n:
            torch.set_num_threads(self.n)


def _np(x: torch.Tensor):
    return x.detach().numpy() if x.requires_grad else x.numpy()  # (detach costs ~1 µs a call at 224²)


SCRATCH_MAX_BYTES = 32 * 2 ** 20  # larger scratch tensors are allocated per call, not kept


def _scratch(name: str, *shape: int, dtype: torch.dtype) -> Tuple[torch.Tensor, np.ndarray]:
    """This thread's buffer ``name`` of ``shape``/``dtype`` and its numpy view (for the kernels; kept with the buffer:
    making a view costs ~2 µs): the last one when they match, else a new one (which
    replaces it). For tensors nobody keeps after the call. Writing a fresh multi-MiB tensor costs a page fault per
    4 KiB page — on this VM kind ~11 ms of a 15 ms Bi-WKV forward at T = 4,096, C = 192 (the kernel itself
    2.4 ms); a reused buffer is already mapped. One buffer per name and thread is kept, each at most
    ``SCRATCH_MAX_BYTES`` (32 MiB: a 2048² image at batch 1 fits; the forward keeps at most ~100 MiB per thread
    between calls); a larger one is allocated for the call alone."""
    cache = _TLS.__dict__.setdefault("scratch", {})
    views = _TLS.__dict__.setdefault("scratch_np", {})
    if math.prod(shape) * dtype.itemsize > SCRATCH_MAX_BYTES:
        cache.pop(name, None)
        views.pop(name, None)
        buf = torch.empty(shape, dtype=dtype)
        return buf, buf.numpy()
    buf = cache.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        with torch.inference_mode(False):  # a normal tensor: writable in and outside inference mode
            buf = cache[name] = torch.empty(shape, dtype=dtype)
        views[name] = buf.numpy()
    return buf, views[name]


def _cd(t: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """``t`` in dtype ``cd``, contiguous (``t`` itself when it already is: no dispatch)."""
    return t if t.dtype == cd and t.is_contiguous() else t.to(cd).contiguous()


def forward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, L: int, nc: int,
            cd: torch.dtype, reuse: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's forward on CPU with the compiled kernel: ``(y [B, T, C] in v's dtype, X, [δ' ; den]
    [2B, L, nc, C], carries [2, 2B, nc, C])`` in the compute dtype ``cd`` (float32 or float64), exactly the layout
    of the torch path for chunking ``(L, nc)``. ``reuse``: the caller keeps only y (no backward), so X, PS and the
    carries are this thread's scratch buffers (:func:`_scratch`), overwritten by the next such call, and ``den``
    and ``δ'`` are not computed (y has the same bits)."""
    B, T, C = k.shape
    Tp = L * nc
    w, u, k32, v32 = (_cd(t, cd) for t in (w, u, k, v))
    # the one exp per element (torch's vectorised one), into a reused buffer: a is not kept after the kernel
    a, an = _scratch("a", B, T, C, dtype=cd)
    torch.sub(k32, k32.amax(1, keepdim=True), out=a).exp_()
    if Tp != T:
        a = F.pad(a, (0, 0, 0, Tp - T))
        an = a.numpy()
        v32 = F.pad(v32, (0, 0, 0, Tp - T))
    y = torch.empty(B, Tp, C, dtype=cd)
    if reuse:
        (X, Xn), (PS, PSn) = _scratch("X", 2 * B, L, nc, C, dtype=cd), _scratch("PS", 2 * B, L, nc, C, dtype=cd)
        car, carn = _scratch("car", 2, 2 * B, nc, C, dtype=cd)
    else:
        X = torch.empty(2 * B, L, nc, C, dtype=cd)
        PS = torch.empty_like(X)
        car = torch.empty(2, 2 * B, nc, C, dtype=cd)
        Xn, PSn, carn = X.numpy(), PS.numpy(), car.numpy()
    with threads("linvision::bi_wkv_fwd (numba)"):
        _fwd_kernel(_np(w), _np(u), an, _np(v32), y.numpy(), Xn, PSn, carn, not reuse)
    if Tp == T and v.dtype == cd:  # the common case, without the slice and casts (~15 µs a call at T = 196)
        return y, X, PS, car
    return y[:, :T].to(v.dtype).contiguous(), X, PS, car


def backward(gy: torch.Tensor, w: torch.Tensor, u: torch.Tensor, y: torch.Tensor, X: torch.Tensor,
             DD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward on CPU with the compiled kernel: ``(dw [C], du [C], dk, dv [B, T, C])`` in X's dtype."""
    cd = X.dtype
    B, T, C = gy.shape
    gy, w, u, y = (_cd(t, cd) for t in (gy, w, u, y))
    X, DD = X.contiguous(), DD.contiguous()
    dk = torch.empty(B, T, C, dtype=cd)
    dv = torch.empty_like(dk)
    dwp = torch.empty(2 * B, C, dtype=torch.float64)  # Σ_j (P^n Q^α + S^n Q'^α) rows, then the β rows
    du = torch.empty(B, C, dtype=torch.float64)
    with threads("linvision::bi_wkv_bwd (numba)"):
        _bwd_kernel(_np(gy), _np(w), _np(u), _np(y), _np(X), _np(DD), _np(dk), _np(dv), _np(dwp), _np(du))
    dw = -torch.exp(-w.double()) * (dwp[:B].sum(0) - dwp[B:].sum(0))
    return dw.to(cd), du.sum(0).to(cd), dk, dv
