"""VRWKV6: the bidirectional WKV6 op (chunked ``wkv6`` against the float64 reference ``wkv6_ref`` and an
independent O(T²) closed form: outputs and all gradients, odd shapes, extreme decays, long sequences, linear
memory) and the models (official goldens, per-head Q-Shift / GroupNorm, official sizes, timm contract)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import linvision  # noqa: F401  (registers the models; must precede timm)
import timm
from conftest import rel_rms, run
from linvision.layers import rwkv6 as rwkv6_layers
from linvision.memory import TensorMemoryTracker, peak_tensor_bytes
from linvision.ops import wkv6, wkv6_loop_free, wkv6_ref
from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
NAMES = ["out", "r", "k", "v", "w", "u"]


def _inputs(B, T, H, N, w_lo=-5.0, w_hi=1.0, dtype=torch.float32, seed=0):
    """r, k, v ~ N(0, 1); w ~ U(w_lo, w_hi), i.e. per-token decay exp(-exp(w)) in [exp(-e^w_hi), exp(-e^w_lo)];
    u ~ N(0, 1) of shape [H, N]."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H * N, generator=g) for _ in range(3))
    w = w_lo + (w_hi - w_lo) * torch.rand(B, T, H * N, generator=g)
    u = torch.randn(H, N, generator=g)
    return [t.to(dtype).requires_grad_() for t in (r, k, v, w, u)]


def _grads(fn, inputs, gy):
    out = fn(*inputs)
    return (out,) + torch.autograd.grad(out, inputs, gy, materialize_grads=True)


def _closed_form(r, k, v, w, u):
    """Official closed form (golden JSON ``wkv``), O(T²) float64, independent of both implementations:
    y_t = r_t . (diag(u) k_t^T v_t + sum_{s != t} diag(prod of a over the tokens strictly between) k_s^T v_s)."""
    B, T, C = r.shape
    H, N = u.shape
    r, k, v, w = (x.double().reshape(B, T, H, N) for x in (r, k, v, w))
    la = -torch.exp(w)  # log a_t
    y = torch.zeros(B, T, H, N, dtype=torch.float64)
    for t in range(T):
        for s in range(T):
            if s == t:
                d = u.double()[None].expand(B, H, N)
            else:
                lo, hi = min(s, t), max(s, t)
                d = torch.exp(la[:, lo + 1:hi].sum(1))  # [B, H, N]
            y[:, t] += (r[:, t] * d * k[:, s]).sum(-1, keepdim=True) * v[:, s]
    return y.reshape(B, T, C)


# ------------------------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("T,B,H,N,chunk", [(1, 2, 2, 8, 16), (2, 2, 1, 4, 16), (3, 1, 2, 4, 1), (35, 2, 2, 8, 16),
                                           (64, 1, 1, 64, 16), (64, 2, 3, 4, 7), (197, 1, 2, 8, 16),
                                           (100, 1, 1, 8, 64)])
def test_wkv6_matches_reference(T, B, H, N, chunk):
    """fp32 chunked form against the float64 recurrence: output and the gradients of r, k, v, w, u to 1e-5 relative
    RMS (one chunk, padded chunks, chunk 1, several heads, head size 64)."""
    inputs = _inputs(B, T, H, N)
    gy = torch.randn(B, T, H * N, generator=torch.Generator().manual_seed(1))
    fast = _grads(lambda *a: wkv6(*a, chunk_size=chunk), inputs, gy)
    ref = _grads(wkv6_ref, inputs, gy)
    for name, a, b in zip(NAMES, fast, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel_rms(a, b) < 1e-5, name


def test_wkv6_both_forms_match_the_closed_form():
    """The golden JSON's closed form term by term (float64), for the reference and the chunked form."""
    r, k, v, w, u = (t.detach().double() for t in _inputs(2, 9, 2, 4))
    want = _closed_form(r, k, v, w, u)
    torch.testing.assert_close(wkv6_ref(r, k, v, w, u), want, rtol=1e-12, atol=1e-12)
    for chunk in (1, 4, 16):
        torch.testing.assert_close(wkv6(r, k, v, w, u, chunk_size=chunk), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,chunk", [(1, 16), (2, 16), (17, 16), (50, 4), (100, 1)])
@pytest.mark.parametrize("w_lo,w_hi", [(-5.0, 1.0), (2.0, 6.0), (-20.0, -15.0)], ids=["mixed", "vanishing", "none"])
def test_wkv6_loop_free_matches_reference(T, chunk, w_lo, w_hi):
    """The export form (states by a doubling scan, T always padded): output and all gradients against the float64
    recurrence, odd T (a padded chunk, 100 chunks of 1 = seven scan steps that reach back), extreme decays."""
    inputs = _inputs(2, T, 2, 4, w_lo, w_hi, seed=5)
    gy = torch.randn(2, T, 8, generator=torch.Generator().manual_seed(1))
    fast = _grads(lambda *a: wkv6_loop_free(*a, chunk_size=chunk), inputs, gy)
    ref = _grads(wkv6_ref, inputs, gy)
    for name, a, b in zip(NAMES, fast, ref):
        assert torch.isfinite(a).all() and a.shape == b.shape, name
        assert rel_rms(a, b, floor=1e-3) < 1e-5, name
    x = [t.detach().double() for t in inputs]
    assert rel_rms(wkv6_loop_free(*x, chunk_size=chunk), wkv6(*x, chunk_size=chunk)) < 1e-13


def test_wkv6_loop_free_refuses_more_tokens_than_its_scan_covers(monkeypatch):
    import importlib
    # the scan covers chunk 2 x 2**1 chunks = 4 tokens
    monkeypatch.setattr(importlib.import_module("linvision.ops.wkv6"), "SCAN_LEVELS", 1)
    x = [t.detach() for t in _inputs(1, 5, 1, 4)]
    with pytest.raises(ValueError, match="at most 4 tokens, got 5"):
        wkv6_loop_free(*x, chunk_size=2)
    assert torch.isfinite(wkv6_loop_free(*(t[:, :4] if t.dim() == 3 else t for t in x), chunk_size=2)).all()


def test_wkv6_is_not_v4_or_causal():
    """Guards the definition: dropping the anti-causal half, or using the decay of the endpoints too, changes it."""
    r, k, v, w, u = (t.detach().double() for t in _inputs(1, 6, 1, 4))
    y = wkv6(r, k, v, w, u)
    causal_only = wkv6(r[:, :3], k[:, :3], v[:, :3], w[:, :3], u)
    assert (y[:, :3] - causal_only).abs().max() > 1e-3  # later tokens reach earlier ones
    assert (y - wkv6(r, k, v, w + 1, u)).abs().max() > 1e-3


@pytest.mark.parametrize("T,chunk", [(5, 16), (11, 4)])
def test_wkv6_gradcheck_float64(T, chunk):
    r, k, v, w, u = (t.detach().double().requires_grad_() for t in _inputs(1, T, 2, 4))
    assert torch.autograd.gradcheck(lambda *a: wkv6(*a, chunk_size=chunk), (r, k, v, w, u))


def test_wkv6_chunk_size_only_moves_rounding():
    x = [t.detach().double() for t in _inputs(2, 150, 2, 8)]
    outs = [wkv6(*x, chunk_size=c) for c in (1, 5, 16, 64, 150)]
    for o in outs[1:]:
        assert rel_rms(o, outs[0]) < 1e-13


@pytest.mark.parametrize("w_lo,w_hi", [(2.0, 2.1), (2.0, 6.0), (-12.0, 6.0), (-20.0, -15.0)],
                         ids=["decay4e-4", "decay_to_1e-175", "mixed", "no_decay"])
def test_wkv6_extreme_decays(w_lo, w_hi):
    """Per-token decays exp(-exp(w)): ~4e-4 (w = 2.06; a 16-token cumulative product is ~1e-55, below float32's
    range, so a prod(a_t)/prod(a_s) form gives 0/0), down to exp(-e^6) ≈ 1e-175 (0 in float32), mixed with
    a ≈ 1 - 6e-6, or none at all (a = 1 - 1e-7): finite, and output and gradients match the float64 reference.
    The gradient of w is compared in absolute terms where it is ~0 (floor 1e-3: the reference's own RMS there)."""
    inputs = _inputs(2, 100, 2, 8, w_lo, w_hi, seed=3)
    gy = torch.randn(2, 100, 16, generator=torch.Generator().manual_seed(1))
    fast = _grads(wkv6, inputs, gy)
    ref = _grads(wkv6_ref, inputs, gy)
    for name, a, b in zip(NAMES, fast, ref):
        assert torch.isfinite(a).all(), name
        assert rel_rms(a, b, floor=1e-3) < 1e-5, name


@pytest.mark.parametrize("w_lo,w_hi", [(-5.0, 1.0), (2.0, 2.1), (2.0, 6.0), (-12.0, 6.0), (-20.0, -15.0)],
                         ids=["mixed", "decay4e-4", "decay_to_1e-175", "wide", "no_decay"])
@pytest.mark.parametrize("T,chunk", [(1, 16), (37, 16), (100, 4), (64, 64)])
def test_wkv6_cpu_kernel_matches_reference(monkeypatch, w_lo, w_hi, T, chunk):
    """Without gradients on CPU the within-chunk scores come from the compiled kernel (ops/wkv6_cpu.py: running decay
    products, no [L, L, N] tensor): it runs (spied), and the output matches the float64 recurrence as closely as
    the torch form does, in float32 and float64, at vanishing, tiny and absent decays and odd T / chunks."""
    import linvision.ops.wkv6_cpu as kernel_mod
    calls = []
    real = kernel_mod.intra_chunk_scores
    monkeypatch.setattr(kernel_mod, "intra_chunk_scores", lambda *a: calls.append(1) or real(*a))
    x = [t.detach() for t in _inputs(2, T, 2, 8, w_lo, w_hi, seed=11)]
    ref = wkv6_ref(*(t.double() for t in x))
    with torch.no_grad():
        fast = wkv6(*x, chunk_size=chunk)
        fast64 = wkv6(*(t.double() for t in x), chunk_size=chunk)
        monkeypatch.setenv("LINVISION_BIWKV_CPU", "torch")
        plain = wkv6(*x, chunk_size=chunk)
    assert len(calls) == 2  # float32 and float64; not with LINVISION_BIWKV_CPU=torch
    assert torch.isfinite(fast).all() and fast.dtype == torch.float32
    assert rel_rms(fast, ref) < max(2 * rel_rms(plain, ref), 2e-7)
    assert rel_rms(fast64, ref) < 1e-12


def test_wkv6_cpu_kernel_only_without_gradients(monkeypatch):
    """With gradients the torch form runs (autograd through it), so training is unchanged."""
    import linvision.ops.wkv6_cpu as kernel_mod
    monkeypatch.setattr(kernel_mod, "intra_chunk_scores", lambda *a: pytest.fail("kernel called with gradients"))
    x = _inputs(1, 20, 2, 4)
    wkv6(*x).sum().backward()
    assert all(t.grad is not None for t in x)


def test_wkv6_extreme_decays_cumprod_would_fail():
    """The hazard the log-space chunks avoid is real: in float32 the within-chunk cumulative product of 4e-4
    decays underflows to exactly 0 (so prod(a_t)/prod(a_s) would be 0/0)."""
    a = torch.full((16,), 4e-4)
    assert a.cumprod(0)[-1] == 0 and torch.isnan(a.cumprod(0)[-1] / a.cumprod(0)[-2])


def test_wkv6_long_sequence():
    """T = 4096 (one image of 1024² at patch 16), 2 heads of 8: the fp32 output against the float64 recurrence;
    fp32 gradients against the chunked form's own float64 gradients (whose formulas the tests above check against
    the recurrence; the full-gradient comparison at this length is the slow test below)."""
    inputs = _inputs(1, 4096, 2, 8, seed=5)
    gy = torch.randn(1, 4096, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_rms(wkv6(*inputs), wkv6_ref(*inputs)) < 1e-5
    fast = _grads(wkv6, inputs, gy)
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    f64 = _grads(wkv6, x64, gy.double())
    for name, a, b in zip(NAMES, fast, f64):
        assert torch.isfinite(a).all() and rel_rms(a, b) < 1e-5, name


@pytest.mark.slow
def test_wkv6_long_sequence_gradients_against_reference():
    inputs = _inputs(1, 4096, 1, 8, seed=5)
    gy = torch.randn(1, 4096, 8, generator=torch.Generator().manual_seed(1))
    for name, a, b in zip(NAMES, _grads(wkv6, inputs, gy), _grads(wkv6_ref, inputs, gy)):
        assert torch.isfinite(a).all() and rel_rms(a, b) < 1e-5, name


def _peak_bytes(T, B=1, H=1, N=16):
    inputs = _inputs(B, T, H, N)
    return peak_tensor_bytes(lambda: wkv6(*inputs).backward(torch.ones(B, T, H * N)))


def test_wkv6_memory_grows_linearly_in_T():
    """Complexity, not timing: peak live tensor memory of forward + backward grows x4 for x4 tokens and is
    O(T·C·L) — below 48 bytes x T x C x (chunk 16): the pairwise decays inside chunks (float32, with float64
    log-space temporaries), both directions; no [T, T] tensor. What a forward keeps for backward is its output
    only (the op is checkpointed; its inputs are kept by their producers anyway)."""
    peaks = [_peak_bytes(T) for T in (1024, 4096)]
    assert 3.5 <= peaks[1] / peaks[0] <= 4.5, peaks
    assert peaks[1] <= 48 * 4096 * 16 * 16, peaks[1] / (4096 * 16 * 16)
    inputs = _inputs(1, 4096, 2, 64)
    with TensorMemoryTracker() as tracker:
        y = wkv6(*inputs)
        kept = tracker.current_bytes
    assert kept <= 1.01 * y.numel() * 4, kept / y.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wkv6_low_precision_computed_in_fp32(dtype):
    inputs = _inputs(2, 40, 2, 8, dtype=dtype)
    gy = torch.randn(2, 40, 16).to(dtype)
    fast = _grads(wkv6, inputs, gy)
    ref = _grads(wkv6_ref, inputs, gy)
    for name, a, b in zip(NAMES, fast, ref):
        assert a.dtype == dtype, name
        assert rel_rms(a.float(), b.float()) < 1e-2, name


def test_wkv6_bad_input():
    r, k, v, w, u = _inputs(1, 4, 2, 4)
    with pytest.raises(ValueError, match="wkv6: r, k, v, w must all be"):
        wkv6(r, k[:, :3], v, w, u)
    with pytest.raises(ValueError, match="wkv6: u must be"):
        wkv6(r, k, v, w, u[:1])
    with pytest.raises(ValueError, match="chunk_size"):
        wkv6(r, k, v, w, u, chunk_size=0)
    with pytest.raises(ValueError, match="wkv6_ref: u must be"):
        wkv6_ref(r, k, v, w, u.reshape(-1))


# --------------------------------------------------------------------------------------------------- the models
GOLDENS = [("vrwkv6_golden_small", "test_vrwkv6"), ("vrwkv6_golden_small_rand", "test_vrwkv6"),
           ("vrwkv6_golden_small_postnorm_rand", "test_vrwkv6_postnorm")]
needs_golden = pytest.mark.skipif(not GOLDEN.exists(), reason="../shared/golden not present on this machine")


def _golden_model(golden, model_name, **kw):
    path = GOLDEN / f"{golden}.safetensors"
    return (timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval(),
            load_file(str(path)))


@needs_golden
@pytest.mark.parametrize("golden,model_name", GOLDENS)
def test_golden_matches_registered_config(golden, model_name):
    bb = json.loads((GOLDEN / f"{golden}.json").read_text())["config"]["backbone"]
    m = timm.create_model(model_name)
    assert (m.embed_dim, m.num_heads, len(m.blocks), m.head_size) == (bb["embed_dims"], bb["num_heads"],
                                                                       bb["depth"], 64)
    assert m.blocks[0].post_norm == bb["post_norm"]
    assert isinstance(m.blocks[0].spatial_mix.key_norm, torch.nn.LayerNorm) == bb["key_norm"]
    assert isinstance(m.blocks[0].ls1, torch.nn.Identity) == (bb["init_values"] is None)


@needs_golden
@pytest.mark.parametrize("golden,model_name", GOLDENS)
def test_golden_logits(golden, model_name):
    """Logits and pooled features to 1e-4, each block's output and block 0's WKV output along the way."""
    model, ref = _golden_model(golden, model_name)
    acts = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: acts.__setitem__(f"__backbone.layers.{i}__", out))
    model.blocks[0].spatial_mix.wkv_fn = lambda *a: acts.setdefault("__backbone.layers.0.att.wkv__", wkv6(*a))
    with torch.no_grad():
        feats = model.forward_features(ref["__input__"])
        logits = model.forward_head(feats)
    assert (logits - ref["__logits__"]).abs().max() <= 1e-4
    assert (model.forward_head(feats, pre_logits=True) - ref["__features__"]).abs().max() <= 1e-4
    for key, got in acts.items():
        want = ref[key]
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item()), key


@needs_golden
def test_golden_logits_through_the_reference_op():
    model, ref = _golden_model("vrwkv6_golden_small_rand", "test_vrwkv6", wkv_fn=wkv6_ref)
    with torch.no_grad():
        assert (model(ref["__input__"]) - ref["__logits__"]).abs().max() <= 1e-4


@needs_golden
def test_postnorm_golden_needs_per_head_shift_and_groupnorm(monkeypatch):
    """The 2-head golden tells per-head Q-Shift and per-head GroupNorm from whole-channel ones (so the golden test
    above can fail if either is wrong)."""
    model, ref = _golden_model("vrwkv6_golden_small_postnorm_rand", "test_vrwkv6_postnorm")
    with torch.no_grad():
        for blk in model.blocks:
            blk.spatial_mix.ln_x = torch.nn.GroupNorm(1, 128, eps=1e-5)
            blk.spatial_mix.ln_x.load_state_dict(dict(weight=ref["backbone.layers.0.att.ln_x.weight"] * 0 + 1,
                                                      bias=torch.zeros(128)))
        assert (model(ref["__input__"]) - ref["__logits__"]).abs().max() > 1e-2
    model, _ = _golden_model("vrwkv6_golden_small_postnorm_rand", "test_vrwkv6_postnorm")
    monkeypatch.setattr(rwkv6_layers, "q_shift_multihead", lambda x, grid, head_size, shift=1:
                        rwkv6_layers.q_shift(x, grid, shift))
    with torch.no_grad():
        assert (model(ref["__input__"]) - ref["__logits__"]).abs().max() > 1e-2


def test_q_shift_multihead_per_head_quarters():
    """Each head's 4 quarters take left / right / up / down neighbours (official q_shift_multihead)."""
    B, Hh, Ww, nh, hs = 1, 3, 4, 2, 8
    x = torch.arange(B * Hh * Ww * nh * hs, dtype=torch.float32).reshape(B, Hh * Ww, nh * hs)
    y = rwkv6_layers.q_shift_multihead(x, (Hh, Ww), hs).reshape(Hh, Ww, nh, hs)
    g = x.reshape(Hh, Ww, nh, hs)
    for h in range(nh):
        torch.testing.assert_close(y[:, 1:, h, 0:2], g[:, :-1, h, 0:2])  # from the left
        torch.testing.assert_close(y[:, :-1, h, 2:4], g[:, 1:, h, 2:4])  # from the right
        torch.testing.assert_close(y[1:, :, h, 4:6], g[:-1, :, h, 4:6])  # from above
        torch.testing.assert_close(y[:-1, :, h, 6:8], g[1:, :, h, 6:8])  # from below
        assert (y[:, 0, h, 0:2] == 0).all() and (y[-1, :, h, 6:8] == 0).all()
    with pytest.raises(ValueError, match="head_size"):
        rwkv6_layers.q_shift_multihead(x, (Hh, Ww), 6)


OFFICIAL = {  # README of OpenGVLab/Vision-RWKV: #Param (M), #FLOPs (G, i.e. GMACs) at 224²
    "vrwkv6_tiny": (7.6, 1.6, 192, 3, False, None, 0.0),
    "vrwkv6_small": (27.7, 5.6, 384, 6, True, 1e-5, 0.3),
    "vrwkv6_base": (104.9, 20.9, 768, 12, True, 1e-5, 0.5),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_configs_params_and_macs(name):
    """Official configs (classification/configs/vrwkv6/*), parameter count to the README's 0.1 M and the MACs
    torch.utils.flop_counter sees at 224² (FLOPs / 2) within 2 % of the README's GFLOPs (which are MACs)."""
    params_m, gmacs, C, heads, post_norm, ls, dpr = OFFICIAL[name]
    m = timm.create_model(name).eval()
    assert (m.embed_dim, m.num_heads, len(m.blocks), m.blocks[0].post_norm) == (C, heads, 12, post_norm)
    assert isinstance(m.blocks[0].ls1, torch.nn.Identity) if ls is None else m.blocks[0].ls1.gamma[0] == ls
    assert abs(m.blocks[-1].drop_path.drop_prob - dpr) < 1e-6 if dpr else isinstance(m.blocks[-1].drop_path,
                                                                                         torch.nn.Identity)
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == params_m
    with torch.no_grad(), FlopCounterMode(display=False) as fc:  # shapes only: counted on the meta device
        m.to("meta")(torch.randn(1, 3, 224, 224, device="meta"))
    assert abs(fc.get_total_flops() / 2e9 - gmacs) / gmacs < 0.02


def test_fancy_init_matches_official_formulas():
    m = timm.create_model("vrwkv6_tiny", img_size=32)
    L, C = 12, 192
    c = torch.arange(C, dtype=torch.float32)
    for i in (0, 5, 11):
        sm = m.blocks[i].spatial_mix
        r0, r1 = i / (L - 1), 1 - i / L
        torch.testing.assert_close(sm.time_maa_v.data, 1.0 - ((c / C) ** r1 + 0.3 * r0))
        torch.testing.assert_close(sm.time_maa_g.data, 1.0 - (c / C) ** (0.5 * r1))
        torch.testing.assert_close(sm.time_decay.data, -6 + 5 * (c / (C - 1)) ** (0.7 + 1.3 * r0))
        torch.testing.assert_close(sm.time_faaaa.data.reshape(-1), r0 * (1 - c / (C - 1)) + ((c + 1) % 3 - 1) * 0.1)
        assert sm.time_maa_w1.abs().max() <= 1e-4 and sm.time_decay_w2.shape == (64, C)
        torch.testing.assert_close(m.blocks[i].channel_mix.mix_k.data, (c / C) ** r1)


def test_vrwkv6_other_input_sizes_and_bad_heads():
    model = timm.create_model("test_vrwkv6_postnorm", num_classes=5, img_size=48, patch_size=8, in_chans=1).eval()
    with torch.no_grad():
        for hw in [(48, 48), (32, 80), (37, 50)]:
            out = model(torch.randn(1, 1, *hw))
            assert out.shape == (1, 5) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="num_heads=3 x head_size=64"):
        timm.create_model("vrwkv6_tiny", embed_dim=128)


def test_linvision_train_vrwkv6(tiny_data, tmp_path, capsys):
    """``linvision train --model test_vrwkv6`` (any timm-registered name works) trains 2 steps, saves and evaluates."""
    out = tmp_path / "run"
    rc, stdout, _ = run(capsys, "train", "--model", "test_vrwkv6", "--img-size", "32", "--patch-size", "8",
                        "--data", tiny_data, "--output", out, "--epochs", "1", "--batch-size", "4", "--workers", "0",
                        "--threads", "1", "--max-steps", "2")
    assert rc == 0 and "test top-1" in stdout and (out / "model.safetensors").is_file()
    rc, stdout, _ = run(capsys, "eval", "--checkpoint", out, "--data", tiny_data, "--json", "--workers", "0",
                        "--threads", "1")
    assert rc == 0 and json.loads(stdout)["n"] == 8
