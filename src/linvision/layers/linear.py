"""``nn.Linear`` whose large CPU inference products use a weight packed once for oneDNN.

At high resolution the matrix products are most of a model's CPU time (``vrwkv_tiny`` at 1024²: ``aten::mm``
~65 % of a forward, README "Compiled CPU kernels"). ``F.linear`` re-lays out the weight at every call; oneDNN's
packed-weight linear (``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, what torch's inductor
uses for frozen CPU graphs) lays it out once. Measured on this project's 2-core machine kind (fp32, 2 threads,
medians of 5 interleaved rounds, ms per call, ``F.linear`` → packed): 4,096 rows 192→192 3.1 → 2.5, 192→576
8.1 → 7.2, 192→768 11.5 → 9.8, 768→192 11.4 → 8.9; 16,384 rows 13.6 → 10.6, 55.8 → 50.0, 71.0 → 58.6,
45.6 → 34.0. Over few rows it is not faster (196 rows: 0.77–1.13×; 2,048 rows: 0.95–1.07×), so it is taken
only from :data:`PACKED_MIN_ROWS` rows on.

That was an AMD EPYC (AVX2). On an Intel Xeon VM (AVX-512, AMX; same four shapes, 2 threads, packed and
``F.linear`` alternating per call, paired-ratio medians of 25 pairs, packed ÷ ``F.linear``, two runs) it depends on
the bias. Without one (``F.linear`` → MKL's ``mm``): 4,096 rows 1.10/1.10, 1.11/1.13, 1.08/1.07, 0.95/0.99;
16,384 rows 1.05/1.06, 1.03/1.03, 0.78/0.73, 0.97/0.98. With one (``F.linear`` → ``addmm``, which first copies
the bias into every output row; the packed op adds it in its epilogue): 4,096 rows 1.05/1.02, 0.93/1.02,
0.98/0.97, 0.93/0.98; 16,384 rows 0.94/0.89, 0.98/0.98, 0.96/0.96, 0.92/0.95. Whole models at 1024² (forwards
alternating, 25 pairs; the same code on both sides reads 1.01–1.03): ``vrwkv_tiny`` (no bias in its blocks)
1.02–1.10 in seven A/Bs, ``vir_tiny`` chunkwise (biases everywhere) 0.90–1.11 in six (median 0.99). So by
default (:func:`packed_mode`, ``auto``) the packed path serves every PackedLinear on AMD CPUs, only those with a
bias on Intel ones, and none where the vendor is unknown (not measured); the environment variable
``LINVISION_PACKED_LINEAR`` (``auto`` | ``all`` | ``biased`` | ``off``, read at import) overrides.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PackedLinear", "PACKED_MIN_ROWS", "PACKED_ENV", "PACKED_MODES", "packed_available", "packed_mode",
           "set_packed_mode", "packed_mode_scope", "cpu_vendor", "use_packed_linears_"]

#: fewest rows (``x.numel() // in_features``, e.g. ``B * T``) for which the packed product is used: about the
#: crossover measured above. Also the row count the weight is packed for (oneDNN's blocking hint).
PACKED_MIN_ROWS = 2048


def packed_available() -> bool:
    """True when this torch build has oneDNN and its packed-weight linear ops."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


#: environment variable choosing which PackedLinears take the packed path (:func:`packed_mode`)
PACKED_ENV = "LINVISION_PACKED_LINEAR"
PACKED_MODES = ("auto", "all", "biased", "off")
#: the ``auto`` mode by CPU vendor (``vendor_id`` of ``/proc/cpuinfo``), as measured (module docstring)
_AUTO_BY_VENDOR = {"AuthenticAMD": "all", "GenuineIntel": "biased"}


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The CPU vendor string (e.g. ``"AuthenticAMD"``, ``"GenuineIntel"``) from the ``vendor_id`` line of
    ``cpuinfo``, or None where there is no such file or line (not Linux, not x86)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip() or None
    except OSError:
        pass
    return None


def packed_mode(choice: Optional[str] = None, vendor: Optional[str] = None) -> str:
    """Which :class:`PackedLinear` s take the packed path in this process: ``"all"``, ``"biased"`` (those with a
    bias) or ``"off"``.

    Args:
        choice: one of :data:`PACKED_MODES`; ``"auto"``: by the CPU vendor where measured (AMD ``"all"``, Intel
            ``"biased"``), else ``"off"``. None reads the environment variable ``LINVISION_PACKED_LINEAR`` (unset
            or empty: ``auto``). Always ``"off"`` when this torch build lacks the packed ops.
        vendor: the CPU vendor string; None reads it (:func:`cpu_vendor`).

    Raises:
        ValueError: ``choice`` (or the environment variable) is not one of :data:`PACKED_MODES`.
    """
    name = "choice" if choice is not None else f"environment variable {PACKED_ENV}"
    if choice is None:
        choice = os.environ.get(PACKED_ENV, "")
    choice = choice.strip().lower() or "auto"
    if choice not in PACKED_MODES:
        raise ValueError(f"PackedLinear: {name} must be one of {PACKED_MODES}, got {choice!r}")
    if not packed_available():
        return "off"
    if choice == "auto":
        return _AUTO_BY_VENDOR.get(vendor if vendor is not None else cpu_vendor(), "off")
    return choice


def set_packed_mode(mode: Optional[str]) -> None:
    """Set which PackedLinears take the packed path from now on in this process: ``mode`` as ``choice`` of
    :func:`packed_mode` (None: the environment variable, as at import). Raises ValueError as it does."""
    global _ALL, _BIASED
    mode = packed_mode(mode)
    _ALL, _BIASED = mode == "all", mode != "off"


@contextlib.contextmanager
def packed_mode_scope(mode: Optional[str]) -> Iterator[None]:
    """``with packed_mode_scope(mode):`` :func:`set_packed_mode` for the block, then the mode before it again
    (e.g. to time or test one mode whatever this CPU's default)."""
    global _ALL, _BIASED
    saved = _ALL, _BIASED
    set_packed_mode(mode)
    try:
        yield
    finally:
        _ALL, _BIASED = saved


_ALL = _BIASED = False  # packed products for every PackedLinear / for those with a bias (set just below)
set_packed_mode(None)


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _plain_eager(x: torch.Tensor) -> bool:
    """No tracing, compiling, exporting, autocast, ``torch.func`` transform (vmap: the oneDNN op has no batching
    rule) or ``__torch_function__`` / dispatch mode (e.g. FlopCounterMode, which would not count the oneDNN call)
    is active on ``x``."""
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.is_autocast_enabled("cpu") or torch._C._len_torch_function_stack()
                or torch._C._len_torch_dispatch_stack() or _is_functorch_wrapped(x))


class PackedLinear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and results up to float rounding) that, without gradients, on
    CPU float32 tensors and from :data:`PACKED_MIN_ROWS` rows on, multiplies by a oneDNN-packed copy of its
    weight — where that path is on (:func:`packed_mode`: by default for every PackedLinear on AMD CPUs, for those
    with a bias on Intel ones).

    The packed copy is made on first use and again whenever the weight changes (an in-place update, e.g. an
    optimizer step or ``load_state_dict``, or new storage, e.g. ``.to()``); it is not part of the state dict.
    Everything else (training, autograd, other dtypes/devices, fewer rows, ``torch.export``/``torch.compile``/
    ``torch.jit``, ``torch.func`` transforms, autocast, dispatch modes such as ``FlopCounterMode``, torch builds
    without oneDNN, the path off) runs ``F.linear``. Input ``[..., in_features]`` → ``[..., out_features]``,
    float32 on the packed path. The packed copy costs one more weight's memory (22 MiB for ``vrwkv_tiny``, 20 MiB
    for ``vir_tiny``) from the first large inference that takes it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # the row count first: small inputs (224² images) pay one comparison
        if (x.numel() >= PACKED_MIN_ROWS * self.in_features and (_ALL or (_BIASED and self.bias is not None))
                and not torch.is_grad_enabled()
                and type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32
                and w.dtype == torch.float32 and w.device.type == "cpu" and _plain_eager(x)):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
        return F.linear(x, w, self.bias)

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        cache = self.__dict__.get("_packed")
        # the cache holds the packed tensor's source (so its storage cannot be reused by another tensor) and
        # the weight's version at packing time
        if (cache is None or cache[0].data_ptr() != w.data_ptr() or cache[0].shape != w.shape
                or cache[1] != w._version):
            src = w.detach()
            packed = torch.ops.mkldnn._reorder_linear_weight(src, PACKED_MIN_ROWS)
            self.__dict__["_packed"] = cache = (src, w._version, packed)
        return cache[2]

    def __getstate__(self):  # copies and pickles leave the cache behind
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def use_packed_linears_(modules: Iterable[nn.Module]) -> None:
    """Make every plain ``nn.Linear`` inside ``modules`` a :class:`PackedLinear` in place (same parameters and
    state-dict keys), e.g. the two layers of a timm ``Mlp``."""
    for module in modules:
        for m in module.modules():
            if type(m) is nn.Linear:
                m.__class__ = PackedLinear
