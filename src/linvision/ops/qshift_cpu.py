"""Compiled CPU kernel (numba) of :func:`linvision.ops.qshift.q_shift_lerp`: reads x once and writes every
``lerp(q_shift(x), x, mix[i])`` in the same pass, with ``torch.lerp``'s own arithmetic. Imported only when the
compiled CPU path is on (:func:`linvision.ops.biwkv.cpu_kernel` is ``numba``), so ``import linvision`` never loads
numba or its threading runtime."""
from __future__ import annotations

from numba import njit, prange

__all__ = ["q_shift_lerp_kernel"]


@njit(cache=True, inline="always")
def _lerp_seg(x, mix, out, b, t, src, c0, c1):  # pragma: no cover - compiled
    if src < 0:  # zero border: s = 0
        for i in range(mix.shape[0]):
            for c in range(c0, c1):
                e, m = x[b, t, c], mix[i, c]
                out[i, b, t, c] = m * e if abs(m) < 0.5 else e - e * (1 - m)
    else:
        for i in range(mix.shape[0]):
            for c in range(c0, c1):
                e, s, m = x[b, t, c], x[b, src, c], mix[i, c]
                out[i, b, t, c] = s + m * (e - s) if abs(m) < 0.5 else e - (e - s) * (1 - m)


@njit(parallel=True, cache=True, fastmath=False)
def q_shift_lerp_kernel(x, mix, out, H, W, s):  # pragma: no cover - compiled
    B, T, C = x.shape
    q = C // 4
    for job in prange(B * H):
        b, h = job // H, job % H
        for w in range(W):
            t = h * W + w
            _lerp_seg(x, mix, out, b, t, t - s if w >= s else -1, 0, q)
            _lerp_seg(x, mix, out, b, t, t + s if w + s < W else -1, q, 2 * q)
            _lerp_seg(x, mix, out, b, t, t - s * W if h >= s else -1, 2 * q, 3 * q)
            _lerp_seg(x, mix, out, b, t, t + s * W if h + s < H else -1, 3 * q, 4 * q)
            _lerp_seg(x, mix, out, b, t, t, 4 * q, C)
