"""A training run's output folder (timm's ``CheckpointSaver`` + output-dir handling, in one object).

:class:`RunFolder` checks the folder before any work (writable; not holding another run unless resumed), loads and
vets the resumable state (readable, same locked arguments, same number of processes, complete), and writes the
run's files atomically (temp file, fsync, rename; only on rank 0): ``model.safetensors`` + ``config.json``,
``train_state.pt``, ``metrics.csv`` and ``curves.png``.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoint import (STATE_FILE, atomic_write, check_locked_args, load_train_state, remove_stale_temp_files,
                          save_model, save_train_state)
from ..plots import atomic_write_png, new_figure
from ..distributed import DistInfo
from ..errors import LinvisionError

__all__ = ["RunFolder", "Panel", "write_metrics_csv", "plot_curves", "json_ready"]

_log = logging.getLogger("linvision")

# Keys every resumable train_state.pt written by linvision.engine.loop holds.
REQUIRED_STATE_KEYS = ("model", "optimizer", "scheduler", "step", "history")


def json_ready(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with paths as strings and tuples as lists (for ``config.json`` / ``train_state.pt`` arguments)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def write_metrics_csv(out: Path, history: list[dict[str, Any]], fields: Sequence[str]) -> None:
    """Atomically (re)write ``out/metrics.csv``: one row per entry of ``history``, columns ``fields``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    atomic_write(Path(out) / "metrics.csv", buf.getvalue().encode())


@dataclass(frozen=True)
class Panel:
    """One panel of ``curves.png``: ``title``, y-axis label and ``(metrics.csv column, legend label)`` lines
    (columns missing from the history or empty are left out)."""

    title: str
    ylabel: str
    lines: tuple[tuple[str, str], ...]


def plot_curves(out: Path, history: list[dict[str, Any]], panels: Sequence[Panel], title: str) -> None:
    """Atomically write ``out/curves.png``: one subplot per :class:`Panel`, x = epoch (every task uses this)."""
    ep = [h["epoch"] for h in history]
    fig = new_figure((5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for i, (col, label) in enumerate(panel.lines):
            ys = [h.get(col, "") for h in history]
            if any(y == "" or y is None for y in ys):
                continue
            ax.plot(ep, ys, "o-" if i < 3 else "--", label=label)
        ax.set(xlabel="epoch", ylabel=panel.ylabel, title=panel.title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    atomic_write_png(Path(out) / "curves.png", fig)


class RunFolder:
    """The output folder of one run; ``state`` is the resumed ``train_state.pt`` (``None`` for a new run).

    Args:
        output: folder to write (default: ``resume``).
        resume: folder of a run to continue, or ``None``.
        args: this invocation's arguments (``vars(args)``); ``locked`` names those a resume must keep.
        di: this process's :class:`~linvision.distributed.DistInfo` (only rank 0 writes).
        ignore: arguments not stored with the run (they describe this invocation only).

    Raises:
        LinvisionError: unreadable state, changed locked arguments, another number of processes than the run was
        trained with, a state lacking parts, or a new run into a folder that already holds one.
    """

    def __init__(self, output: str | Path | None, resume: str | Path | None, args: dict[str, Any],
                 locked: Sequence[str], di: DistInfo, ignore: Sequence[str] = ("resume", "output", "max_steps")):
        self.out = Path(output or resume)
        self.di = di
        self.args = json_ready({k: v for k, v in args.items() if k not in ignore})
        self.state: dict[str, Any] | None = load_train_state(resume) if resume else None
        if self.state is not None:
            check_locked_args(resume, self.state["args"], args, locked)
            if self.state.get("world_size", 1) != di.world_size:
                raise LinvisionError(f"cannot resume {resume} with {di.world_size} process(es): it was trained with "
                                     f"{self.state.get('world_size', 1)} (the global batch and data order depend on "
                                     "it)")
            if missing := [k for k in REQUIRED_STATE_KEYS if k not in self.state]:
                raise LinvisionError(f"cannot resume from {self.out / STATE_FILE}: it lacks {', '.join(missing)}")
        elif (self.out / STATE_FILE).exists():
            raise LinvisionError(f"output folder {self.out} already holds a run; continue it with --resume "
                                 f"{self.out} or choose another --output")

    def check_writable(self) -> None:
        """Prove the folder writable before any work (rank 0; a folder this creates for the probe is removed
        again, so a run that fails before its first checkpoint leaves nothing behind); drop temp files of killed
        writes.

        Raises:
            LinvisionError: the path is a file or cannot be written.
        """
        if not self.di.is_main:
            return
        out = self.out
        if out.exists() and not out.is_dir():
            raise LinvisionError(f"--output {out} is a file, not a folder")
        created = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise LinvisionError(f"cannot write to --output {out}: {e.strerror or e}") from None
        finally:
            for p in created:
                try:
                    p.rmdir()
                except OSError:
                    break
        if removed := remove_stale_temp_files(out) if out.is_dir() else []:
            _log.info("removed %d temporary file(s) left in %s by an interrupted write", len(removed), out)

    def save_model(self, module: torch.nn.Module, config: dict[str, Any]) -> None:
        """``model.safetensors`` + ``config.json`` (rank 0)."""
        if self.di.is_main:
            save_model(self.out, module, config)

    def save_state(self, state: dict[str, Any]) -> None:
        """``train_state.pt`` (rank 0); ``world_size`` and the run's arguments are added."""
        if self.di.is_main:
            save_train_state(self.out, {**state, "world_size": self.di.world_size, "args": self.args})

    def write_history(self, history: list[dict[str, Any]], fields: Sequence[str], panels: Sequence[Panel],
                      title: str) -> None:
        """``metrics.csv`` and ``curves.png`` (rank 0)."""
        if self.di.is_main:
            write_metrics_csv(self.out, history, fields)
            plot_curves(self.out, history, panels, title)
