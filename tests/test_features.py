"""timm's feature contract on every family: feature_info, forward_intermediates, prune_intermediate_layers,
features_only — at sizes not divisible by the patch, in every ViR mode."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import linvision  # noqa: F401  (registers the models; CPU torchvision shim before timm)
import timm

H, W = 45, 60  # a small analogue of 360x480 with patch 8 (sides not divisible by the patch)
# name -> (kwargs, expected (num_chs, reduction) per feature level, prefix tokens: None | 'first' | 'last')
FAMILIES = {
    "test_vrwkv": (dict(patch_size=8), [(64, 8)] * 4, None),
    "test_vir": (dict(patch_size=8), [(64, 8)] * 2, "last"),
    "test_vir2d": (dict(patch_size=8), [(64, 8)] * 2, None),
    "test_resnas": ({}, [(32, 14), (64, 28), (128, 56)], "first"),
}


def _model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**FAMILIES[name][0], **kw}).eval()


def _patch_tokens(tokens, prefix):
    return tokens[:, :-1] if prefix == "last" else tokens[:, 1:] if prefix == "first" else tokens


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_feature_info_and_map_shapes(name, image):
    model = _model(name)
    expected = FAMILIES[name][1]
    assert [(d["num_chs"], d["reduction"]) for d in model.feature_info] == expected
    with torch.no_grad():
        maps = model.forward_intermediates(image, intermediates_only=True)
    assert len(maps) == len(expected)
    for m, (c, r) in zip(maps, expected):
        assert m.shape == (2, c, math.ceil(H / r), math.ceil(W / r)) and torch.isfinite(m).all()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_last_map_with_norm_is_forward_features(name, image):
    model, prefix = _model(name), FAMILIES[name][2]
    with torch.no_grad():
        tokens = model.forward_features(image)
        final, maps = model.forward_intermediates(image, indices=1, norm=True)
        nlc = model.forward_intermediates(image, indices=[-1], norm=True, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(final, tokens)
    patches = _patch_tokens(tokens, prefix)
    torch.testing.assert_close(nlc[0], patches)
    B, C, h, w = maps[0].shape
    torch.testing.assert_close(maps[0], patches.reshape(B, h, w, C).permute(0, 3, 1, 2))
    if prefix:
        with torch.no_grad():
            (m, cls), = model.forward_intermediates(image, indices=1, norm=True, intermediates_only=True,
                                                    return_prefix_tokens=True)
        torch.testing.assert_close(m, maps[0])
        torch.testing.assert_close(cls, tokens[:, -1:] if prefix == "last" else tokens[:, :1])


@pytest.mark.parametrize("name,modes", [("test_vir", ("parallel", "chunkwise", "recurrent")),
                                        ("test_vir2d", ("parallel", "recurrent"))])
def test_every_vir_mode_gives_the_same_maps(name, modes, image):
    model = _model(name, chunk_size=5)  # chunks cross patch-row boundaries (8 patches per row)
    with torch.no_grad():
        ref = model.forward_intermediates(image, intermediates_only=True, mode="parallel")
        for mode in modes[1:]:
            got = model.forward_intermediates(image, intermediates_only=True, mode=mode)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            model.mode = mode  # the model's default mode is used too, with stop_early
            early = model.forward_intermediates(image, indices=[0], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(early[0], ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_features_only_via_timm(name, image):
    n = len(FAMILIES[name][1])
    feat = _model(name, features_only=True, out_indices=(0, -1))
    assert feat.feature_info.channels() == [FAMILIES[name][1][0][0], FAMILIES[name][1][-1][0]]
    assert feat.feature_info.reduction() == [FAMILIES[name][1][0][1], FAMILIES[name][1][-1][1]]
    ref = _model(name)  # same seed: same weights
    with torch.no_grad():
        got = feat(image)
        want = ref.forward_intermediates(image, indices=[0, n - 1], intermediates_only=True)
    assert len(got) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if n >= 3:  # timm's default for these models (feature_cfg out_indices=3, as its ViT): the last three levels
        assert _model(name, features_only=True).feature_info.out_indices == (n - 3, n - 2, n - 1)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prune_then_forward_intermediates(name, image):
    model = _model(name)
    full = copy.deepcopy(model)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1]
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.num_classes == 0
    seq = model.stages if name == "test_resnas" else model.blocks
    assert len(seq) == 2
    with torch.no_grad():
        got = model.forward_intermediates(image, indices=[0, 1], intermediates_only=True)
        want = full.forward_intermediates(image, indices=[0, 1], intermediates_only=True)
        want_early = full.forward_intermediates(image, indices=[0, 1], stop_early=True)[1]
    for a, b, c in zip(got, want, want_early):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_bad_feature_arguments(image):
    model = _model("test_vrwkv")
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(image, output_fmt="NHWC")
    with pytest.raises(AssertionError, match="out of range"):
        model.forward_intermediates(image, indices=[7])


def test_resnas_odd_grid_reduction_is_ceil_with_border_means():
    """An odd patch grid (here 3x5) reduces to ceil(n/2) (2x3): the conv zero-pads, the skip averages the tokens
    inside each clipped border window; an even grid is the official computation (goldens in test_resnas)."""
    torch.manual_seed(0)
    red = timm.create_model("test_resnas").stages[1].reduction
    x = torch.randn(2, 1 + 3 * 5, 32)
    with torch.no_grad():
        out = red(x, (3, 5))
    assert out.shape == (2, 1 + 2 * 3, 64)
    patches = x[:, 1:].transpose(1, 2).reshape(2, 32, 3, 5)
    counts = F.avg_pool2d(F.pad(torch.ones(1, 1, 3, 5), (0, 1, 0, 1)), 2) * 4
    skip = F.avg_pool2d(F.pad(patches, (0, 1, 0, 1)), 2) * 4 / counts             # sums / real-token counts
    xn = red.norm(x)
    main = F.conv2d(F.pad(xn[:, 1:].transpose(1, 2).reshape(2, 32, 3, 5), (0, 1, 0, 1)), red.patch_reduce.weight,
                    red.patch_reduce.bias, stride=2, padding=1)[..., :2, :3]
    pos = F.interpolate(red.pos_embed.reshape(1, 4, 4, 64).permute(0, 3, 1, 2), size=(2, 3), mode="bicubic",
                        align_corners=False)
    want = F.pad(skip.flatten(2).transpose(1, 2), (0, 32)) + (main + pos).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, 1:], want, rtol=1e-5, atol=1e-5)
