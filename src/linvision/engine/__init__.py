"""Training, evaluation and prediction: one training loop for every task (CPU or CUDA, deterministic,
resumable, data-parallel under torchrun).

Layout (in the shape of timm's ``train.py``):

- :mod:`linvision.engine.run` — :class:`RunFolder`: the output folder (writable check, resume with locked
  arguments / number of processes / completeness checks, atomic saves of ``model.safetensors`` + ``config.json``,
  ``train_state.pt``, ``metrics.csv`` and ``curves.png`` via the one :func:`plot_curves`).
- :mod:`linvision.engine.loop` — :func:`train_one_epoch` and :func:`fit` (epochs, model choice on validation
  data, test report, saves, exact mid-epoch resume, DDP with every rank stepping together).
- :mod:`linvision.engine.classification` — :class:`ClassificationTask` and ``train(args)`` (``linvision train``),
  plus ``create_model``, ``evaluate``, ``predict``. The ViT-ResNAS super-network
  (:mod:`linvision.nas.train`) is another task on the same loop.

The Task interface (:class:`linvision.engine.loop.Task`; a new task, e.g. segmentation, implements it and calls
:func:`build_trainer` + :func:`fit` - the loop itself is not touched)::

    class MyTask:
        metric_fields: Sequence[str]   # metrics.csv columns, in order. The loop fills "epoch", "step",
                                       # "train_loss", "weights", "lr", "img_per_s", "epoch_seconds", the
                                       # train_metrics() keys, "<split>_<key>" for each number evaluate() returns
                                       # (split = "val"/"test"/..., as passed to fit) and
                                       # "<val split>_<score_name>_<raw|ema>" (each candidate's score).
        score_name: str                # what "score" is (e.g. "top1", "miou"): names the candidate columns
        panels: Sequence[Panel]        # curves.png: Panel(title, ylabel, ((column, label), ...))
        title: str                     # curves.png title

        def prepare(self, batch) -> tuple[batch | None, int]:
            # CPU side, per loader batch (never None here): (what train_step gets, or None if there is nothing to
            # train on; images received, for the "unreadable images skipped" count).
        def train_step(self, net, batch, info: StepInfo) -> tuple[loss, int, dict[str, float]]:
            # Forward under the loop's autocast: (mean loss [scalar tensor], samples n, per-step sums such as
            # {"correct": k}). net is DDP-wrapped under torchrun. info: epoch, index, steps_per_epoch, step
            # (optimizer steps before this one), rank, world_size, device, position (fractional epoch).
        def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
            # Row columns from the epoch's sums over all ranks (they hold "seen" and "loss_sum" too),
            # e.g. {"train_acc": 100 * sums["correct"] / sums["seen"]}.
        def evaluate(self, model, loader, di: DistInfo, desc: str) -> dict[str, Any]:
            # Metrics of the whole split (reduce over ranks: each rank holds a shard); must hold "score"
            # (higher is better), used to choose raw vs EMA weights on validation data.
        def on_epoch_start(self, epoch: int, trainer: Trainer) -> None:
            # Hook before an epoch's first step (not when resuming inside it), e.g. the super-network rewires.
        def model_config(self, epoch, step, weights, metrics, choice) -> dict:
            # config.json written next to the kept weights (metrics: the kept weights' test or validation
            # metrics; choice: {"weights", "split", "reason", "scores"}).
"""
from __future__ import annotations

from .classification import (METRIC_FIELDS, RESUME_LOCKED_ARGS, ClassificationTask, check_model_name,  # noqa: F401
                             create_model, evaluate, model_data_config, predict, setup_threads, train)
from .loop import LoopConfig, StepInfo, Task, Trainer, build_trainer, fit, progress_enabled, train_one_epoch  # noqa
from .run import Panel, RunFolder, plot_curves, write_metrics_csv  # noqa: F401

__all__ = ["setup_threads", "check_model_name", "create_model", "model_data_config", "evaluate", "predict", "train",
           "RESUME_LOCKED_ARGS", "METRIC_FIELDS", "ClassificationTask", "Task", "StepInfo", "Trainer", "LoopConfig",
           "build_trainer", "train_one_epoch", "fit", "progress_enabled", "RunFolder", "Panel", "plot_curves",
           "write_metrics_csv"]
