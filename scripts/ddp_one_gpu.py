"""Data-parallel smoke test on a machine with ONE GPU (run by scripts/gpu_check.sh).

Usage: ``torchrun --nproc_per_node N scripts/ddp_one_gpu.py BACKEND [linvision CLI args...]``

``linvision train`` under torchrun puts rank r on ``cuda:LOCAL_RANK`` and refuses more ranks than GPUs. This
wrapper instead puts every rank on ``cuda:0``, joins the process group itself with BACKEND (``nccl`` or
``gloo``), checks one all-reduce of a CUDA tensor, and then runs ``linvision`` in-process, which reuses the
existing group (``linvision.distributed.init_distributed``), so DDP over CUDA tensors runs with N ranks. NCCL
usually refuses two ranks on one device; gloo (host-staged) accepts them.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

backend = sys.argv[1]
os.environ["LOCAL_RANK"] = "0"  # every rank on cuda:0
torch.cuda.set_device(0)
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.full((1,), float(rank + 1), device="cuda")
dist.all_reduce(t)
print(f"[ddp_one_gpu] rank {rank}/{world} backend {backend}: all_reduce on cuda = {t.item()} "
      f"(expected {world * (world + 1) / 2})", flush=True)
from linvision.cli import main  # noqa: E402

rc = main(sys.argv[2:]) if len(sys.argv) > 2 else 0
dist.barrier()
dist.destroy_process_group()
sys.exit(rc)
