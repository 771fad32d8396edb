"""Evolutionary search over a trained super-network (``linvision search``; paper Sec. 3.4, official
``evo_search.py`` + ``search_utils/evolver.py``, ``gen_utils.py``).

Iteration 0 draws ``population`` random sub-networks inside the constraint window ``[lower·C, C]``; each later
iteration makes ``mutations`` children of random top-``top_k`` parents (every gene re-drawn with probability
``mutate_prob``) and ``crossovers`` children of two distinct top-``top_k`` parents (each gene from either parent),
all inside the window and never a sub-network evaluated before. Fitness = top-1 of the sliced sub-network on
the held-out part of the training split that the super-network did not train on (never the test split).

The cost is MACs (:func:`~linvision.nas.macs.analytic_macs`) or, beyond the paper, latency on the current device
at a given batch size (:class:`~linvision.nas.latency.LatencyModel`: a calibrated per-component table, or direct measurement).

State: ``history.csv`` (one row per evaluated sub-network, appended durably as soon as it is evaluated) is the
whole state of a search: iteration ``i``'s candidates are a deterministic function of ``(seed, i)`` and the rows
of iterations ``< i``, so ``--resume`` regenerates the interrupted iteration and evaluates only what is missing.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ..checkpoint import atomic_write, check_locked_args
from ..plots import atomic_write_png, new_figure
from ..errors import LinvisionError
from ..distributed import all_gather_object, barrier, broadcast_object, init_distributed
from .latency import LatencyModel
from .macs import analytic_macs, parse_macs
from .space import SearchSpace

__all__ = ["EvolutionarySearch", "LatencyModel", "HISTORY_FIELDS", "read_history", "pareto_front", "plot_search",
           "parse_macs", "read_settings"]

_log = logging.getLogger("linvision")
Arch = Dict[str, Any]
HISTORY_FIELDS = ("iteration", "index", "origin", "macs", "latency_ms", "top1", "loss", "arch")


def read_settings(folder: str | Path) -> Dict[str, Any]:
    """The settings (``search.json``) of the search in ``folder``.

    Raises:
        LinvisionError: no such file, unreadable, not JSON, or not a JSON object (one line naming the file)."""
    f = Path(folder) / SETTINGS_FILE
    if not f.is_file():
        raise LinvisionError(f"cannot resume: no {SETTINGS_FILE} in {folder}")
    try:
        old = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise LinvisionError(f"cannot resume: {f} is not readable JSON ({e})") from None
    if not isinstance(old, dict):
        raise LinvisionError(f"cannot resume: {f} is not a search settings object")
    return old


# --------------------------------------------------------------------------------------------------- evolution
@dataclass
class Candidate:
    arch: Arch
    origin: str
    key: Tuple


class EvolutionarySearch:
    """Candidate generation of the evolutionary search (paper Sec. 3.4).

    Args:
        space: the search space.
        cost: arch → cost (MACs, or latency in ms); ``lower``·``budget`` ≤ cost ≤ ``budget`` is required.
        population, top_k, mutate_prob, mutations, crossovers: as the official ``--init-popu-size``,
            ``--parent-size``, ``--mutate-prob``, ``--mutate-size`` (crossovers default to the same number).
        seed: iteration ``i`` draws from ``random.Random(seed·1000003 + i)``.
        max_tries: draws per wanted candidate before giving up on a crowded window (fewer children are made).
    """

    def __init__(self, space: SearchSpace, cost: Callable[[Arch], float], budget: float, lower: float = 0.975,
                 population: int = 500, top_k: int = 75, mutate_prob: float = 0.3, mutations: Optional[int] = None,
                 crossovers: Optional[int] = None, seed: int = 0, max_tries: int = 2000):
        self.space, self.cost, self.budget, self.lo = space, cost, budget, lower * budget
        self.population, self.top_k, self.mutate_prob = population, top_k, mutate_prob
        self.mutations = top_k if mutations is None else mutations
        self.crossovers = self.mutations if crossovers is None else crossovers
        self.seed, self.max_tries = seed, max_tries
        self.genes = space.genes()

    def feasible(self, arch: Arch) -> bool:
        return self.lo <= self.cost(arch) <= self.budget

    def check_feasible(self) -> None:
        """Raise ValueError if no sub-network can meet the window (smallest too costly / largest too cheap)."""
        lo_cost, hi_cost = self.cost(self.space.smallest()), self.cost(self.space.largest())
        if lo_cost > self.budget or hi_cost < self.lo:
            raise ValueError(f"the constraint window [{self.lo:.4g}, {self.budget:.4g}] is outside what space "
                             f"{self.space.name} can reach ([{lo_cost:.4g}, {hi_cost:.4g}])")

    def _set(self, arch: Arch, g, v) -> None:
        if g.kind == "dims":
            arch["dims"][g.stage] = v
        else:
            arch[g.kind][g.stage][g.block] = v

    def _get(self, arch: Arch, g):
        return arch["dims"][g.stage] if g.kind == "dims" else arch[g.kind][g.stage][g.block]

    def random_candidate(self, rng: random.Random) -> Arch:
        """A random sub-network shrunk into the window (official ``gen_random_network_def``): draw every gene
        uniformly; while too costly, step a random head/MLP gene (later also widths and depth) down one choice;
        redraw if it ends below ``lower·budget``."""
        for _ in range(self.max_tries):
            arch = self.space.random_arch(rng)
            tries = 0
            while self.cost(arch) > self.budget:
                tries += 1
                kinds = ("heads", "mlp") if tries < 100 else ("heads", "mlp", "dims", "present")
                g = rng.choice([g for g in self.genes if g.kind in kinds])
                i = g.choices.index(self._get(arch, g))
                if i + 1 < len(g.choices):
                    self._set(arch, g, g.choices[i + 1])
                if tries > 10_000:
                    break
            arch = self.space.decode(self.space.encode(arch))
            if self.feasible(arch):
                return arch
        raise ValueError(f"could not draw a sub-network with cost in [{self.lo:.4g}, {self.budget:.4g}] after "
                         f"{self.max_tries} tries")

    def mutate(self, parent: Arch, rng: random.Random) -> Arch:
        child = json.loads(json.dumps(parent))
        for g in self.genes:
            if rng.random() < self.mutate_prob:
                self._set(child, g, rng.choice(g.choices))
        return child

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        child = json.loads(json.dumps(a))
        for g in self.genes:
            if rng.random() < 0.5:
                self._set(child, g, self._get(b, g))
        return child

    def propose(self, iteration: int, history: Sequence[Dict[str, Any]]) -> List[Candidate]:
        """The candidates of ``iteration`` given the evaluated ``history`` rows of earlier iterations (dicts with
        ``arch`` and ``top1``): deterministic, distinct, never in ``history``, all inside the window."""
        rng = random.Random(self.seed * 1_000_003 + iteration)
        seen = {self.space.encode(h["arch"]) for h in history}
        out: List[Candidate] = []

        def add(arch: Arch, origin: str) -> bool:
            key = self.space.encode(arch)
            arch = self.space.decode(key)  # canonical (depth rule applied): what is evaluated and stored
            if key in seen or not self.feasible(arch):
                return False
            seen.add(key)
            out.append(Candidate(arch, origin, key))
            return True

        if iteration == 0:
            tries = 0
            while len(out) < self.population and tries < self.max_tries * max(self.population, 1):
                tries += 1
                add(self.random_candidate(rng), "random")
            return out
        ranked = sorted(range(len(history)), key=lambda i: (-float(history[i]["top1"]), i))
        parents = [history[i]["arch"] for i in ranked[:self.top_k]]
        if not parents:
            return out
        for n, origin in ((self.mutations, "mutation"), (self.crossovers, "crossover")):
            made = tries = 0
            if origin == "crossover" and len(parents) < 2:
                continue
            while made < n and tries < self.max_tries * max(n, 1):
                tries += 1
                if origin == "mutation":
                    child = self.mutate(rng.choice(parents), rng)
                else:
                    a, b = rng.sample(parents, 2)
                    child = self.crossover(a, b, rng)
                made += add(child, origin)
        return out


# --------------------------------------------------------------------------------------------------- history
def read_history(path: Path) -> List[Dict[str, Any]]:
    """Rows of a ``history.csv`` (typed: ints, floats, ``arch`` as a dict); ``[]`` if it does not exist.
    A torn last line (killed mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append({"iteration": int(r["iteration"]), "index": int(r["index"]), "origin": r["origin"],
                             "macs": int(r["macs"]),
                             "latency_ms": float(r["latency_ms"]) if r["latency_ms"] else None,
                             "top1": float(r["top1"]), "loss": float(r["loss"]), "arch": json.loads(r["arch"])})
            except (KeyError, TypeError, ValueError):
                break
    return rows


def _append_rows(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """Append rows durably (header first if the file is new); a torn trailing line is cut off first."""
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    if new:
        w.writeheader()
    for r in rows:
        w.writerow({**r, "latency_ms": "" if r.get("latency_ms") is None else repr(r["latency_ms"]),
                    "top1": repr(r["top1"]), "loss": repr(r["loss"]),
                    "arch": json.dumps(r["arch"], separators=(",", ":"))})
    with open(path, "a") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points (cost, accuracy) not dominated by any other (lower-or-equal cost with higher
    accuracy, or lower cost with equal accuracy), sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_search(path: Path, rows: Sequence[Dict[str, Any]], window: Tuple[float, float], cost: str,
                title: str) -> None:
    """PNG of held-out top-1 vs cost for every evaluated sub-network (colour = iteration), the Pareto front and
    the best candidate; the constraint window shaded."""
    if not rows:
        return
    lat = cost == "latency"
    xs = [r["latency_ms"] if lat else r["macs"] / 1e6 for r in rows]
    ys = [r["top1"] for r in rows]
    fig = new_figure((7, 5), dpi=110)
    ax = fig.subplots()
    lo, hi = (window[0], window[1]) if lat else (window[0] / 1e6, window[1] / 1e6)
    ax.axvspan(lo, hi, color="0.9", label="constraint window")
    sc = ax.scatter(xs, ys, c=[r["iteration"] for r in rows], cmap="viridis", s=14, alpha=0.8,
                    label="evaluated sub-networks")
    fig.colorbar(sc, ax=ax, label="iteration")
    front = pareto_front(list(zip(xs, ys)))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "r.-", lw=1.5, ms=8, label="Pareto front")
    b = max(range(len(rows)), key=lambda i: (ys[i], -i))
    ax.plot([xs[b]], [ys[b]], "*", color="orange", ms=16, mec="k", label=f"best: {ys[b]:.2f}%")
    ax.set(xlabel="latency (ms)" if lat else "MACs (M)", ylabel="held-out top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    atomic_write_png(path, fig)


# --------------------------------------------------------------------------------------------------- the command
SEARCH_DEFAULTS: Dict[str, Any] = {
    "supernet": None, "data": None, "output": None, "resume": None,
    "macs": None, "latency_ms": None, "latency_batch": 1, "latency_mode": "table", "latency_table": None,
    "lower": 0.975, "population": 500, "iterations": 20, "top_k": 75, "mutate_prob": 0.3, "mutations": None,
    "crossovers": None, "seed": 0, "batch_size": 256, "holdout_limit": None, "random_archs": 0,
    "threads": None, "workers": None,
}
SEARCH_LOCKED = ("supernet", "macs", "latency_ms", "latency_batch", "latency_mode", "lower", "population", "top_k",
                 "mutate_prob", "mutations", "crossovers", "seed", "holdout_limit")
SETTINGS_FILE, HISTORY_FILE, BEST_FILE, PLOT_FILE = "search.json", "history.csv", "best.json", "search.png"


def _holdout_batches(net, config: Dict[str, Any], data: Optional[str], batch_size: int, limit: Optional[int],
                     workers: Optional[int], seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The super-network's held-out images (eval transform), decoded once and kept in memory as batches."""
    from ..data import ImageFolder, build_eval_loader, holdout_split, resolve_data_root, split_dir, stratified_subset
    root = resolve_data_root(data if data is not None else config["data"])
    targets = ImageFolder(split_dir(root, "train"), None, config["class_names"]).targets
    ho = config["holdout"]
    _, held = holdout_split(targets, ho["holdout"], ho["seed"])
    if len(held) != ho["n"]:
        raise LinvisionError(f"the training split of {root} gives {len(held)} held-out images, the super-network "
                             f"held out {ho['n']}: not the data it was trained on")
    if limit and limit < len(held):
        held = [held[i] for i in stratified_subset([targets[i] for i in held], limit, seed)]
    loader = build_eval_loader(root, config["data_config"], batch_size, classes=config["class_names"],
                               num_workers=workers, split="train", indices=held)
    return [b for b in loader if b is not None]


def _constraint(args, net, di) -> Tuple[float, str, Callable, Optional["LatencyModel"]]:
    """``(budget, kind, cost function, latency model or None)`` of ``--macs`` / ``--latency-ms`` (rank 0
    calibrates a latency table and writes ``--latency-table``)."""
    space, device = net.space, di.device
    if args.macs is not None:
        try:
            budget = parse_macs(args.macs)
        except ValueError as e:
            raise LinvisionError(str(e)) from None
        kind = "macs"
        cost = lambda a: analytic_macs(a, net.img_size, net.num_classes, stem_chans=space.stem_chans,  # noqa: E731
                                       normalized=True)
        latency = None
    else:
        budget, kind = float(args.latency_ms), "latency"
        table = None
        if args.latency_table and Path(args.latency_table).is_file():
            table = json.loads(Path(args.latency_table).read_text()).get("table")
        latency = LatencyModel(space, net.img_size, net.num_classes, args.latency_batch, device, args.latency_mode,
                               table=table)
        if args.latency_mode == "table" and di.is_main:
            latency.calibrate()
            if args.latency_table:
                atomic_write(Path(args.latency_table), json.dumps(
                    {"device": str(device), "batch": args.latency_batch, "img_size": net.img_size,
                     "space": space.name, "table": latency.table}, indent=1).encode())
        cost = latency
    return budget, kind, cost, latency


def run_search(args) -> Dict[str, Any]:
    """Run (or resume) an evolutionary search; returns the best candidate's row plus ``output``.

    Writes to ``args.output``: ``search.json`` (settings), ``history.csv`` (every evaluated sub-network: iteration,
    origin, MACs, latency, held-out top-1 and loss, arch JSON), ``best.json`` (the best arch, loadable with
    ``linvision train --arch``), ``search.png`` (accuracy vs cost, Pareto front) and, with ``random_archs``,
    ``random_archs.json`` (random sub-networks inside the same window, evaluated the same way).

    Raises:
        LinvisionError: bad arguments, missing super-network, an infeasible constraint, or a resume with
        different locked settings, or an output folder another process is using (see
        :class:`~linvision.engine.run.FolderLock`).
    """
    from ..engine.run import FolderLock
    di = init_distributed(None)
    out = Path(args.output or args.resume)
    lock = FolderLock(out, "--output" if args.output else "--resume") if di.is_main else None
    try:
        return _run_search(args, di, out)
    finally:
        if lock is not None:
            lock.release()


def _run_search(args, di, out: Path) -> Dict[str, Any]:
    from ..engine import evaluate as evaluate_classifier, progress_enabled, setup_threads
    from .train import load_supernet
    device = di.device
    setup_threads(args.threads, di)
    settings = {k: getattr(args, k) for k in SEARCH_DEFAULTS if k not in ("output", "resume", "threads", "workers")}
    if args.resume:
        old = read_settings(args.resume)
        check_locked_args(args.resume, old, settings, SEARCH_LOCKED)
    elif (out / HISTORY_FILE).exists():
        raise LinvisionError(f"output folder {out} already holds a search; continue it with --resume {out} "
                             "or choose another --output")
    if (args.macs is None) == (args.latency_ms is None):
        raise LinvisionError("give exactly one constraint: --macs (e.g. 1.79G) or --latency-ms")
    for name in ("population", "top_k", "iterations"):
        if getattr(args, name) < 1:
            raise LinvisionError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.lower <= 1 or not 0 <= args.mutate_prob <= 1:
        raise LinvisionError("--lower must be in (0, 1] and --mutate-prob in [0, 1]")
    if args.supernet is None:
        raise LinvisionError("--supernet DIR is required (a `linvision supernet train` output folder)")
    net, config = load_supernet(args.supernet, device)
    space = net.space

    budget, kind, cost, latency = _constraint(args, net, di)
    evo = EvolutionarySearch(space, cost, budget, args.lower, args.population, args.top_k, args.mutate_prob,
                             args.mutations, args.crossovers, args.seed)
    if di.is_main:
        try:
            evo.check_feasible()
        except ValueError as e:
            raise LinvisionError(str(e)) from None
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / SETTINGS_FILE, (json.dumps(settings, indent=2) + "\n").encode())
    batches = _holdout_batches(net, config, args.data, args.batch_size, args.holdout_limit, args.workers, args.seed)
    history = broadcast_object(read_history(out / HISTORY_FILE) if di.is_main else None, di)
    n_held = sum(len(b[1]) for b in batches)
    if di.is_main:
        _log.info("search in space %s (%s sub-networks) under %s in [%.4g, %.4g]; fitness on %d held-out images; "
                  "%d rows in the history", space.name, f"{space.size():.3g}", kind, evo.lo, budget, n_held,
                  len(history))

    def evaluate(c: Candidate) -> Dict[str, Any]:
        m = evaluate_classifier(net.extract_subnet(c.arch), batches, progress=False, device=device)
        return {"macs": analytic_macs(c.arch, net.img_size, net.num_classes, stem_chans=space.stem_chans),
                "top1": m["top1"], "loss": m["loss"]}

    last_plot = time.perf_counter()
    for it in range(args.iterations):
        before = [h for h in history if h["iteration"] < it]
        done = {space.encode(h["arch"]) for h in history if h["iteration"] == it}
        cands = broadcast_object(evo.propose(it, before) if di.is_main else None, di)
        if not cands:
            _log.warning("iteration %d: no new sub-network could be generated; stopping", it)
            break
        todo = [(i, c) for i, c in enumerate(cands) if c.key not in done]
        bar = tqdm(total=len(cands), initial=len(cands) - len(todo), desc=f"search iteration {it + 1}/"
                   f"{args.iterations}", file=sys.stderr, dynamic_ncols=True, leave=False,
                   disable=not progress_enabled(di))
        chunk = di.world_size
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            mine = part[di.rank] if di.rank < len(part) else None
            res = evaluate(mine[1]) if mine is not None else None
            rows = []
            for r, (i, c) in zip(all_gather_object(res, di), part):
                rows.append({"iteration": it, "index": i, "origin": c.origin, "macs": r["macs"],
                             "latency_ms": latency(c.arch) if latency is not None and di.is_main else None,
                             "top1": r["top1"], "loss": r["loss"], "arch": c.arch})
            if di.is_main:
                _append_rows(out / HISTORY_FILE, rows)
            history += rows
            bar.update(len(part))
            best = max(history, key=lambda h: h["top1"])
            bar.set_postfix(best=f"{best['top1']:.2f}%")
        bar.close()
        if di.is_main:
            plot = it == args.iterations - 1 or time.perf_counter() - last_plot > 60  # the PNG costs ~1 s
            _write_outputs(out, history, kind, (evo.lo, budget), config, net, args, plot)
            last_plot = time.perf_counter() if plot else last_plot
            best = _best(history)
            tqdm.write(f"search iteration {it + 1}/{args.iterations}: {len(cands)} candidates, best held-out top-1 "
                       f"{best['top1']:.2f}% at {best['macs'] / 1e6:.2f} MMACs"
                       + (f", {best['latency_ms']:.3f} ms" if best.get("latency_ms") is not None else ""),
                       file=sys.stderr)
    if args.random_archs and di.is_main:
        rng = random.Random(args.seed * 1_000_003 + 999_983)
        seen, rand = set(), []
        for _ in range(args.random_archs * 100):
            if len(rand) == args.random_archs:
                break
            a = evo.random_candidate(rng)
            k = space.encode(a)
            if k not in seen:
                seen.add(k)
                r = evaluate(Candidate(a, "random", k))
                rand.append({"arch": {**a, "stem_chans": space.stem_chans}, "macs": r["macs"],
                             "holdout_top1": r["top1"], "latency_ms": latency(a) if latency is not None else None})
        atomic_write(out / "random_archs.json", ("[\n" + ",\n".join(json.dumps(r) for r in rand) + "\n]\n").encode())
    barrier(di)
    best = _best(history)
    return {**best, "output": str(out)}


def _best(history: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    return max(enumerate(history), key=lambda ih: (ih[1]["top1"], -ih[0]))[1]


def _write_outputs(out: Path, history, kind: str, window, config, net, args, plot: bool = True) -> None:
    best = _best(history)
    img = net.img_size[0] if net.img_size[0] == net.img_size[1] else list(net.img_size)
    arch = {**best["arch"], "stem_chans": net.space.stem_chans}
    doc = {"arch": arch, "model": "vit_resnas_tiny", "img_size": img,
           "num_classes": net.num_classes, "space": net.space.name, "macs": best["macs"],
           "latency_ms": best.get("latency_ms"), "holdout_top1": best["top1"], "iteration": best["iteration"],
           "constraint": {"kind": kind, "lower": window[0], "upper": window[1],
                          **({"latency_batch": args.latency_batch} if kind == "latency" else {})},
           "supernet": str(args.supernet), "evaluated": len(history)}
    atomic_write(out / BEST_FILE, _json_lines(doc))
    if plot:
        plot_search(out / PLOT_FILE, history, window, kind,
                    f"evolutionary search, {net.space.name} space ({len(history)} sub-networks)")


def _json_lines(doc: Dict[str, Any]) -> bytes:
    """A JSON object with one top-level key per line (values compact)."""
    return ("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()) + "\n}\n").encode()
