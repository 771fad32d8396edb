"""In-place inference layers (``linvision.layers.inplace``) and the patch embedding that pads only when needed."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import linvision  # noqa: F401  (before timm)
import timm
from timm.layers import LayerScale as TimmLayerScale
from timm.layers import PatchEmbed

from linvision.layers.inplace import GELU, LayerScale, overwritable
from linvision.models._common import PaddedPatchEmbed


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_overwrites_only_without_gradient(approximate):
    x = torch.randn(3, 7, 40) * 3
    want = nn.GELU(approximate=approximate)(x)
    act = GELU(approximate=approximate)
    with torch.no_grad():
        t = x.clone()
        out = act(t)
        assert out.data_ptr() == t.data_ptr() and torch.equal(out, want)  # in place, same bits
    xg = x.clone().requires_grad_()
    out = act(xg)  # a gradient will flow: out of place, differentiable, input untouched
    assert out.data_ptr() != xg.data_ptr() and torch.equal(xg.detach(), x) and torch.equal(out.detach(), want)
    g = torch.randn_like(x)
    ref = x.clone().requires_grad_()
    nn.GELU(approximate=approximate)(ref).backward(g)
    out.backward(g)
    assert torch.equal(xg.grad, ref.grad)
    t = x.clone()  # autograd on, but nothing requires grad: may overwrite
    assert overwritable(t) and act(t).data_ptr() == t.data_ptr()


def test_layer_scale_overwrites_only_without_gradient_and_keeps_promotion():
    ls, ref = LayerScale(40, 1e-2), TimmLayerScale(40, 1e-2)
    with torch.no_grad():
        ls.gamma.copy_(torch.randn(40))
        ref.gamma.copy_(ls.gamma)
    assert ls.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        t = x.clone()
        out = ls(t)
        assert out.data_ptr() == t.data_ptr() and torch.equal(out, ref(x))
        xb = x.bfloat16()  # bf16 x fp32 γ promotes to fp32 out of place: in place would keep bf16
        assert ls(xb.clone()).dtype == ref(xb).dtype == torch.float32 and torch.equal(ls(xb.clone()), ref(xb))
    xg = x.clone().requires_grad_()
    out = ls(xg)
    assert out.data_ptr() != xg.data_ptr() and torch.equal(xg.detach(), x)
    out.sum().backward()
    torch.testing.assert_close(ls.gamma.grad, x.sum((0, 1)))


@pytest.mark.parametrize("size", [(64, 48), (70, 50), (16, 17)])
def test_padded_patch_embed_equals_timm_and_skips_the_zero_pad(size, monkeypatch):
    torch.manual_seed(0)
    ours = PaddedPatchEmbed(64, 16, 3, 24, bias=True, output_fmt="NHWC")
    ref = PatchEmbed(64, 16, 3, 24, bias=True, strict_img_size=False, output_fmt="NHWC", dynamic_img_pad=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, *size)
    want = ref(x)
    calls = []
    real_pad = F.pad
    monkeypatch.setattr(F, "pad", lambda *a, **k: calls.append(1) or real_pad(*a, **k))
    got = ours(x)
    assert torch.equal(got, want) and got.shape == (2, -(-size[0] // 16), -(-size[1] // 16), 24)
    assert bool(calls) == (size[0] % 16 != 0 or size[1] % 16 != 0)  # padded only when a side needs it


@pytest.mark.parametrize("name", ["vir_tiny", "vrwkv_tiny", "vit_resnas_tiny"])
def test_models_use_the_in_place_layers(name):
    m = timm.create_model(name)
    acts = [mod for mod in m.modules() if isinstance(mod, nn.GELU)]
    assert all(type(a) is GELU for a in acts)
    assert all(type(mod) is LayerScale for mod in m.modules() if isinstance(mod, TimmLayerScale))
    if name != "vit_resnas_tiny":
        assert type(m.patch_embed) is PaddedPatchEmbed


@pytest.mark.parametrize("v6", [False, True])
def test_channel_mix_in_place_inference_equals_training_forward(v6):
    """Vision-RWKV's channel mixes run relu², the gate and the product in place without gradients: the same bits
    as the differentiable forward."""
    from linvision.layers.rwkv import ChannelMix
    from linvision.layers.rwkv6 import ChannelMixV6

    torch.manual_seed(0)
    mix = ChannelMixV6(32, 128, head_size=8, layer_id=1, num_layers=3) if v6 else ChannelMix(32, 128, 1, 3)
    x = torch.randn(2, 6 * 5, 32)
    train = mix(x.clone().requires_grad_(), (6, 5))
    with torch.no_grad():
        infer = mix(x, (6, 5))
    assert torch.equal(infer, train.detach())


def test_mixers_keep_derived_parameters_only_while_they_are_unchanged():
    """The spatial and channel mix keep the stacked μ's and w/T, u/T between inference calls (layers.rwkv._derived):
    the same outputs as rebuilding them, rebuilt after an optimizer step, load_state_dict or a new T, never kept
    while the parameters need a gradient, and usable by a frozen-parameter forward after an inference_mode one."""
    from linvision.layers import rwkv

    torch.manual_seed(0)
    sm, cm = rwkv.SpatialMix(16, 1, 4), rwkv.ChannelMix(16, 64, 1, 4)
    x, grid = torch.randn(2, 12, 16), (3, 4)

    def fresh(m, xx, g):  # the forward with the cache emptied first (so derived values are rebuilt)
        rwkv._DERIVED.pop(m, None)
        return m(xx, g)

    for m in (sm, cm):
        with torch.inference_mode():
            first = m(x, grid)
            assert m in rwkv._DERIVED
            assert torch.equal(m(x, grid), first) and torch.equal(fresh(m, x, grid), first)
        kept = rwkv._DERIVED[m]
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        out = m(x, grid)  # training forward: parameters need grad -> nothing taken from or put in the cache
        assert rwkv._DERIVED[m] is kept
        out.square().sum().backward()
        opt.step()  # in place: versions move
        with torch.no_grad():
            after_step = m(x, grid)
            assert not torch.equal(after_step, first) and torch.equal(after_step, fresh(m, x, grid))
            m.load_state_dict({k: v + 0.1 for k, v in m.state_dict().items()})
            assert torch.equal(m(x, grid), fresh(m, x, grid))
        m.requires_grad_(False)  # frozen backbone, input needs grad: the inference_mode-built values are saved
        rwkv._DERIVED.pop(m, None)
        with torch.inference_mode():
            m(x, grid)  # built here
        assert m in rwkv._DERIVED
        xg = x.clone().requires_grad_()
        m(xg, grid).sum().backward()
        assert xg.grad is not None and torch.isfinite(xg.grad).all()
        m.requires_grad_(True)
    with torch.no_grad():  # another T: w/T and u/T rebuilt for it
        x2, grid2 = torch.randn(1, 20, 16), (4, 5)
        assert torch.equal(sm(x2, grid2), fresh(sm, x2, grid2))
        assert torch.equal(sm(x, grid), fresh(sm, x, grid))
