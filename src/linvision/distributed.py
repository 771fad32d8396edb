"""Data-parallel training under ``torchrun``: process-group setup, rank-0 gating and cross-rank reductions.

``torchrun --nproc_per_node N -m linvision train ...`` starts N processes with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_distributed` reads them and joins the
process group with the ``nccl`` backend on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) or ``gloo`` on CPU. A
plain process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) gets a :class:`DistInfo` of rank 0 of 1 and no process group,
so every helper here is a no-op and single-process code paths stay exactly as they were.

The training loop built on these helpers (:func:`linvision.engine.loop.fit`, used by classification and the
super-network alike) wraps the model in ``torch.nn.parallel.DistributedDataParallel``, shards the data with a
distributed sampler, all-reduces its metrics and lets only rank 0 write files and logs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .errors import LinvisionError

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "all_reduce_sum", "all_gather_object",
           "broadcast_object", "barrier", "resolve_device"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node, its ``device``;
    ``owns_group`` is True if :func:`init_distributed` created the process group (and should destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes checkpoints, logs and plots."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``"auto"``/``None`` → ``cuda:LOCAL_RANK`` if CUDA is available, else ``cpu``; ``"cuda"`` →
    ``cuda:LOCAL_RANK``; anything else is passed to ``torch.device``.

    Raises:
        LinvisionError: CUDA asked for but not available, or an unknown device string.
    """
    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LinvisionError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LinvisionError(f"--device {device}: {e}") from None


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the ``torchrun`` process group if ``WORLD_SIZE`` > 1 (``nccl`` on CUDA, ``gloo`` on CPU) and return this
    process's :class:`DistInfo`. Reuses a process group that is already initialized (``owns_group`` False then).

    Raises:
        LinvisionError: ``WORLD_SIZE`` > 1 without ``RANK``/``LOCAL_RANK`` (not started by torchrun), or more
        processes on a node than GPUs when training on CUDA.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(device=resolve_device(device))
    if "RANK" not in os.environ and not dist.is_initialized():
        raise LinvisionError(f"WORLD_SIZE={world} but RANK is not set; start distributed runs with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LinvisionError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node; "
                                 "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                    owns_group=owns)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if ``info`` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(fn: Callable[[Any, DistInfo], Any], args: Any, device: str | None = None,
                    on_exit: Callable[[], Any] | None = None) -> Any:
    """``fn(args, info)`` inside :func:`init_distributed` / :func:`cleanup_distributed` (also on errors), with the
    ``linvision`` logger of every rank but rank 0 lowered to warnings, and ``on_exit()`` (e.g. releasing the run
    folder's lock) called before the process group goes — the frame of every training entry point
    (``linvision train``, ``supernet train``, ``segment train``)."""
    info = init_distributed(device)
    log = logging.getLogger("linvision")
    level = log.level
    if not info.is_main:
        log.setLevel(logging.WARNING)
    try:
        return fn(args, info)
    finally:
        log.setLevel(level)
        try:
            if on_exit is not None:
                on_exit()
        finally:
            cleanup_distributed(info)


def all_reduce_sum(values: Sequence[float] | torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``values`` element-wise over all ranks; returns a float64 CPU tensor (the values themselves with one
    process). Every rank must call it (it is a collective)."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1)
    if not info.distributed:
        return t.cpu()
    t = t.to(info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` with one process). A collective."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself with one process). A collective."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (no-op with one process)."""
    if info.distributed:
        dist.barrier()
