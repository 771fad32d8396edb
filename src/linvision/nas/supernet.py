"""The ViT-ResNAS weight-sharing super-network (paper Sec. 3.3; official ``nets/vit_sr_supernet.py`` with
``supernet=True``, ``nets/channel_drop.py``, ``nets/masked_layer_norm.py``, ``Block.rewiring``).

One set of weights — those of the largest network of a :class:`~linvision.nas.space.SearchSpace` — serves every
sub-network: a sub-network uses the *first* ``C`` channels of each stage, the first ``h`` heads and the first
``m`` MLP neurons of each block, and skips its absent blocks.

* **Multi-architecture sampling**: ``supernet(x, archs)`` runs ``len(archs)`` sub-networks in one pass, each on
  its own contiguous slice of the batch, through per-sample channel masks: stage-width masks ``[B, 1, C]`` on the
  tokens, head masks on the attention output, neuron masks on the MLP hidden layer, and per-sample block
  keep-flags. LayerNorm statistics are computed over each sample's active channels only
  (:func:`masked_layer_norm`), so a slice's output equals the sliced standalone network's
  (:meth:`ResNASSuperNet.extract_subnet`).
* **Progressive warm-up** of the choice sets (:meth:`SearchSpace.sample_archs`) and **rewiring**
  (:meth:`ResNASSuperNet.rewire`): during warm-up the heads and MLP neurons of every block are re-ordered by
  importance (L1 norm of their weights) at each epoch start, so the most important ones are those every
  sub-network shares.
"""
from __future__ import annotations

import copy
import math
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.resnas import ResNAS, ResNASBlock, ResidualSpatialReduction, resize_pos_embed_2d
from .macs import analytic_macs, count_macs
from .space import SearchSpace, get_space

__all__ = ["ResNASSuperNet", "masked_layer_norm", "SubnetMasks"]

Arch = Dict[str, Any]


def masked_layer_norm(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over each sample's active channels (official ``MaskedLayerNorm``).

    Args:
        x: ``[B, T, C]``. mask: ``[B, 1, C]`` (1 active, 0 inactive). count: ``[B, 1, 1]`` active channels.
        norm: supplies ``weight``, ``bias`` ``[C]`` and ``eps``.
    Returns:
        ``[B, T, C]``: on the active channels exactly ``F.layer_norm`` of the active slice; 0 elsewhere.
    """
    mean = (x * mask).sum(-1, keepdim=True) / count
    xc = (x - mean) * mask
    var = xc.pow(2).sum(-1, keepdim=True) / count
    return (xc * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias) * mask


class SubnetMasks:
    """Per-sample masks of a multi-architecture batch: sample ``i`` runs ``archs[i * n // B]``.

    Attributes (float tensors): ``dims[s]`` ``[B, 1, C_s]`` and ``counts[s]`` ``[B, 1, 1]`` per stage;
    ``heads[s][j]`` ``[B, 1, H·d]``, ``mlp[s][j]`` ``[B, 1, M]`` and ``keep[s][j]`` ``[B, 1, 1]`` per block.
    """

    def __init__(self, space: SearchSpace, archs: Sequence[Arch], batch: int, device: torch.device):
        n = len(archs)
        if not 1 <= n <= batch:
            raise ValueError(f"need 1 to {batch} sub-networks for a batch of {batch}, got {n}")
        idx = torch.arange(batch, device=device) * n // batch
        self.slices = [(int((idx == i).nonzero()[0]), int((idx == i).sum())) for i in range(n)]

        def per_sample(values):
            return torch.tensor(values, device=device)[idx].view(batch, 1, 1)

        def mask(values, size):
            return (torch.arange(size, device=device).view(1, 1, size) < per_sample(values)).float()

        self.dims, self.counts, self.heads, self.mlp, self.keep = [], [], [], [], []
        for s, C in enumerate(space.dims):
            Cmax, d = C[0], space.head_dims[s]
            w = [a["dims"][s] for a in archs]
            self.dims.append(mask(w, Cmax))
            self.counts.append(per_sample(w).float())
            self.heads.append([mask([a["heads"][s][j] * d for a in archs], space.heads[s][0] * d)
                               for j in range(space.depths[s])])
            self.mlp.append([mask([a["mlp"][s][j] for a in archs], space.mlp[s][0]) for j in range(space.depths[s])])
            self.keep.append([per_sample([float(a["present"][s][j]) for a in archs]) for j in range(space.depths[s])])


class ResNASSuperNet(ResNAS):
    """Weight-sharing super-network of a search space: a :class:`ResNAS` of the space's largest architecture
    (same parameter names, so its state dict is also the largest standalone network's) with a masked
    multi-architecture forward.

    Args:
        space: a :class:`SearchSpace` or its name (``tiny``, ``small``, ``demo``, ``test``) / JSON file.
        img_size: default ``space.img_size``. Other arguments as :class:`ResNAS` (``stem_chans`` from the space).

    ``forward(x [B, 3, H, W], archs=None)`` → logits ``[B, num_classes]``: ``archs=None`` runs the largest
    network; a list of ``n ≤ B`` archs runs ``archs[i]`` on the ``i``-th of ``n`` contiguous batch slices
    (sizes differ by at most one).
    """

    def __init__(self, space: Union[str, SearchSpace], img_size: Optional[int] = None, **kwargs: Any):
        space = get_space(space)
        kwargs.setdefault("stem_chans", space.stem_chans)
        super().__init__(space.largest(), img_size=img_size or space.img_size, **kwargs)
        self.space = space

    # ------------------------------------------------------------------ masked forward
    def _block(self, blk: ResNASBlock, x: torch.Tensor, m: torch.Tensor, cnt: torch.Tensor, hm: torch.Tensor,
               mm: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        a, mlp = blk.attn, blk.mlp
        B, N, C = x.shape
        h = masked_layer_norm(x, m, cnt, blk.norm1)
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.)
        o = a.proj_drop(a.proj(o.transpose(1, 2).reshape(B, N, a.attn_dim) * hm))     # inactive heads -> 0
        gate = keep * m                                                                  # absent block / channels
        x = x + blk.drop_path1(o) * gate
        h = masked_layer_norm(x, m, cnt, blk.norm2)
        f = mlp.drop2(mlp.fc2(mlp.drop1(mlp.act(mlp.fc1(h))) * mm))                     # inactive neurons -> 0
        return x + blk.drop_path2(f) * gate

    def _reduction(self, red: ResidualSpatialReduction, x: torch.Tensor, grid: Tuple[int, int], m_in: torch.Tensor,
                   cnt_in: torch.Tensor, m_out: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h, w = grid
        patches = x[:, 1:].transpose(1, 2).reshape(B, C, h, w)
        skip = torch.cat([x[:, :1], F.avg_pool2d(patches, 2, 2).flatten(2).transpose(1, 2)], dim=1)
        skip = F.pad(skip, (0, red.out_dim - C))
        xn = masked_layer_norm(x, m_in, cnt_in, red.norm)
        p = red.patch_reduce(xn[:, 1:].transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
        p = p + resize_pos_embed_2d(red.pos_embed, (red.grid[0] // 2, red.grid[1] // 2), (h // 2, w // 2))
        return (torch.cat([red.token_transform(xn[:, :1]), p], dim=1) + skip) * m_out

    def forward_features_masked(self, x: torch.Tensor, archs: Sequence[Arch]) -> torch.Tensor:
        """Multi-architecture ``forward_features``: ``[B, 3, H, W]`` → tokens ``[B, 1 + N, C3_max]`` whose channels
        beyond each sample's stage-3 width are 0."""
        masks = SubnetMasks(self.space, archs, x.shape[0], x.device)
        x, grid = self._embed(x)
        x = x * masks.dims[0]
        for s, stage in enumerate(self.stages):
            if stage.reduction is not None:
                x = self._reduction(stage.reduction, x, grid, masks.dims[s - 1], masks.counts[s - 1], masks.dims[s])
                grid = (grid[0] // 2, grid[1] // 2)
            for j, blk in enumerate(stage.blocks):
                x = self._block(blk, x, masks.dims[s], masks.counts[s], masks.heads[s][j], masks.mlp[s][j],
                                masks.keep[s][j])
        return masked_layer_norm(x, masks.dims[-1], masks.counts[-1], self.norm)

    def forward(self, x: torch.Tensor, archs: Optional[Sequence[Arch]] = None) -> torch.Tensor:
        if archs is None:
            return super().forward(x)
        return self.forward_head(self.forward_features_masked(x, [self.space.check(a) for a in archs]))

    # ------------------------------------------------------------------ sampling, warm-up, rewiring
    def sample_archs(self, n: int, epoch: float = math.inf, warmup_epochs: float = 0.,
                     rng: Optional[random.Random] = None) -> List[Arch]:
        """``n`` sub-networks for one training step with the space's progressive warm-up
        (:meth:`SearchSpace.sample_archs`)."""
        return self.space.sample_archs(n, epoch, warmup_epochs, rng)

    @torch.no_grad()
    def rewire(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Re-order every block's heads and MLP neurons by importance, most important first (official
        ``Attention.rewiring`` / ``Mlp.rewiring``): a head's importance is the L1 norm of its q, k, v rows (weights
        and biases) plus its ``proj`` columns; a neuron's that of its ``fc1`` row, bias and ``fc2`` column.

        The largest network computes the same function afterwards. Optimizer state tensors shaped like a
        parameter (Adam moments, momentum) are permuted with it, so training continues consistently (the
        official code leaves them in the old order)."""
        state = optimizer.state if optimizer is not None else {}

        def permute(p: nn.Parameter, index: torch.Tensor, dim: int) -> None:
            p.copy_(p.index_select(dim, index))
            for v in state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.copy_(v.index_select(dim, index))

        for stage in self.stages:
            for blk in stage.blocks:
                a, mlp = blk.attn, blk.mlp
                H, d = a.num_heads, a.head_dim
                score = (a.qkv.weight.abs().sum(1) + a.qkv.bias.abs()).view(3, H, d).sum((0, 2))
                score = score + a.proj.weight.abs().sum(0).view(H, d).sum(1)
                heads = score.argsort(descending=True, stable=True)
                rows = (torch.arange(3, device=heads.device).view(3, 1, 1) * H * d + heads.view(1, H, 1) * d
                        + torch.arange(d, device=heads.device).view(1, 1, d)).reshape(-1)
                permute(a.qkv.weight, rows, 0), permute(a.qkv.bias, rows, 0)
                permute(a.proj.weight, (heads.view(H, 1) * d + torch.arange(d, device=heads.device)).reshape(-1), 1)
                score = mlp.fc1.weight.abs().sum(1) + mlp.fc1.bias.abs() + mlp.fc2.weight.abs().sum(0)
                neurons = score.argsort(descending=True, stable=True)
                permute(mlp.fc1.weight, neurons, 0), permute(mlp.fc1.bias, neurons, 0)
                permute(mlp.fc2.weight, neurons, 1)

    # ------------------------------------------------------------------ sub-networks
    def subnet_state_dict(self, arch: Arch) -> Dict[str, torch.Tensor]:
        """The weights of sub-network ``arch`` under the standalone :class:`ResNAS` key names (absent blocks
        dropped, later blocks renumbered), sliced from the super-network (copies)."""
        arch = self.space.check(arch)
        sd = self.state_dict()
        dims, out = arch["dims"], {}

        def put(dst: str, src: str, *index) -> None:
            out[dst] = sd[src][index].clone() if index else sd[src].clone()

        for k in sd:
            if k.startswith("patch_embed.conv") and not k.startswith("patch_embed.conv_proj"):
                put(k, k)
        c0, cl = dims[0], dims[-1]
        put("patch_embed.conv_proj.weight", "patch_embed.conv_proj.weight", slice(0, c0))
        put("patch_embed.conv_proj.bias", "patch_embed.conv_proj.bias", slice(0, c0))
        put("cls_token", "cls_token", slice(None), slice(None), slice(0, c0))
        put("pos_embed", "pos_embed", slice(None), slice(None), slice(0, c0))
        for s, stage in enumerate(self.stages):
            C, d = dims[s], arch["head_dims"][s]
            if s > 0:
                r, ci = f"stages.{s}.reduction", dims[s - 1]
                put(f"{r}.norm.weight", f"{r}.norm.weight", slice(0, ci))
                put(f"{r}.norm.bias", f"{r}.norm.bias", slice(0, ci))
                put(f"{r}.patch_reduce.weight", f"{r}.patch_reduce.weight", slice(0, C), slice(0, ci))
                put(f"{r}.patch_reduce.bias", f"{r}.patch_reduce.bias", slice(0, C))
                put(f"{r}.token_transform.weight", f"{r}.token_transform.weight", slice(0, C), slice(0, ci))
                put(f"{r}.token_transform.bias", f"{r}.token_transform.bias", slice(0, C))
                put(f"{r}.pos_embed", f"{r}.pos_embed", slice(None), slice(None), slice(0, C))
            jj = 0
            for j, blk in enumerate(stage.blocks):
                if not arch["present"][s][j]:
                    continue
                src, dst = f"stages.{s}.blocks.{j}", f"stages.{s}.blocks.{jj}"
                jj += 1
                H, h, M = blk.attn.num_heads, arch["heads"][s][j], arch["mlp"][s][j]
                for n in ("norm1", "norm2"):
                    put(f"{dst}.{n}.weight", f"{src}.{n}.weight", slice(0, C))
                    put(f"{dst}.{n}.bias", f"{src}.{n}.bias", slice(0, C))
                w = sd[f"{src}.attn.qkv.weight"].view(3, H, d, -1)[:, :h, :, :C]
                out[f"{dst}.attn.qkv.weight"] = w.reshape(3 * h * d, C).clone()
                out[f"{dst}.attn.qkv.bias"] = sd[f"{src}.attn.qkv.bias"].view(3, H, d)[:, :h].reshape(-1).clone()
                put(f"{dst}.attn.proj.weight", f"{src}.attn.proj.weight", slice(0, C), slice(0, h * d))
                put(f"{dst}.attn.proj.bias", f"{src}.attn.proj.bias", slice(0, C))
                put(f"{dst}.mlp.fc1.weight", f"{src}.mlp.fc1.weight", slice(0, M), slice(0, C))
                put(f"{dst}.mlp.fc1.bias", f"{src}.mlp.fc1.bias", slice(0, M))
                put(f"{dst}.mlp.fc2.weight", f"{src}.mlp.fc2.weight", slice(0, C), slice(0, M))
                put(f"{dst}.mlp.fc2.bias", f"{src}.mlp.fc2.bias", slice(0, C))
        put("norm.weight", "norm.weight", slice(0, cl))
        put("norm.bias", "norm.bias", slice(0, cl))
        for head in ("head", "patch_head"):
            if f"{head}.weight" in sd:
                put(f"{head}.weight", f"{head}.weight", slice(None), slice(0, cl))
                put(f"{head}.bias", f"{head}.bias")
        return out

    def extract_subnet(self, arch: Arch, **kwargs: Any) -> ResNAS:
        """A standalone :class:`ResNAS` of sub-network ``arch`` holding the super-network's sliced weights; its
        output equals the masked super-network's for that arch. ``kwargs`` override the standalone model's
        arguments (e.g. ``drop_path_rate`` for retraining); by default they are the super-network's."""
        arch = self.space.check(arch)
        args = dict(img_size=self.img_size, num_classes=self.num_classes, global_pool=self.global_pool,
                    stem_chans=self.space.stem_chans, patch_output=self.patch_head is not None,
                    in_chans=self.patch_embed.conv1.conv.in_channels)
        args.update(kwargs)
        with torch.device("meta"):  # no initialization work: every tensor comes from the super-network
            net = ResNAS(copy.deepcopy(arch), **args)
        net.load_state_dict(self.subnet_state_dict(arch), strict=True, assign=True)
        p = next(self.parameters())
        return net.to(device=p.device, dtype=p.dtype).train(self.training)

    def arch_macs(self, arch: Arch, measured: bool = False) -> int:
        """MACs of sub-network ``arch`` at the super-network's ``img_size``: analytic (fast) or, with ``measured``,
        counted by ``torch.utils.flop_counter`` on the extracted network."""
        if measured:
            arch = self.space.check(arch)
            return count_macs(ResNAS(arch, img_size=self.img_size, num_classes=self.num_classes,
                                     stem_chans=self.space.stem_chans), self.img_size)
        return analytic_macs(arch, self.img_size, self.num_classes, stem_chans=self.space.stem_chans)
