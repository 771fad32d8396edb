"""A training run's output folder (timm's ``CheckpointSaver`` + output-dir handling, in one object).

:class:`RunFolder` checks the folder before any work (writable; not holding another run unless resumed), loads and
vets the resumable state (readable, same locked arguments, same number of processes, complete), and writes the
run's files atomically (temp file, fsync, rename; only on rank 0): ``model.safetensors`` + ``config.json``,
``train_state.pt``, ``metrics.csv`` and ``curves.png``.

One process at a time: :class:`FolderLock` takes an exclusive ``fcntl.flock`` on ``DIR/.linvision.lock`` (holding
the holder's PID) before any check or cleanup and holds it for the whole run, so a second ``train`` / ``supernet
train`` / ``search`` / ``--resume`` into the same folder stops with a one-line error naming that PID instead of
replacing the first run's files or deleting its temporary files. The kernel drops the lock when the process ends,
however it ends (no stale locks).
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoint import (CONFIG_FILE, MODEL_FILE, STATE_FILE, atomic_write, check_locked_args, load_train_state,
                          model_files, remove_stale_temp_files, save_files, save_model, save_train_state,
                          train_state_bytes)
from ..plots import atomic_write_png, new_figure
from ..distributed import DistInfo
from ..errors import LinvisionError

__all__ = ["RunFolder", "FolderLock", "release_run_locks", "LOCK_FILE", "Panel", "write_metrics_csv", "plot_curves",
           "json_ready"]

_log = logging.getLogger("linvision")

# Keys every resumable train_state.pt written by linvision.engine.loop holds.
REQUIRED_STATE_KEYS = ("model", "optimizer", "scheduler", "step", "history")


LOCK_FILE = ".linvision.lock"
_HELD: "weakref.WeakSet[FolderLock]" = weakref.WeakSet()


class FolderLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``folder/.linvision.lock`` held until :meth:`release` (or the
    process ends). The folder is created if missing; :meth:`release` removes the lock file, and the folders this
    created if they are empty. A lock file left by a killed process is harmless (the kernel dropped its lock).

    Args:
        folder: the run folder.
        option: the option that named it (for messages, e.g. ``--output``).

    Raises:
        LinvisionError: the path is a file, cannot be created / written, or another process holds the lock (the
        message names its PID).
    """

    def __init__(self, folder: str | Path, option: str = "--output"):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise LinvisionError(f"{option} {self.folder} is a file, not a folder")
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]  # innermost first
        self.path = self.folder / LOCK_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise LinvisionError(f"{option} {self.folder} is in use by another linvision process "
                                         f"(PID {self._holder()}); wait for it to end or choose another "
                                         f"{option}") from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino  # not unlinked by a releasing holder
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                _drop_lock(fd, self.path, [])
                raise
        except OSError as e:
            _remove_empty(self._created)
            raise LinvisionError(f"cannot write to {option} {self.folder}: {e.strerror or e}") from None
        _HELD.add(self)
        self._finalizer = weakref.finalize(self, _drop_lock, fd, self.path, self._created)

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        """Drop the lock (idempotent); remove the lock file, and the folders this created if they are empty. Also
        done when the lock object is garbage-collected."""
        self._finalizer()
        _HELD.discard(self)


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # innermost first
        try:
            p.rmdir()
        except OSError:
            break


def _drop_lock(fd: int, path: Path, created: list[Path]) -> None:
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()  # still locked: a process that opened it re-checks the inode
    except OSError:
        pass
    os.close(fd)
    _remove_empty(created)


def release_run_locks() -> None:
    """Release every :class:`FolderLock` this process holds (called when a training command ends)."""
    for lock in list(_HELD):
        lock.release()


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
        option = "--resume" if resume is not None and (output is None or Path(output) == Path(resume)) else "--output"
        self.lock = FolderLock(self.out, option) if di.is_main else None
        self.args = json_ready({k: v for k, v in args.items() if k not in ignore})
        try:
            self.state: dict[str, Any] | None = load_train_state(resume) if resume else None
            if self.state is not None:
                check_locked_args(resume, self.state["args"], args, locked)
                if self.state.get("world_size", 1) != di.world_size:
                    raise LinvisionError(f"cannot resume {resume} with {di.world_size} process(es): it was trained "
                                         f"with {self.state.get('world_size', 1)} (the global batch and data order "
                                         "depend on it)")
                if missing := [k for k in REQUIRED_STATE_KEYS if k not in self.state]:
                    raise LinvisionError(f"cannot resume from {self.out / STATE_FILE}: it lacks {', '.join(missing)}")
            elif (self.out / STATE_FILE).exists():
                raise LinvisionError(f"output folder {self.out} already holds a run; continue it with --resume "
                                     f"{self.out} or choose another --output")
        except BaseException:
            self.close()
            raise

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
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            self.close()
            raise LinvisionError(f"cannot write to --output {out}: {e.strerror or e}") from None
        if removed := remove_stale_temp_files(out) if out.is_dir() else []:
            _log.info("removed %d temporary file(s) left in %s by an interrupted write", len(removed), out)

    def close(self) -> None:
        """Release the folder's lock (a folder left empty is removed again)."""
        if self.lock is not None:
            self.lock.release()

    def save_epoch(self, module: torch.nn.Module, config: dict[str, Any], state: dict[str, Any]) -> None:
        """``model.safetensors``, ``train_state.pt`` and ``config.json`` as one commit (rank 0): all three are
        staged first (a full disk replaces none of them), then renamed with ``config.json`` last, so
        ``config.json`` never names an epoch that ``train_state.pt`` does not hold."""
        if self.di.is_main:
            weights, cfg = model_files(module, config)
            state = {**state, "world_size": self.di.world_size, "args": self.args}
            save_files(self.out, [(MODEL_FILE, weights), (STATE_FILE, train_state_bytes(state)), (CONFIG_FILE, cfg)])

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
