"""Outputs of a bench run: ``<stem>.json`` / ``<stem>.csv`` (atomic), the PNG plots (log-log, through
:mod:`linvision.plots`) and the markdown tables printed on stdout."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..checkpoint import atomic_write
from ..plots import atomic_write_png, new_figure

__all__ = ["write_results", "write_model_plots", "write_op_plots", "markdown_table", "profile_markdown",
           "ops_markdown_table"]


def write_results(out_dir: Path, stem: str, meta: Dict[str, Any], records: List[Dict[str, Any]],
                  fields: List[str]) -> None:
    """``<stem>.json`` = ``{"meta", "records"}`` and ``<stem>.csv`` (``fields`` columns, then any others),
    each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / f"{stem}.json",
                 json.dumps({"meta": meta, "records": records}, indent=1, default=str).encode())
    extra = sorted({k for r in records for k in r} - set(fields))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields + extra, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v))
                    for k, v in r.items()})
    atomic_write(out_dir / f"{stem}.csv", buf.getvalue().encode())


def _plot_title(meta: Dict[str, Any], what: str) -> str:
    dev = meta.get("gpu") or f"{meta['cpu_model']}, {meta['threads']} threads"
    seg = f", + {meta['decoder']}-{meta['decoder_channels']}, {meta['num_classes']} classes" if meta.get("decoder") else ""
    return f"{what}{seg}\n{dev}, {meta['dtype']}, batch {meta['batch_size']}"


def write_model_plots(out_dir: Path, meta: Dict[str, Any], records: List[Dict[str, Any]],
                      prefix: str = "") -> List[Path]:
    """``<prefix>throughput_<mode>.png``, ``<prefix>memory_<mode>.png`` (log-log vs resolution, one line per spec)
    and ``<prefix>speedup_<mode>.png`` (img/s ÷ DeiT of the same size; only if the run has DeiT). Records with a
    ``pixels`` key (``H × W`` sizes, the seg suite) are plotted against the pixel count, ticks labelled ``HxW``.
    Returns the files."""
    import matplotlib
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: cycle[i % len(cycle)] for i, m in enumerate(dict.fromkeys(r["model"] for r in records))}
    plots = [("throughput", "img_per_s", "images / s", True), ("memory", "peak_mib", "peak memory (MiB)", True),
             ("speedup", "speedup_vs_deit", "img/s ÷ DeiT of the same size", False)]
    written = []
    for mode in sorted({r["mode"] for r in records}):
        rs = [r for r in records if r["mode"] == mode and r["status"] == "ok"]
        ticks = {r.get("pixels", r["resolution"]): str(r["resolution"]) for r in rs}
        for stem, key, ylabel, all_models in plots:
            lines: Dict[str, List[Tuple[int, float]]] = {}
            for r in rs:
                if r.get(key) is not None and r[key] > 0 and (all_models or not r["arch"].startswith("deit_")):
                    lines.setdefault(r["model"], []).append((r.get("pixels", r["resolution"]), r[key]))
            if lines:
                path = out_dir / f"{prefix}{stem}_{mode}.png"
                _model_plot(path, lines, color, dict(sorted(ticks.items())), ylabel,
                            _plot_title(meta, f"{prefix}{stem} ({mode})"), unit_line=stem == "speedup",
                            xlabel="input size H×W (log pixel count)" if "pixels" in rs[0] else None)
                written.append(path)
    return written


def _model_plot(path: Path, lines: Dict[str, List[Tuple[int, float]]], color: Dict[str, str], ticks: Dict[int, str],
                ylabel: str, title: str, unit_line: bool, xlabel: Optional[str] = None) -> None:
    """One log-log plot of ``lines`` (model -> [(x, value)]) written to ``path``, x ticks ``ticks`` (x -> label);
    DeiT dashed."""
    import matplotlib.ticker
    fig = new_figure((7, 4.8), dpi=110)
    ax = fig.add_subplot()
    for name, pts in lines.items():
        pts.sort()
        style = "--" if name.startswith("deit_") else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name, color=color[name])
    if unit_line:
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(ticks))
    ax.set_xticklabels(list(ticks.values()))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(xlabel or "resolution (px, square)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    atomic_write_png(path, fig)


def write_op_plots(out_dir: Path, meta: Dict[str, Any], records: List[Dict[str, Any]]) -> List[Path]:
    """``ops_time.png`` and ``ops_memory.png``: ms and peak MiB vs T (log-log), forward and forward + backward
    side by side, one line per op. Returns the files."""
    written = []
    for stem, suffix, ylabel in (("ops_time", "ms", "time (ms)"), ("ops_memory", "peak_mib", "peak memory (MiB)")):
        fig = new_figure((11, 4.5), dpi=110)
        axes = fig.subplots(1, 2)
        any_line = False
        for ax, (key, title) in zip(axes, (("fwd", "forward"), ("fwdbwd", "forward + backward"))):
            for op in dict.fromkeys(r["op"] for r in records):
                pts = sorted((r["tokens"], r[f"{key}_{suffix}"]) for r in records
                             if r["op"] == op and r.get(f"{key}_{suffix}") is not None and r[f"{key}_{suffix}"] > 0)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=op)
                    any_line = True
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens T")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}, C={meta.get('channels')}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(_plot_title(meta, stem.replace("_", " ")), fontsize=9)
        if any_line:
            path = out_dir / f"{stem}.png"
            atomic_write_png(path, fig)
            written.append(path)
    return written


def size_label(size: Any) -> str:
    """``"512px"`` for a square resolution, ``"360x480"`` for an ``(H, W)`` size; a record's ``"HxW"`` label as
    it is."""
    if isinstance(size, str):
        return size
    return f"{size[0]}x{size[1]}" if isinstance(size, (tuple, list)) else f"{size}px"


def _f(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def case_table(records: Sequence[Dict[str, Any]], first: str = "model", size: str = "res",
               extra: Sequence[Tuple[str, Callable[[Dict[str, Any]], str]]] = ()) -> str:
    """A markdown table of model-like cases (one row per case): name, size, batch, mode, img/s, ms/step, peak MiB,
    params (M), GMACs, then the ``extra`` columns ``(header, cell(record))``, then a note (status, reason)."""
    heads = [first, size, "batch", "mode", "img/s", "ms/step", "peak MiB", "params (M)", "GMACs",
             *(h for h, _ in extra), "note"]
    rows = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in records:
        note = r.get("reason") or ""
        if r["status"] != "ok":
            note = f"**{r['status']}**: {note}"
        cells = [f"`{r['model']}`", str(r["resolution"]), str(r.get("batch_size", "")), r["mode"],
                 _f(r.get("img_per_s"), ".2f"), _f(r.get("ms_per_step"), ".1f"), _f(r.get("peak_mib"), ".0f"),
                 _f(r.get("params_m"), ".1f"), _f(r.get("gmacs"), ".2f"), *(cell(r) for _, cell in extra),
                 note.replace("|", "/")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown_table(records: List[Dict[str, Any]]) -> str:
    """The models suite's results as a markdown table (one row per case)."""
    return case_table(records, extra=[
        ("GFLOP/s", lambda r: _f(r.get("gflops"), ".1f")),
        ("% GEMM peak", lambda r: _f(r.get("peak_frac") and 100 * r["peak_frac"], ".0f")),
        ("× DeiT", lambda r: _f(r.get("speedup_vs_deit"), ".2f"))])


def profile_markdown(records: List[Dict[str, Any]]) -> str:
    """The ``--profile`` top ops of every case, one markdown table per case."""
    parts = []
    for r in records:
        if r.get("profile_top"):
            parts.append(f"### `{r['model']}` {size_label(r['resolution'])} {r['mode']} (batch {r['batch_size']}, "
                         f"{_f(r.get('ms_per_step'), '.1f')} ms/step)\n\n"
                         "| op | self ms | calls | % |\n|---|---|---|---|")
            parts.extend(f"| `{e['op']}` | {e['self_ms']:.2f} | {e['calls']} | {e['pct']:.1f} |"
                         for e in r["profile_top"])
            parts.append("")
    return "\n".join(parts)


def ops_markdown_table(records: List[Dict[str, Any]]) -> str:
    """The ops suite's results as a markdown table (one row per op and T)."""
    head = ("| op | T | fwd ms | fwd+bwd ms | fwd+bwd × Linear | fwd peak MiB | fwd+bwd peak MiB | GFLOP fwd "
            "| note |\n|---|---|---|---|---|---|---|---|---|")
    rows = [f"| `{r['op']}` | {r['tokens']} | {_f(r.get('fwd_ms'), '.2f')} | {_f(r.get('fwdbwd_ms'), '.2f')} "
            f"| {_f(r.get('fwdbwd_x_linear'), '.2f')} | {_f(r.get('fwd_peak_mib'), '.0f')} "
            f"| {_f(r.get('fwdbwd_peak_mib'), '.0f')} | {_f(r.get('gflop_fwd'), '.3f')} "
            f"| {(r.get('reason') or '').replace('|', '/')} |" for r in records]
    return "\n".join([head] + rows)
