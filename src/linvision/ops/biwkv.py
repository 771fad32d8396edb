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
* :func:`bi_wkv` — the form the models use: a ``torch.library`` custom op (``linvision::bi_wkv_fwd`` /
  ``linvision::bi_wkv_bwd``) with its own backward; decayed prefix and suffix scans run in chunks, one vectorised
  op per position in a chunk, carries between chunks from the chunk totals. O(T) time and memory in the forward
  and the backward, no token limit, CPU and CUDA (plain torch ops), fp32 inside for bf16/fp16 inputs. On CPU the
  same scans run as compiled numba kernels (:mod:`linvision.ops.biwkv_cpu`) by default (``LINVISION_BIWKV_CPU``
  ``auto``; ``torch`` keeps the torch ops; see :func:`cpu_kernel`); both CPU paths save the same tensors.
* :func:`bi_wkv_official_kernel_ref` (``bi_wkv(..., variant="official_kernel")``) — the arithmetic of the
  authors' CUDA kernel, which differs from Eq. 5 and which the released checkpoints were trained with (float64,
  O(T^2); for evaluating/fine-tuning published weights).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._common import needs_grad
from ._triton import triton_enabled

__all__ = ["bi_wkv_ref", "bi_wkv", "bi_wkv_official_kernel_ref", "BI_WKV_VARIANTS", "wkv_chunk_len", "cpu_kernel"]

BI_WKV_VARIANTS = ("eq5", "official_kernel")


def _check(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"bi_wkv: k and v must both be [B, T, C], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] == 0:
        raise ValueError("bi_wkv: k and v must have at least one token (T >= 1), got T = 0")
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


# ----------------------------------------------------------------------------------------------------------------
# The fast form: chunked decayed scans (O(T) time and memory), a custom op with its own backward.
# ----------------------------------------------------------------------------------------------------------------

_SLICE_ELEMS = 1 << 17  # auto chunk length: about this many elements per vectorised step (2B * T/L * C)
_NAT_CHUNK = 16     # chunk length of the (small) scans over chunk carries


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _auto_chunk(B: int, T: int, C: int) -> int:
    """Chunk length for :func:`bi_wkv`: long chunks (few, large steps) for big inputs, short ones (fewer Python-level
    ops) for small inputs; measured on CPU, where 8-32 are within ~10% of the best at every shape tried."""
    return int(min(32, max(8, round(2 * B * T * C / _SLICE_ELEMS))))


def wkv_chunk_len(T: int) -> int:
    """Tokens per chunk of the Triton kernels: a power of two near √T in [16, 128] (the chunk scans and the carry
    scan then take about equally many sequential steps)."""
    return int(min(128, max(16, 2 ** round(math.log2(max(T, 1)) / 2))))


def _chunking(T: int, target: int) -> Tuple[int, int]:
    """``(L, nc)``: chunk length and chunk count, ``L * nc >= T``: one chunk up to ``2 * target`` tokens (or for
    ``target <= 0``), else a
    divisor of T near ``target`` when there is one (no padding), else ``L = target`` and the last chunk padded."""
    target = int(target)
    if target <= 0 or T <= 2 * target:  # one chunk: no carries needed (0: always; the compiled CPU kernel's choice)
        return max(T, 1), 1
    for d in list(range(target, (target + 1) // 2 - 1, -1)) + list(range(target + 1, 2 * target + 1)):
        if T % d == 0:
            return d, T // d
    return target, -(-T // target)


def _tv(x: torch.Tensor, L: int, nc: int) -> torch.Tensor:
    """``[B, nc*L, C]`` seen chunk-transposed as ``[B, L, nc, C]`` (a view: token ``j*L + l`` at ``[:, l, j]``)."""
    return x.view(x.shape[0], nc, L, x.shape[-1]).transpose(1, 2)


def _pad_tokens(x: torch.Tensor, Tp: int, value: float = 0.0) -> torch.Tensor:
    return x if x.shape[1] == Tp else F.pad(x, (0, 0, 0, Tp - x.shape[1]), value=value)


def _scan_loop(X: torch.Tensor, r: torch.Tensor, carry: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Exclusive decayed scan inside chunks, started from each chunk's carry. ``X: [N, L, nc, C]`` (chunk-
    transposed), ``r = e^{-w}: [C]``, ``carry: [N, nc, C]``. Forward: ``out[l] = r out[l-1] + X[l-1]``,
    ``out[0] = carry``; reverse: ``out[l] = r out[l+1] + X[l+1]``, ``out[L-1] = carry``. One vectorised op per
    position l (over all chunks, channels and signals at once)."""
    out = torch.empty_like(X)
    L = X.shape[1]
    if reverse:
        out[:, L - 1] = carry
        for l in range(L - 2, -1, -1):
            torch.addcmul(X[:, l + 1], out[:, l + 1], r, out=out[:, l])
    else:
        out[:, 0] = carry
        for l in range(1, L):
            torch.addcmul(X[:, l - 1], out[:, l - 1], r, out=out[:, l])
    return out


def _scan_nat(z: torch.Tensor, w: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Exclusive decayed scan along dim 1 of ``z: [N, n, C]`` (natural layout) with per-channel decay ``w``:
    ``out_j = Σ_{i<j} e^{-(j-1-i) w} z_i`` (reverse: ``Σ_{i>j} e^{-(i-j-1) w} z_i``). Used for the chunk carries;
    chunked and recursive like the main scan."""
    N, n, C = z.shape
    r = torch.exp(-w)
    if n <= 2 * _NAT_CHUNK:  # short: one loop over the positions
        out = torch.empty_like(z)
        order = range(n - 1, -1, -1) if reverse else range(n)
        prev = None
        for j in order:
            if prev is None:
                out[:, j] = 0
            else:
                torch.addcmul(z[:, prev], out[:, prev], r, out=out[:, j])
            prev = j
        return out
    L, nc = _chunking(n, _NAT_CHUNK)
    X = _tv(_pad_tokens(z, L * nc), L, nc).contiguous()
    wts = _total_weights(L, w, X.dtype)[1 if reverse else 0]  # [L, 1, 1, C]
    Z = X.new_zeros(N, nc, C)
    for l in range(L):
        Z.addcmul_(X[:, l], wts[l])
    out = _scan_loop(X, r, _scan_nat(Z, L * w, reverse), reverse)
    return out.transpose(1, 2).reshape(N, L * nc, C)[:, :n]


def _total_weights(L: int, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[2, L, 1, 1, C]``: the weights of position l in its chunk's prefix total (``e^{-(L-1-l) w}``) and suffix
    total (``e^{-l w}``)."""
    pw = torch.exp(-torch.arange(L, dtype=dtype, device=w.device)[:, None] * w)  # [L, C]: e^{-l w}
    return torch.stack([pw.flip(0), pw])[:, :, None, None, :]


def _carries_from_totals(Z: torch.Tensor, w: torch.Tensor, L: int) -> torch.Tensor:
    """Chunk carries ``[2, N, nc, C]``: the exclusive prefix at each chunk's first token
    (``Σ_{i<s_j} e^{-(s_j-1-i) w} x_i``) and the exclusive suffix at each chunk's last token, from the chunk totals
    ``Z = [Σ_l e^{-(L-1-l) w} X[l, j] ; Σ_l e^{-l w} X[l, j]]`` (``[2, N, nc, C]``) by a scan over the chunks with
    decay ``L w``."""
    if Z.shape[2] == 1:
        return torch.zeros_like(Z)
    return torch.stack([_scan_nat(Z[0], L * w, False), _scan_nat(Z[1], L * w, True)])


def _bi_wkv_forward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int):
    B, T, C = k.shape
    cd = _compute_dtype(w, u, k, v)
    w, u = w.to(cd), u.to(cd)
    L, nc = _chunking(T, chunk_size)
    Tp = L * nc
    kmax = k.amax(1).to(cd)[:, None]  # [B, 1, C]
    k, v = _pad_tokens(k, Tp, float("-inf")), _pad_tokens(v, Tp)
    X = torch.empty(2 * B, L, nc, C, dtype=cd, device=k.device)  # [x^n = a v ; x^d = a],  a = e^{k - kmax}
    kt, vt = _tv(k, L, nc), _tv(v, L, nc)
    wts = _total_weights(L, w, cd)
    Z = X.new_zeros(2, 2 * B, nc, C)  # chunk totals, accumulated while X is built (one pass over k, v)
    for l in range(L):
        xl = X[:, l]
        torch.sub(kt[:, l], kmax, out=xl[B:])
        xl[B:].exp_()
        torch.mul(xl[B:], vt[:, l], out=xl[:B])
        if nc > 1:
            Z.addcmul_(xl, wts[:, l])
    r, eu = torch.exp(-w), torch.exp(u)
    carries = _carries_from_totals(Z, w, L)
    # Prefix P materialised; S rolled down from the last position and added. PS's storage then becomes what the
    # backward keeps: [δ' ; den] with den = P^d + S^d + e^u a and δ' = e^u a (v - y) = e^u (x^n PS^d - a PS^n) / den.
    PS = _scan_loop(X, r, carries[0], reverse=False)
    y = torch.empty(B, Tp, C, dtype=v.dtype, device=k.device)
    yt = _tv(y, L, nc)
    num, tmp = X.new_empty(B, nc, C), X.new_empty(B, nc, C)
    s, s_next = carries[1].clone(), torch.empty_like(carries[1])
    for l in range(L - 1, -1, -1):
        xl, ps = X[:, l], PS[:, l]
        ps.add_(s)  # P + S
        torch.mul(xl[:B], ps[B:], out=tmp).addcmul_(xl[B:], ps[:B], value=-1)
        torch.addcmul(ps[:B], xl[:B], eu, out=num)
        ps[B:].addcmul_(xl[B:], eu)  # den
        torch.div(num, ps[B:], out=yt[:, l])
        torch.mul(tmp, eu, out=ps[:B]).div_(ps[B:])  # δ'
        if l:
            torch.addcmul(xl, s, r, out=s_next)
            s, s_next = s_next, s
    if Tp != T:
        y = y[:, :T].contiguous()
    return y, X, PS, carries


def _bi_wkv_backward(gy: torch.Tensor, w: torch.Tensor, u: torch.Tensor, y: torch.Tensor, X: torch.Tensor,
                     DD: torch.Tensor, carries: torch.Tensor):
    N, L, nc, C = X.shape
    B, T, Tp, cd = N // 2, y.shape[1], L * nc, X.dtype
    dlt, D = DD[:B], DD[B:]  # e^u a (v - y), den
    w, u = w.to(cd), u.to(cd)
    r, eu = torch.exp(-w), torch.exp(u)
    G = torch.empty_like(X)  # [α = g / den ; β = α y]
    gt, yt = _tv(_pad_tokens(gy, Tp), L, nc), _tv(_pad_tokens(y, Tp), L, nc)
    wts = _total_weights(L, w, cd)
    Z = X.new_zeros(2, N, nc, C)
    acc_u = X.new_zeros(B, nc, C)  # Σ α δ'
    for l in range(L):
        gl = G[:, l]
        torch.div(gt[:, l], D[:, l], out=gl[:B])
        torch.mul(gl[:B], yt[:, l], out=gl[B:])
        acc_u.addcmul_(gl[:B], dlt[:, l])
        if nc > 1:
            Z.addcmul_(gl, wts[:, l])
    cg = _carries_from_totals(Z, w, L)
    QQ = _scan_loop(G, r, cg[0], reverse=False)  # Q' (prefix of G); each slot takes Q (suffix) once used
    dk = torch.empty(B, Tp, C, dtype=cd, device=X.device)
    dv = torch.empty(B, Tp, C, dtype=cd, device=X.device)
    dkt, dvt = _tv(dk, L, nc), _tv(dv, L, nc)
    acc_w = X.new_zeros(N, nc, C)  # Σ P·Q + S·Q'
    q = torch.empty_like(acc_w)
    s, s_next = carries[1].clone(), torch.empty_like(carries[1])  # S (suffix of X), rolled
    sg, sg_next = cg[1].clone(), torch.empty_like(cg[1])  # Q (suffix of G), rolled
    for l in range(L - 1, -1, -1):
        xl, gl, ql = X[:, l], G[:, l], QQ[:, l]
        acc_w.addcmul_(s, ql)
        torch.add(ql, sg, out=q)  # Q' + Q (no bonus)
        ql.copy_(sg)
        dkl = dkt[:, l]
        torch.mul(xl[:B], q[:B], out=dkl).addcmul_(xl[B:], q[B:], value=-1).addcmul_(gl[:B], dlt[:, l])
        torch.mul(xl[B:], q[:B].addcmul_(gl[:B], eu), out=dvt[:, l])  # dv = a (Q' + Q + e^u α)
        if l:
            torch.addcmul(xl, s, r, out=s_next)
            torch.addcmul(gl, sg, r, out=sg_next)
            s, s_next, sg, sg_next = s_next, s, sg_next, sg
    p, p_next = carries[0].clone(), torch.empty_like(carries[0])  # P (prefix of X), rolled
    for l in range(L):
        acc_w.addcmul_(p, QQ[:, l])
        if l < L - 1:
            torch.addcmul(X[:, l], p, r, out=p_next)
            p, p_next = p_next, p
    sw = acc_w.sum(1)  # [2B, C]
    dw = -torch.exp(-w) * (sw[:B].sum(0) - sw[B:].sum(0))
    du = acc_u.sum((0, 1))
    if Tp != T:
        dk, dv = dk[:, :T].contiguous(), dv[:, :T].contiguous()
    return dw, du, dk, dv


@torch.library.custom_op("linvision::bi_wkv_fwd", mutates_args=())
def _bi_wkv_fwd_op(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bi-WKV forward. Returns ``y [B, T, C]`` (v's dtype) and, for the backward (fp32/fp64), the signals
    ``X = [a v ; a]`` and ``[e^u a (v - y) ; den]`` (both ``[2B, L, nc, C]``, chunk-transposed) and the chunk
    carries ``[2, 2B, nc, C]``."""
    return _bi_wkv_forward(w, u, k, v, chunk_size)


@_bi_wkv_fwd_op.register_fake
def _(w, u, k, v, chunk_size):
    B, T, C = k.shape
    L, nc = _chunking(T, chunk_size)
    cd = _compute_dtype(w, u, k, v)
    return (v.new_empty(B, T, C), k.new_empty(2 * B, L, nc, C, dtype=cd), k.new_empty(2 * B, L, nc, C, dtype=cd),
            k.new_empty(2, 2 * B, nc, C, dtype=cd))


@torch.library.custom_op("linvision::bi_wkv_bwd", mutates_args=())
def _bi_wkv_bwd_op(gy: torch.Tensor, w: torch.Tensor, u: torch.Tensor, y: torch.Tensor, X: torch.Tensor,
                   DD: torch.Tensor,
                   carries: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bi-WKV backward: ``(dw [C], du [C], dk [B, T, C], dv [B, T, C])`` in the compute dtype."""
    return _bi_wkv_backward(gy, w, u, y, X, DD, carries)


@_bi_wkv_bwd_op.register_fake
def _(gy, w, u, y, X, DD, carries):
    B, T, C = y.shape
    return (X.new_empty(C), X.new_empty(C), X.new_empty(B, T, C), X.new_empty(B, T, C))


# ----------------------------------------------------------------------------------------------------------------
# CPU: the compiled (numba) kernels of ops/biwkv_cpu.py when numba imports, else the torch-ops path above. Both
# produce and accept the same saved tensors, so they are interchangeable between forward and backward.
# ----------------------------------------------------------------------------------------------------------------

CPU_KERNEL_ENV = "LINVISION_BIWKV_CPU"
CPU_KERNELS = ("auto", "numba", "torch")


def cpu_kernel() -> str:
    """The CPU implementation the op uses now: ``"numba"`` or ``"torch"``, from the environment variable
    ``LINVISION_BIWKV_CPU`` (``auto``, the default: the compiled numba kernels when numba imports, else torch ops;
    ``numba``: require them; ``torch``: the torch-ops path, and numba is never imported). Read at every call.

    Raises:
        ValueError: an unknown value, or ``numba`` requested but numba does not import.
    """
    choice = os.environ.get(CPU_KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in CPU_KERNELS:
        raise ValueError(f"bi_wkv: environment variable {CPU_KERNEL_ENV} must be one of {CPU_KERNELS}, got {choice!r}")
    if choice == "torch":  # numba (and its OpenMP runtime) is imported only when asked for
        return choice
    from . import biwkv_cpu

    if choice == "numba" and not biwkv_cpu.available():
        raise ValueError(f"bi_wkv: {CPU_KERNEL_ENV}=numba but numba does not import ({biwkv_cpu.import_error()}); "
                         "pip install numba, or unset it")
    if choice == "auto":
        return "numba" if biwkv_cpu.available() else "torch"
    return choice


def _numba_forward(w, u, k, v, chunk_size: int, reuse: bool = False):
    """The compiled CPU forward (:func:`linvision.ops.biwkv_cpu.forward`) in the layout of ``chunk_size``: ``(y,
    X, [δ' ; den], carries)``, as the custom op returns them; ``reuse``: only y is kept (scratch buffers)."""
    from . import biwkv_cpu

    return biwkv_cpu.forward(w, u, k, v, *_chunking(k.shape[1], chunk_size), _compute_dtype(w, u, k, v), reuse)


@_bi_wkv_fwd_op.register_kernel("cpu")
def _(w, u, k, v, chunk_size):
    if cpu_kernel() == "torch":
        return _bi_wkv_forward(w, u, k, v, chunk_size)
    return _numba_forward(w, u, k, v, chunk_size)


@_bi_wkv_bwd_op.register_kernel("cpu")
def _(gy, w, u, y, X, DD, carries):
    if cpu_kernel() == "torch":
        return _bi_wkv_backward(gy, w, u, y, X, DD, carries)
    from . import biwkv_cpu

    return biwkv_cpu.backward(gy, w, u, y, X, DD)


def _setup_context(ctx, inputs, output):
    w, u, k, v, _ = inputs
    y, *saved = output
    ctx.save_for_backward(w, u, y, *saved)
    ctx.dtypes = (w.dtype, u.dtype, k.dtype, v.dtype)
    ctx.mark_non_differentiable(*saved)


def _backward(ctx, gy, *_):
    grads = torch.ops.linvision.bi_wkv_bwd(gy.contiguous(), *ctx.saved_tensors)
    return tuple(g.to(dt) for g, dt in zip(grads, ctx.dtypes)) + (None,)


_bi_wkv_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def eager_cpu_kernel(x: torch.Tensor, kernel: Optional[str] = None) -> bool:
    """True when an op on ``x`` may call the compiled CPU kernels directly instead of through its custom op: a CPU
    tensor, the numba path on (:func:`cpu_kernel`), eager mode (not inside ``torch.compile``/``torch.export``) and
    no dispatch mode active (``FlopCounterMode``, ``FakeTensorMode``, ... see the custom op and its registered
    FLOP formula and fake kernel). Skips the custom op's dispatch, measured at ~70 µs a call on this machine kind
    (a fifth of the whole Bi-WKV forward at 224², T = 197). ``kernel``: :func:`cpu_kernel`'s answer when the caller
    has it already."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and (kernel or cpu_kernel()) == "numba")


class _BiWKVCPU(torch.autograd.Function):
    """Eager CPU Bi-WKV on the compiled kernels: the custom op's forward and backward without its dispatch."""

    @staticmethod
    def forward(ctx, w, u, k, v, chunk_size):
        y, X, DD, _ = _numba_forward(w, u, k, v, chunk_size)
        ctx.save_for_backward(w, u, y, X, DD)
        ctx.dtypes = (w.dtype, u.dtype, k.dtype, v.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        from . import biwkv_cpu

        grads = biwkv_cpu.backward(gy.contiguous(), *ctx.saved_tensors)
        return tuple(g.to(dt) for g, dt in zip(grads, ctx.dtypes)) + (None,)

# FLOPs for torch.utils.flop_counter. The official get_flops_backbone.py adds ``vrwkv_flops(n, dim) = n * dim * 29``
# per layer to mmcv's get_model_complexity_info, whose "FLOPs" are multiply-accumulates (a Linear counts in*out per
# token; its attention term 2*N^2*C is the MACs of q k^T and attn v). flop_counter counts 2 FLOPs per MAC, so the
# forward is 2 * 29 * B*T*C FLOPs (= 29 * B*T*C MACs, the official number); the backward, by the usual
# convention, twice the forward.
BI_WKV_MACS_PER_TOKEN_CHANNEL = 29


def _register_flops() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if torch.ops.linvision.bi_wkv_fwd in flop_registry:
        return

    @register_flop_formula(torch.ops.linvision.bi_wkv_fwd)
    def _fwd_flops(w_shape, u_shape, k_shape, *args, **kwargs) -> int:
        B, T, C = k_shape
        return 2 * BI_WKV_MACS_PER_TOKEN_CHANNEL * B * T * C

    @register_flop_formula(torch.ops.linvision.bi_wkv_bwd)
    def _bwd_flops(gy_shape, *args, **kwargs) -> int:
        B, T, C = gy_shape
        return 4 * BI_WKV_MACS_PER_TOKEN_CHANNEL * B * T * C


_register_flops()


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "eq5",
           chunk_size: Optional[int] = None) -> torch.Tensor:
    r"""Bi-WKV (paper Eq. 5) in O(T) time and memory, forward and backward; same contract as :func:`bi_wkv_ref`.

    A ``torch.library`` custom op: ``torch.ops.linvision.bi_wkv_fwd`` (registered autograd) and ``bi_wkv_bwd``,
    both with fake kernels, so ``torch.compile(fullgraph=True)`` traces through it; FLOP formulas for
    ``torch.utils.flop_counter`` (29 MACs per token and channel forward, as the official ``get_flops_backbone.py``;
    twice that backward). Plain torch ops, so it runs on CPU and CUDA alike; no token limit. On CUDA
    (float32/bf16/fp16, Triton installed, ``LINVISION_TRITON`` not ``0``) it runs instead the Triton kernels of
    :mod:`linvision.ops.biwkv_triton` (the same scans, fused; custom op ``linvision::bi_wkv_triton_fwd``/``_bwd``);
    Triton is imported only then. On CPU, when numba imports (``LINVISION_BIWKV_CPU`` unset or ``auto``; ``numba``
    requires it, ``torch`` turns it off) the op runs the compiled kernels of :mod:`linvision.ops.biwkv_cpu`
    instead (the same scans, one sequential pass per direction over whole token rows, one job per batch item and
    signal, states in float64; default ``chunk_size`` there: one chunk) — in eager mode without the custom op's
    dispatch (:func:`eager_cpu_kernel`); see :func:`cpu_kernel`.

    **Forward.** Per channel (dropped from the notation), with ``a_i = e^{k_i - max_j k_j}`` (the max cancels in the
    ratio) and two signals ``x^n_i = a_i v_i``, ``x^d_i = a_i``::

        P_t = Σ_{i<t} e^{-(t-1-i) w} x_i      exclusive decayed prefix:  P_0 = 0,      P_{t+1} = e^{-w} P_t + x_t
        S_t = Σ_{i>t} e^{-(i-t-1) w} x_i      exclusive decayed suffix:  S_{T-1} = 0,  S_{t-1} = e^{-w} S_t + x_t
        num_t = P^n_t + S^n_t + e^u x^n_t,    den_t = P^d_t + S^d_t + e^u x^d_t,    wkv_t = num_t / den_t

    i.e. ``num_t = Σ_i W_ti x^n_i`` with the symmetric ``W_ti = e^{-(|t-i|-1) w}`` (i ≠ t), ``W_tt = e^u`` — Eq. 5.
    The recurrences run in chunks of L tokens (``chunk_size``; T padded to a multiple of L only when no divisor of
    T is near), stored chunk-transposed (``[2B, L, T/L, C]``) so that each of the L steps is one vectorised op
    over all chunks, channels, batch and both signals. Each chunk starts from its carry (the decayed sum of
    everything before / after it), obtained from the chunk totals ``Σ_l e^{-(L-1-l) w} x_l`` and
    ``Σ_l e^{-l w} x_l`` (accumulated while the signals are built) by the same scan over chunks with decay ``L w``
    (recursively). Nothing T×T or T×L is formed; work is O(T·C) per signal.

    **Backward** (``g = ∂ℓ/∂wkv``). ``∂ℓ/∂num_t = α_t = g_t / den_t``, ``∂ℓ/∂den_t = -β_t`` with
    ``β_t = α_t wkv_t``. W is symmetric, so the gradient reaching the signals is the same bidirectional scan of α
    and β (``Q'``: exclusive prefix scan, ``Q``: exclusive suffix scan, as P and S)::

        ∂ℓ/∂x^n_i = A_i  = Q'^α_i + Q^α_i + e^u α_i,       ∂ℓ/∂x^d_i = -(Q'^β_i + Q^β_i + e^u β_i)
        ∂ℓ/∂v_i = a_i A_i
        ∂ℓ/∂k_i = x^n_i (Q'^α_i + Q^α_i) - a_i (Q'^β_i + Q^β_i) + e^u α_i δ_i
        ∂ℓ/∂u   = e^u Σ_t α_t δ_t,        δ_t = a_t (v_t - wkv_t) = (x^n_t (P^d_t + S^d_t) - a_t (P^n_t + S^n_t)) / den_t
        ∂ℓ/∂w   = -e^{-w} Σ_j (P^n_j Q^α_j + S^n_j Q'^α_j - P^d_j Q^β_j - S^d_j Q'^β_j)

    (sums also over the batch). The bonus terms use ``δ`` computed from the neighbour sums, not as ``v - wkv``:
    when the token's own term dominates (large u or k) ``wkv_t`` equals ``v_t`` to fp32 rounding and the
    difference would be noise. The ``∂ℓ/∂w`` line: ``-∂P_t/∂w = Σ_{i<t} (t-1-i) e^{-(t-1-i) w} x_i
    = e^{-w} Σ_{j<t} e^{-(t-1-j) w} P_j`` (the distance-weighted sum is a scan of the scan), so
    ``Σ_t α_t ∂P_t/∂w = -e^{-w} Σ_j P_j Q^α_j`` — products of quantities the scans give, summed. The backward
    recomputes P and S inside its loops from the saved signals and chunk carries: it saves ``x^n, x^d`` (2),
    ``den`` and ``δ`` (1 each) ``[B, T, C]`` tensors in fp32, plus the ``[2, 2B, T/L, C]`` carries — O(T·C)
    memory (peak of forward + backward: 12–13 ``[B, T, C]`` fp32 tensors), O(T·C) time.

    **Numerics.** fp32 inside (fp64 for fp64 inputs; bf16/fp16 inputs are computed in fp32, the output returned in
    ``v``'s dtype and each gradient in its input's dtype). Every state is a sum of positive weights times
    ``a_i ≤ 1``; the weights lie in ``[e^{-|w| T}, e^{|w| T}]``, so nothing overflows for ``|w| T ≲ 60`` and
    ``|u| ≲ 20`` whatever k, and a term that underflows is negligible against the token with the largest key.
    Measured (tests): relative RMS error vs the float64 reference ~1e-7 – 2e-6 for the output and all gradients
    up to T = 4096; with k = ±80, ``w T`` in [-10, 10], ``u = ±20`` or ``±20/T``: finite, output to 1e-7, and
    gradients to 1e-5 except saturated ones (a token whose output is one other token's v to within e^-20: the true
    gradient is ~1e-8 and fp32 resolves it only to ~1e-8 absolute). The chunk size changes only rounding.

    ``variant="official_kernel"`` computes instead what the authors' CUDA kernel computes (the arithmetic the
    released checkpoints were trained with), via :func:`bi_wkv_official_kernel_ref` (float64, O(T^2)).

    Args:
        w, u: ``[C]`` decay and bonus, already divided by T (as the model passes them).
        k, v: ``[B, T, C]`` keys and values; any float dtype.
        variant: ``"eq5"`` (default) or ``"official_kernel"``.
        chunk_size: tokens per scan chunk; default: by input size (8 – 32; Triton: 16 – 128). Speed only.

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
    if triton_enabled(w, u, k, v):  # CUDA: the Triton kernels (their op imports Triton when it first runs)
        L = wkv_chunk_len(k.shape[1]) if chunk_size is None else max(int(chunk_size), 1)
        return torch.ops.linvision.bi_wkv_triton_fwd(w, u, k, v, L)[0]
    kernel = cpu_kernel() if k.device.type == "cpu" else None
    if chunk_size is None:  # the compiled CPU kernel scans sequentially: one chunk (natural layout)
        chunk_size = 0 if kernel == "numba" else _auto_chunk(*k.shape)
    if kernel == "numba" and eager_cpu_kernel(k, kernel):  # the same kernels, without the custom op's dispatch
        if needs_grad(w, u, k, v):
            return _BiWKVCPU.apply(w, u, k, v, int(chunk_size))
        return _numba_forward(w, u, k, v, int(chunk_size), reuse=True)[0]
    return torch.ops.linvision.bi_wkv_fwd(w, u, k, v, int(chunk_size))[0]


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
