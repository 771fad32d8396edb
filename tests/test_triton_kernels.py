"""The Triton kernels (Bi-WKV, chunkwise retention) without a GPU: ``TRITON_INTERPRET=1`` runs them on CPU tensors.

All cases run in one subprocess (tests/triton_interpret_cases.py), which sets nothing in this process: the
interpreter flag must be set before the kernel modules are imported and must not leak into other tests. Each case
compares outputs, final states and every gradient with the float64 references (relative RMS error). Skipped,
with the reason, when Triton is not installed. Plus: CPU calls never import Triton or the kernel modules.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install linvision[triton])")

# tolerance per case: fp32 kernels ~1e-7 – 1e-6 (the CPU op's 1e-5 bound); bf16 inputs: bf16 rounding (~4e-3)
TOL = {"wkv_bf16": 2e-2, "ret_bf16": 2e-2, "qshift_bf16": 2e-2}
CASES = ["wkv_T1", "wkv_T37_C13_L8", "wkv_T11_C40_L4", "wkv_bf16", "wkv_extreme_u_raw", "wkv_extreme_u_per_token",
         "ret_T37_K8_V12_state", "ret_T32_B2", "ret_T5_K3_V5", "ret_bf16", "qshift_B2_3x5_C13", "qshift_4x6_C70_s2",
         "qshift_bf16", "qshift_2x2_C4", "qshift_op"]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install linvision[triton])")
    proc = subprocess.run([sys.executable, str(HERE / "triton_interpret_cases.py")], capture_output=True, text=True,
                          env=_env(TRITON_INTERPRET="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_matches_reference(interpreted, case):
    """Output, final state and every gradient within the tolerance, all finite (-1 marks a non-finite tensor),
    each in its input's dtype."""
    res = interpreted[case]
    assert "error" not in res, res.get("error")
    tol = TOL.get(case, 1e-5)
    assert res.pop("dtypes_ok") == 1.0
    assert len(res) >= (3 if case.startswith("qshift") else 4)  # out + the gradients (+ final state)
    for name, err in res.items():
        assert 0 <= err < tol, (case, name, err)


def test_cpu_ops_do_not_import_triton():
    """bi_wkv and retention_chunkwise on CPU tensors never import the Triton kernel modules (which import Triton at
    their top; torch's own machinery may import Triton on its own, which is not ours to test)."""
    code = ("import sys, torch\n"
            "from linvision.ops import bi_wkv, retention_chunkwise, decay_gammas\n"
            "x = torch.randn(1, 9, 2, 4)\n"
            "bi_wkv(torch.zeros(4), torch.zeros(4), torch.randn(1, 9, 4), torch.randn(1, 9, 4))\n"
            "retention_chunkwise(x, x, x, decay_gammas(2), chunk_size=4)\n"
            "bad = [m for m in ('linvision.ops.biwkv_triton', 'linvision.ops.retention_triton') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
