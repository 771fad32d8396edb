"""Peak tensor memory of a computation, counted exactly on any device (CPU included).

:class:`TensorMemoryTracker` is a ``TorchDispatchMode``: every tensor an operator returns while it is active is
counted (by its storage, so views are free) until the last tensor using that storage is freed. Its ``peak_bytes``
is the largest total of such live storages — the activation memory of the code run under it, independent of the
allocator's caching, of the OS and of whatever else the process holds. Use it for complexity tests ("memory grows
linearly in T") where RSS is too coarse; it slows each operator down, so do not time code under it.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemoryTracker", "peak_tensor_bytes"]


class TensorMemoryTracker(TorchDispatchMode):
    """Counts live bytes of storages created by operators while active; ``peak_bytes``, ``current_bytes`` (int,
    bytes). Tensors that existed before entering (weights, inputs) are not counted."""

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._refs: Dict[int, int] = {}
        self._size: Dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.current_bytes -= self._size.pop(key)
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key == 0:
                    continue
                if key not in self._refs:
                    self._refs[key], self._size[key] = 0, st.nbytes()
                    self.current_bytes += st.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.current_bytes)
                self._refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors created while running ``fn()`` and alive at the same time (see module docstring)."""
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak_bytes
