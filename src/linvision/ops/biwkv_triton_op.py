"""The custom op pair ``linvision::bi_wkv_triton_fwd`` / ``linvision::bi_wkv_triton_bwd``: Bi-WKV by the Triton
kernels of :mod:`.biwkv_triton`, the CUDA path of :func:`linvision.ops.bi_wkv`.

Defined here, in a module that does not import Triton, so that ``bi_wkv`` can call the op on CUDA inputs without
an ``import`` in traced code (``torch.compile(fullgraph=True)`` sees one opaque op with a fake kernel, autograd
and the same FLOP formula as the PyTorch op); the op's body imports the kernels when it first runs. A separate op
rather than a CUDA kernel of ``linvision::bi_wkv_fwd``: that op returns, for its backward, tensors laid out for
the chunk-transposed PyTorch scans (its fake kernel fixes their shapes), while the kernels save different,
smaller ones (``den``, ``max k``, the chunk carries); two ops keep both schemas honest.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .biwkv import BI_WKV_MACS_PER_TOKEN_CHANNEL

__all__: list = []  # registers the ops


@torch.library.custom_op("linvision::bi_wkv_triton_fwd", mutates_args=())
def _fwd_op(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            chunk_len: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [B, T, C] in v's dtype, den [B, T, C] fp32, max_t k [B, C] fp32, carries [4, B, ceil(T/L), C] fp32)``."""
    from .biwkv_triton import triton_forward  # imports Triton: only when this op runs

    return triton_forward(w, u, k, v, chunk_len)


@_fwd_op.register_fake
def _(w, u, k, v, chunk_len):
    B, T, C = k.shape
    f32 = torch.float32
    return (v.new_empty(B, T, C), k.new_empty(B, T, C, dtype=f32), k.new_empty(B, C, dtype=f32),
            k.new_empty(4, B, -(-T // chunk_len), C, dtype=f32))


@torch.library.custom_op("linvision::bi_wkv_triton_bwd", mutates_args=())
def _bwd_op(gy: torch.Tensor, w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor,
            den: torch.Tensor, kmax: torch.Tensor,
            car: torch.Tensor, chunk_len: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dw [C], du [C], dk [B, T, C], dv [B, T, C])``, all fp32."""
    from .biwkv_triton import triton_backward

    return triton_backward(gy, w, u, k, v, y, den, kmax, car, chunk_len)


@_bwd_op.register_fake
def _(gy, w, u, k, v, y, den, kmax, car, chunk_len):
    B, T, C = k.shape
    return (den.new_empty(C), den.new_empty(C), den.new_empty(B, T, C), den.new_empty(B, T, C))


def _setup_context(ctx, inputs, output):
    w, u, k, v, chunk_len = inputs
    y, den, kmax, car = output
    ctx.save_for_backward(w, u, k, v, y, den, kmax, car)
    ctx.chunk_len = chunk_len
    ctx.dtypes = (w.dtype, u.dtype, k.dtype, v.dtype)
    ctx.mark_non_differentiable(den, kmax, car)


def _autograd_backward(ctx, gy, *_):
    grads = torch.ops.linvision.bi_wkv_triton_bwd(gy.contiguous(), *ctx.saved_tensors, ctx.chunk_len)
    return tuple(g.to(dt) for g, dt in zip(grads, ctx.dtypes)) + (None,)


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _register_flops() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if torch.ops.linvision.bi_wkv_triton_fwd in flop_registry:
        return

    @register_flop_formula(torch.ops.linvision.bi_wkv_triton_fwd)
    def _fwd_flops(w_shape, u_shape, k_shape, *args, **kwargs) -> int:
        B, T, C = k_shape
        return 2 * BI_WKV_MACS_PER_TOKEN_CHANNEL * B * T * C

    @register_flop_formula(torch.ops.linvision.bi_wkv_triton_bwd)
    def _bwd_flops(gy_shape, *args, **kwargs) -> int:
        B, T, C = gy_shape
        return 4 * BI_WKV_MACS_PER_TOKEN_CHANNEL * B * T * C


_register_flops()
