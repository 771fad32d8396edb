"""Run many ``linvision train`` runs at once and tabulate their test / validation top-1 (the README's recipe tables).

Usage::

    python scripts/recipe_sweep.py JOBS --out DIR [--parallel 10] [--device cuda] [--budget SECONDS]

``JOBS`` is a text file, one run per line, ``NAME | train options`` (``#`` starts a comment), e.g.::

    base_s0   | --seed 0
    wu03_s0   | --seed 0 --warmup-epochs 0.3
    bs32sq_s1 | --seed 1 --batch-size 32 --lr 2.83e-3

Each run is ``python -m linvision train --device D --threads 1 --workers 1 --output DIR/runs/NAME OPTIONS`` in its
own process (``OMP_NUM_THREADS=1``), ``--parallel`` at a time; its log goes to ``DIR/logs/NAME.log``. No new run
starts after ``--budget`` seconds. Accuracy does not depend on the load, so on one GPU (or many CPU cores) a grid
of short runs finishes in minutes: the README's 7-epoch sweep (44 runs, ``scripts/sweeps/main_job.txt``) took about
8 minutes of one H200 in all, and at 3 epochs the CUDA runs gave exactly the CPU runs' test top-1.

Writes ``DIR/results.csv`` (one row per run: name, options, rc, seconds, epochs and the last ``metrics.csv`` row's
``test_top1``, ``val_top1``, ``train_loss``, ``weights``) and prints a markdown table per configuration (the name
before a trailing ``_s<seed>``): the runs' test top-1 and the means of test and validation top-1.

Errors (one line, exit 2): the jobs file is missing or a line is not ``NAME | OPTIONS``, or two lines share a NAME.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

METRICS = ("epochs", "test_top1", "val_top1", "train_loss", "weights")  # from the run's last metrics.csv row
FIELDS = ("name", "options", "rc", "seconds", *METRICS)


def read_jobs(path: Path) -> List[Tuple[str, str]]:
    """``[(name, options)]`` from a jobs file. Raises ``ValueError`` (one line) on a malformed file."""
    if not path.is_file():
        raise ValueError(f"recipe_sweep: jobs file {path} does not exist")
    jobs: List[Tuple[str, str]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, options = (p.strip() for p in line.partition("|"))
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"recipe_sweep: {path}:{n}: expected 'NAME | train options', got {line!r}")
        if any(name == j[0] for j in jobs):
            raise ValueError(f"recipe_sweep: {path}:{n}: run name {name!r} given twice")
        jobs.append((name, options))
    return jobs


def last_metrics(run_dir: Path) -> Dict[str, str]:
    """The last row of ``run_dir/metrics.csv`` (``{}`` when there is none) plus ``epochs``: its row count."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return dict(rows[-1], epochs=str(len(rows))) if rows else {}


def config_name(name: str) -> str:
    """``wu03_s2`` → ``wu03``: the run's configuration, without its seed suffix."""
    return re.sub(r"_s\d+$", "", name)


def summarize(results: List[Dict[str, str]]) -> str:
    """A markdown table, one row per configuration: runs, test top-1 of each, mean test and validation top-1 (%)."""
    groups: Dict[str, List[Dict[str, str]]] = {}
    for r in results:
        if r.get("test_top1"):
            groups.setdefault(config_name(r["name"]), []).append(r)
    lines = ["| configuration | runs | test top-1 | mean test | mean val |", "|---|---|---|---|---|"]
    for cfg, rs in groups.items():
        tests = [float(r["test_top1"]) for r in rs]
        vals = [float(r["val_top1"]) for r in rs if r.get("val_top1")]
        lines.append(f"| {cfg} | {len(rs)} | {' / '.join(f'{t:.1f}' for t in tests)} | {statistics.mean(tests):.2f} | "
                     + (f"{statistics.mean(vals):.2f} |" if vals else "|"))
    return "\n".join(lines)


def run_all(jobs: List[Tuple[str, str]], out: Path, parallel: int, device: str, budget: float) -> List[Dict[str, str]]:
    """Runs every job (at most ``parallel`` at a time; none started after ``budget`` s); one result dict per run."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    queue, running, results, t0 = list(jobs), {}, [], time.time()
    while queue or running:
        while queue and len(running) < parallel and time.time() - t0 < budget:
            name, options = queue.pop(0)
            cmd = [sys.executable, "-m", "linvision", "train", "--device", device, "--threads", "1", "--workers", "1",
                   "--output", str(out / "runs" / name), *shlex.split(options)]
            log = open(out / "logs" / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.time(),
                             options, log)
        if queue and time.time() - t0 >= budget:
            print(f"recipe_sweep: budget spent, not started: {', '.join(q[0] for q in queue)}", flush=True)
            results += [dict(name=n, options=o, rc="not started") for n, o in queue]
            queue = []
        for name, (proc, start, options, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            m = last_metrics(out / "runs" / name)
            r = dict(name=name, options=options, rc=str(proc.returncode), seconds=f"{time.time() - start:.0f}",
                     **{k: m.get(k, "") for k in METRICS})
            results.append(r)
            print(f"[{time.time() - t0:5.0f} s] {name}: rc {r['rc']}, test top-1 {r['test_top1'] or '-'}, "
                  f"val {r['val_top1'] or '-'}, {r['epochs'] or 0} epochs", flush=True)
            del running[name]
        time.sleep(0.5)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jobs", type=Path, help="jobs file: one 'NAME | train options' per line")
    ap.add_argument("--out", type=Path, required=True, help="output folder (runs/, logs/, results.csv)")
    ap.add_argument("--parallel", type=int, default=10, help="runs at a time [10]")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="train --device [auto]")
    ap.add_argument("--budget", type=float, default=float("inf"), help="start no run after this many seconds")
    args = ap.parse_args(argv)
    try:
        if args.parallel < 1:
            raise ValueError(f"recipe_sweep: --parallel must be >= 1, got {args.parallel}")
        jobs = read_jobs(args.jobs)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    results = run_all(jobs, args.out, args.parallel, args.device, args.budget)
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in FIELDS} for r in results)
    print(summarize(results))
    return 0 if all(r["rc"] == "0" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
