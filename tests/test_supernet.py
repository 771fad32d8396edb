"""ViT-ResNAS super-network: search spaces, masked multi-architecture forward == extracted sub-networks,
masked LayerNorm, progressive warm-up, rewiring, MACs (flop counter vs analytic)."""
from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import linvision  # noqa: F401
import timm

from linvision.models.resnas import ARCHS, ResNAS
from linvision.nas import SPACES, ResNASSuperNet, analytic_macs, count_macs, get_space, masked_layer_norm


def _supernet(space="test", seed=0, **kw) -> ResNASSuperNet:
    """A super-network with non-trivial norms and biases (so every parameter moves the output)."""
    torch.manual_seed(seed)
    net = ResNASSuperNet(space, num_classes=10, **kw)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return net.eval()


def test_official_spaces():
    tiny, small = SPACES["tiny"], SPACES["small"]
    assert tiny.dims == ((256, 224, 192, 176, 160), (512, 448, 384, 352, 320), (1024, 896, 768, 704, 640))
    assert tiny.heads == ((6, 5, 4, 3), (12, 10, 8, 6), (12, 10, 8, 6)) and tiny.head_dims == (32, 48, 64)
    assert all(len(m) == 7 for m in tiny.mlp) and tiny.mlp[2][0] == 3072 and tiny.mlp[2][-1] == 1536
    assert tiny.depths == (6, 6, 6) and tiny.removable == ((1, 3, 5),) * 3          # blocks 2, 4, 6 of each stage
    assert small.depths == (7, 7, 7) and small.heads[1] == (16, 14, 12, 10) and small.dims[2][-1] == 800
    # the searched ViT-ResNAS-Tiny is a sub-network of the Tiny space, inside the official search constraint
    # [0.975 C, C] with C = 1.7944 G (= ViT-Res-Tiny's MACs)
    a = json.loads(json.dumps(ARCHS["vit_resnas_tiny"]))
    for s, j in ((0, 5), (2, 5)):  # 5 of 6 blocks in stages 1 and 3: one removable block left out
        a["heads"][s].insert(j, 6), a["mlp"][s].insert(j, 768), a["present"][s].insert(j, False)
    a = tiny.check(a)
    assert 0.975 * 1.7944e9 <= analytic_macs(a, 224) <= 1.7944e9
    assert analytic_macs(ARCHS["vit_res_tiny"], 224) == 1_794_378_240
    with pytest.raises(ValueError, match="not among the choices"):
        tiny.check({**tiny.largest(), "dims": [250, 512, 1024]})
    with pytest.raises(ValueError, match="leaves out block 0"):
        p = tiny.largest()
        p["present"][0][0] = False
        tiny.check(p)


def test_space_encoding_and_json(tmp_path):
    sp = SPACES["test"]
    rng = random.Random(0)
    for _ in range(20):
        a = sp.random_arch(rng)
        assert sp.decode(sp.encode(a)) == sp.check(sp.decode(sp.encode(a)))
        assert sp.encode(sp.decode(sp.encode(a))) == sp.encode(a)
    a = sp.largest()
    a["present"][1][1] = False
    b = json.loads(json.dumps(a))
    b["heads"][1][1], b["mlp"][1][1] = 1, 64          # genes of an absent block do not matter
    assert sp.encode(a) == sp.encode(b)
    f = tmp_path / "space.json"
    f.write_text(json.dumps(sp.to_dict()))
    assert get_space(str(f)) == sp and get_space("test") is sp
    with pytest.raises(ValueError, match="unknown search space"):
        get_space("huge")


def test_masked_layer_norm_uses_active_channels_only():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(12, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    widths = torch.tensor([12, 7, 3])
    mask = (torch.arange(12).view(1, 1, 12) < widths.view(3, 1, 1)).float()
    x = torch.randn(3, 5, 12) * 4 + 2
    y = masked_layer_norm(x * mask, mask, widths.view(3, 1, 1).float(), norm)
    for i, c in enumerate(widths.tolist()):
        torch.testing.assert_close(y[i, :, :c], F.layer_norm(x[i, :, :c], (c,), norm.weight[:c], norm.bias[:c], 1e-6))
        assert (y[i, :, c:] == 0).all()


@pytest.mark.parametrize("space", ["test", "demo"])
def test_extracted_subnets_equal_masked_supernet(space):
    """Several random sub-networks in ONE multi-architecture batch: each batch slice's logits equal those of the
    standalone network extracted for that arch (fp32, max abs diff <= 1e-5); also smallest and largest."""
    net = _supernet(space)
    rng = random.Random(1)
    archs = [net.space.random_arch(rng) for _ in range(5)] + [net.space.smallest(), net.space.largest()]
    x = torch.randn(2 * len(archs), 3, 56, 56)
    with torch.no_grad():
        out = net(x, archs)
        for i, a in enumerate(archs):
            sub = net.extract_subnet(a)
            assert isinstance(sub, ResNAS) and not sub.training
            assert sum(len(s.blocks) for s in sub.stages) == sum(map(sum, a["present"]))
            assert (out[2 * i:2 * i + 2] - sub(x[2 * i:2 * i + 2])).abs().max() <= 1e-5
        assert (net(x) - net(x, [net.space.largest()])).abs().max() <= 1e-5      # plain forward = largest arch


def test_uneven_slices_and_gradients_stay_in_the_subnetworks():
    """7 samples over 3 archs (slices 3/2/2); with only the smallest arch, every weight outside it gets exactly
    zero gradient (masks, not just small values)."""
    net = _supernet()
    sp = net.space
    archs = [sp.random_arch(random.Random(i)) for i in range(3)]
    x = torch.randn(7, 3, 56, 56)
    with torch.no_grad():
        out = net(x, archs)
        for a, sl in zip(archs, [slice(0, 3), slice(3, 5), slice(5, 7)]):
            assert (out[sl] - net.extract_subnet(a)(x[sl])).abs().max() <= 1e-5
    net.train()
    small = sp.smallest()
    net(x, [small]).sum().backward()
    blk = net.stages[2].blocks[0]
    C, h, d, M = small["dims"][2], small["heads"][2][0], sp.head_dims[2], small["mlp"][2][0]
    assert blk.mlp.fc1.weight.grad[M:].abs().sum() == 0 and blk.mlp.fc1.weight.grad[:M, :C].abs().sum() > 0
    assert blk.mlp.fc1.weight.grad[:, C:].abs().sum() == 0 and blk.norm1.weight.grad[C:].abs().sum() == 0
    qkv = blk.attn.qkv.weight.grad.view(3, -1, d, blk.attn.qkv.in_features)
    assert qkv[:, h:].abs().sum() == 0 and qkv[:, :h].abs().sum() > 0
    absent = [j for j, p in enumerate(small["present"][1]) if not p]
    gone = net.stages[1].blocks[absent[0]].parameters()
    assert absent and all(p.grad is None or p.grad.abs().sum() == 0 for p in gone)
    assert net.head.weight.grad[:, C:].abs().sum() == 0


def test_progressive_warmup_sampling():
    sp = SPACES["tiny"]
    rng = random.Random(0)
    first = sp.sample_archs(8, epoch=0, warmup_epochs=15, rng=rng)
    assert all(a == sp.largest() for a in first)                               # epoch 0: only the largest
    mid = sp.sample_archs(64, epoch=7.5, warmup_epochs=15, rng=rng)            # K=5 widths: first 3; K=7 mlp: 4
    assert {a["dims"][0] for a in mid} == {256, 224, 192}
    assert {a["mlp"][1][0] for a in mid} == {1536, 1408, 1280, 1152}
    assert {a["present"][0][1] for a in mid} == {True}                         # keep (T, T, F, F): first 2
    done = sp.sample_archs(60, epoch=15, warmup_epochs=15, rng=rng)
    widths = Counter(a["dims"][2] for a in done)
    assert set(widths) == set(sp.dims[2]) and set(widths.values()) == {12}     # balanced: 60 / 5 each
    assert Counter(a["present"][2][3] for a in done) == {True: 30, False: 30}
    assert len({sp.encode(a) for a in done}) == 60                             # distinct sub-networks
    assert sp.warmup_choices((3, 2, 1), epoch=math.inf, warmup_epochs=0) == (3, 2, 1)


def test_rewiring_keeps_the_function_and_sorts_by_importance():
    net = _supernet()
    x = torch.randn(2, 3, 56, 56)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    net(x, net.space.sample_archs(2, rng=random.Random(0))).sum().backward()
    opt.step()
    blk = net.stages[1].blocks[1]
    fc1_before, m_before = blk.mlp.fc1.weight.clone(), opt.state[blk.mlp.fc1.weight]["exp_avg"].clone()
    net.eval()
    with torch.no_grad():
        ref = net(x)
    net.rewire(opt)
    with torch.no_grad():
        assert (net(x) - ref).abs().max() <= 1e-5
    a, mlp = blk.attn, blk.mlp
    H, d = a.num_heads, a.head_dim
    head_score = ((a.qkv.weight.abs().sum(1) + a.qkv.bias.abs()).view(3, H, d).sum((0, 2))
                  + a.proj.weight.abs().sum(0).view(H, d).sum(1))
    assert (head_score[:-1] >= head_score[1:]).all()
    neuron_score = mlp.fc1.weight.abs().sum(1) + mlp.fc1.bias.abs() + mlp.fc2.weight.abs().sum(0)
    assert (neuron_score[:-1] >= neuron_score[1:]).all()
    # Adam moments follow their weights
    perm = [int((fc1_before == row).all(1).nonzero()[0]) for row in mlp.fc1.weight]
    torch.testing.assert_close(opt.state[mlp.fc1.weight]["exp_avg"], m_before[perm])


@pytest.mark.parametrize("space,size", [("test", 56), ("demo", 112), ("tiny", 56)])
def test_macs_flop_counter_equals_analytic(space, size):
    net = ResNASSuperNet(space, num_classes=10, img_size=size)
    rng = random.Random(0)
    for a in [net.space.random_arch(rng) for _ in range(1 if space == "tiny" else 3)] + [net.space.smallest()]:
        assert net.arch_macs(a, measured=True) == net.arch_macs(a) == count_macs(net.extract_subnet(a), size)
    assert count_macs(net, size) == net.arch_macs(net.space.largest())


def test_supernet_weights_are_the_largest_standalone_network():
    net = _supernet()
    big = ResNAS(net.space.largest(), img_size=56, num_classes=10, stem_chans=net.space.stem_chans).eval()
    big.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(big(x), net(x))
    assert set(net.subnet_state_dict(net.space.largest())) == set(big.state_dict())
    assert isinstance(timm.create_model("test_resnas"), ResNAS)


def test_depth_rule_and_space_size():
    """Adjacent removable blocks encode depth (official update_depth): once one is absent, the following ones of
    the run are too; size() counts the distinct sub-networks exactly (brute force on a small space)."""
    import itertools

    from linvision.nas.space import SearchSpace
    sp = SearchSpace("t", ((2, 1), (3, 2)), (4, 4), ((2, 1), (1,)), ((8,), (8, 4)), (3, 2), ((1, 2), (1,)))
    keys = {sp.encode(sp.decode(v)) for v in itertools.product(*[g.choices for g in sp.genes()])}
    assert len(keys) == sp.size() == 336
    a = sp.largest()
    a["present"][0][1] = False
    assert sp.decode(sp.encode(a))["present"][0] == [True, False, False]
    test = SPACES["test"]                                       # removable (1, 2) in stage 1: adjacent
    for arch in test.sample_archs(64, rng=random.Random(0)):
        assert not (not arch["present"][1][1] and arch["present"][1][2])
