"""Fast forms of the token-mixing ops against their plain references: outputs, states and all gradients."""
from __future__ import annotations

from functools import partial

import pytest
import torch

import linvision  # noqa: F401
from linvision.layers.rwkv import q_shift
from linvision.ops import (bi_wkv, bi_wkv_official_kernel_ref, bi_wkv_ref, retention_chunkwise, retention_parallel,
                           retention_recurrent, retention_ref)


def rel_rms(a: torch.Tensor, b: torch.Tensor, floor: float = 1.0) -> float:
    """RMS error relative to the reference's RMS; a reference that is exactly zero (e.g. d/du at T = 1) is
    compared in absolute terms against ``floor`` (the unit RMS of the inputs and upstream gradients)."""
    a, b = a.double(), b.double()
    ref = b.pow(2).mean().sqrt().item()
    return (a - b).pow(2).mean().sqrt().item() / (ref if ref > 0 else floor)


def _wkv_inputs(B, T, C, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(C, generator=g) * 3 * scale) / max(T, 1)
    u = (torch.randn(C, generator=g) * 2 * scale) / max(T, 1)
    k = torch.randn(B, T, C, generator=g) * scale
    v = torch.randn(B, T, C, generator=g)
    return [t.to(dtype).requires_grad_() for t in (w, u, k, v)]


@pytest.mark.parametrize("T,B,C,chunk", [(1, 2, 13, 64), (2, 2, 13, 64), (3, 2, 13, 2), (64, 2, 13, 64),
                                         (197, 2, 13, 64), (197, 1, 5, 7), (1000, 1, 5, 64), (4096, 1, 3, 256)])
def test_bi_wkv_matches_reference(T, B, C, chunk):
    """Outputs and gradients of w, u, k, v; chunk sizes that do and do not divide T, odd C."""
    w, u, k, v = _wkv_inputs(B, T, C)
    out, ref = bi_wkv(w, u, k, v, chunk_size=chunk), bi_wkv_ref(w, u, k, v)
    assert rel_rms(out, ref) < 1e-5
    gy = torch.randn_like(out)
    g_fast = torch.autograd.grad(out, (w, u, k, v), gy)
    g_ref = torch.autograd.grad(ref, (w, u, k, v), gy)
    for name, a, b in zip("wukv", g_fast, g_ref):
        assert rel_rms(a, b) < 1e-5, name


def test_bi_wkv_definition_by_loops():
    """Eq. 5 term by term for one (b, t, c), independent of both implementations."""
    w, u, k, v = (t.detach().double() for t in _wkv_inputs(1, 6, 3))
    out = bi_wkv_ref(w, u, k, v)
    for t in range(6):
        for c in range(3):
            num = den = 0.0
            for i in range(6):
                e = (u[c] + k[0, i, c]) if i == t else (-(abs(t - i) - 1) * w[c] + k[0, i, c])
                num, den = num + e.exp() * v[0, i, c], den + e.exp()
            assert abs(out[0, t, c] - num / den) < 1e-12


@pytest.mark.parametrize("T", [50, 700])
def test_bi_wkv_extreme_inputs_finite(T):
    C = 8
    w = torch.linspace(-10, 10, C) / T
    u = torch.tensor([20.0, -20.0] * (C // 2)) / T
    k = torch.randn(2, T, C).sign() * 80
    v = torch.randn(2, T, C)
    out, ref = bi_wkv(w, u, k, v), bi_wkv_ref(w, u, k, v)
    assert torch.isfinite(out).all() and rel_rms(out, ref) < 1e-5


def test_bi_wkv_memory_grows_linearly_in_T():
    """Complexity, not timing: bytes autograd saves for the backward of bi_wkv grow ~linearly with T (×4 T gives
    ≤ ×5 memory; the O(T²) reference gives ×16)."""
    def saved_bytes(fn, T):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        w, u, k, v = _wkv_inputs(2, T, 16)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(w, u, k, v).sum().backward()
        return total
    fast = saved_bytes(bi_wkv, 4096) / saved_bytes(bi_wkv, 1024)
    ref = saved_bytes(bi_wkv_ref, 512) / saved_bytes(bi_wkv_ref, 128)
    assert 3.0 <= fast <= 5.0, fast
    assert ref > 12, ref


def test_bi_wkv_gradcheck_float64():
    w, u, k, v = (t.detach().double().requires_grad_() for t in _wkv_inputs(1, 5, 3))
    assert torch.autograd.gradcheck(bi_wkv, (w, u, k, v))
    assert torch.autograd.gradcheck(lambda *a: bi_wkv(*a, chunk_size=2), (w, u, k, v))
    assert torch.autograd.gradcheck(bi_wkv_ref, (w, u, k, v))


def test_bi_wkv_bf16_in_fp32_out_dtype():
    w, u, k, v = _wkv_inputs(2, 30, 16, dtype=torch.bfloat16)
    out = bi_wkv(w, u, k, v)
    assert out.dtype == torch.bfloat16
    assert rel_rms(out.float(), bi_wkv_ref(w, u, k, v).float()) < 2e-2


def test_bi_wkv_shape_errors():
    w, u, k, v = _wkv_inputs(1, 4, 5)
    with pytest.raises(ValueError, match="k and v"):
        bi_wkv(w, u, k, v[:, :3])
    with pytest.raises(ValueError, match="w and u"):
        bi_wkv(w[:4], u, k, v)


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
    with pytest.raises(ValueError, match="variant"):
        bi_wkv(w, u, k, v, variant="cuda")


def test_q_shift_against_definition():
    B, H, W, C = 2, 3, 4, 10  # C not a multiple of 4: the last 2 channels pass through
    x = torch.randn(B, H * W, C)
    out = q_shift(x, (H, W)).view(B, H, W, C)
    g = x.view(B, H, W, C)
    q = C // 4
    for h in range(H):
        for w_ in range(W):
            def nb(dh, dw, sl):
                hh, ww = h + dh, w_ + dw
                return g[:, hh, ww, sl] if 0 <= hh < H and 0 <= ww < W else torch.zeros_like(g[:, 0, 0, sl])
            torch.testing.assert_close(out[:, h, w_, 0:q], nb(0, -1, slice(0, q)))          # left
            torch.testing.assert_close(out[:, h, w_, q:2 * q], nb(0, 1, slice(q, 2 * q)))   # right
            torch.testing.assert_close(out[:, h, w_, 2 * q:3 * q], nb(-1, 0, slice(2 * q, 3 * q)))  # up
            torch.testing.assert_close(out[:, h, w_, 3 * q:4 * q], nb(1, 0, slice(3 * q, 4 * q)))  # down
            torch.testing.assert_close(out[:, h, w_, 4 * q:], g[:, h, w_, 4 * q:])


def _ret_inputs(B, T, H, K, V, dtype, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if state else None
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, s0)]


FORMS = {
    "parallel": retention_parallel,
    "recurrent": retention_recurrent,
    "chunkwise16": partial(retention_chunkwise, chunk_size=16),
    "chunkwise64": partial(retention_chunkwise, chunk_size=64),
    "chunkwise7": partial(retention_chunkwise, chunk_size=7),    # divides 7 and 63, not the others
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,H", [(1, 1), (2, 3), (7, 12), (63, 3), (197, 3), (1000, 1)])
def test_retention_forms_match_reference(form, dtype, T, H):
    """Outputs, final state and gradients of q, k, v and the initial state, against retention_ref."""
    from linvision.ops import decay_gammas
    gamma = decay_gammas(H)
    q, k, v, s0 = _ret_inputs(2, T, H, 8, 6, dtype)
    o, S = FORMS[form](q, k, v, gamma, initial_state=s0, output_final_state=True)
    o_ref, S_ref = retention_ref(q, k, v, gamma, initial_state=s0, output_final_state=True)
    assert o.dtype == dtype and S.dtype == dtype
    assert rel_rms(o, o_ref) < 1e-5 and rel_rms(S, S_ref) < 1e-5
    go, gS = torch.randn_like(o), torch.randn_like(S)
    ins = (q, k, v, s0)
    g_fast = torch.autograd.grad((o * go).sum() + (S * gS).sum(), ins)
    g_ref = torch.autograd.grad((o_ref * go).sum() + (S_ref * gS.double()).sum(), ins)
    for name, a, b in zip(["q", "k", "v", "initial_state"], g_fast, g_ref):
        assert rel_rms(a, b) < 1e-5, name


def test_retention_reference_is_the_recurrence():
    """retention_ref equals S_n = γ S_{n-1} + k_nᵀ v_n, o_n = q_n S_n, including a carried-in state."""
    from linvision.ops import decay_gammas
    gamma = decay_gammas(2).double()
    q, k, v, s0 = (t.detach() for t in _ret_inputs(1, 9, 2, 4, 3, torch.float64))
    o_ref, S_ref = retention_ref(q, k, v, gamma, scale=1.0, initial_state=s0, output_final_state=True)
    S = s0.clone()
    for n in range(9):
        S = gamma[None, :, None, None] * S + k[:, n, :, :, None] * v[:, n, :, None, :]
        torch.testing.assert_close(o_ref[:, n], torch.einsum("bhk,bhkv->bhv", q[:, n], S))
    torch.testing.assert_close(S_ref, S)


def test_retention_state_splits_a_sequence():
    """Feeding a sequence in two pieces with the state carried over equals feeding it whole."""
    from linvision.ops import decay_gammas
    gamma = decay_gammas(3)
    q, k, v, _ = (t.detach() if t is not None else None for t in _ret_inputs(2, 50, 3, 8, 8, torch.float32, state=False))
    o_full, S_full = retention_parallel(q, k, v, gamma, output_final_state=True)
    o1, S1 = retention_parallel(q[:, :23], k[:, :23], v[:, :23], gamma, output_final_state=True)
    o2, S2 = retention_parallel(q[:, 23:], k[:, 23:], v[:, 23:], gamma, initial_state=S1, output_final_state=True)
    assert rel_rms(torch.cat([o1, o2], 1), o_full) < 1e-5 and rel_rms(S2, S_full) < 1e-5
