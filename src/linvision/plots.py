"""Plot helpers shared by training, the NAS search and ``linvision bench``: a matplotlib figure on the Agg canvas
(no pyplot state, so safe in any thread or worker process) and an atomic PNG writer."""
from __future__ import annotations

import io
from pathlib import Path

from .checkpoint import atomic_write

__all__ = ["new_figure", "atomic_write_png"]


def new_figure(figsize: tuple[float, float], dpi: int = 100):
    """A matplotlib ``Figure`` of ``figsize`` inches at ``dpi`` on the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def atomic_write_png(path: str | Path, fig) -> None:
    """Render ``fig`` (tight layout, at the figure's dpi) as PNG and write it to ``path`` with
    :func:`linvision.checkpoint.atomic_write` (a reader never sees a half-written file)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())
