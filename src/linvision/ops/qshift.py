"""Q-Shift and the token-shift interpolation of Vision-RWKV in one op (Duan et al., arXiv 2403.02308, Eq. 2-3).

``q_shift_lerp(x, mix, grid, shift)[i] = torch.lerp(q_shift(x, grid, shift), x, mix[i])``, i.e. ``x μ_i +
q_shift(x) (1 - μ_i)`` for each row ``μ_i`` of ``mix`` — the inputs of the k/v/r projections of the spatial mix and
the k/r projections of the channel mix. A ``torch.library`` custom op (``linvision::q_shift_lerp``, fake kernel and
autograd registered, so ``torch.compile(fullgraph=True)`` traces it):

* the default implementation (any device) is the plain form: :func:`q_shift_ref` (pad + slices + cat) then one
  ``torch.lerp`` per row — two passes over ``[B, T, C]`` for the shift and one per output;
* on CUDA (Triton installed, ``LINVISION_TRITON`` not ``0``), the Triton kernels of :mod:`.qshift_triton`: one
  pass that writes every output, in the dtype asked for (custom ops ``linvision::q_shift_lerp_triton``/``_bwd``,
  defined here so that nothing on the CPU path imports Triton);
* on CPU, when :func:`linvision.ops.biwkv.cpu_kernel` says ``numba`` (the default where numba imports;
  ``LINVISION_BIWKV_CPU=torch`` turns it off), a compiled kernel reads x once and writes every output in the
  same pass (no pad), as ``s + μ (e - s)`` (``torch.lerp``'s arithmetic for ``|μ| < 0.5``; for other μ the two
  agree to fp32 rounding).

The backward: ``∂x = Σ_i μ_i g_i + q_shift^T(Σ_i (1 - μ_i) g_i)``, ``∂μ_i = Σ_{b,t} g_i (x - q_shift(x))``;
``q_shift^T`` is Q-Shift with each quarter's direction reversed. Torch ops in the custom op's registered autograd
(what ``torch.compile`` traces); in eager CPU runs with numba the op's dispatch is skipped
(:func:`linvision.ops.biwkv.eager_cpu_kernel`, ~70 µs a call) and forward and backward are compiled kernels
(:mod:`linvision.ops.qshift_cpu`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._common import needs_grad
from ._triton import triton_enabled

__all__ = ["q_shift_ref", "q_shift_lerp"]


def q_shift_ref(x: torch.Tensor, grid: Tuple[int, int], shift: int = 1, adjoint: bool = False) -> torch.Tensor:
    """Q-Shift (paper Eq. 2) by pad, slices and cat; see :func:`linvision.layers.rwkv.q_shift` for the contract.
    ``adjoint=True``: its transpose (each quarter shifted the other way), for the backward."""
    B, T, C = x.shape
    H, W = grid
    q = int(C / 4)
    x = x.view(B, H, W, C)
    p = F.pad(x, (0, 0, shift, shift, shift, shift))  # zero border of `shift` on H and W: [B, H+2s, W+2s, C]
    s = shift
    left, right = p[:, s:s + H, 0:W], p[:, s:s + H, 2 * s:2 * s + W]  # x[h, w - s], x[h, w + s]
    up, down = p[:, 0:H, s:s + W], p[:, 2 * s:2 * s + H, s:s + W]  # x[h - s, w], x[h + s, w]
    if adjoint:
        left, right, up, down = right, left, down, up
    out = torch.cat([left[..., 0:q], right[..., q:2 * q], up[..., 2 * q:3 * q], down[..., 3 * q:4 * q],
                     x[..., 4 * q:]], dim=-1)
    return out.reshape(B, T, C)


def _q_shift_lerp_torch(x: torch.Tensor, mix: torch.Tensor, H: int, W: int, shift: int) -> torch.Tensor:
    xx = q_shift_ref(x, (H, W), shift)
    return torch.stack([torch.lerp(xx, x, m) for m in mix.unbind(0)])


@torch.library.custom_op("linvision::q_shift_lerp", mutates_args=())
def _q_shift_lerp_op(x: torch.Tensor, mix: torch.Tensor, H: int, W: int, shift: int) -> torch.Tensor:
    """``[n, B, T, C]``: ``lerp(q_shift(x), x, mix[i])`` for each row of ``mix [n, C]``."""
    return _q_shift_lerp_torch(x, mix, H, W, shift)


def _q_shift_lerp_numba(x: torch.Tensor, mix: torch.Tensor, H: int, W: int, shift: int) -> torch.Tensor:
    from . import biwkv_cpu, qshift_cpu  # numba: imported on first use only

    out = x.new_empty(mix.shape[0], *x.shape)
    with biwkv_cpu.threads("linvision::q_shift_lerp (numba)"):
        qshift_cpu.q_shift_lerp_kernel(biwkv_cpu._np(x.contiguous()), biwkv_cpu._np(mix.contiguous()), out.numpy(),
                                       H, W, shift)
    return out


@_q_shift_lerp_op.register_kernel("cpu")
def _(x, mix, H, W, shift):
    from .biwkv import cpu_kernel

    if cpu_kernel() == "torch" or x.dtype not in (torch.float32, torch.float64) or mix.dtype != x.dtype:
        return _q_shift_lerp_torch(x, mix, H, W, shift)
    return _q_shift_lerp_numba(x, mix, H, W, shift)


@_q_shift_lerp_op.register_fake
def _(x, mix, H, W, shift):
    return x.new_empty(mix.shape[0], *x.shape)


def _setup_context(ctx, inputs, output):  # also the Triton op's (whose extra last input is out_dtype)
    x, mix, H, W, shift = inputs[:5]
    ctx.save_for_backward(x, mix)
    ctx.args = (H, W, shift)


def _backward(ctx, g):
    x, mix = ctx.saved_tensors
    H, W, shift = ctx.args
    m = mix[:, None, None, :]  # [n, 1, 1, C]
    gx = (g * m).sum(0) + q_shift_ref((g * (1 - m)).sum(0), (H, W), shift, adjoint=True)
    gmix = (g * (x - q_shift_ref(x, (H, W), shift))).sum((1, 2))
    return gx, gmix, None, None, None


_q_shift_lerp_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("linvision::q_shift_lerp_triton", mutates_args=())
def _triton_op(x: torch.Tensor, mix: torch.Tensor, H: int, W: int, shift: int, out_dtype: torch.dtype) -> torch.Tensor:
    """CUDA: ``[n, B, T, C]`` in ``out_dtype`` by the Triton kernel (imports Triton when it first runs)."""
    from .qshift_triton import q_shift_lerp_forward

    return q_shift_lerp_forward(x, mix, H, W, shift, out_dtype)


@_triton_op.register_fake
def _(x, mix, H, W, shift, out_dtype):
    return x.new_empty(mix.shape[0], *x.shape, dtype=out_dtype)


@torch.library.custom_op("linvision::q_shift_lerp_triton_bwd", mutates_args=())
def _triton_bwd_op(g: torch.Tensor, x: torch.Tensor, mix: torch.Tensor, H: int, W: int,
                   shift: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(∂x in x's dtype, ∂mix fp32)``."""
    from .qshift_triton import q_shift_lerp_backward

    return q_shift_lerp_backward(g, x, mix, H, W, shift)


@_triton_bwd_op.register_fake
def _(g, x, mix, H, W, shift):
    return torch.empty_like(x), mix.new_empty(mix.shape, dtype=torch.float32)


def _triton_backward(ctx, g):
    x, mix = ctx.saved_tensors
    gx, gmix = torch.ops.linvision.q_shift_lerp_triton_bwd(g, x, mix, *ctx.args)
    return gx, gmix.to(mix.dtype), None, None, None, None


_triton_op.register_autograd(_triton_backward, setup_context=_setup_context)


class _QShiftLerpCPU(torch.autograd.Function):
    """Eager CPU ``q_shift_lerp`` on the compiled kernel: the custom op without its dispatch (see
    :func:`linvision.ops.biwkv.eager_cpu_kernel`); same backward."""

    @staticmethod
    def forward(ctx, x, mix, H, W, shift):
        ctx.save_for_backward(x, mix)
        ctx.args = (H, W, shift)
        return _q_shift_lerp_numba(x, mix, H, W, shift)

    @staticmethod
    def backward(ctx, g):
        from . import biwkv_cpu, qshift_cpu

        x, mix = (t.detach().contiguous() for t in ctx.saved_tensors)
        H, W, shift = ctx.args
        g = biwkv_cpu._cd(g, x.dtype)
        gx, hb = torch.empty_like(x), torch.empty_like(x)
        gmp = torch.empty(x.shape[0] * H, *mix.shape, dtype=torch.float64)  # ∂μ partial sums, one block per job
        with biwkv_cpu.threads("linvision::q_shift_lerp_bwd (numba)"):
            qshift_cpu.q_shift_lerp_bwd(x.numpy(), mix.numpy(), g.numpy(), gx.numpy(), hb.numpy(), gmp.numpy(),
                                        H, W, shift)
        return gx, gmp.sum(0).to(mix.dtype), None, None, None


def q_shift_lerp(x: torch.Tensor, mix: torch.Tensor, grid: Tuple[int, int], shift: int = 1,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.lerp(q_shift(x, grid, shift), x, mix[i])`` for every row of ``mix``, in one op (module docstring).

    Args:
        x: ``[B, T, C]`` tokens in row-major order over ``grid``.
        mix: ``[n, C]`` interpolation weights (μ of the official code).
        grid: ``(H, W)`` patch grid, ``H * W == T``.
        shift: Q-Shift distance in patches (>= 1).
        out_dtype: dtype of the result (default: x's). The layers pass the autocast dtype under autocast: the
            projections would cast to it anyway, and the CUDA kernel then writes it directly (no extra pass).

    Returns:
        ``[n, B, T, C]`` in ``out_dtype`` (differentiable in x and mix; gradients in their dtypes). On CUDA the
        Triton kernels of :mod:`linvision.ops.qshift_triton` (Triton installed, ``LINVISION_TRITON`` not ``0``,
        C >= 4); on CPU the compiled kernel where the compiled CPU path is on (``LINVISION_BIWKV_CPU``, see
        :func:`~linvision.ops.biwkv.cpu_kernel`), outside ``torch.export``; otherwise plain tensor ops, which
        ``torch.export``/ONNX take as they are.

    Raises:
        ValueError: grid does not match T, or mix is not ``[n, C]``.
    """
    B, T, C = x.shape
    H, W = grid
    if H * W != T:
        raise ValueError(f"q_shift: grid {grid} does not match T={T}")
    if mix.dim() != 2 or mix.shape[1] != C:
        raise ValueError(f"q_shift_lerp: mix must be [n, C={C}], got {tuple(mix.shape)}")
    out_dtype = out_dtype or x.dtype
    exporting = torch.compiler.is_exporting()
    if not exporting and C >= 4 and triton_enabled(x, mix):  # CUDA: one Triton pass, writes out_dtype
        return torch.ops.linvision.q_shift_lerp_triton(x, mix, int(H), int(W), int(shift), out_dtype)
    from .biwkv import cpu_kernel, eager_cpu_kernel
    kernel = "torch" if x.device.type != "cpu" or exporting else cpu_kernel()
    if kernel == "torch":  # plain tensor ops (also under torch.export / ONNX: a graph of standard ops, no custom op)
        # H, W as given: under a dynamic torch.export they are symbolic, and int() would pin the graph to one size
        return _q_shift_lerp_torch(x, mix.to(x.dtype), H, W, int(shift)).to(out_dtype)
    mix = mix.to(x.dtype)
    if x.dtype in (torch.float32, torch.float64) and eager_cpu_kernel(x, kernel):  # the kernel, no op dispatch
        if needs_grad(x, mix):
            return _QShiftLerpCPU.apply(x, mix, int(H), int(W), int(shift)).to(out_dtype)
        return _q_shift_lerp_numba(x, mix, int(H), int(W), int(shift)).to(out_dtype)
    return torch.ops.linvision.q_shift_lerp(x, mix, int(H), int(W), int(shift)).to(out_dtype)
