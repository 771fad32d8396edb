"""Run by tests/test_triton_kernels.py in a subprocess with ``TRITON_INTERPRET=1`` (so the flag is set before the
kernel modules are imported and leaks into nothing else): the Triton kernels on CPU tensors against the float64
references. Prints one JSON object ``{case: {quantity: relative RMS error, or -1.0 if not finite}}`` on the last
line of stdout. Tiny shapes: the interpreter runs every op of every program in Python."""
from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from linvision.ops.biwkv import bi_wkv_ref  # noqa: E402
from linvision.ops.biwkv_triton import bi_wkv_triton  # noqa: E402
from linvision.ops.retention import decay_gammas, retention_ref  # noqa: E402
from linvision.ops.qshift import q_shift_ref  # noqa: E402
from linvision.ops.qshift_triton import q_shift_lerp_backward, q_shift_lerp_forward  # noqa: E402
from linvision.ops.retention_triton import retention_chunkwise_triton  # noqa: E402

torch.set_num_threads(1)


def rel_rms(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    if not torch.isfinite(a).all():
        return -1.0
    a, b = a.double(), b.double()
    return (a - b).pow(2).mean().sqrt().item() / max(b.pow(2).mean().sqrt().item(), floor)


def _grads(fn, inputs, gy):
    out = fn(*inputs)
    return (out,) + torch.autograd.grad(out, inputs, gy)


def wkv_case(inputs, chunk, grad_floor=1.0):
    gy = torch.randn(inputs[2].shape, generator=torch.Generator().manual_seed(1)).to(inputs[3].dtype)
    fast = _grads(lambda *a: bi_wkv_triton(*a, chunk_size=chunk), inputs, gy)
    ref = _grads(bi_wkv_ref, inputs, gy)
    res = {n: rel_rms(a.float(), b.float(), 1.0 if n == "out" else grad_floor)
           for n, a, b in zip(["out", "w", "u", "k", "v"], fast, ref)}
    res["dtypes_ok"] = float(all(a.dtype == x.dtype for a, x in zip(fast, (inputs[3],) + tuple(inputs))))
    return res


def wkv_inputs(B, T, C, dtype=torch.float32):
    g = torch.Generator().manual_seed(T * 100 + C)
    w = torch.randn(C, generator=g) * 3 / T
    u = torch.randn(C, generator=g) * 2 / T
    k, v = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    return [t.to(dtype).requires_grad_() for t in (w, u, k, v)]


def wkv_extreme(T, u_per_token, C=12):
    """As tests/test_biwkv.py: k = ±80, w·T in [-10, 10], u = ±20 (or ±20/T), one token dominating some channels."""
    g = torch.Generator().manual_seed(T)
    w = torch.linspace(-10, 10, C) / T
    u = torch.tensor([20.0, -20.0] * (C // 2)) / (T if u_per_token else 1)
    k = torch.randn(2, T, C, generator=g).sign() * 80
    k[0, :, :3] = torch.randn(T, 3, generator=g) * 80
    k[1, :, 3:6] = -80
    k[1, T // 2, 3:6] = 80
    v = torch.randn(2, T, C, generator=g)
    return [t.requires_grad_() for t in (w, u, k, v)]


def ret_case(B, T, H, K, V, chunk, with_state, final, dtype=torch.float32):
    g = torch.Generator().manual_seed(T * 10 + K)
    q, k = (torch.randn(B, T, H, K, generator=g).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g).to(dtype).requires_grad_()
    s0 = torch.randn(B, H, K, V, generator=g).to(dtype).requires_grad_() if with_state else None
    gamma = decay_gammas(H) if H > 1 else torch.tensor([0.9])
    ins = [q, k, v] + ([s0] if with_state else [])
    go = [torch.randn(B, T, H, V, generator=g).to(dtype)] + ([torch.randn(B, H, K, V, generator=g)] if final else [])
    names = ["out"] + (["final_state"] if final else []) + ["q", "k", "v"] + (["initial_state"] if with_state else [])
    vals = []
    for fn in (lambda *a: retention_chunkwise_triton(*a, chunk_size=chunk),
               lambda *a: retention_ref(*a)):
        o, s = fn(q, k, v, gamma, None, s0, final)
        outs = [o] + ([s] if final else [])
        vals.append(outs + list(torch.autograd.grad(outs, ins, [x.to(y.dtype) for x, y in zip(go, outs)])))
    res = {n: rel_rms(a.float(), b.float(), 1.0) for n, a, b in zip(names, *vals)}
    res["dtypes_ok"] = float(vals[0][0].dtype == dtype and all(a.dtype == x.dtype for a, x in
                                                               zip(vals[0][len(go):], ins)))
    return res


def qshift_case(B, H, W, C, n, shift, out_dtype=torch.float32, through_op=False):
    """The Triton Q-Shift + lerp kernels (forward, and the backward with ∂x and ∂μ) against the plain form's
    autograd in float64: ``q_shift_ref`` then ``s + μ (x - s)`` per row of μ."""
    g = torch.Generator().manual_seed(H * 100 + W * 10 + C)
    x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64).requires_grad_()
    mix = torch.rand(n, C, generator=g, dtype=torch.float64).requires_grad_()
    gy = torch.randn(n, B, H * W, C, generator=g, dtype=torch.float64)
    s = q_shift_ref(x, (H, W), shift)
    ref = torch.stack([s + m * (x - s) for m in mix.unbind(0)])
    rgx, rgm = torch.autograd.grad(ref, (x, mix), gy)
    if through_op:  # the custom op with its registered autograd (what CUDA calls take)
        x32, m32 = (t.detach().float().requires_grad_() for t in (x, mix))
        out = torch.ops.linvision.q_shift_lerp_triton(x32, m32, H, W, shift, out_dtype)
        gx, gm = torch.autograd.grad(out, (x32, m32), gy.to(out_dtype))
    else:
        out = q_shift_lerp_forward(x.detach().float(), mix.detach().float(), H, W, shift, out_dtype)
        gx, gm = q_shift_lerp_backward(gy.to(out_dtype), x.detach().float(), mix.detach().float(), H, W, shift)
    return {"out": rel_rms(out.float(), ref.float(), 1.0), "x": rel_rms(gx, rgx, 1.0), "mix": rel_rms(gm, rgm, 1.0),
            "dtypes_ok": float(out.dtype == out_dtype and gx.dtype == torch.float32 and gm.dtype == torch.float32)}


CASES = {
    # Bi-WKV: one token; odd T and C with the last chunk padded and carries over 5 chunks; two channel blocks
    # (C = 40 > 32) with chunks of 4; bf16 inputs; the extreme values of tests/test_biwkv.py over 3 chunks
    "wkv_T1": lambda: wkv_case(wkv_inputs(2, 1, 13), None),
    "wkv_T37_C13_L8": lambda: wkv_case(wkv_inputs(1, 37, 13), 8),
    "wkv_T11_C40_L4": lambda: wkv_case(wkv_inputs(2, 11, 40), 4),
    "wkv_bf16": lambda: wkv_case(wkv_inputs(1, 12, 16, torch.bfloat16), 4),
    "wkv_extreme_u_raw": lambda: wkv_case(wkv_extreme(20, False), 8, grad_floor=1e-3),
    "wkv_extreme_u_per_token": lambda: wkv_case(wkv_extreme(20, True), 8, grad_floor=1e-3),
    # retention: odd T (37 = 2 chunks of 16 + 5) with both states, odd K/V; two full chunks; K, V below 16
    "ret_T37_K8_V12_state": lambda: ret_case(1, 37, 2, 8, 12, 16, True, True),
    "ret_T32_B2": lambda: ret_case(2, 32, 1, 16, 16, 16, False, False),
    "ret_T5_K3_V5": lambda: ret_case(1, 5, 1, 3, 5, 64, True, True),
    "ret_bf16": lambda: ret_case(1, 20, 2, 16, 16, 16, True, True, torch.bfloat16),
    # Q-Shift + lerp: odd grid and C (13: one unshifted channel), rows over two row blocks; C over two channel
    # blocks (70 > 64, two unshifted channels), shift 2, three outputs; bf16 outputs; C = 4 (one channel a quarter)
    "qshift_B2_3x5_C13": lambda: qshift_case(2, 3, 5, 13, 2, 1),
    "qshift_4x6_C70_s2": lambda: qshift_case(1, 4, 6, 70, 3, 2),
    "qshift_bf16": lambda: qshift_case(1, 5, 7, 16, 3, 1, torch.bfloat16),
    "qshift_2x2_C4": lambda: qshift_case(3, 2, 2, 4, 2, 1),
    "qshift_op": lambda: qshift_case(2, 3, 5, 13, 3, 1, through_op=True),
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    out = {}
    for name in names:
        try:
            out[name] = CASES[name]()
        except Exception as e:  # reported per case, so one failure does not hide the others
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    print(json.dumps(out))
