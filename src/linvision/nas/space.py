"""ViT-ResNAS search spaces (paper Sec. 3.2; official ``supernet_config/sr_tiny_mh.py`` / ``sr_small_mh.py``).

A sub-network ("arch", the dict format of :mod:`linvision.models.resnas`) picks, within a :class:`SearchSpace`:
one width per stage, one head count and one MLP hidden size per block, and whether each *removable* block is
present. The super-network holds the weights of :meth:`SearchSpace.largest`.

An arch is encoded as a flat tuple of genes (:meth:`SearchSpace.encode`): stage widths, then per stage and block
``heads, mlp``, then the presence of every removable block. The encoding is canonical — head/MLP genes of an
absent block are set to the largest choice — so two archs that build the same network have the same key.
"""
from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..models.resnas import normalize_arch

__all__ = ["SearchSpace", "SPACES", "get_space", "Gene"]

Arch = Dict[str, Any]


@dataclass(frozen=True)
class Gene:
    """One searchable choice: ``kind`` in ``dims | heads | mlp | present``, its ``stage`` and ``block`` (``-1``
    for a stage width) and its ``choices`` (largest first)."""
    kind: str
    stage: int
    block: int
    choices: Tuple[Any, ...]


@dataclass(frozen=True)
class SearchSpace:
    """A ViT-ResNAS search space.

    Attributes:
        name: registry name (``SPACES``).
        dims: per stage, the width choices, largest first (stage widths must not shrink across stages).
        head_dims: per-stage head dimension (fixed).
        heads: per stage, the head-count choices, largest first.
        mlp: per stage, the MLP hidden-size choices, largest first.
        depths: blocks per stage in the super-network.
        removable: per stage, the 0-based indices of blocks that may be left out.
        keep: sampling choices of a removable block during super-network training, largest first (the official
            ``'layer': [C, C, 0, 0]``: present with probability 1/2 once warm-up is over, and only after the
            first half of the warm-up).
        img_size: default input size; stem_chans: conv-stem mid channels.
    """
    name: str
    dims: Tuple[Tuple[int, ...], ...]
    head_dims: Tuple[int, ...]
    heads: Tuple[Tuple[int, ...], ...]
    mlp: Tuple[Tuple[int, ...], ...]
    depths: Tuple[int, ...]
    removable: Tuple[Tuple[int, ...], ...]
    keep: Tuple[bool, ...] = (True, True, False, False)
    img_size: int = 224
    stem_chans: int = 24
    description: str = field(default="", compare=False)

    def __post_init__(self):
        n = len(self.dims)
        for name in ("head_dims", "heads", "mlp", "depths", "removable"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"search space {self.name}: {name} needs {n} stages")
        for s in range(n):
            for name in ("dims", "heads", "mlp"):
                c = getattr(self, name)[s]
                if not c or list(c) != sorted(set(c), reverse=True):
                    raise ValueError(f"search space {self.name}: {name}[{s}] must be distinct, largest first: {c}")
            if any(not 0 <= j < self.depths[s] for j in self.removable[s]):
                raise ValueError(f"search space {self.name}: removable[{s}] outside 0..{self.depths[s] - 1}")
            if s and min(self.dims[s]) < max(self.dims[s - 1]):
                raise ValueError(f"search space {self.name}: stage {s} widths must all be >= stage {s - 1} widths")
        if self.keep[0] is not True:
            raise ValueError("keep choices must start with True (largest first)")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SearchSpace":
        tup = lambda v: tuple(tup(x) for x in v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        return cls(**{k: tup(v) for k, v in d.items()})

    # ------------------------------------------------------------------ genes
    def genes(self) -> List[Gene]:
        """The flat gene list (see module docstring); ``present`` genes have choices ``(True, False)``."""
        g = [Gene("dims", s, -1, self.dims[s]) for s in range(len(self.dims))]
        for s, d in enumerate(self.depths):
            for j in range(d):
                g += [Gene("heads", s, j, self.heads[s]), Gene("mlp", s, j, self.mlp[s])]
        g += [Gene("present", s, j, (True, False)) for s in range(len(self.depths)) for j in self.removable[s]]
        return g

    def apply_depth_rule(self, arch: Arch) -> Arch:
        """Within a run of consecutive removable blocks, a block is absent once an earlier one of the run is
        (official ``update_depth``: removable blocks encode depth). In place; returns ``arch``. No effect on the
        official spaces, whose removable blocks are never adjacent."""
        for s, pres in enumerate(arch["present"]):
            removed = False
            for j in range(len(pres)):
                if j not in self.removable[s]:
                    removed = False
                elif removed:
                    pres[j] = False
                elif not pres[j]:
                    removed = True
        return arch

    def encode(self, arch: Arch) -> Tuple:
        """Canonical hashable key of ``arch`` (after :meth:`apply_depth_rule`; absent blocks' head/MLP genes
        replaced by the largest choice)."""
        arch = self.apply_depth_rule({**arch, "present": [list(p) for p in arch["present"]]})
        key = []
        for g in self.genes():
            if g.kind == "dims":
                key.append(arch["dims"][g.stage])
            elif g.kind == "present":
                key.append(bool(arch["present"][g.stage][g.block]))
            else:
                p = arch["present"][g.stage][g.block]
                key.append(arch[g.kind][g.stage][g.block] if p else g.choices[0])
        return tuple(key)

    def decode(self, key: Sequence) -> Arch:
        """Inverse of :meth:`encode`."""
        arch = self.largest()
        for g, v in zip(self.genes(), key, strict=True):
            if g.kind == "dims":
                arch["dims"][g.stage] = int(v)
            else:
                arch[g.kind][g.stage][g.block] = bool(v) if g.kind == "present" else int(v)
        return self.apply_depth_rule(arch)

    # ------------------------------------------------------------------ archs
    def largest(self) -> Arch:
        """The largest sub-network (= the super-network's own architecture)."""
        return {"dims": [c[0] for c in self.dims], "head_dims": list(self.head_dims),
                "heads": [[self.heads[s][0]] * d for s, d in enumerate(self.depths)],
                "mlp": [[self.mlp[s][0]] * d for s, d in enumerate(self.depths)],
                "present": [[True] * d for d in self.depths]}

    def smallest(self) -> Arch:
        """The smallest sub-network (every choice at its minimum, removable blocks left out)."""
        a = {"dims": [c[-1] for c in self.dims], "head_dims": list(self.head_dims),
             "heads": [[self.heads[s][-1]] * d for s, d in enumerate(self.depths)],
             "mlp": [[self.mlp[s][-1]] * d for s, d in enumerate(self.depths)],
             "present": [[j not in self.removable[s] for j in range(d)] for s, d in enumerate(self.depths)]}
        return a

    def random_arch(self, rng: Optional[random.Random] = None) -> Arch:
        """A sub-network with every gene drawn uniformly from its (distinct) choices."""
        rng = rng or random
        return self.decode([rng.choice(g.choices) for g in self.genes()])

    def check(self, arch: Arch) -> Arch:
        """Validated, normalized copy of ``arch``; ValueError (naming the gene) if it is not in this space."""
        arch = normalize_arch(arch)
        if arch.pop("stem_chans", self.stem_chans) != self.stem_chans:
            raise ValueError(f"arch stem_chans differs from space {self.name}'s {self.stem_chans}")
        if arch["head_dims"] != list(self.head_dims):
            raise ValueError(f"arch head_dims {arch['head_dims']} != space {self.name} {list(self.head_dims)}")
        if [len(h) for h in arch["heads"]] != list(self.depths):
            raise ValueError(f"arch has {[len(h) for h in arch['heads']]} blocks per stage; space {self.name} has "
                             f"{list(self.depths)} (absent blocks are listed with present=false)")
        for g in self.genes():
            if g.kind == "dims":
                v = arch["dims"][g.stage]
            else:
                v = arch[g.kind][g.stage][g.block]
                if g.kind != "present" and not arch["present"][g.stage][g.block]:
                    continue
            if v not in g.choices:
                where = f"stage {g.stage}" + (f" block {g.block}" if g.block >= 0 else "")
                raise ValueError(f"arch {g.kind} {v} at {where} is not among the choices {list(g.choices)} of "
                                 f"space {self.name}")
        for s, pres in enumerate(arch["present"]):
            for j, p in enumerate(pres):
                if not p and j not in self.removable[s]:
                    raise ValueError(f"arch leaves out block {j} of stage {s}, which space {self.name} keeps")
        return arch

    def size(self) -> int:
        """Number of distinct sub-networks."""
        n = 1
        for s, d in enumerate(self.depths):
            n *= len(self.dims[s])
            block = len(self.heads[s]) * len(self.mlp[s])
            run = 0
            for j in range(d + 1):  # a run of r removable blocks: 0..r of them present, as a prefix
                if j < d and j in self.removable[s]:
                    run += 1
                    continue
                n *= sum(block ** k for k in range(run + 1)) * (block if j < d else 1)
                run = 0
        return n

    # ------------------------------------------------------------------ super-network sampling
    def warmup_choices(self, choices: Sequence, epoch: float, warmup_epochs: float) -> Sequence:
        """Progressive warm-up of a choice list (largest first): at ``epoch`` only its first
        ``min(1 + floor(epoch·(K−1)/warmup_epochs), K)`` entries are sampled (official ``ChannelDrop.set_mask``),
        so training starts from the largest sub-network and adds smaller choices one by one."""
        K = len(choices)
        if warmup_epochs <= 0:
            return choices
        return choices[:max(1, min(1 + math.floor(epoch * (K - 1) / warmup_epochs), K))]

    def sample_archs(self, n: int, epoch: float = math.inf, warmup_epochs: float = 0.,
                     rng: Optional[random.Random] = None) -> List[Arch]:
        """``n`` sub-networks for one multi-architecture training step (official ``ChannelDrop``): each gene's
        allowed choices (after warm-up) are repeated to at least ``n`` entries, shuffled, and dealt out, so every
        allowed choice of every gene appears about ``n / K`` times. Removable blocks use the ``keep`` list."""
        rng = rng or random
        archs = [self.largest() for _ in range(n)]
        for g in self.genes():
            choices = self.keep if g.kind == "present" else g.choices
            allowed = list(self.warmup_choices(choices, epoch, warmup_epochs))
            pool = allowed * math.ceil(n / len(allowed))
            rng.shuffle(pool)
            for a, v in zip(archs, pool):
                if g.kind == "dims":
                    a["dims"][g.stage] = v
                else:
                    a[g.kind][g.stage][g.block] = v
        return [self.apply_depth_rule(a) for a in archs]


def _space(name, dims, head_dims, heads, mlp, depths, removable, description, **kw) -> SearchSpace:
    return SearchSpace(name, tuple(map(tuple, dims)), tuple(head_dims), tuple(map(tuple, heads)),
                       tuple(map(tuple, mlp)), tuple(depths), tuple(map(tuple, removable)),
                       description=description, **kw)


SPACES: Dict[str, SearchSpace] = {s.name: s for s in [
    # official supernet_config/sr_tiny_mh.py (attn channels 192..96 / 576..288 / 768..384 over head_dim 32/48/64)
    _space("tiny", [(256, 224, 192, 176, 160), (512, 448, 384, 352, 320), (1024, 896, 768, 704, 640)], (32, 48, 64),
           [(6, 5, 4, 3), (12, 10, 8, 6), (12, 10, 8, 6)],
           [(768, 704, 640, 576, 512, 448, 384), (1536, 1408, 1280, 1152, 1024, 896, 768),
            (3072, 2816, 2560, 2304, 2048, 1792, 1536)], (6, 6, 6), [(1, 3, 5)] * 3,
           "official Tiny space (sr_tiny_mh): 6 blocks per stage, blocks 2, 4, 6 removable"),
    # official supernet_config/sr_small_mh.py
    _space("small", [(320, 280, 240, 220, 200), (640, 560, 480, 440, 400), (1280, 1120, 960, 880, 800)], (32, 48, 64),
           [(8, 7, 6, 5), (16, 14, 12, 10), (16, 14, 12, 10)],
           [(960, 880, 800, 720, 640, 560, 480), (1920, 1760, 1600, 1440, 1280, 1120, 960),
            (3840, 3520, 3200, 2880, 2560, 2240, 1920)], (7, 7, 7), [(1, 3, 5)] * 3,
           "official Small space (sr_small_mh): 7 blocks per stage, blocks 2, 4, 6 removable"),
    # scaled down for the CPU demo (CIFAR-10 upsampled to 56x56: 4x4 -> 2x2 -> 1x1 patches)
    _space("demo", [(96, 80, 64, 48), (160, 128, 96), (256, 224, 192, 160)], (16, 32, 32),
           [(4, 3, 2), (4, 3, 2), (6, 4, 2)], [(288, 224, 160, 96), (480, 384, 288, 192), (768, 640, 512, 384)],
           (3, 3, 3), [(1, 2)] * 3, "CPU demo space (56x56 inputs)", img_size=56, stem_chans=16),
    # for tests: a few thousand parameters
    _space("test", [(32, 24, 16), (48, 40, 32), (64, 56)], (8, 8, 16), [(3, 2, 1), (3, 2, 1), (2, 1)],
           [(64, 48, 32), (96, 64), (128, 96, 64)], (2, 3, 2), [(1,), (1, 2), (1,)], "unit-test space",
           img_size=56, stem_chans=8),
]}


def get_space(space: Union[str, Path, SearchSpace, Dict[str, Any]]) -> SearchSpace:
    """A search space by name (``SPACES``: tiny, small, demo, test), from a JSON file or dict, or as given.

    Raises:
        ValueError: unknown name, unreadable file or invalid space.
    """
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, dict):
        return SearchSpace.from_dict(copy.deepcopy(space))
    if str(space) in SPACES:
        return SPACES[str(space)]
    p = Path(space)
    if p.suffix == ".json" or p.is_file():
        try:
            return SearchSpace.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read search space {p}: {e}") from None
    raise ValueError(f"unknown search space {space!r}; choose one of {', '.join(SPACES)} or give a JSON file")
