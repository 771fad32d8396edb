"""The one training loop (in the shape of timm's ``train.py``: ``train_one_epoch`` + evaluate + save per epoch).

:func:`fit` runs epochs of :func:`train_one_epoch` for any :class:`Task` (see :mod:`linvision.engine` for the
interface), then chooses the weights to keep (raw or EMA) by the task's ``score`` on the validation data, reports
the chosen weights on the test data, and saves through a :class:`~linvision.engine.run.RunFolder`. It gives every
task: data-parallel training (DDP; all ranks step together), a per-step cosine schedule, gradient clipping, AMP,
EMA, non-finite checks that keep the last good checkpoint, recovery checkpoints every N steps and an exact resume
(the position inside the epoch, every rank's RNG states, the epoch's running statistics), and progress as a tqdm
bar on a terminal or one line per epoch (plus one every ``log_interval`` steps) otherwise.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from tqdm import tqdm

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn, random_seed

from ..checkpoint import STATE_FILE, check_state_dict, get_rng_states, set_rng_states
from ..distributed import DistInfo, all_gather_object, all_reduce_sum
from ..errors import LinvisionError
from .run import Panel, RunFolder

__all__ = ["Task", "StepInfo", "Trainer", "LoopConfig", "build_trainer", "train_one_epoch", "fit",
           "progress_enabled"]

_log = logging.getLogger("linvision")


def progress_enabled(di: DistInfo | None = None) -> bool:
    """tqdm bars only on rank 0 and only when stderr is a terminal (else one log line per epoch, as timm)."""
    return (di is None or di.is_main) and sys.stderr.isatty()


@dataclass(frozen=True)
class StepInfo:
    """Where a training step stands: ``epoch`` (0-based), ``index`` of the batch in the epoch, ``steps_per_epoch``,
    ``step`` (optimizer steps taken before this one), and the process's ``rank`` of ``world_size`` on ``device``."""

    epoch: int
    index: int
    steps_per_epoch: int
    step: int
    rank: int
    world_size: int
    device: torch.device

    @property
    def position(self) -> float:
        """Fractional epoch of this step (``epoch + index / steps_per_epoch``)."""
        return self.epoch + self.index / max(self.steps_per_epoch, 1)


class Task(Protocol):
    """What a task gives the loop (documented in :mod:`linvision.engine`)."""

    metric_fields: Sequence[str]
    score_name: str
    panels: Sequence[Panel]
    title: str

    def prepare(self, batch: Any) -> tuple[Any, int]: ...

    def train_step(self, net: torch.nn.Module, batch: Any, info: StepInfo
                   ) -> tuple[torch.Tensor, int, dict[str, float]]: ...

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def evaluate(self, model: torch.nn.Module, loader: Any, di: DistInfo, desc: str) -> dict[str, Any]: ...

    def on_epoch_start(self, epoch: int, trainer: "Trainer") -> None: ...

    def model_config(self, epoch: int, step: int, weights: str, metrics: dict[str, Any],
                     choice: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class LoopConfig:
    """Loop settings: ``epochs``, ``seed`` (per-epoch RNG streams), ``save_every`` (recovery checkpoint every N
    steps, 0 = epoch ends only), ``max_steps`` (of this invocation; ends that epoch early), ``log_interval``
    (without a terminal: a progress line every N steps, 0 = epoch lines only), ``clip_grad`` (0 = off),
    ``amp`` (float16 + grad scaler on CUDA, bfloat16 on CPU) and ``sync_bn`` (BatchNorm over all ranks)."""

    epochs: int
    seed: int = 0
    save_every: int = 0
    max_steps: int | None = None
    log_interval: int = 0
    clip_grad: float = 0.0
    amp: bool = False
    sync_bn: bool = False  # under DDP on CUDA: BatchNorm statistics over the global batch (timm's --sync-bn)


@dataclass
class Trainer:
    """The optimisation state the loop drives: ``model`` (unwrapped), ``net`` (DDP-wrapped under torchrun, else
    ``model``), ``optimizer``, per-step ``scheduler``, optional ``ema``, AMP ``scaler``, and counters."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: ModelEmaV3 | None
    scaler: torch.amp.GradScaler
    di: DistInfo
    step: int = 0
    steps_this_run: int = 0
    last_ckpt: str = ""  # what the last written train_state.pt holds, for the non-finite message
    history: list[dict[str, Any]] = field(default_factory=list)


def build_trainer(model: torch.nn.Module, di: DistInfo, *, steps_per_epoch: int, epochs: int, opt: str, lr: float,
                  weight_decay: float, warmup_epochs: float, warmup_lr: float, min_lr: float,
                  ema_decay: float | None = None, amp: bool = False) -> Trainer:
    """timm AdamW-style optimizer (``create_optimizer_v2``), a per-step cosine schedule with linear warm-up
    (``create_scheduler_v2``, ``updates_per_epoch`` = ``steps_per_epoch``), ``ModelEmaV3`` if ``ema_decay``, and
    the grad scaler; ``model`` must already be on ``di.device``. The DDP wrapper is added by :func:`fit`."""
    optimizer = create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=warmup_epochs,
                                       warmup_lr=warmup_lr, min_lr=min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True) if ema_decay is not None else None
    scaler = torch.amp.GradScaler(di.device.type, enabled=amp and di.device.type == "cuda")
    return Trainer(model, model, optimizer, scheduler, ema, scaler, di)


def _restore(trainer: Trainer, state: dict[str, Any], f: Any, same_epochs: bool) -> None:
    check_state_dict(trainer.model, state["model"], f)
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if same_epochs:  # else: the new, longer/shorter cosine takes over
            trainer.scheduler.load_state_dict(state["scheduler"])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            trainer.scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise LinvisionError(f"cannot resume from {f}: its optimizer/scheduler/EMA state does not fit this run "
                             f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    trainer.step, trainer.history = state["step"], state["history"]
    trainer.scheduler.step_update(trainer.step)


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _nonfinite(trainer: Trainer, run: RunFolder, what: str, value: float, epoch: int,
               at: int | None = None) -> LinvisionError:
    where = (f"the last good checkpoint ({trainer.last_ckpt}) is kept in {run.out}" if trainer.last_ckpt else
             "no checkpoint was written")
    return LinvisionError(f"non-finite {what} ({value}) at step {trainer.step + 1 if at is None else at} (epoch "
                          f"{epoch + 1}); training stopped, {where}. Try a lower --lr or --clip-grad")


def _save_state(trainer: Trainer, run: RunFolder, epoch_done: int, batch_in_epoch: int,
                stats: dict[str, Any] | None, model: tuple[torch.nn.Module, dict[str, Any]] | None = None) -> None:
    """train_state.pt (a collective: every rank's RNG state and epoch statistics go in; rank 0 writes); with
    ``model`` = (module, config) also model.safetensors + config.json, all three as one commit."""
    if not _all_finite(trainer.model):
        raise LinvisionError(f"non-finite weights after step {trainer.step}; training stopped, not saved; the last "
                             f"good checkpoint ({trainer.last_ckpt or 'none'}) is kept in {run.out}. Try a lower --lr")
    ranks = all_gather_object({"rng": get_rng_states(), "stats": stats}, trainer.di)
    save = run.save_state if model is None else (lambda state: run.save_epoch(*model, state))
    save({
        "model": trainer.model.state_dict(), "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(), "epoch": epoch_done, "step": trainer.step,
        "batch_in_epoch": batch_in_epoch, "epoch_stats": [r["stats"] for r in ranks] if stats is not None else None,
        "rng": ranks[0]["rng"], "rng_per_rank": [r["rng"] for r in ranks], "history": trainer.history})
    trainer.last_ckpt = f"epoch {epoch_done}" if not batch_in_epoch else \
        f"epoch {epoch_done + 1} in progress, step {trainer.step}"


def _optimizer_step(trainer: Trainer, run: RunFolder, loss: torch.Tensor, cfg: LoopConfig, epoch: int) -> None:
    opt, scaler = trainer.optimizer, trainer.scaler
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.clip_grad or not scaler.is_enabled():
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.clip_grad or float("inf"))
        if not scaler.is_enabled() and not torch.isfinite(norm):  # the scaler skips such steps itself
            raise _nonfinite(trainer, run, "gradient norm", float(norm), epoch)
    scaler.step(opt)
    scaler.update()
    trainer.step += 1
    trainer.steps_this_run += 1
    trainer.scheduler.step_update(trainer.step)
    if trainer.ema is not None:
        trainer.ema.update(trainer.model, step=trainer.step)


def train_one_epoch(task: Task, trainer: Trainer, run: RunFolder, loader: Any, epoch: int, cfg: LoopConfig,
                    first: int = 0, stats: dict[str, float] | None = None) -> tuple[dict[str, float], int, bool]:
    """Train one epoch (from batch ``first`` with running ``stats`` when resuming inside it).

    Per batch: ``task.prepare`` (images received, or nothing to train on), a cross-rank check that every rank
    has a batch (else all skip it: DDP needs every rank in every step), ``task.train_step`` under autocast, a
    global non-finite check, backward, clipping, optimizer/scheduler/EMA step, running sums, progress, and a
    recovery checkpoint every ``cfg.save_every`` steps. Returns ``(this rank's sums, batches done, stop)``:
    ``stop`` when ``cfg.max_steps`` was reached.
    """
    di, steps_per_epoch = trainer.di, len(loader) + first
    amp_dtype = torch.float16 if di.device.type == "cuda" else torch.bfloat16
    stats = dict(stats) if stats else {"seen": 0, "loss_sum": 0.0, "received": 0, "seconds": 0.0}
    t0 = time.perf_counter() - stats["seconds"]
    bar = tqdm(loader, total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               file=sys.stderr, dynamic_ncols=True, leave=False, disable=not progress_enabled(di))
    batch_idx, stop = first, False
    trainer.net.train()
    for batch in bar:
        batch_idx += 1
        batch, received = task.prepare(batch) if batch is not None else (None, 0)
        stats["received"] += received
        ready = batch is not None
        if di.distributed:  # all ranks step together: skip the step if any rank has nothing to train on
            ready = all_reduce_sum([float(ready)], di).item() == di.world_size
        if not ready:
            continue
        info = StepInfo(epoch, batch_idx - 1, steps_per_epoch, trainer.step, di.rank, di.world_size, di.device)
        with torch.autocast(di.device.type, dtype=amp_dtype, enabled=cfg.amp):
            loss, n, sums = task.train_step(trainer.net, batch, info)
        loss_value = loss.item()
        global_loss = all_reduce_sum([loss_value], di).item() / di.world_size if di.distributed else loss_value
        if not math.isfinite(global_loss):
            raise _nonfinite(trainer, run, "loss", global_loss, epoch)
        _optimizer_step(trainer, run, loss, cfg, epoch)
        stats["seen"] += n
        stats["loss_sum"] += loss_value * n
        for k, v in sums.items():
            stats[k] = stats.get(k, 0) + v
        if di.is_main and (bar.disable is False or cfg.log_interval):
            _show_progress(task, trainer, bar, stats, t0, batch_idx, steps_per_epoch, epoch, cfg)
        if cfg.save_every and trainer.step % cfg.save_every == 0:
            stats["seconds"] = time.perf_counter() - t0
            _save_state(trainer, run, epoch, batch_idx, stats)
        if cfg.max_steps and trainer.steps_this_run >= cfg.max_steps:
            stop = True
            break
    bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats, batch_idx, stop


def _show_progress(task: Task, trainer: Trainer, bar: Any, stats: dict[str, float], t0: float, batch_idx: int,
                   steps_per_epoch: int, epoch: int, cfg: LoopConfig) -> None:
    seen = max(stats["seen"], 1)
    shown = {"loss": f"{stats['loss_sum'] / seen:.3f}",
             **{k.removeprefix("train_"): f"{v:.1f}" for k, v in task.train_metrics(stats).items()},
             "img_s": f"{trainer.di.world_size * seen / max(time.perf_counter() - t0, 1e-9):.0f}",
             "lr": f"{trainer.optimizer.param_groups[0]['lr']:.2e}"}
    if not bar.disable:
        bar.set_postfix(**shown)
    elif trainer.step % cfg.log_interval == 0:
        _log.info("epoch %d/%d batch %d/%d %s", epoch + 1, cfg.epochs, batch_idx, steps_per_epoch,
                  " ".join(f"{k} {v}" for k, v in shown.items()))


def _round(k: str, v: Any) -> Any:
    return round(v, 5 if k.endswith("loss") else 3) if isinstance(v, float) else v


def _choose_weights(task: Task, trainer: Trainer, val: tuple[str, Any] | None, test: tuple[str, Any] | None
                    ) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(weights, row columns, metrics reported for the chosen weights, choice record)``: the raw or EMA
    weights, whichever has the higher validation ``score`` (raw on a tie); the test split only reports."""
    cands = {"raw": trainer.model, **({"ema": trainer.ema.module} if trainer.ema is not None else {})}
    row: dict[str, Any] = {}
    if val is not None:
        split, loader = val
        scores = {k: task.evaluate(m, loader, trainer.di, f"{split} {k}") for k, m in cands.items()}
        which = max(scores, key=lambda k: scores[k]["score"])
        row.update({f"{split}_{task.score_name}_{k}": _round("", float(m["score"])) for k, m in scores.items()})
        row.update({f"{split}_{k}": _round(k, v) for k, v in scores[which].items() if isinstance(v, (int, float))})
        tie = len({m["score"] for m in scores.values()}) == 1
        reason = ("the only weights" if len(cands) == 1 else f"equal {split} {task.score_name}: raw kept" if tie
                  else f"higher {split} {task.score_name}")
        choice = {"weights": which, "split": split, "reason": reason,
                  "scores": {k: round(float(m["score"]), 4) for k, m in scores.items()}}
        reported = {**scores[which], "split": split}
    else:
        which = "ema" if "ema" in cands else "raw"
        choice = {"weights": which, "split": None, "reason": "no validation data: "
                  + ("the EMA weights are kept (timm's default), not chosen" if which == "ema" else "raw weights")}
        reported = {}
    if test is not None:
        split, loader = test
        reported = {**task.evaluate(cands[which], loader, trainer.di, split), "split": split}
        row.update({f"{split}_{k}": _round(k, v) for k, v in reported.items() if isinstance(v, (int, float))})
    return which, row, reported, choice


def fit(task: Task, trainer: Trainer, run: RunFolder, train_loader: Any, cfg: LoopConfig,
        val: tuple[str, Any] | None = None, test: tuple[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg.epochs`` epochs (resuming from ``run.state`` if set); returns ``{"epoch", "step", "weights",
    "metrics" (of the kept weights on ``test``, else ``val``), "choice", "history"}``.

    After each epoch: the candidates (raw, and EMA if any) are evaluated on ``val = (split name, loader)`` and
    the best ``score`` is kept (without ``val``: EMA if any, else raw); the kept weights alone are evaluated on
    ``test`` (reported, never used for a choice); then ``model.safetensors`` + ``config.json``
    (``task.model_config``), ``train_state.pt``, ``metrics.csv`` (``task.metric_fields``) and ``curves.png``
    (``task.panels``) are written. Every rank calls this (it is a collective under torchrun).
    """
    di, state = trainer.di, run.state
    start_epoch = start_batch = 0
    if state is not None:
        _restore(trainer, state, run.out / STATE_FILE, state["args"].get("epochs") == cfg.epochs)
        start_epoch, start_batch = state["epoch"], state.get("batch_in_epoch", 0)
        trainer.last_ckpt = (f"epoch {start_epoch}" if not start_batch else
                             f"epoch {start_epoch + 1} in progress, step {trainer.step}")
        _log.info("resumed %s at epoch %d%s, step %d", run.out, start_epoch,
                  f" + {start_batch}/{len(train_loader)} batches" if start_batch else "", trainer.step)
    if di.distributed:
        if cfg.sync_bn and di.device.type == "cuda":  # SyncBatchNorm needs CUDA
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(trainer.model)
        trainer.net = torch.nn.parallel.DistributedDataParallel(
            trainer.model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    batch_size = train_loader.batch_size
    stop, last = start_epoch >= cfg.epochs, None
    for epoch in range(start_epoch, cfg.epochs):
        first = start_batch if epoch == start_epoch else 0
        train_loader.sampler.set_epoch(epoch, start=first * batch_size)
        random_seed(cfg.seed + 1_000_003 * (epoch + 1), di.rank)  # dropout/drop-path/mixup RNG: (seed, epoch, rank)
        if epoch == 0 and first == 0:
            # Runs before resumable mid-epoch checkpoints drew the loader's worker seed from this RNG when the
            # first epoch's (persistent) workers started; keep that draw so those runs' numbers reproduce.
            torch.empty((), dtype=torch.int64).random_()
        if first:  # inside an epoch: continue the RNG streams exactly where the checkpoint left them
            set_rng_states(state["rng_per_rank"][di.rank] if "rng_per_rank" in state else state["rng"])
        else:
            task.on_epoch_start(epoch, trainer)
        stats = state["epoch_stats"][di.rank] if first and state.get("epoch_stats") else None
        stats, batch_idx, stop = train_one_epoch(task, trainer, run, train_loader, epoch, cfg, first, stats)
        trainer.scheduler.step(epoch + 1)
        last = _end_epoch(task, trainer, run, train_loader, epoch, stats, batch_idx, cfg, val, test)
        if stop:
            break
    if last is None:  # nothing left to train (resumed a finished run)
        h = trainer.history[-1] if trainer.history else {}
        split = (test or val or ("test", None))[0]
        last = {"weights": h.get("weights"), "choice": None,
                "metrics": {k[len(split) + 1:]: v for k, v in h.items() if k.startswith(split + "_")}}
    return {"epoch": trainer.history[-1]["epoch"] if trainer.history else 0, "step": trainer.step,
            "history": trainer.history, **last}


def _end_epoch(task: Task, trainer: Trainer, run: RunFolder, loader: Any, epoch: int, stats: dict[str, float],
               batch_idx: int, cfg: LoopConfig, val: tuple[str, Any] | None, test: tuple[str, Any] | None
               ) -> dict[str, Any]:
    """Reduce the epoch's sums over ranks, choose and evaluate the weights, write the row and every file."""
    di, t_end = trainer.di, time.perf_counter()
    expected = (batch_idx * loader.batch_size if loader.drop_last else
                min(batch_idx * loader.batch_size, loader.sampler.num_samples))
    keys = sorted(k for k in stats if k != "seconds")
    *sums, expected = all_reduce_sum([stats[k] for k in keys] + [expected], di).tolist()
    totals = dict(zip(keys, sums))
    skipped = int(expected - totals["received"])
    if di.distributed:
        # Each rank's BatchNorm running statistics saw only its shard: average them (timm's --dist-bn reduce), so
        # every rank evaluates, and rank 0 saves, the same weights (a no-op for models without BatchNorm).
        for m in filter(None, (trainer.model, trainer.ema.module if trainer.ema is not None else None)):
            distribute_bn(m, di.world_size, reduce=True)
    which, cols, metrics, choice = _choose_weights(task, trainer, val, test)
    seen = totals["seen"]
    row = {"epoch": epoch + 1, "step": trainer.step, "train_loss": round(totals["loss_sum"] / max(seen, 1), 5),
           **{k: _round(k, v) for k, v in task.train_metrics(totals).items()}, **cols, "weights": which,
           "lr": trainer.optimizer.param_groups[0]["lr"],
           "img_per_s": round(seen / max(stats["seconds"], 1e-9), 1),
           "epoch_seconds": round(stats["seconds"] + time.perf_counter() - t_end, 2)}
    trainer.history.append({k: row.get(k, "") for k in task.metric_fields})
    kept = trainer.ema.module if which == "ema" else trainer.model
    if not _all_finite(kept):
        raise _nonfinite(trainer, run, "weights", float("nan"), epoch, at=trainer.step)
    config = task.model_config(epoch + 1, trainer.step, which, metrics, choice)
    _save_state(trainer, run, epoch + 1, 0, None, (kept, config))
    run.write_history(trainer.history, task.metric_fields, task.panels, task.title)
    if di.is_main:
        h = trainer.history[-1]
        body = " | ".join(f"{k} {v}" for k, v in h.items() if k not in ("epoch", "step", "lr") and v != "")
        unreadable = f", {skipped} unreadable image(s) skipped" if skipped else ""
        tqdm.write(f"epoch {h['epoch']}/{cfg.epochs} step {trainer.step}: {body}{unreadable}", file=sys.stderr)
        if metrics.get("skipped"):
            _log.warning("%d unreadable %s image(s) skipped", metrics["skipped"], metrics["split"])
    return {"weights": which, "metrics": metrics, "choice": choice}

