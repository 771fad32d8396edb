"""CUDA tests (marker ``cuda``; skipped without a GPU): the Triton kernels behind ``bi_wkv``,
``retention_chunkwise`` and ``q_shift_lerp`` against the float64 references and the PyTorch forms at realistic
shapes (up to 16,384 tokens), extreme inputs in fp32/bf16/fp16, torch.compile, and the models with and without the
kernels.
Run by scripts/gpu_check.sh (``python3 -m pytest tests/test_cuda.py -m cuda``)."""
from __future__ import annotations

import pytest
import torch

import linvision  # noqa: F401  (registers the models; must precede timm)
import timm
from linvision.ops import bi_wkv, bi_wkv_ref, decay_gammas, retention_chunkwise, retention_ref

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = "cuda"


def rel_rms(a, b, floor=1.0):
    a, b = a.double(), b.double()
    return (a - b).pow(2).mean().sqrt().item() / max(b.pow(2).mean().sqrt().item(), floor)


def _grads(fn, inputs, gy):
    out = fn(*inputs)
    return (out,) + torch.autograd.grad(out, inputs, gy)


def _wkv_inputs(B, T, C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, generator=g) * 3 / T
    u = torch.randn(C, generator=g) * 2 / T
    k, v = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    return [t.to(DEV, dtype).requires_grad_() for t in (w, u, k, v)]


def _extreme_inputs(T, u_per_token, C=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(T)
    w = torch.linspace(-10, 10, C) / T
    u = torch.tensor([20.0, -20.0] * (C // 2)) / (T if u_per_token else 1)
    k = torch.randn(2, T, C, generator=g).sign() * 80
    k[0, :, :3] = torch.randn(T, 3, generator=g) * 80
    k[1, :, 3:6] = -80
    k[1, T // 2, 3:6] = 80
    v = torch.randn(2, T, C, generator=g)
    # w, u stay fp32 (parameters under autocast); k, v in the compute dtype
    return [t.to(DEV, dtype if t.dim() == 3 else torch.float32).requires_grad_() for t in (w, u, k, v)]


def _torch_path(monkeypatch):
    monkeypatch.setenv("LINVISION_TRITON", "0")


def test_triton_path_is_taken():
    from torch.profiler import ProfilerActivity, profile
    w, u, k, v = _wkv_inputs(1, 64, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bi_wkv(w, u, k, v)
    assert any("bi_wkv_triton_fwd" in e.name for e in prof.events())


@pytest.mark.parametrize("B,T,C", [(2, 197, 192), (1, 1000, 13), (3, 4096, 5)])
def test_bi_wkv_cuda_matches_reference(B, T, C):
    w, u, k, v = _wkv_inputs(B, T, C)
    gy = torch.randn(B, T, C, device=DEV)
    fast = _grads(bi_wkv, (w, u, k, v), gy)
    ref = _grads(bi_wkv_ref, (w, u, k, v), gy)
    for name, a, b in zip(["out", "w", "u", "k", "v"], fast, ref):
        assert a.dtype == torch.float32 and rel_rms(a, b) < 1e-5, name


def test_bi_wkv_cuda_16k_tokens_matches_pytorch_float64(monkeypatch):
    """T = 16,384 (a 2048² image at patch 16): Triton (fp32) vs the PyTorch O(T) op in float64."""
    w, u, k, v = _wkv_inputs(1, 16384, 64)
    gy = torch.randn(1, 16384, 64, device=DEV)
    fast = _grads(bi_wkv, (w, u, k, v), gy)
    _torch_path(monkeypatch)
    x64 = [t.detach().double().requires_grad_() for t in (w, u, k, v)]
    ref = _grads(bi_wkv, x64, gy.double())
    for name, a, b in zip(["out", "w", "u", "k", "v"], fast, ref):
        assert rel_rms(a, b) < 1e-4, name


@pytest.mark.parametrize("T", [50, 700])
@pytest.mark.parametrize("u_per_token", [True, False], ids=["u_per_token", "u_raw"])
def test_bi_wkv_cuda_extreme_inputs(T, u_per_token):
    """The CPU op's extreme case (k ±80, w·T in [-10, 10], u ±20): finite, and as accurate as the CPU op."""
    inputs = _extreme_inputs(T, u_per_token)
    gy = torch.randn(2, T, 12, device=DEV)
    fast = _grads(bi_wkv, inputs, gy)
    ref = _grads(bi_wkv_ref, inputs, gy)
    for name, a, b in zip(["out", "w", "u", "k", "v"], fast, ref):
        assert torch.isfinite(a).all(), name
        assert rel_rms(a, b, floor=1.0 if name == "out" else 1e-3) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [700, 16384])
def test_bi_wkv_cuda_low_precision_extreme_finite(dtype, T):
    inputs = _extreme_inputs(T, False, dtype=dtype)
    gy = torch.randn(2, T, 12, device=DEV, dtype=dtype)
    out = _grads(bi_wkv, inputs, gy)
    for name, a, x in zip(["out", "w", "u", "k", "v"], out, [inputs[3]] + inputs):
        assert a.dtype == x.dtype and torch.isfinite(a).all(), name
    if T <= 1000:
        ref = bi_wkv_ref(*inputs)
        assert rel_rms(out[0].float(), ref.float()) < 1e-2


def test_bi_wkv_cuda_compile_fullgraph():
    w, u, k, v = _wkv_inputs(2, 300, 48)
    gy = torch.randn(2, 300, 48, device=DEV)
    eager = _grads(bi_wkv, (w, u, k, v), gy)
    compiled = _grads(torch.compile(bi_wkv, fullgraph=True), (w, u, k, v), gy)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_bi_wkv_cuda_flop_formula():
    from torch.utils.flop_counter import FlopCounterMode
    w, u, k, v = _wkv_inputs(2, 300, 48)
    with FlopCounterMode(display=False) as fc:
        bi_wkv(w, u, k, v).sum().backward()
    assert fc.get_total_flops() >= 6 * 29 * 2 * 300 * 48


def _ret_inputs(B, T, H, K, V, dtype=torch.float32, state=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g)
    s0 = torch.randn(B, H, K, V, generator=g) if state else None
    ins = [t.to(DEV, dtype).requires_grad_() for t in (q, k, v)]
    return ins + ([s0.to(DEV, dtype).requires_grad_()] if state else [])


def _ret_grads(fn, ins, gamma, final=True, seed=1):
    q, k, v = ins[:3]
    s0 = ins[3] if len(ins) > 3 else None
    o, s = fn(q, k, v, gamma, None, s0, final)
    outs = [o] + ([s] if final else [])
    g = torch.Generator(device=DEV).manual_seed(seed)
    gos = [torch.randn(x.shape, generator=g, device=DEV).to(x.dtype) for x in outs]
    return outs + list(torch.autograd.grad(outs, ins, gos))


@pytest.mark.parametrize("B,T,H,K,V,chunk", [(2, 197, 3, 64, 64, 64), (1, 1000, 2, 32, 48, 32),
                                             (1, 77, 1, 100, 128, 16)])
def test_retention_cuda_matches_reference(B, T, H, K, V, chunk):
    ins = _ret_inputs(B, T, H, K, V)
    gamma = decay_gammas(H).to(DEV)
    fast = _ret_grads(lambda *a: retention_chunkwise(*a, chunk_size=chunk), ins, gamma)
    ref = _ret_grads(retention_ref, ins, gamma)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert rel_rms(a, b) < 1e-5, i


def test_retention_cuda_16k_tokens_matches_pytorch_chunkwise(monkeypatch):
    ins = _ret_inputs(1, 16384, 3, 64, 64)
    gamma = decay_gammas(3).to(DEV)
    fast = _ret_grads(retention_chunkwise, ins, gamma)
    _torch_path(monkeypatch)
    x64 = [t.detach().double().requires_grad_() for t in ins]
    ref = _ret_grads(retention_chunkwise, x64, gamma)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert rel_rms(a, b) < 1e-4, i


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_retention_cuda_low_precision(dtype):
    ins = _ret_inputs(2, 4096, 3, 64, 64, dtype=dtype)
    gamma = decay_gammas(3).to(DEV)
    fast = _ret_grads(retention_chunkwise, ins, gamma)
    ref = _ret_grads(retention_chunkwise, [t.detach().float().requires_grad_() for t in ins], gamma)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert a.dtype == dtype and torch.isfinite(a).all(), i
        assert rel_rms(a.float(), b) < 3e-2, i


def test_retention_cuda_compile():
    ins = _ret_inputs(1, 300, 3, 64, 64)
    gamma = decay_gammas(3).to(DEV)
    eager = _ret_grads(retention_chunkwise, ins, gamma)
    compiled = _ret_grads(torch.compile(retention_chunkwise), ins, gamma)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("B,H,W,C,n,shift", [(2, 64, 64, 192, 3, 1), (1, 37, 29, 70, 2, 2), (4, 14, 14, 13, 2, 1)])
def test_q_shift_lerp_cuda_matches_plain_form(monkeypatch, B, H, W, C, n, shift):
    """The Triton Q-Shift + lerp (outputs, ∂x, ∂μ) against the plain form (pad + cat + lerp) in float64 on CUDA,
    and its custom op is what runs."""
    from torch.profiler import ProfilerActivity, profile
    from linvision.ops.qshift import q_shift_lerp
    g = torch.Generator().manual_seed(C)
    x = torch.randn(B, H * W, C, generator=g).to(DEV).requires_grad_()
    mix = torch.rand(n, C, generator=g).to(DEV).requires_grad_()
    gy = torch.randn(n, B, H * W, C, generator=g).to(DEV)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fast = _grads(lambda a, m: q_shift_lerp(a, m, (H, W), shift), (x, mix), gy)
    assert any("q_shift_lerp_triton" in e.name for e in prof.events())
    _torch_path(monkeypatch)
    x64, m64 = (t.detach().double().requires_grad_() for t in (x, mix))
    ref = _grads(lambda a, m: q_shift_lerp(a, m, (H, W), shift), (x64, m64), gy.double())
    for name, a, b in zip(("out", "x", "mix"), fast, ref):
        assert a.dtype == torch.float32 and rel_rms(a, b) < 1e-6, name


def test_q_shift_lerp_cuda_out_dtype_and_compile():
    """bf16 outputs written directly (as the layers ask under autocast) equal the fp32 ones rounded; the op
    traces in torch.compile(fullgraph=True)."""
    from linvision.ops.qshift import q_shift_lerp
    x = torch.randn(2, 24 * 24, 64, device=DEV, requires_grad=True)
    mix = torch.rand(3, 64, device=DEV, requires_grad=True)
    full = q_shift_lerp(x, mix, (24, 24))
    half = q_shift_lerp(x, mix, (24, 24), out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, full.to(torch.bfloat16), atol=0, rtol=0)
    (gx,) = torch.autograd.grad(half.float().sum(), x)
    assert gx.dtype == torch.float32 and torch.isfinite(gx).all()
    fn = torch.compile(lambda a, m: q_shift_lerp(a, m, (24, 24)), fullgraph=True)
    torch.testing.assert_close(fn(x, mix), full)


@pytest.mark.parametrize("name,kw", [("vrwkv_tiny", {}), ("vir_tiny", {"mode": "chunkwise"})])
def test_models_cuda_triton_vs_pytorch(monkeypatch, name, kw):
    """Whole models at 224²: logits and the input gradient with the kernels equal the PyTorch forms'."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kw).to(DEV).eval()
    x = torch.randn(2, 3, 224, 224, device=DEV, requires_grad=True)
    out = model(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    _torch_path(monkeypatch)
    out2 = model(x)
    (gx2,) = torch.autograd.grad(out2.sum(), x)
    assert rel_rms(out, out2) < 1e-3 and rel_rms(gx, gx2, floor=1e-12) < 1e-3
