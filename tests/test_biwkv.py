"""Bi-WKV: the O(T) custom op (``bi_wkv``) against the float64 O(T²) reference (``bi_wkv_ref``, paper Eq. 5) —
outputs and the gradients of w, u, k, v, extreme inputs, low precision, linear memory, 65,536 tokens,
torch.compile, the FLOP formula — and the official-kernel variant."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import linvision  # noqa: F401  (registers the models; must precede timm)
import timm
from linvision.memory import peak_tensor_bytes
from linvision.ops import bi_wkv, bi_wkv_official_kernel_ref, bi_wkv_ref
from linvision.ops import biwkv as biwkv_module
from linvision.ops import biwkv_cpu


def rel_rms(a: torch.Tensor, b: torch.Tensor, floor: float = 1.0) -> float:
    """RMS error relative to the reference's RMS; a reference whose RMS is below ``floor`` (exactly zero, e.g. d/dw
    at T <= 2, or saturated) is compared in absolute terms against ``floor``."""
    a, b = a.double(), b.double()
    ref = b.pow(2).mean().sqrt().item()
    return (a - b).pow(2).mean().sqrt().item() / max(ref, floor)


@pytest.fixture(params=["numba", "torch"])
def cpu_path(request, monkeypatch):
    """Runs a test with each CPU implementation of the op: the compiled numba kernels and the torch-ops path
    (numba is a dependency, so ``numba`` fails rather than skips where it does not import)."""
    monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, request.param)
    assert biwkv_module.cpu_kernel() == request.param
    return request.param


def _wkv_inputs(B, T, C, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(C, generator=g) * 3 * scale) / max(T, 1)
    u = (torch.randn(C, generator=g) * 2 * scale) / max(T, 1)
    k = torch.randn(B, T, C, generator=g) * scale
    v = torch.randn(B, T, C, generator=g)
    return [t.to(dtype).requires_grad_() for t in (w, u, k, v)]


def _grads(fn, inputs, gy):
    out = fn(*inputs)
    return (out,) + torch.autograd.grad(out, inputs, gy)


# chunk sizes: one chunk (T <= 2 * chunk), a divisor of T, the last chunk padded (197 is prime; 64 % 7 != 0),
# carries over more than 32 chunks (a recursive scan over the chunk totals)
@pytest.mark.parametrize("T,B,C,chunk", [(1, 2, 13, 32), (2, 2, 13, 32), (3, 2, 13, 1), (64, 2, 13, 32),
                                         (64, 2, 13, 7), (197, 2, 13, 32), (197, 1, 5, 3), (1000, 1, 5, 32),
                                         (1000, 1, 5, 8), (4096, 1, 3, 32), (1, 1, 1, None), (197, 2, 13, None),
                                         (197, 2, 13, 0)])
def test_bi_wkv_matches_reference(T, B, C, chunk, cpu_path):
    """fp32 relative RMS error < 1e-5 for the output and the gradients of w, u, k, v (odd C)."""
    w, u, k, v = _wkv_inputs(B, T, C)
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1))
    fast = _grads(lambda *a: bi_wkv(*a, chunk_size=chunk), (w, u, k, v), gy)
    ref = _grads(bi_wkv_ref, (w, u, k, v), gy)
    for name, a, b in zip(["out", "w", "u", "k", "v"], fast, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_rms(a, b) < 1e-5, name


def test_bi_wkv_non_contiguous_inputs(cpu_path):
    """k, v as strided views (a slice of a wider tensor, a transpose) give the same output and gradients."""
    w, u, k, v = _wkv_inputs(2, 45, 7)
    kk = torch.cat([k, k], -1).detach()[..., 7:].requires_grad_()  # stride 14 over channels
    vv = v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # channels-major storage
    assert not kk.is_contiguous() and not vv.is_contiguous()
    gy = torch.randn(2, 45, 7)
    for a, b in zip(_grads(bi_wkv, (w, u, kk, vv), gy), _grads(bi_wkv, (w, u, k, v), gy)):
        torch.testing.assert_close(a, b)


def test_bi_wkv_definition_by_loops(cpu_path):
    """Eq. 5 term by term for every (t, c), independent of both implementations."""
    w, u, k, v = (t.detach().double() for t in _wkv_inputs(1, 6, 3))
    for out in (bi_wkv_ref(w, u, k, v), bi_wkv(w, u, k, v)):
        for t in range(6):
            for c in range(3):
                num = den = 0.0
                for i in range(6):
                    e = (u[c] + k[0, i, c]) if i == t else (-(abs(t - i) - 1) * w[c] + k[0, i, c])
                    num, den = num + e.exp() * v[0, i, c], den + e.exp()
                assert abs(out[0, t, c] - num / den) < 1e-12


@pytest.mark.parametrize("T,chunk", [(5, 32), (13, 4), (70, 2)])
def test_bi_wkv_gradcheck_float64(T, chunk, cpu_path):
    """Analytic backward (the custom op's) against finite differences: one chunk, padded chunks, recursive carries
    (70 tokens in chunks of 2: 35 chunk carries)."""
    w, u, k, v = (t.detach().double().requires_grad_() for t in _wkv_inputs(1 if T > 20 else 2, T, 3))
    assert torch.autograd.gradcheck(lambda *a: bi_wkv(*a, chunk_size=chunk), (w, u, k, v))


def test_bi_wkv_reference_gradcheck_float64():
    w, u, k, v = (t.detach().double().requires_grad_() for t in _wkv_inputs(1, 5, 3))
    assert torch.autograd.gradcheck(bi_wkv_ref, (w, u, k, v))


def test_bi_wkv_chunk_size_only_moves_rounding(cpu_path):
    w, u, k, v = (t.detach().double() for t in _wkv_inputs(2, 300, 5))
    outs = [bi_wkv(w, u, k, v, chunk_size=c) for c in (1, 5, 7, 32, 300)]
    for o in outs[1:]:
        assert rel_rms(o, outs[0]) < 1e-13


def _extreme_inputs(T, u_per_token, C=12):
    g = torch.Generator().manual_seed(T)
    w = torch.linspace(-10, 10, C) / T  # w T in [-10, 10]: weights shrink or grow (w < 0) by e^10 over the image
    u = torch.tensor([20.0, -20.0] * (C // 2)) / (T if u_per_token else 1)
    k = torch.randn(2, T, C, generator=g).sign() * 80  # e^{±80}: overflows fp32 without the max subtraction
    k[0, :, :3] = torch.randn(T, 3, generator=g) * 80
    k[1, :, 3:6] = -80
    k[1, T // 2, 3:6] = 80  # one token dominates every output of these channels
    v = torch.randn(2, T, C, generator=g)
    return [t.requires_grad_() for t in (w, u, k, v)]


@pytest.mark.parametrize("T", [2, 50, 700])
@pytest.mark.parametrize("u_per_token", [True, False], ids=["u_per_token", "u_raw"])
def test_bi_wkv_extreme_inputs(T, u_per_token, cpu_path):
    """k = ±80, w·T in [-10, 10], u = ±20 (or ±20/T): no inf/NaN in the output or any gradient; the output matches
    the reference to 1e-5. Gradients match it to 1e-5 relative, except where they are saturated (tokens whose
    output is one token's v up to e^-20: the true gradient is ~1e-8 and fp32 cannot resolve v - y there) — hence
    the absolute floor of 1e-3 (errors below 1e-8). The same op in float64 matches every gradient to 1e-9, so the
    formulas hold in the saturated regime too."""
    inputs = _extreme_inputs(T, u_per_token)
    gy = torch.randn(2, T, 12, generator=torch.Generator().manual_seed(1))
    fast = _grads(bi_wkv, inputs, gy)
    ref = _grads(bi_wkv_ref, inputs, gy)
    for name, a, b in zip(["out", "w", "u", "k", "v"], fast, ref):
        assert torch.isfinite(a).all(), name
        assert rel_rms(a, b, floor=1.0 if name == "out" else 1e-3) < 1e-5, name
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    fast64, ref64 = _grads(bi_wkv, x64, gy.double()), _grads(bi_wkv_ref, x64, gy.double())
    for name, a, b in zip(["out", "w", "u", "k", "v"], fast64, ref64):
        assert rel_rms(a, b, floor=1e-30) < 1e-9, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bi_wkv_low_precision_computed_in_fp32(dtype, cpu_path):
    w, u, k, v = _wkv_inputs(2, 130, 16, dtype=dtype)
    gy = torch.randn(2, 130, 16).to(dtype)
    fast = _grads(bi_wkv, (w, u, k, v), gy)
    ref = _grads(bi_wkv_ref, (w, u, k, v), gy)  # float64 inside, from the same rounded inputs
    for name, a, b in zip(["out", "w", "u", "k", "v"], fast, ref):
        assert a.dtype == dtype, name
        assert rel_rms(a.float(), b.float()) < 1e-2, name  # bf16 keeps 8 bits: rounding the result ~4e-3


def _peak_bytes(fn, T, B=1, C=8):
    w, u, k, v = _wkv_inputs(B, T, C)
    return peak_tensor_bytes(lambda: fn(w, u, k, v).backward(torch.ones(B, T, C)))


def test_bi_wkv_memory_grows_linearly_in_T(cpu_path):
    """Complexity, not timing: peak live tensor memory of forward + backward grows ×4 for ×4 tokens (the O(T²)
    reference: ×16), and stays a small multiple of one [B, T, C] fp32 tensor."""
    fast = [_peak_bytes(bi_wkv, T) for T in (1024, 4096)]
    assert 3.5 <= fast[1] / fast[0] <= 4.5, fast
    assert fast[1] <= 16 * 4096 * 8 * 4, fast[1] / (4096 * 8 * 4)
    ref = [_peak_bytes(bi_wkv_ref, T) for T in (128, 512)]
    assert ref[1] / ref[0] > 12, ref


def test_bi_wkv_65536_tokens(cpu_path):
    """No token limit: T = 65,536 forward and backward. fp32 against the same op in float64 (whose formulas the
    tests above check against Eq. 5), and the float64 output at sampled tokens against Eq. 5 itself (O(T) each)."""
    T, C = 65536, 3
    w, u, k, v = _wkv_inputs(1, T, C)
    gy = torch.randn(1, T, C, generator=torch.Generator().manual_seed(1))
    f32 = _grads(bi_wkv, (w, u, k, v), gy)
    x64 = [t.detach().double().requires_grad_() for t in (w, u, k, v)]
    f64 = _grads(bi_wkv, x64, gy.double())
    for name, a, b in zip(["out", "w", "u", "k", "v"], f32, f64):
        assert torch.isfinite(a).all() and rel_rms(a, b) < 1e-5, name
    assert rel_rms(bi_wkv(w, u, k, v, chunk_size=7), f64[0]) < 1e-5  # padded chunks, deeper carry recursion
    w, u, k, v = (t.detach() for t in x64)
    i = torch.arange(T, dtype=torch.float64)[:, None]
    for t in (0, 1, 4097, T // 2, T - 1):
        logit = -((t - i).abs() - 1) * w + k[0]  # [T, C]
        logit[t] = u + k[0, t]
        p = torch.softmax(logit, dim=0)
        torch.testing.assert_close(f64[0][0, t], (p * v[0]).sum(0), rtol=1e-10, atol=1e-12)


def test_bi_wkv_is_a_custom_op_with_fake_and_autograd(cpu_path):
    w, u, k, v = _wkv_inputs(2, 37, 5)
    for chunk in (32, 8, 0):  # one chunk; padded chunks with carries; one chunk (the numba path's default)
        torch.library.opcheck(torch.ops.linvision.bi_wkv_fwd.default, (w, u, k, v, chunk))


def _f(w, u, k, v):
    return (torch.sigmoid(k) * bi_wkv(w * 2, u, k, v)).square().sum()


def _check_compiled(backend):
    w, u, k, v = _wkv_inputs(2, 37, 5)
    compiled = torch.compile(_f, fullgraph=True, backend=backend)
    got, ref = _grads(compiled, (w, u, k, v), None), _grads(_f, (w, u, k, v), None)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bi_wkv_torch_compile_fullgraph(cpu_path):
    """Dynamo traces through the op in one graph (fake kernel + registered autograd); aot_eager keeps this fast."""
    torch._dynamo.reset()
    _check_compiled("aot_eager")


@pytest.mark.slow
def test_bi_wkv_torch_compile_fullgraph_inductor(tmp_path, monkeypatch):
    """The default inductor backend (C++ codegen for the ops around it; ~30-50 s on 2 CPU cores). A fresh cache:
    inductor's on-disk cache does not key on a custom op's outputs."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    _check_compiled("inductor")


def test_vrwkv_model_compiles_fullgraph_and_uses_the_op():
    """vrwkv_* call the custom op by default (one call per block), and a whole model traces as one graph."""
    model = timm.create_model("test_vrwkv", img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as fc:
        ref = model(x)
    calls = fc.get_flop_counts()["Global"].get(torch.ops.linvision.bi_wkv_fwd, 0)
    assert calls == len(model.blocks) * 2 * 29 * 2 * 16 * model.embed_dim
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), ref)


def test_bi_wkv_flop_formula(cpu_path):
    """29 MACs (58 FLOPs) per token and channel forward, as the official get_flops_backbone.py counts Bi-WKV (its
    mmcv counter counts multiply-accumulates); the backward counts twice the forward."""
    B, T, C = 2, 37, 5
    w, u, k, v = _wkv_inputs(B, T, C)
    with FlopCounterMode(display=False) as fc:
        bi_wkv(w, u, k, v).sum().backward()
    counts = fc.get_flop_counts()["Global"]
    assert counts[torch.ops.linvision.bi_wkv_fwd] == 2 * 29 * B * T * C
    assert counts[torch.ops.linvision.bi_wkv_bwd] == 4 * 29 * B * T * C


def test_bi_wkv_shape_errors():
    w, u, k, v = _wkv_inputs(1, 4, 5)
    with pytest.raises(ValueError, match="k and v"):
        bi_wkv(w, u, k, v[:, :3])
    with pytest.raises(ValueError, match="w and u"):
        bi_wkv(w[:4], u, k, v)
    with pytest.raises(ValueError, match="T >= 1"):
        bi_wkv(w, u, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="variant"):
        bi_wkv(w, u, k, v, variant="cuda")


@pytest.mark.parametrize("T", [1, 5, 32])
def test_official_kernel_is_eq5_with_u_plus_w_up_to_32_tokens(T):
    """With one token per kernel chunk (T <= 32) the kernel's arithmetic is Eq. 5 with u -> u + w (and EPS)."""
    w, u, k, v = (t.detach().double() for t in _wkv_inputs(2, T, 7))
    out = bi_wkv(w, u, k, v, variant="official_kernel")
    assert rel_rms(out, bi_wkv_ref(w, u + w, k, v)) < 1e-5
    assert rel_rms(out, bi_wkv_official_kernel_ref(w, u, k, v, eps=0.0)) < 1e-5  # EPS: a 1e-6-level effect


def test_official_kernel_differs_from_eq5_beyond_32_tokens_and_is_differentiable():
    w, u, k, v = (t.detach().double().requires_grad_() for t in _wkv_inputs(1, 70, 3))
    assert rel_rms(bi_wkv_official_kernel_ref(w, u, k, v), bi_wkv_ref(w, u + w, k, v)) > 1e-4
    assert torch.autograd.gradcheck(lambda *a: bi_wkv_official_kernel_ref(*a), (w, u, k, v))


# ---------------------------------------------------------------------------------------------------------------
# The two CPU implementations (compiled numba kernels, torch ops): interchangeable, selectable, falling back cleanly.
# ---------------------------------------------------------------------------------------------------------------

def _fwd_outputs(monkeypatch, path, args):
    monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, path)
    return torch.ops.linvision.bi_wkv_fwd(*args)


@pytest.mark.parametrize("T,chunk", [(1, 32), (37, 32), (37, 8), (64, 7), (100, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_kernels_save_the_same_tensors(monkeypatch, T, chunk, dtype):
    """The numba forward returns the torch path's output and saved tensors (signals, [δ' ; den], chunk carries)
    in the same layout and dtypes, for one chunk, divisor chunks and padded chunks."""
    w, u, k, v = (t.detach() for t in _wkv_inputs(2, T, 11, dtype=dtype))
    got = _fwd_outputs(monkeypatch, "numba", (w, u, k, v, chunk))
    ref = _fwd_outputs(monkeypatch, "torch", (w, u, k, v, chunk))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(["y", "X", "DD", "carries"], got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_rms(a.float(), b.float()) < (1e-2 if name == "y" and dtype == torch.bfloat16 else tol), name


@pytest.mark.parametrize("fwd_path,bwd_path", [("numba", "torch"), ("torch", "numba")])
def test_cpu_kernels_are_interchangeable_between_forward_and_backward(monkeypatch, fwd_path, bwd_path):
    """A forward by one CPU path and the backward by the other give the reference's gradients (the saved tensors
    have one meaning), with carries (chunk 7, padded) and in one chunk."""
    w, u, k, v = _wkv_inputs(2, 45, 6)
    gy = torch.randn(2, 45, 6)
    ref = _grads(bi_wkv_ref, (w, u, k, v), gy)[1:]
    for chunk in (7, 0):
        monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, fwd_path)
        out = bi_wkv(w, u, k, v, chunk_size=chunk)
        monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, bwd_path)
        for name, a, b in zip("wukv", torch.autograd.grad(out, (w, u, k, v), gy), ref):
            assert rel_rms(a, b) < 1e-5, (chunk, name)


def test_cpu_kernel_choice_and_fallback(monkeypatch):
    """unset = auto: numba when it imports, else the torch path (same results); torch: the torch path; an
    unknown value or numba requested without numba: a clear ValueError naming the variable."""
    w, u, k, v = (t.detach() for t in _wkv_inputs(1, 20, 4))
    monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, "torch")
    assert biwkv_module.cpu_kernel() == "torch"
    monkeypatch.delenv(biwkv_module.CPU_KERNEL_ENV, raising=False)
    assert biwkv_module.cpu_kernel() == "numba"
    with_numba = bi_wkv(w, u, k, v)
    monkeypatch.setattr(biwkv_cpu, "numba", None)  # as on a machine where numba does not import
    assert not biwkv_cpu.available() and biwkv_module.cpu_kernel() == "torch"
    assert rel_rms(bi_wkv(w, u, k, v), with_numba) < 1e-6
    monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, "auto")
    assert biwkv_module.cpu_kernel() == "torch"
    monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, "numba")
    with pytest.raises(ValueError, match="LINVISION_BIWKV_CPU=numba but numba does not import"):
        bi_wkv(w, u, k, v)
    monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match="LINVISION_BIWKV_CPU must be one of"):
        bi_wkv(w, u, k, v)


def test_cpu_kernel_follows_torch_threads(monkeypatch):
    """The numba kernels run on torch.get_num_threads() threads (so --threads holds for them too)."""
    import numba

    monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, "numba")
    w, u, k, v = (t.detach() for t in _wkv_inputs(1, 9, 4))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        bi_wkv(w, u, k, v)
        assert numba.get_num_threads() == 1
        torch.set_num_threads(max(2, before))
        bi_wkv(w, u, k, v)
        assert numba.get_num_threads() == min(max(2, before), numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)


def test_numba_imported_only_when_used():
    """``import linvision`` never imports numba (nor its OpenMP runtime); with ``LINVISION_BIWKV_CPU=torch`` neither
    does running Vision-RWKV forward and backward on CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch, linvision, timm\n"
            "assert 'numba' not in sys.modules, 'numba imported by import linvision'\n"
            "m = timm.create_model('test_vrwkv', img_size=32, patch_size=8)\n"
            "m(torch.randn(2, 3, 32, 32)).sum().backward()\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n")
    env = {**os.environ, "LINVISION_BIWKV_CPU": "torch"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_numba_scratch_buffers_are_safe_to_reuse(monkeypatch):
    """The compiled forward reuses this thread's scratch buffers for what no caller keeps (e^{k - max k}; X, PS and
    the carries without gradients): an earlier result is not overwritten by a later call, inference-mode, no-grad
    and training calls in any order give the same output (a buffer made under inference_mode stays writable
    outside it), and the shapes may change between calls."""
    monkeypatch.setenv("LINVISION_BIWKV_CPU", "numba")
    g = torch.Generator().manual_seed(0)
    w, u = torch.rand(16, generator=g) / 50, torch.rand(16, generator=g) / 50
    k1, v1, k2, v2 = (torch.randn(2, 50, 16, generator=g) for _ in range(4))
    with torch.inference_mode():
        y1 = bi_wkv(w, u, k1, v1)
        bi_wkv(w, u, k2, v2)
        bi_wkv(w, u, k2[:, :7], v2[:, :7])  # other shapes replace the buffers
    with torch.no_grad():
        y1b = bi_wkv(w, u, k1, v1)
    kg = k1.clone().requires_grad_()
    y1c = bi_wkv(w, u, kg, v1)
    y1c.sum().backward()
    assert torch.equal(y1, y1b) and torch.equal(y1, y1c.detach()) and torch.isfinite(kg.grad).all()
    torch.testing.assert_close(y1, bi_wkv_ref(w, u, k1, v1), rtol=1e-5, atol=1e-5)
    assert "a" in biwkv_cpu._TLS.scratch and not biwkv_cpu._TLS.scratch["a"].is_inference()
    monkeypatch.setattr(biwkv_cpu, "SCRATCH_MAX_BYTES", 1000)  # larger buffers are not kept between calls
    with torch.no_grad():
        torch.testing.assert_close(bi_wkv(w, u, k1, v1), y1, rtol=0, atol=0)
    assert "a" not in biwkv_cpu._TLS.scratch and "X" not in biwkv_cpu._TLS.scratch
    assert "a" not in biwkv_cpu._TLS.scratch_np  # nor their numpy views (which would keep them alive)


def test_numba_keeps_torch_thread_count():
    """numba's OpenMP threading layer sets the shared OpenMP runtime's thread count to numba's pool size when it
    starts (the first compiled kernel in a process). The kernels must leave torch's count as they found it:
    otherwise a run computed everything after its first Bi-WKV call on other threads, with another order of
    additions, than the same run resumed in a process where numba had already started (that broke the bit-exact
    kill-and-resume test). Fresh process, numba's pool of 2 threads, torch on 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch, linvision, timm\n"
            "torch.set_num_threads(1)\n"
            "m = timm.create_model('test_vrwkv', img_size=32, patch_size=8)\n"
            "m(torch.randn(2, 3, 32, 32)).sum().backward()\n"
            "assert torch.get_num_threads() == 1, f'torch threads {torch.get_num_threads()} after numba started'\n"
            "import numba\n"
            "assert numba.threading_layer() and numba.get_num_threads() == 1, numba.get_num_threads()\n")
    env = {**os.environ, "LINVISION_BIWKV_CPU": "numba", "NUMBA_NUM_THREADS": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("T,chunk", [(37, None), (50, 8)])
def test_eager_numba_path_equals_the_custom_op(monkeypatch, T, chunk):
    """On CPU with numba, eager calls skip the custom op (``_BiWKVCPU``, no dispatch): same outputs and gradients,
    bit for bit, as ``torch.ops.linvision.bi_wkv_fwd`` with its registered autograd; under a dispatch mode
    (``FlopCounterMode``) the op is used, so FLOPs are still counted."""
    monkeypatch.setenv(biwkv_module.CPU_KERNEL_ENV, "numba")
    w, u, k, v = (t.requires_grad_() for t in _wkv_inputs(2, T, 11))
    assert biwkv_module.eager_cpu_kernel(k)
    y = bi_wkv(w, u, k, v, chunk_size=chunk)
    assert y.grad_fn is not None and "BiWKVCPU" in type(y.grad_fn).__name__
    y_op = torch.ops.linvision.bi_wkv_fwd(w, u, k, v, 0 if chunk is None else chunk)[0]
    assert torch.equal(y, y_op)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad((y * g).sum(), (w, u, k, v)), torch.autograd.grad((y_op * g).sum(),
                                                                                          (w, u, k, v))):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(bi_wkv(w, u, k, v, chunk_size=chunk), y)
    with FlopCounterMode(display=False) as fc:
        assert not biwkv_module.eager_cpu_kernel(k)
        bi_wkv(w, u, k, v, chunk_size=chunk)
    assert fc.get_total_flops() > 0
