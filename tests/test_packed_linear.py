"""PackedLinear (layers/linear.py): the oneDNN packed-weight product against F.linear, when it is (not) taken, and
that its cache follows the weight."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import linvision  # noqa: F401  (registers the models)
import timm
from linvision.layers import linear as L
from linvision.layers.linear import PACKED_MIN_ROWS, PackedLinear, use_packed_linears_

needs_onednn = pytest.mark.skipif(not L.packed_available(), reason="this torch build has no oneDNN packed linear")


@pytest.fixture(autouse=True)
def _packed_path_on():
    """These tests are about the packed path: on wherever oneDNN has it, whatever this CPU's default (and this
    process's mode again after each test, whatever the test set)."""
    with L.packed_mode_scope("all"):
        yield


def _lin(cin=48, cout=80, bias=True):
    torch.manual_seed(0)
    return PackedLinear(cin, cout, bias=bias)


def _packed_taken(lin):
    return "_packed" in lin.__dict__


@needs_onednn
@pytest.mark.parametrize("shape", [(PACKED_MIN_ROWS, 48), (2, PACKED_MIN_ROWS // 2 + 3, 48), (3, 700, 48)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_packed_product_equals_linear(shape, bias, ctx):
    lin = _lin(bias=bias)
    x = torch.randn(*shape)
    with ctx():
        y = lin(x)
    assert _packed_taken(lin)
    assert y.shape == (*shape[:-1], 80)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["few_rows", "grad", "float64", "autocast", "flop_counter", "vmap", "unavailable"])
def test_falls_back_to_linear_bit_for_bit(case):
    lin = _lin()
    x = torch.randn(2 * PACKED_MIN_ROWS, 48)
    ctx = torch.no_grad()
    if case == "few_rows":
        x = x[:PACKED_MIN_ROWS - 1]
    elif case == "grad":
        ctx = torch.enable_grad()
    elif case == "float64":
        lin, x = lin.double(), x.double()
    elif case == "autocast":
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    elif case == "unavailable":
        L.set_packed_mode("off")
    with ctx:
        if case == "flop_counter":
            with FlopCounterMode(display=False) as counter:
                y = lin(x)
            assert counter.get_total_flops() == 2 * x.shape[0] * 48 * 80
        elif case == "vmap":
            y = torch.func.vmap(lin)(x.view(2, PACKED_MIN_ROWS, 48)).view(-1, 80)
        else:
            y = lin(x)
        ref = F.linear(x, lin.weight, lin.bias)
    assert not _packed_taken(lin)
    assert torch.equal(y, ref)


@needs_onednn
def test_cache_follows_the_weight():
    lin = _lin()
    x = torch.randn(PACKED_MIN_ROWS, 48)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)

    check()
    first = lin.__dict__["_packed"][2]
    check()
    assert lin.__dict__["_packed"][2] is first  # reused while the weight is unchanged
    with torch.no_grad():
        lin.weight.mul_(-2)  # in place (an optimizer step)
    check()
    lin.load_state_dict(_lin(cout=80).state_dict() | {"weight": torch.randn(80, 48)})
    check()
    lin.double().float()  # new storage
    check()
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).square().sum().backward()
    opt.step()
    check()


@needs_onednn
def test_state_dict_copies_and_mlp_conversion():
    lin = _lin()
    with torch.no_grad():
        lin(torch.randn(PACKED_MIN_ROWS, 48))
    assert list(lin.state_dict()) == list(nn.Linear(48, 80).state_dict())
    for clone in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert not _packed_taken(clone) and torch.equal(clone.weight, lin.weight)

    mlp = timm.layers.Mlp(48, 96)
    keys = list(mlp.state_dict())
    use_packed_linears_([mlp])
    assert type(mlp.fc1) is PackedLinear and type(mlp.fc2) is PackedLinear and list(mlp.state_dict()) == keys
    x = torch.randn(PACKED_MIN_ROWS, 48)
    y = mlp(x)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), y.detach(), rtol=1e-5, atol=1e-5)
    assert _packed_taken(mlp.fc1) and _packed_taken(mlp.fc2)


@needs_onednn
def test_export_traces_plain_linear():
    lin = _lin().eval()
    with torch.no_grad():
        ep = torch.export.export(lin, (torch.randn(PACKED_MIN_ROWS, 48),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets), targets
    assert not _packed_taken(lin)


@needs_onednn
@pytest.mark.parametrize("name", ["vrwkv_tiny", "vir_tiny"])
def test_models_use_packed_products_at_many_tokens(name):
    """48×48 patches = 2,304 tokens: the no-grad logits (packed products) match the graph-keeping forward."""
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=10, img_size=384, patch_size=8).eval()
    x = torch.randn(1, 3, 384, 384)
    y = m(x)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), y.detach(), rtol=1e-4, atol=1e-5)
    layers = [mod for mod in m.modules() if isinstance(mod, PackedLinear)]
    assert layers and all(_packed_taken(mod) for mod in layers)


@pytest.mark.parametrize("choice, vendor, expected", [
    ("auto", "AuthenticAMD", "all"), ("auto", "GenuineIntel", "biased"), ("auto", None, "off"),
    ("auto", "HygonGenuine", "off"), (" AUTO ", "AuthenticAMD", "all"), ("", "GenuineIntel", "biased"),
    ("all", "GenuineIntel", "all"), ("biased", None, "biased"), ("off", "AuthenticAMD", "off")])
def test_mode_follows_vendor_and_choice(choice, vendor, expected, monkeypatch):
    """``auto`` follows the vendor as measured (None: no vendor line, e.g. not x86 Linux; unmeasured vendors:
    off); the other choices override it."""
    monkeypatch.setattr(L, "cpu_vendor", lambda: vendor)
    want = expected if L.packed_available() else "off"
    assert L.packed_mode(choice) == want
    if vendor is not None:
        assert L.packed_mode(choice, vendor=vendor) == want


def test_mode_reads_environment_and_rejects_bad_values(monkeypatch):
    monkeypatch.setenv(L.PACKED_ENV, "off")
    assert L.packed_mode(vendor="AuthenticAMD") == "off"
    monkeypatch.setenv(L.PACKED_ENV, "all")
    assert L.packed_mode(vendor="GenuineIntel") == ("all" if L.packed_available() else "off")
    monkeypatch.setenv(L.PACKED_ENV, "on")
    with pytest.raises(ValueError, match="LINVISION_PACKED_LINEAR must be one of"):
        L.packed_mode()
    with pytest.raises(ValueError, match="LINVISION_PACKED_LINEAR must be one of"):
        L.set_packed_mode(None)
    with pytest.raises(ValueError, match="choice must be one of"):
        L.packed_mode("fast")


def test_cpu_vendor_parses_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert L.cpu_vendor(str(info)) == "AuthenticAMD"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # e.g. aarch64: no vendor line
    assert L.cpu_vendor(str(info)) is None
    assert L.cpu_vendor(str(tmp_path / "missing")) is None


@needs_onednn
@pytest.mark.parametrize("mode", ["all", "biased", "off"])
def test_set_packed_mode_chooses_layers(mode):
    """``biased`` (Intel's default) packs only the Linears with a bias; ``off`` none; the results stay
    ``F.linear``'s (bit for bit where not packed)."""
    L.set_packed_mode(mode)  # the autouse fixture restores the mode
    with_bias, without = _lin(bias=True), _lin(bias=False)
    x = torch.randn(PACKED_MIN_ROWS, 48)
    with torch.no_grad():
        ys = [lin(x) for lin in (with_bias, without)]
    assert _packed_taken(with_bias) is (mode != "off") and _packed_taken(without) is (mode == "all")
    for lin, y in zip((with_bias, without), ys):
        ref = F.linear(x, lin.weight, lin.bias)
        if _packed_taken(lin):
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(y, ref)


@needs_onednn
def test_modes_in_models():
    """Vision-RWKV's block Linears have no bias, ViR's all have one: under ``biased`` only ViR's are packed."""
    L.set_packed_mode("biased")
    torch.manual_seed(0)
    for name, packed in (("vrwkv_tiny", False), ("vir_tiny", True)):
        m = timm.create_model(name, num_classes=10, img_size=384, patch_size=8).eval()
        with torch.inference_mode():
            m(torch.randn(1, 3, 384, 384))
        layers = [mod for mod in m.modules() if isinstance(mod, PackedLinear)]
        assert layers and all(_packed_taken(mod) is packed for mod in layers), name


def test_packed_mode_scope_restores(monkeypatch):
    before = L._ALL, L._BIASED
    with L.packed_mode_scope("off"):
        assert (L._ALL, L._BIASED) == (False, False)
    assert (L._ALL, L._BIASED) == before
    monkeypatch.setenv(L.PACKED_ENV, "bogus")
    with pytest.raises(ValueError, match="LINVISION_PACKED_LINEAR"):
        with L.packed_mode_scope(None):
            pass
    assert (L._ALL, L._BIASED) == before
