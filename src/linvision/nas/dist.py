"""Minimal torchrun support for the NAS commands: process group, device, sharding helpers.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init` starts the default process group (NCCL on GPUs, else Gloo);
without it everything runs in one process and the helpers are no-ops.
"""
from __future__ import annotations

import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist

__all__ = ["init", "world", "rank", "is_main", "device", "all_gather_objects", "barrier", "broadcast_object"]


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init() -> Tuple[int, int]:
    """Start the process group if launched by torchrun with several processes; returns ``(rank, world)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        dist.init_process_group(backend)
    return rank(), world()


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (in rank order); ``[obj]`` without a process group."""
    if world() == 1:
        return [obj]
    out: List[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    if world() > 1:
        dist.barrier()
