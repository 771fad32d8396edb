"""Checkpoints: ``model.safetensors`` + ``config.json`` (the model) and ``train_state.pt`` (resumable state).

Every file is written atomically (temporary file in the same folder, flush + fsync, ``os.replace``, fsync of the
folder), so a crash leaves either the previous or the new version, never a torn one. Weights are loaded only
through safetensors or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

import timm

from .errors import LinvisionError
from .untrusted import check_finite, check_header, check_model_args

__all__ = ["MODEL_FILE", "CONFIG_FILE", "STATE_FILE", "atomic_write", "save_model", "load_model", "load_config",
           "load_state_dict", "check_state_dict", "save_train_state", "load_train_state", "get_rng_states",
           "set_rng_states", "remove_stale_temp_files", "timm_config_fields", "stage_write", "commit_staged",
           "save_files", "model_files", "train_state_bytes"]

MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "train_state.pt"
_UMASK = os.umask(0o22)
os.umask(_UMASK)


def stage_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` durably to a temporary file next to ``path`` (``.NAME.*.tmp``, flushed and fsynced) and
    return it; :func:`commit_staged` renames it into place. A failed write (e.g. ``ENOSPC``) removes the temporary
    file and re-raises the ``OSError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def commit_staged(staged: Sequence[tuple[Path, Path]]) -> None:
    """Rename each staged ``(temp file, path)`` into place, in the given order (the last one is the commit
    point), then fsync the folders. Renames allocate no data blocks, so a full disk fails in :func:`stage_write`,
    before anything is replaced."""
    for tmp, path in staged:
        os.replace(tmp, path)
    for folder in dict.fromkeys(Path(path).parent for _, path in staged):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def discard_staged(staged: Sequence[tuple[Path, Path]]) -> None:
    """Remove staged temporary files that will not be committed."""
    for tmp, _ in staged:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file + fsync + ``os.replace`` + folder fsync)."""
    commit_staged([(stage_write(path, data), Path(path))])


def remove_stale_temp_files(directory: str | Path, names: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves behind when killed mid-write (``.NAME.*.tmp`` for
    each of ``names``, default: the checkpoint files); returns those removed. Call only while no other process
    writes to ``directory``."""
    names = names or (MODEL_FILE, CONFIG_FILE, STATE_FILE, "metrics.csv", "curves.png")
    removed = []
    for name in names:
        for p in Path(directory).glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _tensors_for_save(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; tensors sharing storage with an earlier one (tied weights) are cloned,
    since safetensors refuses shared storage."""
    seen, out = set(), {}
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def model_files(model: torch.nn.Module, config: dict[str, Any]) -> tuple[bytes, bytes]:
    """The bytes of ``model.safetensors`` and ``config.json`` for ``model`` and ``config`` (see
    :func:`save_model`)."""
    weights = save(_tensors_for_save(model.state_dict()), metadata={"format": "pt"})
    if timm.is_model(str(config.get("model", ""))):  # a timm-registered model (not e.g. the NAS super-network)
        config = {**timm_config_fields(model, config), **config}
    return weights, (json.dumps(config, indent=2, sort_keys=False) + "\n").encode()


def save_files(directory: str | Path, files: Sequence[tuple[str, bytes]]) -> None:
    """Write several files of ``directory`` as one commit: all are staged (written + fsynced to temp files)
    first, then renamed in order; the last one is the commit point. A write error (full disk, ...) replaces
    nothing."""
    directory, staged = Path(directory), []
    try:
        for name, data in files:
            staged.append((stage_write(directory / name, data), directory / name))
    except BaseException:
        discard_staged(staged)
        raise
    commit_staged(staged)


def save_model(directory: str | Path, model: torch.nn.Module, config: dict[str, Any]) -> None:
    """Write ``directory/model.safetensors`` (the model's ``state_dict``) and ``directory/config.json``.

    ``config`` must be JSON-serializable and hold at least ``model`` (timm name) and ``model_args`` (keyword
    arguments for ``timm.create_model``, e.g. ``num_classes``, ``img_size``, ``patch_size``); the trainer also
    stores ``class_names`` and ``data_config`` (``mean``, ``std``, ``input_size``, ``crop_pct``,
    ``interpolation``). Both are staged before either is replaced and ``config.json`` is renamed last (the commit
    point), so a config always describes weights at least as new and a full disk replaces neither.

    For a timm-registered model the config also gets the fields of timm's pretrained-config format
    (:func:`timm_config_fields`; keys already in ``config`` win), so the folder loads with
    ``timm.create_model("local-dir:DIR", pretrained=True)`` as well.
    """
    weights, cfg = model_files(model, config)
    save_files(directory, [(MODEL_FILE, weights), (CONFIG_FILE, cfg)])


def timm_config_fields(model: torch.nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` fields timm's ``local-dir:`` / ``hf-hub:`` loader reads (``architecture``,
    ``num_classes``, ``num_features``, ``label_names``, ``pretrained_cfg``; ``model_args`` is shared with
    linvision's own): the model's timm pretrained cfg with the run's ``data_config`` (mean, std, input size,
    crop, interpolation) and classes. linvision's own keys (``model``, ``model_args``, ...) are left alone."""
    from dataclasses import fields
    from timm.models import PretrainedCfg

    skip = {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag"}
    known = {f.name for f in fields(PretrainedCfg)} - skip
    json_types = (str, int, float, bool, list, tuple, type(None))
    pcfg = {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in (getattr(model, "pretrained_cfg", None) or {}).items()
            if k in known and isinstance(v, json_types)}
    dc = config.get("data_config") or {}
    pcfg.update({k: list(dc[k]) if isinstance(dc[k], tuple) else dc[k]
                 for k in ("input_size", "mean", "std", "crop_pct", "interpolation") if k in dc})
    num_classes = int(getattr(model, "num_classes", pcfg.get("num_classes", 0)))
    pcfg["num_classes"] = num_classes
    out = {"architecture": config["model"], "num_classes": num_classes,
           "num_features": int(getattr(model, "num_features", 0)), "pretrained_cfg": pcfg}
    if config.get("class_names"):
        out["label_names"] = list(config["class_names"])
    return out


def _checkpoint_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise LinvisionError(f"checkpoint does not exist: {p}")
    return p.parent if p.is_file() else p


def load_config(path: str | Path) -> dict[str, Any]:
    """Read ``config.json`` of a checkpoint folder (or of the folder holding the given file).

    Raises:
        LinvisionError: missing or unreadable file, invalid JSON, or no ``model`` entry.
    """
    f = _checkpoint_dir(path) / CONFIG_FILE
    try:
        config = json.loads(f.read_text())
    except FileNotFoundError:
        raise LinvisionError(f"checkpoint config not found: {f}") from None
    except (OSError, ValueError) as e:
        raise LinvisionError(f"cannot read checkpoint config {f}: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise LinvisionError(f"checkpoint config {f} has no 'model' name")
    return config


def load_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (on CPU).

    Raises:
        LinvisionError: file missing or not a valid safetensors file.
    """
    try:
        return load_file(str(file), device="cpu")
    except FileNotFoundError:
        raise LinvisionError(f"model weights not found: {file}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LinvisionError(f"{file} is not a valid safetensors file ({e})") from None


def _describe(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} total)" if len(keys) > n else "")


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise a one-line :class:`LinvisionError` naming ``source`` and the missing / unexpected / mis-shaped keys
    if ``state_dict`` does not fit ``model`` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{label}: {_describe(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if keys]
    if problems:
        name = type(model).__name__
        hint = " (the weights of another model?)" if len(missing) > len(expected) / 2 else ""
        raise LinvisionError(f"checkpoint {source} does not match model {name}: " + "; ".join(problems) + hint)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint folder (or its ``model.safetensors`` / ``config.json``).

    The folder is untrusted input: ``model_args`` must pass :func:`linvision.untrusted.check_model_args` (an
    allow-list of keys per family, values range-checked); the model is first built on the ``meta`` device and its
    tensor names, shapes and dtypes compared with the safetensors header (:func:`~linvision.untrusted.check_header`)
    before any real allocation; weights holding NaN/Inf are refused. Then
    ``timm.create_model(config["model"], **config["model_args"])`` (``pretrained=False``, nothing is downloaded)
    gets the weights strictly; returns ``(model.eval(), config)``.

    Raises:
        LinvisionError: missing files, invalid safetensors, unknown model name, ``model_args`` outside the
        allow-list or range, weights that do not match the model (names, shapes or dtypes; the message names the
        file and the offending keys), or non-finite weights.
    """
    p = Path(path).expanduser()
    directory = _checkpoint_dir(p)
    config = load_config(directory)
    if config.get("task") == "segmentation":
        raise LinvisionError(f"checkpoint {directory} is a segmentation run; use `linvision segment eval/predict`")
    if not timm.is_model(config["model"]):
        raise LinvisionError(f"checkpoint {directory / CONFIG_FILE} names unknown model {config['model']!r}")
    weights = p if p.is_file() and p.suffix == ".safetensors" else directory / MODEL_FILE
    model_args = check_model_args(config["model"], config.get("model_args"), directory / CONFIG_FILE)
    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated before the header agrees
        meta = _build(config["model"], model_args, directory)
    check_header(meta.state_dict(), weights, type(meta).__name__)
    del meta
    state_dict = load_state_dict(weights)
    check_finite(state_dict, weights)
    model = _build(config["model"], model_args, directory)
    check_state_dict(model, state_dict, weights)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval(), config


def _build(name: str, model_args: dict[str, Any], directory: Path) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **model_args)
    except (TypeError, ValueError, AssertionError, RuntimeError, NotImplementedError) as e:
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise LinvisionError(f"cannot build {name} from {directory / CONFIG_FILE}: {text}") from None


# --------------------------------------------------------------------------------------------------- train state
def get_rng_states() -> dict[str, Any]:
    """Python, numpy, torch (and, once CUDA is initialized, this device's CUDA) RNG states as tensors / primitives
    (safe for ``torch.load(weights_only=True)``)."""
    _, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "python": {"state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
              "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`get_rng_states` (the CUDA state only where CUDA is available)."""
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(states["python"]["state"].tolist()), states["python"]["gauss"]))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Write ``directory/train_state.pt`` atomically with ``torch.save``.

    ``state`` must contain only tensors, numbers, strings, ``None`` and lists/tuples/dicts of them (what
    ``torch.load(weights_only=True)`` accepts): optimizer/scheduler/EMA state dicts, epoch, step, RNG states
    (:func:`get_rng_states`), best metric, the run's arguments as a dict, metrics history.
    """
    atomic_write(Path(directory) / STATE_FILE, train_state_bytes(state))


def train_state_bytes(state: dict[str, Any]) -> bytes:
    """``state`` serialized with ``torch.save`` (the bytes of ``train_state.pt``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_train_state(directory: str | Path) -> dict[str, Any]:
    """Load ``train_state.pt`` from a run folder with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        LinvisionError: the folder does not exist or has no ``train_state.pt``, or the file is not a PyTorch zip
        checkpoint or holds objects other than tensors and plain Python values (one line, naming the file).
    """
    p = Path(directory).expanduser()
    if not p.exists():
        raise LinvisionError(f"cannot resume: {p} does not exist")
    f = (p.parent if p.is_file() else p) / STATE_FILE
    if not f.is_file():
        raise LinvisionError(f"cannot resume: no {STATE_FILE} in {f.parent} (not a linvision run folder, or its "
                             "first epoch / recovery checkpoint was never written)")
    if not zipfile.is_zipfile(f):
        raise LinvisionError(f"cannot read training state {f}: not a PyTorch zip checkpoint (corrupt or not written "
                             "by linvision)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; their messages span lines
        text = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        detail = (f"it holds Python objects that safe loading (weights_only) refuses: {unsafe.group(1)}" if unsafe
                  else text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__)
        raise LinvisionError(f"cannot read training state {f}: {detail}") from None
    if not isinstance(state, dict) or not {"epoch", "args"} <= set(state):
        raise LinvisionError(f"cannot resume from {f}: it is not a linvision training state")
    return state


def check_locked_args(resume: str | Path, old: dict[str, Any], new: dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse to resume ``resume`` when any of ``keys`` (the arguments that define the run) differs between the
    stored ``old`` and the requested ``new`` arguments.

    Raises:
        LinvisionError: naming each changed option as ``--name (old -> new)``.
    """
    changed = [k for k in keys if old.get(k) != new.get(k)]
    if changed:
        raise LinvisionError(f"cannot resume {resume} with different " + ", ".join(
            f"--{k.replace('_', '-')} ({old.get(k)} -> {new.get(k)})" for k in changed))
