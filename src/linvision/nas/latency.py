"""Latency of ViT-ResNAS sub-networks on a device (``linvision search --latency-ms``; beyond the paper, which
constrains MACs): direct measurement, or a calibrated per-component lookup table summed per architecture."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from ..models.resnas import ConvStem, ResNAS, ResNASBlock, ResidualSpatialReduction
from .space import SearchSpace

__all__ = ["LatencyModel"]

Arch = Dict[str, Any]


class LatencyModel:
    """Latency (ms, median of ``repeats`` timed forward passes at ``batch`` images) of sub-networks on ``device``.

    ``mode="measure"``: build each sub-network (random weights: latency does not depend on them) and time it;
    results cached by arch. ``mode="table"``: a calibrated lookup table — the stem (per stage-1 width), every
    attention half-block (per stage, width, heads), MLP half-block (per stage, width, hidden size), spatial
    reduction (per width pair) and the final norm + head (per width) are timed once; an arch's latency is the
    sum of its parts (``table`` dict, JSON-ready; calibrate with :meth:`calibrate`).
    """

    def __init__(self, space: SearchSpace, img_size: int, num_classes: int, batch: int = 1,
                 device: torch.device | str = "cpu", mode: str = "table", repeats: int = 10,
                 table: Optional[Dict[str, float]] = None):
        if mode not in ("table", "measure"):
            raise ValueError(f"latency mode must be 'table' or 'measure', got {mode!r}")
        self.space, self.num_classes = space, num_classes
        self.img_size = img_size if isinstance(img_size, int) else int(img_size[0])
        if not isinstance(img_size, int) and img_size[0] != img_size[1]:
            raise ValueError("latency tables need square inputs")
        self.batch, self.device, self.mode, self.repeats = batch, torch.device(device), mode, repeats
        self.table: Dict[str, float] = dict(table or {})
        self._cache: Dict[Tuple, float] = {}

    def _time(self, fn: Callable[[], Any]) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            for _ in range(2):
                fn()
            times = []
            for _ in range(self.repeats):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)

    def measure(self, arch: Arch) -> float:
        """Directly measured latency (ms) of the whole sub-network."""
        net = ResNAS(arch, img_size=self.img_size, num_classes=self.num_classes,
                     stem_chans=self.space.stem_chans).to(self.device).eval()
        x = torch.randn(self.batch, 3, self.img_size, self.img_size, device=self.device)
        return self._time(lambda: net(x))

    def calibrate(self, progress: bool = True) -> Dict[str, float]:
        """Time every component of the space once (fills and returns ``table``)."""
        sp, b, dev = self.space, self.batch, self.device
        g = self.img_size // 14
        jobs: List[Tuple[str, Callable[[], Callable[[], Any]]]] = []
        for c in sp.dims[0]:
            def stem(c=c):
                m = ConvStem(3, c, sp.stem_chans).to(dev).eval()
                x = torch.randn(b, 3, self.img_size, self.img_size, device=dev)
                return lambda: m(x)
            jobs.append((f"stem/{c}", stem))
        for s in range(len(sp.dims)):
            n = (g // 2 ** s) ** 2 + 1
            for c in sp.dims[s]:
                for h in sp.heads[s]:
                    def attn(c=c, h=h, n=n, s=s):
                        blk = ResNASBlock(c, h, sp.head_dims[s], 4).to(dev).eval()
                        x = torch.randn(b, n, c, device=dev)
                        return lambda: x + blk.attn(blk.norm1(x))
                    jobs.append((f"attn/{s}/{c}/{h}", attn))
                for m_ in sp.mlp[s]:
                    def mlp(c=c, m_=m_, n=n, s=s):
                        blk = ResNASBlock(c, 1, sp.head_dims[s], m_).to(dev).eval()
                        x = torch.randn(b, n, c, device=dev)
                        return lambda: x + blk.mlp(blk.norm2(x))
                    jobs.append((f"mlp/{s}/{c}/{m_}", mlp))
            if s > 0:
                gs = g // 2 ** (s - 1)
                for ci in sp.dims[s - 1]:
                    for co in sp.dims[s]:
                        def red(ci=ci, co=co, gs=gs):
                            r = ResidualSpatialReduction(ci, co, (gs, gs)).to(dev).eval()
                            x = torch.randn(b, gs * gs + 1, ci, device=dev)
                            return lambda: r(x, (gs, gs))
                        jobs.append((f"reduction/{s}/{ci}/{co}", red))
        for c in sp.dims[-1]:
            def head(c=c):
                norm, lin = torch.nn.LayerNorm(c).to(dev), torch.nn.Linear(c, self.num_classes).to(dev)
                x = torch.randn(b, (g // 2 ** (len(sp.dims) - 1)) ** 2 + 1, c, device=dev)
                return lambda: lin(norm(x)[:, 0])
            jobs.append((f"head/{c}", head))
        for key, make in tqdm(jobs, desc="latency table", file=sys.stderr, leave=False,
                             disable=not (progress and sys.stderr.isatty())):
            if key not in self.table:
                self.table[key] = self._time(make())
        return self.table

    def estimate(self, arch: Arch) -> float:
        """Latency (ms) of ``arch`` from the table (calibrating first if it is empty)."""
        if not self.table:
            self.calibrate()
        d = arch["dims"]
        t = self.table[f"stem/{d[0]}"] + self.table[f"head/{d[-1]}"]
        for s in range(len(d)):
            if s > 0:
                t += self.table[f"reduction/{s}/{d[s - 1]}/{d[s]}"]
            for h, m, p in zip(arch["heads"][s], arch["mlp"][s], arch["present"][s]):
                if p:
                    t += self.table[f"attn/{s}/{d[s]}/{h}"] + self.table[f"mlp/{s}/{d[s]}/{m}"]
        return t

    def __call__(self, arch: Arch) -> float:
        key = self.space.encode(arch)
        if key not in self._cache:
            self._cache[key] = self.estimate(arch) if self.mode == "table" else self.measure(arch)
        return self._cache[key]
