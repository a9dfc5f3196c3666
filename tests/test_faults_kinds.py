"""The fault-kind extension point, the kind registry, `Selection` and the error-model protocols."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

import qmargin.faults.kinds as kinds_module
from qmargin.errors import ConfigError
from qmargin.faults import (
    BitErrorModel,
    ErrorModel,
    ErrorModelTemplate,
    FaultKind,
    FaultModel,
    FaultResult,
    RandomFlips,
    Selection,
    StuckAt,
    bit_differences,
    derive_seed,
    fault_kind_from_dict,
    fault_kinds,
    force_bits_,
    inject,
    make_generator,
    register_fault_kind,
    sample_stuck_bits,
    select_tensors,
    to_words,
)
from qmargin.quant import QuantSpec, quantize_model, quantized_modules


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def make_net(bits: int = 4, bias_bits: int | None = None, *, frozen: bool = True) -> Net:
    torch.manual_seed(0)
    net = Net()
    quantize_model(net, QuantSpec(bits), bias_spec=QuantSpec(bias_bits) if bias_bits else None)
    if frozen:
        for _, m in quantized_modules(net):
            m.freeze()
    return net.eval()


def codes_of(model: nn.Module) -> dict[str, Tensor]:
    return {f"{n}.{t}": m.codes(t).clone() for n, m in quantized_modules(model) for t in m.quant_specs}


@dataclass(frozen=True)
class SetBit0(FaultKind):
    """A test kind: bit 0 of every word reads as 1 with probability ``p`` (unless protected)."""

    p: float
    stream: ClassVar[tuple[str, ...]] = ("set_bit0",)

    @property
    def is_null(self) -> bool:
        return self.p == 0.0

    def apply_(
        self, codes: Tensor, bits: int, generator: torch.Generator, protected: frozenset[int]
    ) -> FaultResult:
        spared = protected | frozenset(range(1, bits))  # only bit 0 is exposed
        stuck = sample_stuck_bits(codes.numel(), bits, rate_1=self.p, seed=generator, protected_bits=spared)
        return FaultResult(force_bits_(codes, bits, stuck), n_stuck=stuck.n_bits)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the kind registry, so kinds registered by a test do not leak."""
    monkeypatch.setattr(kinds_module, "_REGISTRY", dict(kinds_module._REGISTRY))
    return kinds_module._REGISTRY


# ---------------------------------------------------------------------------------------------
# a custom kind through inject
# ---------------------------------------------------------------------------------------------
def test_custom_kind_is_applied_by_inject_and_restored_exactly(registry):
    register_fault_kind("set_bit0", SetBit0)
    assert fault_kinds()["set_bit0"] is SetBit0 and SetBit0.name == "set_bit0"
    net = make_net(4)
    clean = codes_of(net)
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    y_clean = net(x)
    model = FaultModel((SetBit0(0.5),), Selection(layers=("fc", "fc2")))
    with inject(net, model, seed=3) as report:
        inside = codes_of(net)
        assert torch.equal(inside["conv.weight"], clean["conv.weight"])  # not selected
        n_set = 0
        for key in ("fc.weight", "fc2.weight"):
            before, after = to_words(clean[key], 4), to_words(inside[key], 4)
            assert torch.equal(after & 0b1110, before & 0b1110)  # only bit 0 can change ...
            assert torch.all(after >= before)  # ... and only 0 -> 1
            # the pattern comes from the kind's own stream, derive_seed(seed, layer, tensor, "set_bit0")
            layer = key.split(".")[0]
            g = make_generator(derive_seed(3, layer, "weight", "set_bit0"))
            stuck = sample_stuck_bits(clean[key].numel(), 4, rate_1=0.5, seed=g, protected_bits=(1, 2, 3))
            assert stuck.n_bits > 0
            assert torch.equal(after.flatten()[stuck.index] & 1, torch.ones(len(stuck), dtype=torch.uint8))
            n_set += stuck.n_bits
        assert report.n_stuck == n_set and report.n_flipped == 0
        assert report.n_changed == sum(bit_differences(clean[k], inside[k], 4) for k in clean)
        assert report.to_dict()["error_model"] == model.to_dict()
    after = codes_of(net)
    assert all(torch.equal(after[k], clean[k]) for k in clean)
    assert torch.equal(net(x), y_clean)


def test_custom_kind_runs_in_order_after_flips_and_respects_protected_bits(registry):
    register_fault_kind("set_bit0", SetBit0)
    net = make_net(4)
    clean = codes_of(net)
    both = FaultModel((RandomFlips(0.3, 0.3), SetBit0(1.0)))
    with inject(net, both, seed=0) as report:
        for v in codes_of(net).values():
            assert torch.all(to_words(v, 4) & 1 == 1)  # set after the flips: bit 0 always reads 1
        assert report.n_flipped > 0 and report.n_stuck == report.n_bits // 4
    assert all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)
    with inject(net, FaultModel((SetBit0(1.0),), Selection(protected_bits=(0,))), seed=0) as report:
        assert all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)
        assert report.n_stuck == report.n_changed == 0 and report.n_exposed == report.n_bits * 3 // 4
    bad = FaultModel((SetBit0(1.0),), Selection(protected_bits=(-5,)))
    message = "protected bits \\[-5\\] do not exist in the 4-bit codes of conv.weight"
    with pytest.raises(ConfigError, match=message), inject(net, bad, seed=0):
        pass
    assert all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)


def test_inject_knows_no_fault_kind():
    """`inject` imports no concrete kind and no sampler: adding a kind never edits it."""
    source = Path(kinds_module.__file__).with_name("inject.py").read_text()
    names = {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) for a in n.names}
    concrete = {"RandomFlips", "StuckAt", "sample_flips", "sample_stuck_bits", "flip_bits_", "force_bits_"}
    assert not names & concrete


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
def test_builtin_kinds_are_registered():
    kinds = fault_kinds()
    assert kinds["flips"] is RandomFlips and kinds["stuck_at"] is StuckAt
    assert RandomFlips.stream == () and StuckAt.stream == ("stuck_at",)
    kinds.clear()  # a copy
    assert "flips" in fault_kinds()


def test_registry_rejects_duplicates_and_non_kinds(registry):
    @dataclass(frozen=True)
    class Other(SetBit0):
        stream: ClassVar[tuple[str, ...]] = ("other",)

    @dataclass(frozen=True)
    class SameStream(SetBit0):
        stream: ClassVar[tuple[str, ...]] = ("stuck_at",)

    register_fault_kind("set_bit0", SetBit0)
    with pytest.raises(ConfigError, match="already registered"):
        register_fault_kind("set_bit0", Other)  # name taken
    with pytest.raises(ConfigError, match="already registered"):
        register_fault_kind("flips", Other)
    with pytest.raises(ConfigError, match="already registered as fault kind 'set_bit0'"):
        register_fault_kind("again", SetBit0)  # class taken
    with pytest.raises(ConfigError, match="stream"):
        register_fault_kind("same_stream", SameStream)
    with pytest.raises(TypeError):
        register_fault_kind("not_a_kind", dict)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        register_fault_kind("", Other)
    assert register_fault_kind("other", Other) is Other
    assert list(fault_kinds()) == ["flips", "stuck_at", "secded", "parity", "set_bit0", "other"]


def test_kinds_serialise_through_the_registry(registry):
    @dataclass(frozen=True)
    class SubKind(SetBit0):
        stream: ClassVar[tuple[str, ...]] = ("sub",)

    register_fault_kind("set_bit0", SetBit0)
    model = FaultModel((RandomFlips(0.1, 0.0), StuckAt(0.0, 0.2), SetBit0(0.5)), Selection(layers="fc*"))
    d = json.loads(json.dumps(model.to_dict()))
    assert d["kinds"][0] == {"kind": "flips", "p01": 0.1, "p10": 0.0}
    assert FaultModel.from_dict(d) == model
    with pytest.raises(ConfigError, match="not registered"):
        FaultModel((SubKind(0.5),)).to_dict()  # inherits SetBit0's name, but is another kind
    with pytest.raises(ConfigError, match="unknown fault kind 'nope'"):
        fault_kind_from_dict({"kind": "nope"})
    with pytest.raises(ConfigError, match="bad parameters"):
        fault_kind_from_dict({"kind": "flips", "p": 0.1})
    with pytest.raises(ConfigError):
        RandomFlips(1.5, 0.0)
    with pytest.raises(ConfigError, match="<= 1"):
        StuckAt(0.6, 0.5)


# ---------------------------------------------------------------------------------------------
# BitErrorModel = Selection + kinds
# ---------------------------------------------------------------------------------------------
def test_bit_error_model_composes_selection_and_kinds():
    m = BitErrorModel(ber=1e-3, p10=0.0, stuck_at_1=0.2, protected_bits=(7, -1), layers="fc*",
                      layer_types=(nn.Linear,), tensors="weight")
    assert m.selection == Selection(layers=("fc*",), layer_types=("Linear",), tensors=("weight",),
                                    protected_bits=(-1, 7))
    assert m.fault_kinds() == (RandomFlips(1e-3, 0.0), StuckAt(0.0, 0.2))
    assert BitErrorModel(p10=0.3).fault_kinds() == (RandomFlips(0.0, 0.3),)
    assert BitErrorModel(stuck_at_0=0.1).fault_kinds() == (StuckAt(0.1, 0.0),)
    assert BitErrorModel().fault_kinds() == () and BitErrorModel().is_null
    assert m.with_ber(0.5).selection == m.selection
    assert BitErrorModel().selection == Selection()


def test_bit_error_model_and_fault_model_give_the_same_patterns():
    net = make_net(6)
    em = BitErrorModel(ber=0.1, stuck_at_0=0.05, stuck_at_1=0.02, protected_bits=(-1,), layers="fc*")
    fm = FaultModel(
        (RandomFlips(0.1, 0.1), StuckAt(0.05, 0.02)), Selection(layers="fc*", protected_bits=(-1,))
    )
    with inject(net, em, seed=5) as r1:
        a = codes_of(net)
    with inject(net, fm, seed=5) as r2:
        b = codes_of(net)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert r1.tensors == r2.tensors and r1.n_flipped > 0 and r1.n_stuck > 0


def test_protocols():
    em = BitErrorModel(ber=0.1)
    assert isinstance(em, ErrorModel) and isinstance(em, ErrorModelTemplate)
    fm = FaultModel((RandomFlips(0.1, 0.1),))
    assert isinstance(fm, ErrorModel) and not isinstance(fm, ErrorModelTemplate)
    assert not isinstance({"ber": 0.1}, ErrorModel)
    with pytest.raises(TypeError, match="ErrorModel"), inject(make_net(), {"ber": 0.1}, seed=0):  # type: ignore[arg-type]
        pass
    assert FaultModel().is_null and FaultModel((RandomFlips(0.0, 0.0),)).fault_kinds() == ()
    with pytest.raises(ConfigError):
        FaultModel(("flips",))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Selection on its own
# ---------------------------------------------------------------------------------------------
def _selected(net: nn.Module, **kw) -> list[str]:
    return [f"{n}.{t}" for n, _, t in select_tensors(net, FaultModel((), Selection(**kw)))]


def test_selection_alone_selects_like_before():
    net = make_net(4, bias_bits=8, frozen=False)
    assert _selected(net) == ["conv.weight", "fc.weight", "fc2.weight"]
    assert _selected(net, exclude=("fc*",)) == ["conv.weight"]
    assert _selected(net, layers="fc2") == ["fc2.weight"]
    assert _selected(net, layer_types=("Conv2d",)) == ["conv.weight"]
    assert _selected(net, layer_types=(nn.Linear,)) == ["fc.weight", "fc2.weight"]
    assert _selected(net, tensors=("weight", "bias"))[:2] == ["conv.weight", "conv.bias"]
    assert _selected(net, tensors=None) == _selected(net, tensors=("weight", "bias"))
    assert _selected(make_net(4), tensors=("weight", "bias")) == ["conv.weight", "fc.weight", "fc2.weight"]
    with pytest.raises(ConfigError, match="selects no stored tensor \\(layers=\\['decoder.\\*'\\]"):
        _selected(net, layers="decoder.*")

    s = Selection(layers=("fc*",), exclude=("fc2",), layer_types=("Linear",))
    assert s.selects_layer("fc", net.fc) and not s.selects_layer("fc2", net.fc2)
    assert not s.selects_layer("conv", net.conv)
    assert not Selection(layer_types="Conv2d").selects_layer("fc", net.fc)
    assert Selection().selects_tensors(["weight", "bias", "W", "U", "b"]) == ["weight", "W", "U"]
    assert Selection(tensors=None).selects_tensors(["b", "W"]) == ["b", "W"]


def test_selection_validation_and_round_trip():
    s = Selection(layers="features.*", layer_types=(nn.Conv2d, "Linear"), tensors="weight",
                  protected_bits=(7, -1, 7))
    assert s.layers == ("features.*",) and s.layer_types == ("Conv2d", "Linear")
    assert s.protected_bits == (-1, 7)
    assert Selection(**json.loads(json.dumps(s.to_dict()))) == s
    assert Selection(protected_bits=3).protected_bits == (3,)
    for kw in ({"layers": ()}, {"layers": ("",)}, {"tensors": ()}, {"layer_types": (3,)},
               {"protected_bits": (8,)}, {"protected_bits": (1.5,)}, {"protected_bits": (True,)}):
        with pytest.raises(ConfigError):
            Selection(**kw)
