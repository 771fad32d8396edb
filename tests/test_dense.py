"""Dense prediction: ViTDet simple feature pyramid, smp decoders on every family (and on timm's DeiT/Swin),
any input size, gradients; which of smp's own timm-encoder paths take linvision backbones."""
import pytest
import torch
import torch.nn.functional as F

import linvision  # noqa: F401
import segmentation_models_pytorch as smp
import timm
from linvision.dense import SimpleFeaturePyramid, create_segmentation_model

H, W, K = 45, 61, 3  # odd sides, not multiples of any patch or stride
FAMILIES = {"test_vrwkv": dict(patch_size=8), "test_vir": dict(patch_size=8, mode="chunkwise", chunk_size=7),
            "test_vir2d": dict(patch_size=8), "test_resnas": {}}


def _seg(name, decoder, **kw):
    torch.manual_seed(0)
    return create_segmentation_model(name, decoder, num_classes=K, decoder_channels=32, **{**FAMILIES[name], **kw})


def test_simple_feature_pyramid_plain_and_hierarchical():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 6, 8)
    sfp = SimpleFeaturePyramid([64], num_up=2, num_down=1)  # ViTDet's scales 4, 2, 1, 1/2
    out = sfp([x])
    assert [tuple(y.shape) for y in out] == [(2, 16, 24, 32), (2, 32, 12, 16), (2, 64, 6, 8), (2, 64, 3, 4)]
    assert sfp.out_channels == [16, 32, 64, 64]
    assert out[2] is x
    torch.testing.assert_close(out[3], F.max_pool2d(x, 2))
    up2 = sfp.up[1][0]  # the 2x branch is one 2x2 stride-2 transposed conv
    torch.testing.assert_close(out[1], F.conv_transpose2d(x, up2.weight, up2.bias, stride=2))
    # hierarchical (ViT-ResNAS-like, three stages): one finer level, ViTDet's projection to a common width
    feats = [torch.randn(2, 32, 8, 8), torch.randn(2, 64, 4, 4), torch.randn(2, 128, 2, 2)]
    sfp = SimpleFeaturePyramid([32, 64, 128], num_up=1, num_down=0, out_channels=24)
    assert [tuple(y.shape) for y in sfp(feats)] == [(2, 24, 16, 16), (2, 24, 8, 8), (2, 24, 4, 4), (2, 24, 2, 2)]
    with pytest.raises(ValueError, match="num_up"):
        SimpleFeaturePyramid([32], -1, 0)


@pytest.mark.parametrize("decoder", ["upernet", "fpn", "dpt"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_any_size(name, decoder):
    model = _seg(name, decoder).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, H, W))
    assert y.shape == (2, K, H, W) and y.dtype == torch.float32 and torch.isfinite(y).all()
    strides = [d["reduction"] for d in timm.create_model(name, **FAMILIES[name]).feature_info]
    assert model.encoder.size_multiple == (56 if name == "test_resnas" else 32), strides


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradients_reach_backbone_and_decoder(name):
    model = _seg(name, "upernet").train()
    y = model(torch.randn(2, 3, H, W))
    (y.float().square().mean()).backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    # ViR's class token (appended last) cannot influence the patch tokens under causal retention
    assert no_grad <= {"encoder.model.cls_token"}, no_grad
    stem = model.encoder.model.patch_embed
    w = stem.conv1.conv.weight if name == "test_resnas" else stem.proj.weight
    assert w.grad.abs().sum() > 0
    assert model.segmentation_head[0].weight.grad.abs().sum() > 0


def test_padding_is_cropped_consistently():
    """A multiple of the pad size runs unpadded; a smaller image is the same model on the zero-padded input."""
    model = _seg("test_vrwkv", "upernet").eval()
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        y = model(x)
        y_full = model(F.pad(x, (0, 64 - W, 0, 64 - H)))  # 64 = the padded size of 45x61
    assert y_full.shape[-2:] == (64, 64)
    torch.testing.assert_close(y, y_full[..., :H, :W])


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_plain_timm_backbones(name):
    model = create_segmentation_model(name, "upernet", num_classes=K, decoder_channels=32).eval()
    assert model.encoder.plain == name.startswith("deit")
    with torch.no_grad():
        assert model(torch.randn(1, 3, H, W)).shape == (1, K, H, W)


def test_smp_timm_encoder_paths():
    # smp's TimmUniversalEncoder needs strides 4/8/16/32: single-stride and 14/28/56 backbones are refused cleanly
    for name in ("tu-test_vrwkv", "tu-test_resnas"):  # (depth-2 test_vir: timm's default last-3 indices fail)
        with pytest.raises(ValueError, match="Unsupported model downsampling pattern"):
            smp.UPerNet(encoder_name=name, encoder_weights=None)
    # smp's DPT (TimmViTEncoder: forward_intermediates + feature_info) takes the plain families directly
    for name, readout in (("tu-test_vrwkv", "ignore"), ("tu-test_vir", "cat")):
        torch.manual_seed(0)
        m = smp.DPT(encoder_name=name, encoder_weights=None, encoder_depth=2, decoder_readout=readout,
                    decoder_intermediate_channels=(16, 16), decoder_fusion_channels=16, classes=K).eval()
        with torch.no_grad():
            assert m(torch.randn(1, 3, 64, 96)).shape == (1, K, 64, 96)


def test_bad_arguments():
    with pytest.raises(ValueError, match="decoder must be one of"):
        create_segmentation_model("test_vrwkv", "segformer")
    with pytest.raises(ValueError, match="multiple of 32"):
        create_segmentation_model("test_vrwkv", "fpn", decoder_channels=48)
    with pytest.raises(ValueError, match="one block"):
        create_segmentation_model("test_vrwkv", "upernet", out_indices=[1, 3])
