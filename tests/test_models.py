"""timm-style generic model checks for every linvision model, plus the official golden files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linvision  # noqa: F401  (registers models; must precede timm)
import timm
from safetensors.torch import load_file, save_file

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
MODELS = sorted(n for n in timm.list_models() if timm.get_pretrained_cfg(n) is not None
                and getattr(timm.get_pretrained_cfg(n), "paper_ids", None) in ("arXiv:2403.02308", "arXiv:2310.19731",
                                                                                 "arXiv:2109.00642"))
SMALL = dict(img_size=64)  # keeps the large models cheap on 2 CPU cores


def _small_size(name: str) -> int:
    """Contract-test input side: 64, or 56 for ViT-ResNAS (its official sizes are multiples of 56)."""
    return 56 if timm.get_pretrained_cfg(name).paper_ids == "arXiv:2109.00642" else SMALL["img_size"]


def test_registry_lists_every_family():
    for name in ["vrwkv_tiny", "vrwkv_small", "vrwkv_base", "vrwkv_large", "vir_tiny", "vir_small", "vir_base",
                 "test_vrwkv", "test_vrwkv_postnorm", "test_vir", "vit_res_tiny", "vit_resnas_tiny",
                 "vit_resnas_small", "vit_resnas_medium", "test_resnas", "vrwkv6_tiny", "vrwkv6_small", "vrwkv6_base",
                 "test_vrwkv6", "test_vrwkv6_postnorm"]:
        assert name in MODELS and timm.is_model(name)


@pytest.mark.parametrize("name", MODELS)
def test_model_contract(name):
    torch.manual_seed(0)
    size = _small_size(name)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0., img_size=size)  # no dropped branches
    assert model.default_cfg is model.pretrained_cfg and model.pretrained_cfg["architecture"] == name
    assert isinstance(model.no_weight_decay(), set) and "pos_embed" in model.no_weight_decay()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[0] == 2 and feats.shape[-1] == model.num_features
        torch.testing.assert_close(model.forward_head(feats), model(x))
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("name", ["test_vrwkv", "test_vir", "vrwkv_tiny", "vir_tiny"])
def test_other_input_sizes(name):
    """Non-default, non-square sizes (pos-embed resized), other patch/channels; sides not divisible by the patch
    are padded bottom/right (official Vision-RWKV PatchEmbed padding='corner')."""
    model = timm.create_model(name, num_classes=5, img_size=48, patch_size=8, in_chans=1).eval()
    with torch.no_grad():
        for hw in [(48, 48), (32, 80), (37, 50)]:
            out = model(torch.randn(1, 1, *hw))
            assert out.shape == (1, 5) and torch.isfinite(out).all()
        ntok = model.forward_features(torch.randn(1, 1, 37, 50)).shape[1]
    assert ntok == 5 * 7 + model.num_prefix_tokens


def test_constructor_img_size_changes_pos_embed():
    m = timm.create_model("vrwkv_tiny", img_size=32, patch_size=4, num_classes=10)
    assert m.pos_embed.shape == (1, 64, 192)
    m = timm.create_model("vir_tiny", img_size=(32, 48), patch_size=8, num_classes=10)
    assert m.pos_embed.shape == (1, 24, 192)


def test_official_configs():
    cfgs = {n: timm.create_model(n, img_size=32) for n in ["vrwkv_tiny", "vrwkv_small", "vrwkv_large"]}
    t, s, L = cfgs["vrwkv_tiny"], cfgs["vrwkv_small"], cfgs["vrwkv_large"]
    assert (t.embed_dim, len(t.blocks), t.blocks[0].channel_mix.key.out_features) == (192, 12, 768)
    assert not t.blocks[0].post_norm and isinstance(t.blocks[0].ls1, torch.nn.Identity)
    assert s.blocks[0].post_norm and s.blocks[0].ls1.gamma[0].item() == 1.0
    assert abs(s.blocks[-1].drop_path.drop_prob - 0.3) < 1e-6
    assert (L.embed_dim, len(L.blocks)) == (1024, 24) and isinstance(L.blocks[0].spatial_mix.key_norm, torch.nn.LayerNorm)
    assert L.pre_logits.fc.out_features == 3072 and L.head.in_features == 3072
    v = timm.create_model("vir_small", img_size=32)
    assert (v.embed_dim, v.blocks[0].retention.num_heads, v.blocks[0].mlp.fc1.out_features) == (384, 6, 1536)
    assert v.blocks[0].norm1.eps == 1e-6 and v.blocks[0].ls1.gamma[0].item() == pytest.approx(1e-5)


def test_fancy_init_matches_official_formulas():
    m = timm.create_model("vrwkv_tiny", img_size=32)
    L, C = 12, 192
    c = torch.arange(C, dtype=torch.float32)
    for l in (0, 5, 11):
        sm, cm = m.blocks[l].spatial_mix, m.blocks[l].channel_mix
        r0, r1 = l / (L - 1), 1 - l / L
        torch.testing.assert_close(sm.spatial_decay.data, -5 + 8 * (c / (C - 1)) ** (0.7 + 1.3 * r0))
        torch.testing.assert_close(sm.spatial_first.data, torch.log(torch.tensor(0.3)) + 0.5 * (((c + 1) % 3) - 1))
        torch.testing.assert_close(sm.mix_v.data, (c / C) ** r1 + 0.3 * r0)
        torch.testing.assert_close(sm.mix_r.data, (c / C) ** (0.5 * r1))
        torch.testing.assert_close(cm.mix_k.data, (c / C) ** r1)
    assert m.pos_embed.abs().sum() == 0


# --------------------------------------------------------------------------------------- official golden files
GOLDENS = [("vrwkv_golden_small", "test_vrwkv"), ("vrwkv_golden_small_rand", "test_vrwkv"),
           ("vrwkv_golden_small_postnorm", "test_vrwkv_postnorm"),
           ("vrwkv_golden_small_postnorm_rand", "test_vrwkv_postnorm"),
           ("vir_golden_small", "test_vir"), ("vir_golden_small_rand", "test_vir")]


def _json_args(name: str) -> dict:
    """Constructor arguments that differ from the registered test model's defaults, read from the golden JSON."""
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    bb = meta.get("config", {}).get("backbone")
    if bb is not None and bb.get("init_values") not in (None, 1e-5):
        return dict(init_values=bb["init_values"])
    return {}


@pytest.mark.skipif(not GOLDEN.exists(), reason="../shared/golden not present on this machine")
@pytest.mark.parametrize("golden,model_name", GOLDENS)
def test_golden_logits(golden, model_name):
    path = GOLDEN / f"{golden}.safetensors"
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **_json_args(golden)).eval()
    ref = load_file(str(path))
    with torch.no_grad():
        feats = model.forward_features(ref["__input__"])
        logits = model.forward_head(feats)
    assert (logits - ref["__logits__"]).abs().max() <= 1e-4
    assert (model.forward_head(feats, pre_logits=True) - ref["__features__"]).abs().max() <= 1e-4


@pytest.mark.skipif(not GOLDEN.exists(), reason="../shared/golden not present on this machine")
@pytest.mark.parametrize("golden,model_name", [g for g in GOLDENS if g[0].startswith("vrwkv")])
def test_golden_logits_official_kernel_variant(golden, model_name):
    """wkv_variant='official_kernel' reproduces the logits of the authors' CUDA arithmetic (__logits_cudaport__),
    including the _rand files' T = 35 > 32 (two tokens per kernel chunk)."""
    path = GOLDEN / f"{golden}.safetensors"
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              wkv_variant="official_kernel", **_json_args(golden)).eval()
    ref = load_file(str(path))
    with torch.no_grad():
        assert (model(ref["__input__"]) - ref["__logits_cudaport__"]).abs().max() <= 1e-4


def _to_official_vrwkv(sd: dict) -> dict:
    """Inverse of vrwkv.checkpoint_filter_fn, written independently: linvision keys -> mmcls keys."""
    out = {}
    for k, v in sd.items():
        if k.startswith("norm_pre."):
            k = "backbone.layers.0.ln0." + k.split(".", 1)[1]
        elif k.startswith("blocks."):
            k = ("backbone.layers." + k[len("blocks."):]).replace(".spatial_mix.", ".att.").replace(
                ".channel_mix.", ".ffn.").replace(".mix_", ".spatial_mix_").replace(".ls1.gamma", ".gamma1").replace(
                ".ls2.gamma", ".gamma2").replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
            if ".spatial_mix_" in k:
                v = v.reshape(1, 1, -1)
        elif k.startswith("norm."):
            k = "backbone.ln1." + k.split(".", 1)[1]
        elif k.startswith("patch_embed.proj."):
            k = "backbone.patch_embed.projection." + k.split(".")[-1]
        elif k == "pos_embed":
            k = "backbone.pos_embed"
        elif k.startswith("pre_logits.fc."):
            k = "head.layers.pre_logits." + k.split(".")[-1]
        elif k.startswith("head."):
            k = ("head.layers.head." if "pre_logits.fc.weight" in sd else "head.fc.") + k.split(".")[-1]
        out[k] = v.contiguous()
    return out


@pytest.mark.parametrize("name,kw", [("vrwkv_large", dict(depth=2)), ("vrwkv_small", {})])
def test_full_size_official_keys_load(tmp_path, name, kw):
    """A full-width checkpoint under official mmcls key names (incl. the L head's pre_logits) loads strictly
    and, at another resolution, gets its pos-embed resized."""
    torch.manual_seed(0)
    src = timm.create_model(name, img_size=224, num_classes=11, **kw).eval()
    file = tmp_path / "official.safetensors"
    save_file(_to_official_vrwkv(src.state_dict()), str(file))
    dst = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file), num_classes=11),
                            num_classes=11, img_size=224, **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    resized = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file), num_classes=11),
                                num_classes=11, img_size=256, **kw)
    assert resized.pos_embed.shape[1] == 256


def test_shim_then_timm_imports_cleanly():
    code = "import linvision, timm, torchvision; m = timm.create_model('vrwkv_tiny'); print(type(m).__name__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "VisionRWKV"


def test_compat_shim_is_imported_once_by_the_package():
    """``linvision/__init__.py`` imports ``_compat`` before anything else; importing any submodule runs the package
    first, so no other module imports it (and none needs ``# noqa: E402`` for it). A submodule imported first in a
    fresh process (here the data module, which imports timm/torchvision) still works."""
    from pathlib import Path
    root = Path(linvision.__file__).parent
    users = sorted(str(f.relative_to(root)) for f in root.rglob("*.py") if "import _compat" in f.read_text())
    assert users == ["__init__.py"], users
    res = subprocess.run([sys.executable, "-c", "import linvision.data, torchvision; print('ok')"],
                         capture_output=True, text=True, env={**os.environ})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("mode", ["chunkwise", "recurrent"])
def test_vir_modes_give_the_same_logits(mode):
    """vir_tiny at 224² (197 tokens; chunk 64 does not divide it): every retention form, run chunk by chunk
    through all blocks with one state per block, gives the parallel logits. Layer scales are raised to 0.5 so
    that retention moves the logits."""
    torch.manual_seed(0)
    model = timm.create_model("vir_tiny").eval()
    for blk in model.blocks:
        blk.ls1.gamma.data.fill_(0.5)
        blk.ls2.gamma.data.fill_(0.5)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        assert (model(x, mode=mode) - ref).abs().max() <= 1e-4  # per call
        by_default = timm.create_model("vir_tiny", mode=mode).eval()  # constructor default
        by_default.load_state_dict(model.state_dict())
        assert (by_default(x) - ref).abs().max() <= 1e-4


@pytest.mark.skipif(not GOLDEN.exists(), reason="../shared/golden not present on this machine")
@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_vir_golden_in_every_mode(mode):
    path = GOLDEN / "vir_golden_small_rand.safetensors"
    model = timm.create_model("test_vir", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), mode=mode,
                              chunk_size=5).eval()
    ref = load_file(str(path))
    with torch.no_grad():
        assert (model(ref["__input__"]) - ref["__logits__"]).abs().max() <= 1e-4


def test_vir_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        timm.create_model("test_vir")(torch.randn(1, 3, 64, 64), mode="softmax")


def test_vir_retention_norm_keeps_modes_equivalent():
    """The optional per-head RMSNorm of the retention output is per token: every form still agrees."""
    torch.manual_seed(0)
    model = timm.create_model("test_vir", retention_norm=True, init_values=0.5).eval()
    assert isinstance(model.blocks[0].retention.norm, torch.nn.RMSNorm)
    assert isinstance(timm.create_model("test_vir").blocks[0].retention.norm, torch.nn.Identity)  # authors' variant
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        for mode in ("chunkwise", "recurrent"):
            assert (model(x, mode=mode) - ref).abs().max() <= 1e-5


# ------------------------------------------------- VRWKV-L's InternImage-code checkpoint format (issue 14)
def _to_internimage(sd: dict, head0=None) -> dict:
    """Official mmcls keys -> the keys ``classification_internimage/models/vrwkv.py`` (VRWKV_Classification)
    saves under ``{'model': ...}``: same ``backbone.*``; head ``nn.Linear`` -> ``head.*``, or with ``head0`` =
    (weight, bias) of its first Linear, ``nn.Sequential(Linear, Tanh, Linear)`` -> ``head.0.*`` / ``head.2.*``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("__"):
            continue
        if k.startswith("head.fc."):
            k = ("head.2." if head0 is not None else "head.") + k[len("head.fc."):]
        elif k.startswith("head.layers.pre_logits."):
            k = "head.0." + k[len("head.layers.pre_logits."):]
        elif k.startswith("head.layers.head."):
            k = "head.2." + k[len("head.layers.head."):]
        out[k] = v
    if head0 is not None:
        out["head.0.weight"], out["head.0.bias"] = head0
    return {"model": out, "epoch": 29, "max_accuracy": 86.0}


@pytest.mark.skipif(not GOLDEN.exists(), reason="../shared/golden not present on this machine")
@pytest.mark.parametrize("hidden", [None, 48])
def test_internimage_format_golden(tmp_path, hidden):
    """The key_norm/post_norm golden re-keyed as the InternImage code names it, saved as its .pth checkpoint, loads
    and reproduces the official logits; with a Linear-Tanh-Linear head (``head.0``/``head.2``, as VRWKV-L) the
    expected logits are computed from the golden's pooled features ``head.2(tanh(head.0(f)))``."""
    ref = load_file(str(GOLDEN / "vrwkv_golden_small_postnorm_rand.safetensors"))
    expected, kw, head0 = ref["__logits__"], {}, None
    if hidden:
        g = torch.Generator().manual_seed(3)
        head0 = (torch.randn(hidden, 64, generator=g) / 8, torch.randn(hidden, generator=g))
        w2, b2 = torch.randn(10, hidden, generator=g) / hidden ** 0.5, torch.randn(10, generator=g)
        ref = {**ref, "head.fc.weight": w2, "head.fc.bias": b2}
        expected = torch.tanh(ref["__features__"] @ head0[0].T + head0[1]) @ w2.T + b2
        kw = dict(head_hidden_size=hidden)
    file = tmp_path / "vrwkv_internimage.pth"
    torch.save(_to_internimage(ref, head0), file)
    model = timm.create_model("test_vrwkv_postnorm", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)),
                              **kw).eval()
    with torch.no_grad():
        assert (model(ref["__input__"]) - expected).abs().max() <= 1e-4
    # the filter also unwraps the raw checkpoint dict itself
    mapped = linvision.models.vrwkv.checkpoint_filter_fn(_to_internimage(ref, head0), model)
    assert set(mapped) == set(model.state_dict())


def test_vrwkv_large_internimage_format(tmp_path):
    """vrwkv_large (shrunk to depth 2) through the InternImage names, incl. head.0/head.2, reproduces its logits."""
    torch.manual_seed(0)
    src = timm.create_model("vrwkv_large", img_size=64, depth=2, num_classes=11).eval()
    for p in src.parameters():  # move every parameter off its init so a swapped key changes the logits
        p.data.add_(0.05 * torch.randn_like(p))
    file = tmp_path / "vrwkv_l_22kto1k.pth"
    official = _to_internimage(_to_official_vrwkv(src.state_dict()))
    assert {"head.0.weight", "head.2.weight"} <= set(official["model"]) and "head.1.weight" not in official["model"]
    torch.save(official, file)
    dst = timm.create_model("vrwkv_large", pretrained=True, img_size=64, depth=2, num_classes=11,
                            pretrained_cfg_overlay=dict(file=str(file), num_classes=11)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_vrwkv_in_place_inference_equals_the_training_forward():
    """Without gradients the RWKV blocks run their elementwise ops in place (layers/rwkv.py): same logits, bit for
    bit, as the forward that keeps the graph (eval mode, so no dropout/drop path)."""
    torch.manual_seed(0)
    m = timm.create_model("vrwkv_tiny", num_classes=10, img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    assert y.requires_grad
    with torch.no_grad():
        assert torch.equal(m(x), y)
    with torch.inference_mode():
        assert torch.equal(m(x), y)
