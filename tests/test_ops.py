"""Retention forms against their plain reference (outputs, states, all gradients), and Q-Shift.
Bi-WKV: tests/test_biwkv.py."""
from __future__ import annotations

from functools import partial

import pytest
import torch

import linvision  # noqa: F401
from conftest import rel_rms
from linvision.layers.rwkv import q_shift
from linvision.ops import retention_chunkwise, retention_parallel, retention_recurrent, retention_ref


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


@pytest.mark.parametrize("needs_grad", ["k", "v", "state", "none"])
def test_retention_chunkwise_gradients_when_only_some_inputs_require_them(needs_grad):
    """The chunkwise form scales its copy of q in place only when no gradient is computed: with q constant and k,
    v or the initial state requiring grad, the backward still runs and matches the reference."""
    q, k, v, s0 = (t.detach() for t in _ret_inputs(2, 45, 3, 8, 8, torch.float64, seed=3))
    ins = dict(q=q, k=k, v=v, state=s0)
    if needs_grad != "none":
        ins[needs_grad].requires_grad_()
    gamma = torch.tensor([0.9, 0.8, 0.99], dtype=torch.float64)
    o, S = retention_chunkwise(ins["q"], ins["k"], ins["v"], gamma, initial_state=ins["state"],
                               output_final_state=True, chunk_size=16)
    o_ref, S_ref = retention_ref(q, k, v, gamma, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)
    if needs_grad != "none":
        leaf = ins[needs_grad]
        g, = torch.autograd.grad((o.sum() + S.sum()), leaf)
        ref_leaf = leaf.detach().clone().requires_grad_()
        ref_ins = {**dict(q=q, k=k, v=v, state=s0), needs_grad: ref_leaf}
        o2, S2 = retention_ref(ref_ins["q"], ref_ins["k"], ref_ins["v"], gamma, initial_state=ref_ins["state"],
                               output_final_state=True)
        g_ref, = torch.autograd.grad(o2.sum() + S2.sum(), ref_leaf)
        torch.testing.assert_close(g, g_ref)


def test_retention_parallel_uncached_mask_matches_reference():
    """Masks too large to cache (H·T² > 2^22) are built per call in the compute dtype: still the reference."""
    from linvision.ops import decay_gammas
    from linvision.ops.retention import _FACTOR_CACHE_MAX_ELEMS
    T, H = 1300, 3
    assert H * T * T > _FACTOR_CACHE_MAX_ELEMS
    q, k, v, s0 = _ret_inputs(1, T, H, 8, 4, torch.float32)
    gamma = decay_gammas(H)
    o, S = retention_parallel(q, k, v, gamma, initial_state=s0, output_final_state=True)
    o_ref, S_ref = retention_ref(q, k, v, gamma, initial_state=s0, output_final_state=True)
    assert rel_rms(o, o_ref) < 1e-5 and rel_rms(S, S_ref) < 1e-5
    go = torch.randn_like(o)
    g_fast = torch.autograd.grad((o * go).sum(), (q, k, v))
    g_ref = torch.autograd.grad((o_ref * go).sum(), (q, k, v))
    for name, a, b in zip("qkv", g_fast, g_ref):
        assert rel_rms(a, b) < 1e-5, name


# Q-Shift + lerp in one op (ops/qshift.py): the compiled CPU kernel and the torch-ops form against the definition.

@pytest.mark.parametrize("path", ["numba", "torch"])
@pytest.mark.parametrize("B,H,W,C,shift", [(2, 3, 5, 10, 1), (1, 4, 4, 8, 2), (1, 1, 1, 3, 1), (2, 7, 6, 13, 1)])
def test_q_shift_lerp_matches_q_shift_then_lerp(monkeypatch, path, B, H, W, C, shift):
    """Each output is torch.lerp(q_shift(x), x, μ_i) (to fp32 rounding; μ on both sides of 0.5 and outside [0, 1]),
    C not a multiple of 4 included; float64 gradients of x and μ against finite differences."""
    from linvision.ops.qshift import q_shift_lerp

    monkeypatch.setenv("LINVISION_BIWKV_CPU", path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, H * W, C, generator=g)
    mix = torch.rand(3, C, generator=g) * 1.4 - 0.2
    xx = q_shift(x, (H, W), shift)
    out = q_shift_lerp(x, mix, (H, W), shift)
    assert out.shape == (3, B, H * W, C) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.stack([torch.lerp(xx, x, m) for m in mix]), rtol=0, atol=1e-6)
    x64, m64 = x.double().requires_grad_(), mix.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, m: q_shift_lerp(a, m, (H, W), shift), (x64, m64))


def test_q_shift_lerp_is_a_custom_op_and_checks_input():
    from linvision.ops.qshift import q_shift_lerp

    x, mix = torch.randn(2, 12, 9), torch.rand(2, 9)
    torch.library.opcheck(torch.ops.linvision.q_shift_lerp.default, (x, mix, 3, 4, 1))
    with pytest.raises(ValueError, match="grid"):
        q_shift_lerp(x, mix, (3, 5))
    with pytest.raises(ValueError, match="mix must be"):
        q_shift_lerp(x, mix[:, :4], (3, 4))


@pytest.mark.parametrize("path", ["numba", "torch"])
def test_q_shift_lerp_out_dtype(monkeypatch, path):
    """``out_dtype`` (what the layers pass under autocast) gives the default result cast, differentiably."""
    from linvision.ops.qshift import q_shift_lerp

    monkeypatch.setenv("LINVISION_BIWKV_CPU", path)
    x = torch.randn(2, 12, 9, requires_grad=True)
    mix = torch.rand(2, 9)
    out = q_shift_lerp(x, mix, (3, 4), out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, q_shift_lerp(x, mix, (3, 4)).to(torch.bfloat16), rtol=0, atol=0)
    (gx,) = torch.autograd.grad(out.float().sum(), x)
    assert gx.dtype == torch.float32


def test_q_shift_lerp_eager_kernel_backward_matches_torch_ops(monkeypatch):
    """The eager CPU path (compiled forward and backward, no custom-op dispatch) against the plain tensor-op form:
    outputs and gradients of x and μ (fp32, several outputs, a shift of 2, C not a multiple of 4)."""
    from linvision.ops.qshift import _q_shift_lerp_torch, q_shift_lerp

    monkeypatch.setenv("LINVISION_BIWKV_CPU", "numba")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5 * 6, 14, generator=g, requires_grad=True)
    mix = (torch.rand(3, 14, generator=g) * 1.4 - 0.2).requires_grad_()
    out = q_shift_lerp(x, mix, (5, 6), 2)
    assert "QShiftLerpCPU" in type(out.grad_fn).__name__
    ref = _q_shift_lerp_torch(x, mix, 5, 6, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    go = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad((out * go).sum(), (x, mix)), torch.autograd.grad((ref * go).sum(), (x, mix))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
