"""ViT-ResNAS standalone network: official goldens (logits and per-stage activations), official checkpoint keys,
architectures and MACs of the registered nets, residual spatial reduction, input sizes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import linvision  # noqa: F401  (registers models; must precede timm)
import timm
from safetensors.torch import load_file, save_file

from linvision.models.resnas import ARCHS, ResNAS, arch_from_network_def, checkpoint_filter_fn, load_arch
from linvision.nas import analytic_macs, count_macs

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
GOLDENS = ["resnas_golden_small", "resnas_golden_small_recipe"]
needs_golden = pytest.mark.skipif(not GOLDEN.exists(), reason="../shared/golden not present on this machine")


@needs_golden
@pytest.mark.parametrize("golden", GOLDENS)
def test_golden_logits_and_activations(golden):
    """test_resnas's defaults are the golden's configuration: create_model alone reproduces the official logits,
    and every stem/block/reduction output matches the official activations."""
    path = GOLDEN / f"{golden}.safetensors"
    model = timm.create_model("test_resnas", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    ref, acts = load_file(str(path)), load_file(str(GOLDEN / f"{golden}.acts.safetensors"))
    got = {}
    flat = [m for st in model.stages for m in ([st.reduction] if st.reduction is not None else []) + list(st.blocks)]
    for i, m in enumerate(flat):
        m.register_forward_hook(lambda mod, inp, out, i=i: got.__setitem__(f"blocks.{i}", out))
    for name in ("conv1", "conv2", "conv3"):
        getattr(model.patch_embed, name).register_forward_hook(
            lambda mod, inp, out, name=name: got.__setitem__(f"patch_embed.{name}", out.clone()))
    with torch.no_grad():
        logits = model(ref["__input__"])
        feats = model.forward_features(ref["__input__"])
    assert (logits - ref["__logits__"]).abs().max() <= 1e-4
    assert len(flat) == 8 and set(got) == {k for k in acts if k.startswith("blocks.") or k.startswith("patch_embed.")}
    for k, v in got.items():
        assert (v - acts[k]).abs().max() <= 1e-4, k
    assert (feats[:, :1] - acts["norm"]).abs().max() <= 1e-4
    assert (model.forward_head(feats, pre_logits=True) - acts["norm"][:, 0]).abs().max() <= 1e-4


@needs_golden
def test_golden_config_and_patch_head():
    meta = json.loads((GOLDEN / "resnas_golden_small.json").read_text())
    assert arch_from_network_def(meta["network_def"]) == ARCHS["test_resnas"]
    path = str(GOLDEN / "resnas_golden_small.safetensors")
    model = timm.create_model("test_resnas", pretrained=True, patch_output=True,
                              pretrained_cfg_overlay=dict(file=path))  # loads patch_head strictly too
    torch.testing.assert_close(model.patch_head.weight, load_file(path)["patch_head.weight"])
    feats = model.forward_features(torch.randn(2, 3, 112, 112))
    assert model.forward_patch_head(feats).shape == (2, 4, 10)
    with pytest.raises(RuntimeError, match="patch_output=True"):
        timm.create_model("test_resnas").forward_patch_head(feats)


def _to_official(sd: dict, arch: dict) -> dict:
    """Inverse of checkpoint_filter_fn, written independently: linvision keys -> official keys, with a bypass
    (no-parameter) block index for every block whose ``present`` is False, as the official network_def does."""
    index, i = {}, 0
    for s, pres in enumerate(arch["present"]):
        if s > 0:
            index[f"stages.{s}.reduction"] = i
            i += 1
        j = 0
        for p in pres:
            if p:
                index[f"stages.{s}.blocks.{j}"] = i
                j += 1
            i += 1
    out = {}
    for k, v in sd.items():
        for prefix, idx in index.items():
            if k.startswith(prefix + "."):
                k = f"blocks.{idx}." + k[len(prefix) + 1:]
                break
        k = {"cls_token": "tokens"}.get(k, k)
        k = "cls_head." + k[5:] if k.startswith("head.") else k
        out[k] = v.contiguous()
    return {"model": out}


def test_official_keys_with_bypass_blocks_load(tmp_path):
    """An official checkpoint of a net with removed (bypass) blocks loads: block indices are remapped."""
    arch = load_arch(ARCHS["test_resnas"])
    arch["heads"][1], arch["mlp"][1], arch["present"][1] = [2, 1, 2], [128, 96, 64], [True, False, True]
    torch.manual_seed(0)
    src = ResNAS(arch, img_size=112, num_classes=10).eval()
    assert len(src.stages[1].blocks) == 2 and src.stages[1].blocks[1].mlp.fc1.out_features == 64
    off = _to_official(src.state_dict(), arch)
    assert "blocks.5.norm1.weight" in off["model"] and not any(k.startswith("blocks.4.") for k in off["model"])
    torch.save(off, tmp_path / "official.pth")
    dst = timm.create_model("test_resnas", arch=arch, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "official.pth"))).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    # at another resolution every pos-embed (stem grid and both reductions) is resized bicubically
    big = timm.create_model("test_resnas", arch=arch, img_size=224, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "official.pth")))
    assert big.pos_embed.shape == (1, 257, 32) and big.stages[2].reduction.pos_embed.shape == (1, 16, 128)


def test_registered_archs_and_macs():
    """The searched/reference architectures of the official scripts; MACs by flop counter (paper: ViT-ResNAS-Tiny
    1.8 G; the official search constraint 1.7944 G is exactly ViT-Res-Tiny) and by the analytic estimator."""
    t = timm.create_model("vit_resnas_tiny")
    assert t.arch["dims"] == [176, 352, 704] and t.arch["head_dims"] == [32, 48, 64]
    assert t.arch["heads"] == [[3, 3, 3, 4, 4], [10, 8, 8, 8, 10, 10], [10, 10, 10, 8, 8]]
    assert t.arch["mlp"] == [[704, 576, 640, 576, 704], [1408, 1408, 1280, 1408, 1280, 1024],
                             [2560, 1792, 2816, 2816, 2560]]
    assert t.stages[1].blocks[0].attn.qkv.out_features == 3 * 10 * 48 and t.stages[2].blocks[0].attn.scale == 64 ** -.5
    assert abs(t.stages[2].blocks[-1].drop_path1.drop_prob - 0.2) < 1e-6
    macs = count_macs(t, 224)
    assert abs(macs / 1.78e9 - 1) <= 0.02 and macs == analytic_macs(t.arch, 224) == 1_782_630_272
    assert count_macs(timm.create_model("vit_res_tiny"), 224) == 1_794_378_240
    for name in ("vit_resnas_small", "vit_resnas_medium"):
        m = timm.create_model(name, img_size=112)
        assert count_macs(m, 112) == analytic_macs(m.arch, 112)
    assert [len(s.blocks) for s in timm.create_model("vit_resnas_medium", img_size=56).stages] == [7, 7, 6]


def test_residual_spatial_reduction_skip_and_main_branches():
    """With the main branch zeroed the reduction is avg-pool + channel zero-padding of the *un-normalized* input
    (class token: zero-padding only); the main branch is conv(LN(patches)) + pos-embed and Linear(LN(cls))."""
    torch.manual_seed(0)
    m = timm.create_model("test_resnas").eval()
    red = m.stages[1].reduction
    x = torch.randn(2, 1 + 8 * 8, 32) * 3 + 1
    patches = x[:, 1:].transpose(1, 2).reshape(2, 32, 8, 8)
    with torch.no_grad():
        out = red(x, (8, 8))
        xn = F.layer_norm(x, (32,), red.norm.weight, red.norm.bias, 1e-6)
        main_p = F.conv2d(xn[:, 1:].transpose(1, 2).reshape(2, 32, 8, 8), red.patch_reduce.weight,
                          red.patch_reduce.bias, stride=2, padding=1).flatten(2).transpose(1, 2) + red.pos_embed
        skip_p = F.pad(F.avg_pool2d(patches, 2).flatten(2).transpose(1, 2), (0, 32))
        torch.testing.assert_close(out[:, 1:], main_p + skip_p)
        torch.testing.assert_close(out[:, :1], red.token_transform(xn[:, :1]) + F.pad(x[:, :1], (0, 32)))


def test_input_sizes():
    odd = timm.create_model("test_resnas", img_size=64)  # pos-embed grids ceil(64/14) = 5, then 3, then 2
    assert odd.pos_embed.shape[1] == 1 + 5 * 5 and odd.stages[2].reduction.pos_embed.shape[1] == 2 * 2
    model = timm.create_model("test_resnas").eval()
    with torch.no_grad():
        # any run-time size: zero-padded to multiples of 14 (100 -> 112), odd grids reduce to ceil(n/2)
        assert model.forward_features(torch.randn(1, 3, 100, 112)).shape == (1, 1 + 2 * 2, 128)
        assert model.forward_features(torch.randn(1, 3, 45, 60)).shape == (1, 1 + 1 * 2, 128)  # 4x5 -> 2x3 -> 1x2
        feats = model.forward_features(torch.randn(1, 3, 168, 224))   # other multiples: pos-embeds resized
        assert feats.shape == (1, 1 + 3 * 4, 128) and torch.isfinite(feats).all()
        assert model(torch.randn(2, 3, 56, 56)).shape == (2, 10)


def test_arch_validation_and_files(tmp_path):
    with pytest.raises(ValueError, match="lacks mlp"):
        ResNAS({"dims": [8, 8, 8], "head_dims": [4, 4, 4], "heads": [[1], [1], [1]]}, img_size=56)
    bad = load_arch(ARCHS["test_resnas"])
    bad["dims"] = [64, 32, 128]
    with pytest.raises(ValueError, match="must not shrink"):
        ResNAS(bad, img_size=56)
    f = tmp_path / "best.json"
    f.write_text(json.dumps({"arch": ARCHS["test_resnas"], "macs": 1}))
    assert load_arch(f) == ARCHS["test_resnas"]
    assert timm.create_model("test_resnas", arch=str(f)).arch == ARCHS["test_resnas"]
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        load_arch(tmp_path / "broken.json")


def test_linvision_checkpoint_roundtrip(tmp_path):
    """A linvision state dict (safetensors) passes through the filter unchanged."""
    torch.manual_seed(0)
    src = timm.create_model("test_resnas", num_classes=3).eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "m.safetensors"))
    dst = timm.create_model("test_resnas", num_classes=3, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "m.safetensors"), num_classes=3)).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    assert set(checkpoint_filter_fn(src.state_dict(), dst)) == set(dst.state_dict())
