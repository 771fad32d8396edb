"""Checkpoint folders are input: vet ``config.json``'s ``model_args`` and the weights' header before building.

:func:`check_model_args` keeps ``timm.create_model`` away from anything but the keyword arguments linvision itself
writes (an allow-list per model family, each value type- and range-checked), so a run folder cannot make
linvision read a file (e.g. ``checkpoint_path``, a ViT-ResNAS ``arch`` given as a path), build a gigantic model or
crash on odd values. :func:`check_header` compares the architecture, built on the ``meta`` device (no memory),
with the safetensors header (tensor names, shapes, dtypes) before anything real is allocated;
:func:`check_finite` refuses weights holding NaN / Inf.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import LinvisionError

__all__ = ["check_model_args", "check_header", "check_finite", "MODEL_ARG_LIMITS"]

# key -> (kind, low, high); the keys linvision's trainers store (see engine.classification.create_model)
MODEL_ARG_LIMITS: dict[str, tuple[str, float, float]] = {
    "num_classes": ("int", 0, 100_000),
    "img_size": ("size", 1, 8192),
    "patch_size": ("int", 1, 1024),
    "drop_path_rate": ("float", 0.0, 1.0),
    "in_chans": ("int", 1, 64),
}
# architecture settings of linvision's own families (the weights' header must still match what they build)
_OWN = {"embed_dim": ("int", 1, 8192), "depth": ("int", 1, 256), "init_values": ("optfloat", 0.0, 10.0),
        "drop_rate": ("float", 0.0, 1.0), "global_pool": ("str", 0, 0)}
MODEL_ARG_LIMITS.update(_OWN)
MODEL_ARG_LIMITS.update({
    "wkv_variant": ("str", 0, 0), "post_norm": ("bool", 0, 0), "key_norm": ("bool", 0, 0),
    "shift_pixel": ("int", 0, 16), "hidden_rate": ("int", 1, 64), "num_heads": ("int", 1, 256),
    "mlp_ratio": ("float", 0.0, 64.0), "retention_norm": ("bool", 0, 0), "mode": ("str", 0, 0),
    "chunk_size": ("optint", 1, 1 << 20), "pos_drop_rate": ("float", 0.0, 1.0), "proj_drop_rate": ("float", 0.0, 1.0)})
_COMMON = ("num_classes", "img_size", "patch_size", "drop_path_rate", "in_chans")
# extra keys of a family (model-name substring -> keys)
_FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "resnas": ("arch",),
    "vrwkv": (*_OWN, "wkv_variant", "post_norm", "key_norm", "shift_pixel", "hidden_rate"),
    "vir": (*_OWN, "num_heads", "mlp_ratio", "retention_norm", "mode", "chunk_size", "pos_drop_rate",
            "proj_drop_rate"),
}
_ARCH_MAX_BLOCKS, _ARCH_MAX_WIDTH = 1024, 65_536

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _allowed(model: str) -> tuple[str, ...]:
    extra = tuple(k for fam, keys in _FAMILY_KEYS.items() if fam in model for k in keys)
    return tuple(dict.fromkeys((*_COMMON, *extra)))


def _check_arch(value: Any, where: str) -> None:
    if not isinstance(value, dict):  # a string would be read as a file path by ResNAS
        raise LinvisionError(f"{where}: model_args.arch must be an architecture object, got {type(value).__name__}")
    heads = value.get("heads")
    blocks = sum(len(s) for s in heads if isinstance(s, list)) if isinstance(heads, list) else 0
    ints = [x for k in ("dims", "head_dims", "heads", "mlp", "stem_chans") for x in _flat(value.get(k))]
    if blocks > _ARCH_MAX_BLOCKS or any(not isinstance(x, int) or isinstance(x, bool) or not 1 <= x <= _ARCH_MAX_WIDTH
                                        for x in ints):
        raise LinvisionError(f"{where}: model_args.arch out of range (at most {_ARCH_MAX_BLOCKS} blocks, integer "
                             f"sizes 1..{_ARCH_MAX_WIDTH})")


def _flat(v: Any) -> list[Any]:
    if v is None:
        return []
    return [y for x in v for y in _flat(x)] if isinstance(v, list) else [v]


def check_model_args(model: str, model_args: Any, where: str | Path) -> dict[str, Any]:
    """``model_args`` of ``config.json`` if they are safe to pass to ``timm.create_model(model, ...)``.

    Args:
        model: the config's model name.
        model_args: the config's ``model_args`` (untrusted).
        where: the config file (named in messages).

    Raises:
        LinvisionError: not an object, a key outside the family's allow-list (``MODEL_ARG_LIMITS`` + family
        extras), or a value of the wrong type or out of range (one line naming the key).
    """
    if model_args is None:
        return {}
    if not isinstance(model_args, dict):
        raise LinvisionError(f"{where}: model_args must be an object, got {type(model_args).__name__}")
    allowed = _allowed(model)
    if bad := sorted(k for k in model_args if k not in allowed):
        raise LinvisionError(f"{where}: model_args {', '.join(map(repr, bad))} not allowed for {model} (allowed: "
                             f"{', '.join(allowed)})")
    for k, v in model_args.items():
        if k == "arch":
            _check_arch(v, str(where))
            continue
        kind, lo, hi = MODEL_ARG_LIMITS[k]
        if kind in ("optfloat", "optint") and v is None:
            continue
        if kind in ("bool", "str"):  # a str is checked by the model itself (choices), never used as a path
            if not isinstance(v, bool if kind == "bool" else str) or (kind == "str" and len(v) > 64):
                what = "boolean" if kind == "bool" else "short string"
                raise LinvisionError(f"{where}: model_args.{k} must be a {what}, got {v!r}")
            continue
        kind = {"optfloat": "float", "optint": "int"}.get(kind, kind)
        values = v if kind == "size" and isinstance(v, list) and len(v) == 2 else [v]
        ok = all((isinstance(x, int) or (kind == "float" and isinstance(x, float) and math.isfinite(x)))
                 and not isinstance(x, bool) and lo <= x <= hi for x in values)
        if not ok:
            shape = "an integer or [H, W]" if kind == "size" else "a number" if kind == "float" else "an integer"
            raise LinvisionError(f"{where}: model_args.{k} must be {shape} in [{lo}, {hi}], got {v!r}")
    return dict(model_args)


def header(file: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` from a safetensors file's header (no tensor data is read).

    Raises:
        LinvisionError: missing file, or not a valid safetensors file.
    """
    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            return out
    except FileNotFoundError:
        raise LinvisionError(f"model weights not found: {file}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LinvisionError(f"{file} is not a valid safetensors file ({e})") from None


def check_header(expected: dict[str, torch.Tensor], file: str | Path, model: str) -> None:
    """Compare a model's ``state_dict`` (on the meta device: names, shapes, dtypes) with the safetensors header of
    ``file``.

    Raises:
        LinvisionError: missing / unexpected / mis-shaped tensors or another dtype (one line naming the file and
        the first offending keys).
    """
    got = header(file)
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {got[k][0]} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in got and got[k][0] != tuple(v.shape)]
    dtypes = [f"{k} {got[k][1]} vs model {str(v.dtype).replace('torch.', '')}" for k, v in expected.items()
              if k in got and _DTYPES.get(got[k][1]) != v.dtype]
    problems = [f"{label}: {_describe(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes),
                 ("dtype mismatch", dtypes)) if keys]
    if problems:
        hint = " (the weights of another model?)" if len(missing) > len(expected) / 2 else ""
        raise LinvisionError(f"checkpoint {file} does not match model {model}: " + "; ".join(problems) + hint)


def check_finite(state_dict: dict[str, torch.Tensor], file: str | Path) -> None:
    """Raise a one-line :class:`LinvisionError` naming ``file`` and the tensors holding NaN or Inf."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise LinvisionError(f"checkpoint {file} holds non-finite weights (NaN/Inf) in {_describe(bad)}; it cannot "
                             "be used (was training diverging?)")


def _describe(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} total)" if len(keys) > n else "")
