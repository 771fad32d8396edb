"""2D retention (ops, layer, vir2d models) and streaming inference (sources, equality, constant memory)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import linvision  # noqa: F401  (registers models; must precede timm)
import timm
from conftest import rel_rms
from linvision.memory import peak_tensor_bytes
from linvision.ops import decay_gammas
from linvision.ops.retention2d import retention2d_parallel, retention2d_recurrent, retention2d_ref
from linvision.stream import (NpySource, PILSource, StripSource, can_stream, forward_stream, interpolation_matrix,
                              open_row_source)


def _inputs(B, R, W, H, K, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, R * W, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, R * W, H, V, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, W, K, V, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, s0)]


FORMS2D = {"parallel": retention2d_parallel, "recurrent": retention2d_recurrent}


# ------------------------------------------------------------------------------------------------ 2D retention ops
@pytest.mark.parametrize("form", list(FORMS2D))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R,W,H", [(1, 1, 1), (2, 1, 3), (1, 7, 3), (3, 5, 12), (4, 37, 3), (2, 40, 1), (7, 14, 3)])
def test_retention2d_forms_match_reference(form, dtype, R, W, H):
    """Outputs, final state and gradients of q, k, v and the initial state against retention2d_ref; widths that
    are and are not multiples of the 16-column blocks of the row prefix sum."""
    gamma = decay_gammas(H)
    q, k, v, s0 = _inputs(2, R, W, H, 8, 6, dtype)
    o, S = FORMS2D[form](q, k, v, gamma, W, initial_state=s0, output_final_state=True)
    o_ref, S_ref = retention2d_ref(q, k, v, gamma, W, initial_state=s0, output_final_state=True)
    assert o.dtype == dtype and S.dtype == dtype and S.shape == (2, H, W, 8, 6)
    assert rel_rms(o, o_ref) < 1e-5 and rel_rms(S, S_ref) < 1e-5
    go, gS = torch.randn_like(o), torch.randn_like(S)
    ins = (q, k, v, s0)
    g_fast = torch.autograd.grad((o * go).sum() + (S * gS).sum(), ins)
    g_ref = torch.autograd.grad((o_ref * go).sum() + (S_ref * gS.double()).sum(), ins)
    for name, a, b in zip(["q", "k", "v", "initial_state"], g_fast, g_ref):
        assert rel_rms(a, b) < 1e-5, name


def test_retention2d_reference_is_the_four_term_recurrence():
    """retention2d_ref equals S[r,c] = γS[r-1,c] + γS[r,c-1] - γ²S[r-1,c-1] + k[r,c]ᵀv[r,c], o = q S, with the
    state of the row above carried in as S[-1, ·] — the algebra of the issue, checked by loops in float64."""
    B, R, W, H, K, V = 1, 4, 6, 2, 3, 2
    gamma = torch.tensor([0.9, 0.6], dtype=torch.float64)
    q, k, v, s0 = (t.detach() for t in _inputs(B, R, W, H, K, V, torch.float64))
    o_ref, S_ref = retention2d_ref(q, k, v, gamma, W, scale=1.0, initial_state=s0, output_final_state=True)
    g = gamma[None, :, None, None]
    S = {(-1, c): s0[:, :, c] for c in range(W)}
    zero = torch.zeros(B, H, K, V, dtype=torch.float64)
    for r in range(R):
        for c in range(W):
            n = r * W + c
            S[r, c] = (g * S[r - 1, c] + g * S.get((r, c - 1), zero) - g ** 2 * S.get((r - 1, c - 1), zero)
                       + k[:, n, :, :, None] * v[:, n, :, None, :])
            torch.testing.assert_close(o_ref[:, n], torch.einsum("bhk,bhkv->bhv", q[:, n], S[r, c]))
    torch.testing.assert_close(S_ref, torch.stack([S[R - 1, c] for c in range(W)], dim=2))


def test_retention2d_rows_in_pieces():
    """Rows fed in two pieces with the state carried over equal the whole grid (what streaming relies on)."""
    gamma = decay_gammas(3)
    q, k, v, _ = (t.detach() for t in _inputs(2, 9, 11, 3, 8, 8, torch.float32))
    o, S = retention2d_parallel(q, k, v, gamma, 11, output_final_state=True)
    cut = 4 * 11
    o1, S1 = retention2d_recurrent(q[:, :cut], k[:, :cut], v[:, :cut], gamma, 11, output_final_state=True)
    o2, S2 = retention2d_parallel(q[:, cut:], k[:, cut:], v[:, cut:], gamma, 11, initial_state=S1,
                                  output_final_state=True)
    assert rel_rms(torch.cat([o1, o2], 1), o) < 1e-5 and rel_rms(S2, S) < 1e-5


def test_retention2d_decay_has_no_denormals():
    """The parallel form's row/column decays: powers below e^-60 are exactly 0 (denormal floats make CPU kernels
    many times slower), the rest exact γ^(i-j)."""
    from linvision.ops.retention2d import _decay
    gamma = torch.tensor([0.5, 1 - 2 ** -5])
    D = _decay(gamma, 200, torch.float32)
    assert not ((D > 0) & (D < torch.finfo(torch.float32).tiny)).any() and D[0, 199, 0] == 0
    assert D[0, 10, 3] == 0.5 ** 7 and D[1, 3, 10] == 0 and D[1, 199, 0] > 0


def test_retention2d_shape_errors():
    q = torch.randn(1, 10, 2, 4)
    with pytest.raises(ValueError, match="not whole rows"):
        retention2d_parallel(q, q, q, decay_gammas(2), 3)
    with pytest.raises(ValueError, match="initial_state"):
        retention2d_recurrent(q, q, q, decay_gammas(2), 5, initial_state=torch.zeros(1, 2, 4, 4, 4))


# ------------------------------------------------------------------------------------------------ vir2d models
def _perturbed(name, **kw):
    """A model whose layer scales and weights are far from init, so retention moves the logits."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for blk in model.blocks:
            blk.ls1.gamma.fill_(0.5)
            blk.ls2.gamma.fill_(0.5)
    return model


def test_vir2d_modes_give_the_same_logits():
    model = _perturbed("vir2d_tiny")
    x = torch.randn(1, 3, 224, 160)  # 14 x 10 patches
    with torch.no_grad():
        ref = model(x)
        assert (model(x, mode="recurrent") - ref).abs().max() <= 1e-4
        assert model.forward_features(x).shape == (1, 140, 192)  # no class token
    with pytest.raises(ValueError, match="2D retention mode"):
        model(x, mode="chunkwise")


def test_vir2d_is_not_1d_retention():
    """Same weights, 1D vs 2D decay: different outputs (the 2D mask really is used), except on the first row where
    both decays are γ^Δcol."""
    from linvision.layers.retention import MultiScaleRetention, MultiScaleRetention2D
    torch.manual_seed(0)
    l2, l1 = MultiScaleRetention2D(32, 2), MultiScaleRetention(32, 2)
    l1.load_state_dict(l2.state_dict())
    x = torch.randn(1, 6 * 5, 32)
    with torch.no_grad():
        o2, o1 = l2(x, width=5)[0], l1(x)[0]
    assert rel_rms(o2, o1) > 0.1
    torch.testing.assert_close(o2[:, :5], o1[:, :5])


def test_vir2d_trains():
    model = timm.create_model("test_vir2d", num_classes=3)
    x, y = torch.randn(4, 3, 64, 48), torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ streaming
def test_interpolation_matrix_is_the_bicubic_resize():
    from linvision.models._common import resize_pos_embed_2d
    P = torch.randn(1, 4 * 5, 8)
    Mh, Mw = interpolation_matrix(4, 9), interpolation_matrix(5, 3)
    ours = torch.einsum("ri,cj,ijd->rcd", Mh, Mw, P.view(4, 5, 8)).reshape(1, 27, 8)
    torch.testing.assert_close(ours, resize_pos_embed_2d(P, (4, 5), (9, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(interpolation_matrix(6, 6), torch.eye(6))


def _normalize(model, img: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    return (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - mean) / std


@pytest.mark.parametrize("name,mode,kw", [("test_vir", "chunkwise", dict(chunk_size=5)),
                                          ("test_vir", "chunkwise", dict(global_pool="avg")),
                                          ("test_vir2d", "recurrent", {}),
                                          ("vir_tiny", "chunkwise", {})])
def test_stream_equals_whole_image(name, mode, kw, tmp_path):
    """linvision.stream.forward_stream from every kind of source equals the whole-image forward (the pos-embed
    resized for a grid of 10 x 7 patches, sides not divisible by the patch zero-padded)."""
    model = _perturbed(name, **kw)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (150, 97, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = model(_normalize(model, img), mode=mode)
    np.save(tmp_path / "img.npy", img)
    Image.fromarray(img).save(tmp_path / "img.ppm")
    sources = {"array": img, "tensor": _normalize(model, img), "npy": str(tmp_path / "img.npy"),
               "ppm": str(tmp_path / "img.ppm"),
               "strips": StripSource((img[i:i + 7] for i in range(0, 150, 7)), height=150)}
    for kind, src in sources.items():
        out = forward_stream(model, src)
        assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4, kind


@pytest.mark.parametrize("fmt,streamed", [("ppm", True), ("bmp", True), ("tiff", True), ("png", False)])
def test_pil_source_reads_strips_of_uncompressed_files(fmt, streamed, tmp_path, caplog):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (45, 31, 3), dtype=np.uint8)
    path = tmp_path / f"img.{fmt}"
    Image.fromarray(img).save(path)
    log = logging.getLogger("linvision")  # the CLI stops it propagating to the root logger caplog listens on
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="linvision"):
            src = PILSource(path)
    finally:
        log.removeHandler(caplog.handler)
    assert (src.tiles is not None) == streamed
    assert ("decoding it whole" in caplog.text) == (not streamed)
    got = np.concatenate([src.read_rows(r, min(45, r + 8)) for r in range(0, 45, 8)])
    np.testing.assert_array_equal(got, img)


def test_pil_source_converts_grayscale_and_16bit(tmp_path):
    g8 = np.arange(20 * 9, dtype=np.uint8).reshape(20, 9)
    Image.fromarray(g8).save(tmp_path / "g.pgm")
    got = PILSource(tmp_path / "g.pgm").read_rows(3, 11)
    np.testing.assert_array_equal(got, np.repeat(g8[3:11, :, None], 3, axis=2))
    g16 = (np.arange(20 * 9, dtype=np.uint16).reshape(20, 9) * 300)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    got = PILSource(tmp_path / "g16.png").read_rows(0, 20)
    assert got.shape == (20, 9, 3) and got.dtype == np.uint8 and got.max() > 200


def test_stream_sources_errors(tmp_path):
    from linvision.errors import LinvisionError
    with pytest.raises(LinvisionError, match="image not found"):
        open_row_source(str(tmp_path / "missing.png"))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(LinvisionError, match="bad.npy"):
        NpySource(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="height"):
        open_row_source(iter([np.zeros((4, 4, 3), np.uint8)]))
    with pytest.raises(ValueError, match="ended before"):
        forward_stream(timm.create_model("test_vir"), iter([np.zeros((16, 64, 3), np.uint8)]), height=64)



def test_stream_rejects_models_that_cannot_stream():
    """forward_stream takes ViR / ViR-2D only, and needs a pooled head it can accumulate row by row."""
    img = np.zeros((32, 32, 3), np.uint8)
    rwkv = timm.create_model("test_vrwkv")
    assert not can_stream(rwkv) and can_stream(timm.create_model("test_vir2d"))
    with pytest.raises(TypeError, match="VisionRWKV cannot stream"):
        forward_stream(rwkv, img)
    with pytest.raises(ValueError, match="global_pool"):
        forward_stream(timm.create_model("test_vir", global_pool=""), img)


def test_model_files_import_no_io_module():
    """One room per concern: linvision/models/*.py import no I/O module (PIL, NumPy, file formats, linvision's
    stream/data/checkpoint); streaming lives in linvision.stream, which imports the models, not the reverse."""
    import ast
    from pathlib import Path
    io_modules = ("PIL", "numpy", "safetensors", "linvision.stream", "linvision.data", "linvision.checkpoint",
                  "linvision.bench", "linvision.plots", "matplotlib")
    files = sorted((Path(linvision.__file__).parent / "models").glob("*.py"))
    assert len(files) >= 4
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(["linvision", "models"][:3 - node.level] if node.level else [])
                mod = ".".join(filter(None, [base, node.module or ""]))
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            bad = [n for n in names if any(n == m or n.startswith(m + ".") for m in io_modules)]
            assert not bad, f"{f.name}:{node.lineno} imports {bad}"


def _random_strips(H: int, W: int, rows: int = 16):
    rng = np.random.default_rng(0)
    for r in range(0, H, rows):
        yield rng.integers(0, 256, (min(rows, H - r), W, 3), dtype=np.uint8)


def test_stream_memory_is_constant_in_image_size():
    """Complexity, not timing: peak tensor memory (every tensor any operator creates, counted exactly by
    linvision.memory) of vir_tiny streaming a 2048² image is within 1.2x of a 512² image, while the whole-image
    chunkwise forward grows with the image (the same tool sees the difference)."""
    model = timm.create_model("vir_tiny").eval()
    stream = {s: peak_tensor_bytes(lambda: forward_stream(model, _random_strips(s, s), height=s)) for s in (512, 2048)}
    assert stream[2048] <= 1.2 * stream[512], stream
    with torch.no_grad():
        whole = {s: peak_tensor_bytes(lambda: model(torch.randn(1, 3, s, s), mode="chunkwise")) for s in (256, 512)}
    assert whole[512] >= 2 * whole[256], whole  # 4x the tokens (plus constant weights-sized buffers)
    assert stream[512] < whole[512]


def test_stream_2d_memory_is_constant_in_height():
    """2D retention keeps one state per column: its streaming memory does not grow with the number of rows."""
    model = timm.create_model("vir2d_tiny").eval()
    peak = {h: peak_tensor_bytes(lambda: forward_stream(model, _random_strips(h, 256), height=h)) for h in (256, 1024)}
    assert peak[1024] <= 1.1 * peak[256], peak


def test_cli_predict_stream(tmp_path, tiny_data, capsys):
    """`linvision predict --stream` classifies images at native size (PPM read by strips, PNG decoded once) and
    equals forward_stream on the same pixels; a model that cannot stream is a one-line error."""
    import json

    from linvision.checkpoint import load_model
    from linvision.cli import main
    fast = ["--img-size", "32", "--patch-size", "8", "--data", str(tiny_data), "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--threads", "1", "--max-steps", "1"]
    assert main(["train", "--model", "test_vir", "--output", str(tmp_path / "vir"), *fast]) == 0
    img = np.random.default_rng(0).integers(0, 256, (150, 203, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "big.ppm")
    Image.fromarray(img).save(tmp_path / "big.png")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path / "vir"), "--stream", "--json", "--top-k", "2",
                 str(tmp_path / "big.ppm"), str(tmp_path / "big.png")]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)["results"]
    assert "streamed" in cap.err and "peak RSS" in cap.err
    assert [r["size"] for r in res] == [[203, 150], [203, 150]] and res[0]["tokens"] == 19 * 26
    model, config = load_model(tmp_path / "vir")
    dc = config["data_config"]
    probs = forward_stream(model, img, mean=dc["mean"], std=dc["std"]).softmax(1)[0]
    for r in res:
        assert r["predictions"][0]["index"] == int(probs.argmax())
        assert abs(r["predictions"][0]["prob"] - float(probs.max())) < 1e-5
    assert main(["train", "--model", "test_vrwkv", "--output", str(tmp_path / "rwkv"), *fast]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path / "rwkv"), "--stream", str(tmp_path / "big.ppm")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("linvision: error:") and "cannot stream" in err and len(err.splitlines()) == 1


def test_retention_factor_cache_survives_inference_mode():
    """Decay factors cached during an inference_mode forward can be reused by a training forward."""
    model = timm.create_model("test_vir")
    x = torch.randn(1, 3, 48, 48)  # a token count no other test uses, so the cache entry is made here
    with torch.inference_mode():
        model(x)
    model(x).sum().backward()
    assert model.blocks[0].retention.qkv.weight.grad is not None
