"""Mixed-precision training steps on CUDA (run by scripts/gpu_check.sh): for ``vrwkv_tiny`` and ``vir_tiny``
(parallel and chunkwise retention), one SGD step under bf16 autocast and one under fp16 autocast with a
``torch.amp.GradScaler``, from the same weights and batch; checks the losses are finite and within 5 % of the
fp32 loss and that every gradient is finite. Prints one line per case and exits 1 if any case failed."""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

import linvision  # noqa: F401  (registers the models; must precede timm)
import timm

ok = True
x = torch.randn(4, 3, 224, 224, device="cuda")
y = torch.randint(0, 10, (4,), device="cuda")
for name, kw in (("vrwkv_tiny", {}), ("vir_tiny", {}), ("vir_tiny", {"mode": "chunkwise"})):
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=10, **kw).cuda().train()
    with torch.no_grad():
        ref = F.cross_entropy(base(x), y).item()
    for dtype in (torch.bfloat16, torch.float16):
        try:
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
            with torch.autocast("cuda", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            scaler.step(opt)
            scaler.update()
            good = torch.isfinite(loss).item() and not bad and abs(loss.item() - ref) <= 0.05 * abs(ref)
            print(f"{'OK  ' if good else 'FAIL'} {name}{kw or ''} {str(dtype)[6:]}: loss {loss.item():.4f} "
                  f"(fp32 {ref:.4f}), non-finite grads: {bad[:3]}, scale {scaler.get_scale()}", flush=True)
        except Exception as e:  # report and go on with the other cases
            good = False
            print(f"FAIL {name}{kw or ''} {str(dtype)[6:]}: {type(e).__name__}: {e}", flush=True)
        ok &= bool(good)
sys.exit(0 if ok else 1)
