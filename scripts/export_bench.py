"""onnxruntime (CPU) vs eager PyTorch inference, and ONNX parity, for ``vrwkv_tiny`` and ``vir_tiny`` at 224² and
1024² (random weights). Wall-clock numbers: run on a quiet machine, not under the test suite.

    PYTHONPATH=src python scripts/export_bench.py                       # timing rows (markdown) + JSON lines
    PYTHONPATH=src python scripts/export_bench.py --parity              # instead: one --dynamic export at 224²
                                                                        #   checked by onnxruntime at 224², 1024²
    PYTHONPATH=src python scripts/export_bench.py --models vir_tiny --sizes 224 --threads 2

The timing is :func:`linvision.export.onnx_vs_eager_timing` (meant to be wired into ``linvision bench``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import linvision  # noqa: F401  (registers the models; before timm)
import timm
from linvision.export import export_onnx, export_program, onnx_parity, onnx_vs_eager_timing


def parity(name: str) -> list:
    torch.manual_seed(0)
    model = timm.create_model(name, init_values=1.0).eval()  # layer scale 1: every mixer matters to the logits
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(export_program(model, (224, 224), dynamic=True), Path(d) / "m.onnx")
        return onnx_parity(model, path, [(2, 224, 224), (1, 1024, 1024)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vrwkv_tiny", "vir_tiny"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 1024])
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parity", action="store_true", help="parity of a dynamic export instead of timing")
    a = ap.parse_args()
    if a.parity:
        for name in a.models:
            print(json.dumps({"model": name, "parity": parity(name)}), flush=True)
        return
    print("| model | size | backend | ms/img | img/s |\n|---|---|---|---|---|")
    for name in a.models:
        for s in a.sizes:
            for r in onnx_vs_eager_timing(name, s, repeats=a.repeats, threads=a.threads):
                print(f"| {r['model']} | {s}² | {r['backend']} | {r['ms']:.1f} | {r['img_per_s']:.2f} |", flush=True)
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
