"""Export linvision models out of PyTorch: ``torch.export`` programs (``.pt2``) and ONNX files (the dynamo exporter,
``torch.onnx.export(..., dynamo=True)``), checked against eager PyTorch with onnxruntime.

The training forms of the token mixers are not all exportable as they stand: the Bi-WKV op
(``linvision::bi_wkv_fwd``) picks its chunking from T in Python, and ViR's chunkwise/recurrent forms loop over T in
Python. Inside :func:`export_mode` each is swapped for an equivalent pure-tensor form with no Python control flow
on T (so ``--dynamic`` exports one graph for any batch and image size); the default (training) path is untouched.

* **Bi-WKV** (Vision-RWKV, paper Eq. 5) → :func:`bi_wkv_cumsum`: the decayed prefix and suffix sums written as
  cumulative sums in float64, ``P_t = e^{-(t-1-c) w} Σ_{i<t} e^{(i-c) w} x_i`` (``c = (T-1)/2`` centres the
  exponents), the suffix likewise on the flipped sequence. O(T·C), ONNX ``CumSum``; matches :func:`bi_wkv_ref`
  to ~1e-12 relative for ``|w|·T ≲ 1400`` (the model passes ``w = spatial_decay / T``, so this is
  ``|spatial_decay| ≲ 1400``). The ``official_kernel`` variant has no export form (its chunking depends on T).
* **ViR retention** → :func:`retention_chunkwise_matmul`: the chunkwise form (RetNet Eq. 7) with the cross-chunk
  recurrence unrolled into one decayed ``[n, n]`` matmul over the chunk states (n = ⌈T / chunk⌉), no loop. The
  graph runs the blocks one after another over all tokens, which equals ViR's chunk-by-chunk-through-all-blocks
  evaluation (retention is causal and everything else is per token). Memory O(T·chunk + n²·d²).
* **VRWKV6's WKV6** → :func:`~linvision.ops.wkv6_loop_free`: the op's chunked form with the cross-chunk state
  recurrence as a fixed-depth doubling scan instead of a loop over chunks.
* **ViR-2D** → its parallel form (already pure tensors; O(T²) memory). **ViT-ResNAS** needs nothing.

Substitutions live in :data:`EXPORT_FORMS`, keyed by the function a module calls (``bi_wkv``,
``retention_chunkwise``, …); a new family registers its op's form with :func:`register_export_form`. After
tracing, a graph that still holds a ``linvision::`` custom op is refused in one line.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LinvisionError
from .ops.biwkv import bi_wkv
from .ops.retention import retention_chunkwise, retention_chunkwise_batched, retention_recurrent
from .ops.wkv6 import wkv6, wkv6_loop_free

__all__ = ["bi_wkv_cumsum", "retention_chunkwise_matmul", "EXPORT_FORMS", "register_export_form", "export_mode",
           "export_program", "export_onnx", "export_checkpoint", "onnx_parity", "onnx_vs_eager_timing", "FORMATS",
           "PARITY_TOL"]

FORMATS = ("onnx", "pt2")
PARITY_TOL = 1e-4  # max abs logit difference accepted between the exported file and eager PyTorch


# ------------------------------------------------------------------------------------------- pure-tensor forms
def bi_wkv_cumsum(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV (Vision-RWKV, arXiv 2403.02308, Eq. 5) as cumulative sums in float64: export form of
    :func:`linvision.ops.bi_wkv` (same contract as :func:`~linvision.ops.bi_wkv_ref`).

    With ``a_i = e^{k_i - max k}`` and the signals ``x = [a v ; a]``: ``wkv_t = (P_t + S_t + e^u x_t)`` (numerator
    over denominator), ``P_t = Σ_{i<t} e^{-(t-1-i) w} x_i = e^{-(t-1-c) w} Σ_{i<t} e^{(i-c) w} x_i`` and
    ``S_t = Σ_{i>t} e^{-(i-t-1) w} x_i = e^{(t+1-c) w} Σ_{i>t} e^{-(i-c) w} x_i`` (c = (T-1)/2). Every summand
    is positive in the denominator; float64 keeps ``e^{±|w| T / 2}`` in range for ``|w| T ≲ 1400``.

    Args:
        w, u: ``[C]`` decay and bonus (already divided by T). k, v: ``[B, T, C]``.

    Returns:
        ``[B, T, C]`` in v's dtype. Traceable with symbolic T (no Python control flow on shapes).
    """
    dt = torch.float64
    T = k.shape[1]
    kd = k.to(dt)
    a = torch.exp(kd - kd.amax(1, keepdim=True))
    x = torch.stack([a * v.to(dt), a])  # [2, B, T, C]
    wd, ud = w.to(dt), u.to(dt)
    pos = torch.arange(T, device=k.device, dtype=dt)[:, None]
    e = (pos - (T - 1) / 2) * wd  # [T, C]: (i - c) w
    pre = torch.cumsum(x * torch.exp(e), 2)
    P = F.pad(pre[:, :, :-1], (0, 0, 1, 0)) * torch.exp(wd - e)  # exclusive prefix, × e^{-(t-1-c) w}
    suf = torch.cumsum((x * torch.exp(-e)).flip(2), 2).flip(2)
    S = F.pad(suf[:, :, 1:], (0, 0, 0, 1)) * torch.exp(e + wd)  # exclusive suffix, × e^{(t+1-c) w}
    tot = P + S + torch.exp(ud) * x
    return (tot[0] / tot[1]).to(v.dtype)


def retention_chunkwise_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                               scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                               output_final_state: bool = False, chunk_size: int = 64):
    """Chunkwise retention without a loop over chunks: export form for ViR — the op's own batched form
    :func:`linvision.ops.retention.retention_chunkwise_batched` (plain tensor ops, no cache), whole sequences.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; gamma: ``[H]``; scale: q multiplier (default ``K ** -0.5``).
        initial_state, output_final_state: not supported (the exported graph sees whole sequences).

    Returns:
        ``(o [B, T, H, V] in v's dtype, None)``.

    Raises:
        ValueError: a state was requested.
    """
    if initial_state is not None or output_final_state:
        raise ValueError("retention_chunkwise_matmul: states are not supported (export form, whole sequences)")
    return retention_chunkwise_batched(q, k, v, gamma, scale, chunk_size=chunk_size)


# ------------------------------------------------------------------------------------------- registry
def _bi_wkv_form(keywords: Dict[str, Any]) -> Callable:
    variant = keywords.get("variant", "eq5")
    if variant != "eq5":
        raise LinvisionError(f"Bi-WKV variant {variant!r} cannot be exported (its token chunking depends on T); "
                             "export a model built with wkv_variant='eq5'")
    return bi_wkv_cumsum


def _retention_chunkwise_form(keywords: Dict[str, Any]) -> Callable:
    return functools.partial(retention_chunkwise_matmul, chunk_size=keywords.get("chunk_size", 64))


#: Export-time substitutions: the function a module calls (possibly through ``functools.partial``) →
#: ``make(partial_keywords) -> replacement`` (raises :class:`LinvisionError` if that configuration cannot be
#: exported). Keyed by op: ``bi_wkv`` wraps the ``linvision::bi_wkv_fwd`` custom op.
EXPORT_FORMS: Dict[Callable, Callable[[Dict[str, Any]], Callable]] = {
    bi_wkv: _bi_wkv_form,
    retention_chunkwise: _retention_chunkwise_form,
    retention_recurrent: _retention_chunkwise_form,
    wkv6: lambda kw: functools.partial(wkv6_loop_free, chunk_size=kw.get("chunk_size", 16)),
}


def register_export_form(target: Callable, make: Callable[[Dict[str, Any]], Callable]) -> None:
    """Register the export form of ``target`` (a function modules call, e.g. a custom op's wrapper):
    ``make(keywords)`` gets the keywords of a ``functools.partial(target, ...)`` (``{}`` for the bare function)
    and returns a pure-tensor callable with the same signature."""
    EXPORT_FORMS[target] = make


def _substitute(fn: Any) -> Optional[Callable]:
    base, kw = (fn.func, dict(fn.keywords)) if isinstance(fn, functools.partial) else (fn, {})
    return EXPORT_FORMS[base](kw) if _known(base) else None


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` (in eval mode) runs its export forms: every module attribute (or value of a
    dict attribute, e.g. retention's ``forms``) that :data:`EXPORT_FORMS` knows is replaced, and ViR models run
    block after block (``mode='parallel'``) with 1D retention's parallel form replaced by the chunkwise form.
    Activation checkpointing is switched off. Everything is restored on exit (also on error).

    Raises:
        LinvisionError: a configuration without an export form (e.g. Bi-WKV ``official_kernel``).
    """
    from .layers.retention import MultiScaleRetention
    from .models.vir import VisionRetention

    undo: List[Callable[[], None]] = []
    was_training = model.training
    try:
        model.eval()
        for m in model.modules():
            for name, val in list(vars(m).items()):
                if isinstance(val, dict) and name == "forms":
                    new = {key: _substitute(f) or f for key, f in val.items()}
                    if type(m) is MultiScaleRetention:  # 1D: the block-after-block graph uses the chunkwise form
                        new["parallel"] = new["chunkwise"]
                    undo.append(functools.partial(setattr, m, name, val))
                    setattr(m, name, new)
                elif callable(val) and not isinstance(val, (nn.Module, torch.Tensor)):
                    sub = _substitute(val)
                    if sub is not None:
                        undo.append(functools.partial(setattr, m, name, val))
                        setattr(m, name, sub)
            if isinstance(m, VisionRetention):
                undo.append(functools.partial(setattr, m, "mode", m.mode))
                m.mode = "parallel"
            if getattr(m, "grad_checkpointing", False):  # no activation checkpointing in an inference graph
                undo.append(functools.partial(setattr, m, "grad_checkpointing", True))
                m.grad_checkpointing = False
        yield model
    finally:
        for u in reversed(undo):
            u()
        model.train(was_training)


# ------------------------------------------------------------------------------------------- export
def size_multiple(model: nn.Module) -> int:
    """Image sides of a ``--dynamic`` export are multiples of this: 56 for ViT-ResNAS (patch 14, two 2×
    reductions), else the patch size."""
    from .models.resnas import SIZE_MULTIPLE, ResNAS

    if isinstance(model, ResNAS):
        return SIZE_MULTIPLE
    ps = getattr(getattr(model, "patch_embed", None), "patch_size", 1)
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def _max_chunk(model: nn.Module) -> int:
    """The largest ``chunk_size`` of the ops :data:`EXPORT_FORMS` knows that the model's modules call (bound by
    ``functools.partial``, else the function's default); 1 if none."""
    sizes = [1]
    for mod in model.modules():
        for val in vars(mod).values():
            for f in (val.values() if isinstance(val, dict) else [val]):
                base, kw = (f.func, f.keywords) if isinstance(f, functools.partial) else (f, {})
                if _known(base):
                    param = inspect.signature(base).parameters.get("chunk_size")
                    size = kw.get("chunk_size", param.default if param is not None else None)
                    sizes += [int(size)] if isinstance(size, int) else []
    return max(sizes)


def _known(fn: Callable) -> bool:
    try:
        return fn in EXPORT_FORMS
    except TypeError:  # unhashable
        return False


def _example(model: nn.Module, img_size: Tuple[int, int], batch: int) -> torch.Tensor:
    p = next(iter(model.parameters()))
    in_chans = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, in_chans, *img_size, generator=g).to(p.device, p.dtype)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _check_graph(ep: "torch.export.ExportedProgram", name: str) -> None:
    for node in ep.graph.nodes:
        t = node.target
        if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace == "linvision":
            raise LinvisionError(f"cannot export {name}: custom op {t.namespace}::{t._opname} has no export form "
                                 "(register one with linvision.export.register_export_form)")


def export_program(model: nn.Module, img_size: Sequence[int], dynamic: bool = False,
                   batch: Optional[int] = None) -> "torch.export.ExportedProgram":
    """``torch.export`` program of ``model`` (its export forms, eval mode) for input ``[B, C, H, W]``.

    Args:
        model: a linvision classifier.
        img_size: ``(H, W)`` of the example input (dynamic: a larger one is traced where needed, see below).
        dynamic: batch and image sides symbolic (sides: multiples of :func:`size_multiple`). Traced at a size
            where every chunked op has several chunks (and ``img_size`` at least), the graph then serves every
            size with at least 2 patches a side and more tokens than one chunk of its chunked ops (ViR: the op's
            chunk, 64 for heads of 64; VRWKV6: 16); smaller inputs fail its shape guard (``torch.export``
            specializes sizes of 1).
        batch: example batch (default 2 if dynamic — a size-1 example would be specialized — else 1).

    Raises:
        LinvisionError: the model (or one of its ops) cannot be exported, or the size does not fit the model.
    """
    name = type(model).__name__
    H, W = (int(s) for s in img_size)
    m = size_multiple(model)
    if dynamic and (H % m or W % m):
        raise LinvisionError(f"--dynamic export of {name} needs --img-size sides that are multiples of {m}, "
                             f"got {H}x{W}")
    if dynamic:  # trace where no size is 0 or 1 (those would be specialized): sides, chunk counts, remainders
        rows = max(2, math.isqrt(2 * _max_chunk(model)) + 1)  # > 2 chunks of the largest chunked form
        H, W = max(H, rows * m), max(W, (rows + 1) * m)
    x = _example(model, (H, W), batch or (2 if dynamic else 1))
    shapes = None
    if dynamic:
        Dim = torch.export.Dim
        shapes = {"x": {0: Dim("batch", min=1, max=4096), 2: m * Dim("rows", min=1, max=4096 // m),
                        3: m * Dim("cols", min=1, max=4096 // m)}}
    with export_mode(model):
        try:
            ep = torch.export.export(model, (x,), dynamic_shapes=shapes)
        except LinvisionError:
            raise
        except Exception as e:  # noqa: BLE001 - any tracing failure becomes one line
            raise LinvisionError(f"cannot export {name} at {H}x{W}{' (dynamic)' if dynamic else ''}: "
                                 f"{_one_line(e)}") from None
    _check_graph(ep, name)
    return ep


def export_onnx(ep: "torch.export.ExportedProgram", path: str | Path) -> Path:
    """Write ``ep`` as an ONNX file (dynamo exporter, default opset, weights inside: < 2 GB), atomically."""
    path = Path(path)
    try:
        prog = torch.onnx.export(ep, dynamo=True, verbose=False)
    except Exception as e:  # noqa: BLE001
        raise LinvisionError(f"ONNX conversion failed: {_one_line(e)}") from None
    _atomic_save(path, lambda tmp: prog.save(tmp, external_data=False))
    return path


def _atomic_save(path: Path, save: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_sizes(model: nn.Module, img_size: Tuple[int, int], dynamic: bool) -> List[Tuple[int, int, int]]:
    """``(batch, H, W)`` of the parity checks: the export size, plus another size and batch if dynamic."""
    H, W = img_size
    if not dynamic:
        return [(1, H, W)]
    m = size_multiple(model)
    return [(1, H, W), (3, H + 2 * m, W + m)]


def onnx_parity(model: nn.Module, onnx_path: str | Path, sizes: Sequence[Tuple[int, int, int]]) -> List[Dict]:
    """Max abs difference between onnxruntime (CPU) and eager PyTorch logits, one row per ``(batch, H, W)``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return [_parity_row(model, lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0]), s) for s in sizes]


def _parity_row(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], size: Tuple[int, int, int]) -> Dict:
    B, H, W = size
    x = _example(model, (H, W), B)
    with torch.no_grad():
        ref = model(x)
        out = run(x)
    return {"batch": B, "size": [H, W], "max_abs": float((out.float() - ref.float()).abs().max()),
            "max_ref": float(ref.float().abs().max())}


def export_checkpoint(checkpoint: str | Path, fmt: str = "onnx", output: Optional[str | Path] = None,
                      img_size: Optional[Sequence[int]] = None, dynamic: bool = False,
                      check: bool = True) -> Dict[str, Any]:
    """Export a linvision run folder (or its ``model.safetensors``) — what ``linvision export`` does.

    The file (default ``<run>/model.onnx`` or ``<run>/model.pt2``) is written atomically, and only after its
    outputs matched eager PyTorch to :data:`PARITY_TOL` (max abs logit) at the export size and, if ``dynamic``,
    at another size and batch (ONNX: onnxruntime CPU; pt2: the program's module).

    Returns:
        ``{"output", "format", "model", "img_size", "dynamic", "parity": [row, ...]}``, each row
        ``{"batch", "size", "max_abs", "max_ref"}`` (``max_ref``: the largest PyTorch logit, for scale).

    Raises:
        LinvisionError: bad format/size, a model or op that cannot be exported, or a parity failure.
    """
    from .checkpoint import load_model

    if fmt not in FORMATS:
        raise LinvisionError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model, config = load_model(checkpoint)
    if img_size is None:
        img_size = (config.get("data_config") or {}).get("input_size", model.pretrained_cfg["input_size"])[-2:]
    img_size = tuple(int(s) for s in img_size)
    if len(img_size) != 2 or min(img_size) <= 0:
        raise LinvisionError(f"--img-size needs two positive sides H W, got {img_size}")
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    out = Path(output) if output else run_dir / f"model.{fmt}"
    ep = export_program(model, img_size, dynamic)
    sizes = _check_sizes(model, img_size, dynamic) if check else []
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent if out.parent.exists() else None) as tmpdir:
        tmp = Path(tmpdir) / out.name
        if fmt == "onnx":
            export_onnx(ep, tmp)
            parity = onnx_parity(model, tmp, sizes) if sizes else []
        else:
            torch.export.save(ep, str(tmp))
            loaded = torch.export.load(str(tmp)).module()
            parity = [_parity_row(model, loaded, s) for s in sizes]
        bad = [p for p in parity if not p["max_abs"] <= PARITY_TOL]
        if bad:
            raise LinvisionError(f"exported {config['model']} differs from PyTorch by {bad[0]['max_abs']:.3g} "
                                 f"(> {PARITY_TOL}) at batch {bad[0]['batch']}, {bad[0]['size'][0]}x"
                                 f"{bad[0]['size'][1]}; nothing written to {out}")
        _atomic_save(out, lambda dst: shutil.copyfile(tmp, dst))
    return {"output": str(out), "format": fmt, "model": config["model"], "img_size": list(img_size),
            "dynamic": dynamic, "parity": parity}


# ------------------------------------------------------------------------------------------- bench
def onnx_vs_eager_timing(model_name: str, img_size: int, batch: int = 1, repeats: int = 5, warmup: int = 1,
                         threads: Optional[int] = None, **model_kwargs: Any) -> List[Dict[str, Any]]:
    """Inference time of onnxruntime (CPU) vs eager PyTorch for ``model_name`` at ``img_size``² — the rows of
    ``linvision bench --suite export`` (``{"model", "img_size", "batch", "backend", "ms", "img_per_s"}``, ms per
    step; median of ``repeats`` after ``warmup`` runs, the two backends interleaved run by run, same input, same
    thread count). Random weights; a static export; ``model_kwargs`` go to ``timm.create_model`` (e.g.
    ``mode="chunkwise"`` so that eager ViR runs its linear form, as the exported graph does).

    Not run by the tests (wall-clock numbers); run it on a quiet machine.
    """
    import onnxruntime as ort

    import timm

    if threads:
        torch.set_num_threads(threads)
    model = timm.create_model(model_name, pretrained=False, **model_kwargs).eval()
    x = _example(model, (img_size, img_size), batch)
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(export_program(model, (img_size, img_size), batch=batch), Path(d) / "m.onnx")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        runs = {"onnxruntime": lambda: sess.run(None, feed), "eager": lambda: model(x)}
        times: Dict[str, List[float]] = {b: [] for b in runs}
        with torch.inference_mode():
            for i in range(warmup + repeats):
                for backend, fn in runs.items():  # interleaved: both see the same machine state
                    t0 = time.perf_counter()
                    fn()
                    if i >= warmup:
                        times[backend].append(time.perf_counter() - t0)
        rows = []
        for backend, ts in times.items():
            ms = 1e3 * sorted(ts)[len(ts) // 2]
            rows.append({"model": model_name + "".join(f":{k}={v}" for k, v in model_kwargs.items()),
                         "img_size": img_size, "batch": batch, "backend": backend, "ms": round(ms, 2),
                         "img_per_s": round(batch * 1e3 / ms, 2) if ms > 0 else math.inf})
    return rows


# ------------------------------------------------------------------------------------------- CLI
_EPILOG = """examples:
  linvision export --checkpoint runs/vrwkv_tiny-x --format onnx                 # -> runs/vrwkv_tiny-x/model.onnx
  linvision export --checkpoint runs/vir_tiny-x --format onnx --img-size 224 224 --dynamic
  linvision export --checkpoint runs/x/model.safetensors --format pt2 --output /tmp/x.pt2

The file is written only after its logits matched PyTorch (max abs <= 1e-4) at the export size and, with
--dynamic, at another size and batch (ONNX: onnxruntime on CPU). --dynamic: batch and image sides are symbolic
(sides: multiples of the patch size; 56 for ViT-ResNAS)."""


def add_parser(sub: Any, common: Any) -> None:
    """``linvision export``: the subcommand's parser (called by :func:`linvision.cli.build_parser`)."""
    import argparse

    p = sub.add_parser("export", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_EPILOG, help="export a checkpoint to ONNX or a torch.export program",
                       description="Export a run folder to ONNX (torch dynamo exporter) or a torch.export .pt2 "
                                   "program, checked against PyTorch.")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_WEIGHTS",
                   help="run folder (or its model.safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx or pt2")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"),
                   help="example input size (default: the run's data_config input size)")
    p.add_argument("--dynamic", action="store_true", help="symbolic batch and image size")
    p.add_argument("--output", metavar="PATH", help="output file (default: RUN/model.onnx or RUN/model.pt2)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=_cmd_export)


def _cmd_export(ns: Any) -> int:
    import json

    from .engine import setup_threads
    setup_threads(getattr(ns, "threads", None))
    r = export_checkpoint(ns.checkpoint, ns.format, ns.output, ns.img_size, ns.dynamic)
    if ns.json:
        print(json.dumps(r))
        return 0
    print(f"exported {r['model']} ({r['format']}, {r['img_size'][0]}x{r['img_size'][1]}"
          f"{', dynamic' if r['dynamic'] else ''}) -> {r['output']}")
    for p in r["parity"]:
        print(f"  parity batch {p['batch']} {p['size'][0]}x{p['size'][1]}: max abs {p['max_abs']:.2e} "
              f"(max |logit| {p['max_ref']:.3g})")
    return 0
