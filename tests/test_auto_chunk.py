"""Automatic chunk size of ViR's chunkwise/streaming forwards (``chunk_size=None``): from the token count and head
size; an explicit ``chunk_size`` wins; the result equals the parallel form."""
from __future__ import annotations

import pytest
import torch

import linvision  # noqa: F401  (registers the models; must precede timm)
import timm
from linvision.ops.retention import AUTO_CHUNK_MAX_TOKENS, auto_chunk_size, op_chunk_size


@pytest.mark.parametrize("T", [1, 17, 64, 65, 197, 1025, 4096, 4097, 16385])
@pytest.mark.parametrize("K", [16, 32, 64, 96, 128])
def test_auto_chunk_size_rule(T, K):
    c, L = op_chunk_size(K), auto_chunk_size(T, K)
    assert 16 <= c <= 128 and c & (c - 1) == 0 and c / 2 <= K <= 2 * c  # power of two near K
    assert L % c == 0 and c <= L <= AUTO_CHUNK_MAX_TOKENS
    assert L >= T or L > AUTO_CHUNK_MAX_TOKENS - c  # one pass when it fits, else passes of ~4096 tokens
    assert L < T + c or L == c  # no more than one op chunk of slack


@pytest.mark.parametrize("T", [1, 197, 4097, 16385, 65537])
def test_auto_chunk_size_one_pass_on_cuda(T):
    """On CUDA one pass of whole op chunks, whatever T (launches, not memory, are the cost there); CPU caps it."""
    c = op_chunk_size(64)
    L = auto_chunk_size(T, 64, "cuda")
    assert L >= T and L % c == 0 and L < T + c
    assert auto_chunk_size(T, 64, torch.device("cuda:0")) == L
    assert auto_chunk_size(T, 64, "cpu") == auto_chunk_size(T, 64) <= AUTO_CHUNK_MAX_TOKENS


def _passes(model, x, **kw):
    calls = []
    h = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(x, **kw)
    h.remove()
    return out, len(calls)


def test_vir_auto_chunk_one_pass_and_explicit_wins():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    auto = timm.create_model("test_vir").eval()
    assert auto.chunk_size is None
    ref, _ = _passes(auto, x, mode="parallel")
    out, n = _passes(auto, x, mode="chunkwise")
    T = auto.patch_embed.num_patches + 1
    assert n == -(-T // auto_chunk_size(T, auto.head_dim)) == 1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    fixed = timm.create_model("test_vir", chunk_size=5).eval()
    fixed.load_state_dict(auto.state_dict())
    out5, n5 = _passes(fixed, x, mode="chunkwise")
    assert n5 == -(-T // 5)
    torch.testing.assert_close(out5, ref, rtol=1e-4, atol=1e-5)


def _forms(model, x):
    """Retention forms the first block's retention layer was called with."""
    seen = []
    h = model.blocks[0].retention.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["mode"]),
                                                            with_kwargs=True)
    with torch.no_grad():
        out = model(x)
    h.remove()
    return out, seen


@pytest.mark.parametrize("side, form", [(64, "parallel"), (272, "parallel"), (288, "chunkwise")])
def test_vir_default_mode_auto_picks_form_by_token_count(side, form):
    """``mode='auto'`` (ViR's default): parallel up to AUTO_PARALLEL_MAX_TOKENS (320) tokens, chunkwise above —
    17² + 1 = 290 tokens at 272², 18² + 1 = 325 at 288² — with the logits of the forced forms."""
    from linvision.ops.retention import AUTO_PARALLEL_MAX_TOKENS, auto_form
    torch.manual_seed(0)
    model = timm.create_model("test_vir").eval()
    assert model.mode == "auto"
    x = torch.randn(1, 3, side, side)
    T = (side // 16) ** 2 + 1
    assert auto_form(T) == form and (T <= AUTO_PARALLEL_MAX_TOKENS) == (form == "parallel")
    out, seen = _forms(model, x)
    assert set(seen) == {form}
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, mode="parallel"), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out, model(x, mode="chunkwise"), rtol=1e-4, atol=1e-5)


def test_vir2d_keeps_parallel_default_and_rejects_auto():
    assert timm.create_model("test_vir2d").mode == "parallel"
    with pytest.raises(ValueError, match="mode must be one of"):
        timm.create_model("test_vir2d", mode="auto")
