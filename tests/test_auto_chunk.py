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
