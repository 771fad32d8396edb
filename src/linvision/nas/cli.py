"""``linvision supernet train`` and ``linvision search`` (the ViT-ResNAS pipeline; hooked into
:mod:`linvision.cli` by :func:`add_nas_commands`).

Pipeline: ``linvision supernet train`` → ``linvision search --supernet DIR --macs C`` →
``linvision train --arch DIR/best.json`` (retrain the winner from scratch).
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from .search import SEARCH_DEFAULTS
from .train import SUPERNET_DEFAULTS

__all__ = ["add_nas_commands"]

_SUPERNET_EPILOG = """examples:
  linvision supernet train --space demo --data ../shared/data/cifar10-jpeg.tar.gz --epochs 3 --output runs/sn
  linvision supernet train --resume runs/sn --epochs 5          # continue (and extend) a run
  torchrun --nproc-per-node 8 -m linvision supernet train --space tiny --data /imagenet --img-size 224 \\
      --epochs 120 --choice-warmup-epochs 15 --batch-size 128 --archs-per-step 2

Each step trains --archs-per-step sub-networks at once, each on its slice of the batch (multi-architecture
sampling). The choice sets grow from the largest sub-network during the first --choice-warmup-epochs, and heads /
MLP neurons are re-ordered by importance (rewiring) at each epoch start meanwhile. --holdout images of the
training split are held out for the search. Every epoch writes model.safetensors, config.json, train_state.pt,
metrics.csv and curves.png (atomically)."""

_SEARCH_EPILOG = """examples:
  linvision search --supernet runs/sn --macs 9M --population 50 --iterations 5 --top-k 10 --output runs/search
  linvision search --resume runs/search --iterations 8          # continue / extend (the history is the state)
  linvision search --supernet runs/sn --latency-ms 4 --latency-batch 1 --output runs/search-lat
  linvision train --arch runs/search/best.json --data ../shared/data/cifar10-jpeg.tar.gz --epochs 10

Fitness is the top-1 of each sliced sub-network on the super-network's held-out part of the training split (never
the test split). Outputs: history.csv (every evaluated sub-network), best.json (loadable with
`linvision train --arch`), search.png (accuracy vs cost with the Pareto front), search.json (settings).
Under torchrun the candidates of each iteration are evaluated across ranks."""


def _fmt(v: Any) -> str:
    return "none" if v is None else str(v)


def add_nas_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
                     fmt: type = argparse.RawDescriptionHelpFormatter) -> None:
    """Add the ``supernet`` (with its ``train`` sub-command) and ``search`` sub-commands to ``sub``."""
    d = SUPERNET_DEFAULTS
    sn = sub.add_parser("supernet", formatter_class=fmt, help="ViT-ResNAS super-network (train)",
                        description="ViT-ResNAS weight-sharing super-network.")
    sn_sub = sn.add_subparsers(dest="supernet_command", metavar="SUBCOMMAND", required=True)
    t = sn_sub.add_parser("train", parents=[common], formatter_class=fmt, epilog=_SUPERNET_EPILOG,
                          argument_default=argparse.SUPPRESS, help="train a super-network",
                          description="Train a ViT-ResNAS super-network with multi-architecture sampling. "
                                      "Defaults are shown in brackets.")
    t.add_argument("--space", help="search space: tiny, small (official), demo, test, or a JSON file "
                                   f"[{d['space']}]")
    t.add_argument("--data", metavar="PATH", help="data folder or archive [embedded CIFAR-10 subset]")
    t.add_argument("--output", metavar="DIR", help="output folder [runs/supernet-<space>-<timestamp>]")
    t.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR")
    t.add_argument("--img-size", type=int, help="input resolution, a multiple of 56 [the space's]")
    t.add_argument("--epochs", type=int, help=f"[{d['epochs']}]")
    t.add_argument("--batch-size", type=int, help=f"[{d['batch_size']}]")
    t.add_argument("--archs-per-step", type=int, help="sub-networks trained per step and process, each on its "
                                                      "share of the batch "
                                                      f"[{d['archs_per_step']}]")
    t.add_argument("--choice-warmup-epochs", type=float, help="progressive warm-up of the choice sets, with "
                                                              f"rewiring [{d['choice_warmup_epochs']}]")
    t.add_argument("--lr", type=float, help=f"peak learning rate [{d['lr']}]")
    t.add_argument("--min-lr", type=float, help=f"[{d['min_lr']}]")
    t.add_argument("--warmup-lr", type=float, help=f"[{d['warmup_lr']}]")
    t.add_argument("--warmup-epochs", type=float, help=f"learning-rate warm-up epochs [{d['warmup_epochs']}]")
    t.add_argument("--weight-decay", type=float, help=f"[{d['weight_decay']}]")
    t.add_argument("--opt", help=f"timm optimizer name [{d['opt']}]")
    t.add_argument("--smoothing", type=float, help=f"label smoothing [{d['smoothing']}]")
    t.add_argument("--clip-grad", type=float, help=f"gradient-norm clipping, 0 = off [{d['clip_grad']}]")
    t.add_argument("--drop-path", type=float, help=f"stochastic depth rate [{d['drop_path']}]")
    t.add_argument("--holdout", type=float, help="training images held out for the search: a fraction (< 1) or "
                                                 f"a count [{d['holdout']}]")
    t.add_argument("--holdout-seed", type=int, help=f"[{d['holdout_seed']}]")
    t.add_argument("--train-subset", type=int, metavar="N", help="train on a class-balanced subset of N images")
    t.add_argument("--auto-augment", metavar="POLICY", help=f"timm auto-augment policy [{_fmt(d['auto_augment'])}]")
    t.add_argument("--seed", type=int, help=f"[{d['seed']}]")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps of this invocation")
    t.add_argument("--save-every-steps", type=int, metavar="N", help="also write the resumable train_state.pt "
                                                                    "after every N-th step [0: epoch ends only]")
    t.add_argument("--log-interval", type=int, metavar="N", help="when stderr is not a terminal, also log progress "
                                                                "every N steps [0: one line per epoch]")
    t.set_defaults(func=_cmd_supernet_train)

    s = SEARCH_DEFAULTS
    se = sub.add_parser("search", parents=[common], formatter_class=fmt, epilog=_SEARCH_EPILOG,
                        argument_default=argparse.SUPPRESS, help="evolutionary search over a super-network",
                        description="Evolutionary search of a ViT-ResNAS sub-network under a MACs or latency "
                                    "constraint. Defaults (the paper's) are shown in brackets.")
    se.add_argument("--supernet", metavar="DIR", help="a `linvision supernet train` output folder")
    se.add_argument("--data", metavar="PATH", help="data set (for the held-out images) [the super-network's]")
    se.add_argument("--output", metavar="DIR", help="output folder [runs/search-<timestamp>]")
    se.add_argument("--resume", metavar="DIR", help="continue the search in DIR (its history is the state)")
    se.add_argument("--macs", metavar="C", help="MACs budget, e.g. 1.79G or 9M: cost in [lower·C, C]")
    se.add_argument("--latency-ms", type=float, metavar="C", help="latency budget (ms) on this device instead")
    se.add_argument("--latency-batch", type=int, help=f"batch size of the latency measurements [{s['latency_batch']}]")
    se.add_argument("--latency-mode", choices=("table", "measure"),
                    help=f"calibrated per-component table or direct measurement [{s['latency_mode']}]")
    se.add_argument("--latency-table", metavar="FILE", help="JSON latency table: read if it exists, else calibrated "
                                                            "and written")
    se.add_argument("--lower", type=float, help=f"lower end of the window as a fraction of C [{s['lower']}]")
    se.add_argument("--population", type=int, help=f"random sub-networks of iteration 0 [{s['population']}]")
    se.add_argument("--iterations", type=int, help=f"search iterations, the first random [{s['iterations']}]")
    se.add_argument("--top-k", type=int, help=f"parents: the best K so far [{s['top_k']}]")
    se.add_argument("--mutate-prob", type=float, help=f"per-gene mutation probability [{s['mutate_prob']}]")
    se.add_argument("--mutations", type=int, help="children by mutation per iteration [top-k]")
    se.add_argument("--crossovers", type=int, help="children by crossover per iteration [mutations]")
    se.add_argument("--batch-size", type=int, help=f"evaluation batch size [{s['batch_size']}]")
    se.add_argument("--holdout-limit", type=int, metavar="N", help="evaluate on N of the held-out images [all]")
    se.add_argument("--random-archs", type=int, metavar="N", help="also write N random sub-networks of the same "
                                                                  "window, evaluated alike (random_archs.json) [0]")
    se.add_argument("--seed", type=int, help=f"[{s['seed']}]")
    se.set_defaults(func=_cmd_search)


def _cmd_supernet_train(ns: argparse.Namespace) -> int:
    from .train import supernet_args, train_supernet
    given = {k: v for k, v in vars(ns).items() if k not in ("func", "command", "supernet_command", "debug")}
    r = train_supernet(supernet_args(given))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"done: epoch {r['epoch']}, step {r['step']}, held-out top-1 largest "
          f"{r.get('holdout_top1_largest', float('nan')):.2f}% smallest "
          f"{r.get('holdout_top1_smallest', float('nan')):.2f}% -> {r['output']}")
    return 0


def _cmd_search(ns: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..errors import LinvisionError
    from ..options import check_options
    from .search import parse_macs, read_settings, run_search
    given = {k: v for k, v in vars(ns).items() if k not in ("func", "command", "debug")}
    merged = dict(SEARCH_DEFAULTS)
    if given.get("resume"):
        merged.update(read_settings(given["resume"]))
        merged["output"] = given["resume"]
    merged.update(given)
    check_options(merged)  # also the stored settings of a resumed search
    if merged.get("macs") is not None:
        try:
            parse_macs(merged["macs"])
        except ValueError as e:
            raise LinvisionError(f"--macs: {e}") from None
    if merged["output"] is None:
        merged["output"] = str(Path("runs") / f"search-{time.strftime('%Y%m%d-%H%M%S')}")
    r = run_search(argparse.Namespace(**merged))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    lat = f", {r['latency_ms']:.3f} ms" if r.get("latency_ms") is not None else ""
    print(f"done: best held-out top-1 {r['top1']:.2f}% at {r['macs'] / 1e6:.2f} MMACs{lat} (iteration "
          f"{r['iteration']}) -> {Path(r['output']) / 'best.json'}")
    return 0


def arch_train_args(given: dict) -> dict:
    """``linvision train --arch FILE``: replace the file name by the validated architecture dict (so the run's
    ``config.json`` rebuilds the model without the file) and take ``--model`` / ``--img-size`` from the file
    (``model``, ``img_size`` entries of a search's ``best.json``; default ``vit_resnas_tiny``) unless given.

    Raises:
        LinvisionError: unreadable file or invalid architecture (the message names the file).
    """
    import json
    from pathlib import Path

    from ..errors import LinvisionError
    from ..models.resnas import load_arch
    given = dict(given)
    f = Path(given["arch"])
    try:
        given["arch"] = load_arch(f)
        doc = json.loads(f.read_text())
    except ValueError as e:
        raise LinvisionError(str(e)) from None
    doc = doc if isinstance(doc, dict) else {}
    given.setdefault("model", doc.get("model", "vit_resnas_tiny"))
    if "img_size" in doc:
        given.setdefault("img_size", doc["img_size"])
    return given
