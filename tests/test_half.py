"""Half precision as a tested guarantee on CPU: bf16 Bi-WKV forward and backward stay finite at the extreme inputs
of tests/test_biwkv.py (on both CPU paths), the models' bf16-autocast forward and backward stay finite, and a short
``linvision train --amp`` (bfloat16 autocast on CPU) run follows the fp32 run's losses. fp16 is a CUDA case
(tests/test_cuda.py, scripts/gpu_check.sh)."""
from __future__ import annotations

import csv

import pytest
import torch

import linvision  # noqa: F401  (registers the models; must precede timm)
import timm
from conftest import make_dataset, rel_rms
from linvision.cli import main
from linvision.ops import bi_wkv
from linvision.ops.biwkv import CPU_KERNEL_ENV, bi_wkv_ref
from test_biwkv import _extreme_inputs


@pytest.mark.parametrize("path", ["numba", "torch"])
@pytest.mark.parametrize("T", [2, 50, 700])
@pytest.mark.parametrize("u_per_token", [True, False], ids=["u_per_token", "u_raw"])
def test_bi_wkv_bf16_extreme_inputs_finite(monkeypatch, path, T, u_per_token):
    """k = ±80, w·T in [-10, 10], u = ±20 with k, v in bfloat16 (as under autocast; w, u stay fp32 parameters):
    output and every gradient finite and bf16; the output within bf16 rounding (2e-2 relative RMS) of the float64
    reference computed from the same rounded inputs."""
    monkeypatch.setenv(CPU_KERNEL_ENV, path)
    w, u, k, v = _extreme_inputs(T, u_per_token)
    k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (k, v))
    out = bi_wkv(w, u, k16, v16)
    grads = torch.autograd.grad(out, (w, u, k16, v16), torch.randn_like(out))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    for name, g in zip("wukv", grads):
        assert torch.isfinite(g.float()).all(), name
    ref = bi_wkv_ref(w.detach(), u.detach(), k16.detach().float(), v16.detach().float())
    assert rel_rms(out.float(), ref.float()) < 2e-2


@pytest.mark.parametrize("name, kw", [("test_vrwkv", {}), ("test_vrwkv6", {}), ("test_vir", {"mode": "chunkwise"}),
                                      ("test_vir", {"mode": "parallel"}), ("test_resnas", {}), ("test_vir2d", {})])
def test_models_bf16_autocast_forward_backward_finite(name, kw):
    """Large inputs (×30 a normalised image) through bf16 autocast: logits and every parameter gradient finite,
    logits within bf16 rounding of the fp32 ones on a normal input."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kw)
    size = model.pretrained_cfg.get("input_size", (3, 64, 64))[1:]
    x = torch.randn(2, 3, *size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loud = model(x * 30)
    loud.float().square().mean().backward()
    assert torch.isfinite(loud.float()).all()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert rel_rms(low.float(), ref) < 5e-2


@pytest.mark.parametrize("T, chunk", [(128, 64), (200, 64), (33, 7), (1, 64)])
def test_retention_chunkwise_fp32_inputs_under_bf16_autocast(T, chunk):
    """The op called directly with float32 q, k, v (and initial state) under bf16 autocast — its products run in
    bf16, its elementwise products in fp32, and the cross-chunk term is accumulated into the intra-chunk product
    in place: it runs (whole and padded chunks, one token), output in v's dtype, output, final state and the
    gradients finite and within bf16 rounding of the fp32 call."""
    from linvision.ops import retention_chunkwise
    from linvision.ops.retention import decay_gammas

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, T, 3, 16, generator=g).requires_grad_() for _ in range(3))
    s0 = torch.randn(2, 3, 16, 16, generator=g)
    gamma = decay_gammas(3)
    ref, ref_s = retention_chunkwise(q, k, v, gamma, initial_state=s0, output_final_state=True, chunk_size=chunk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = retention_chunkwise(q, k, v, gamma, initial_state=s0, output_final_state=True,
                                         chunk_size=chunk)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out.sum() + state.float().sum(), (q, k, v))
    assert all(torch.isfinite(t.float()).all() for t in (out, state, *grads))
    assert rel_rms(out.float(), ref) < 5e-2 and rel_rms(state.float(), ref_s) < 5e-2


def _losses(run):
    with open(run / "metrics.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("model", ["test_vrwkv", "test_vir"])
def test_bf16_autocast_training_follows_fp32(tmp_path, model):
    """``linvision train --amp`` on CPU (bfloat16 autocast) for 3 epochs of 8 steps: every epoch's training loss
    within 2 % (relative) of the same run in fp32 — the stated tolerance for bf16 training here (bf16 keeps 8
    bits of mantissa, ~0.4 % per rounding, and the runs drift apart through the updates). Measured on this
    machine: at most 0.11 % (test_vrwkv) and 0.19 % (test_vir)."""
    data = make_dataset(tmp_path / "ds", classes=("blue", "red", "green"), n_train=24, n_test=3)
    common = ["train", "--model", model, "--img-size", "32", "--patch-size", "8", "--epochs", "3",
              "--batch-size", "8", "--val-split", "0", "--threads", "1", "--workers", "0", "--no-ema",
              "--data", str(data)]
    assert main([*common, "--output", str(tmp_path / "fp32")]) == 0
    assert main([*common, "--amp", "--output", str(tmp_path / "bf16")]) == 0
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == 3
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.02 * abs(a), (fp32, bf16)
