"""`inject`, `BitErrorModel` and the per-layer streams on small quantized models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from qmargin.errors import ConfigError
from qmargin.faults import (
    BitErrorModel,
    bit_differences,
    derive_seed,
    inject,
    popcount,
    select_tensors,
    to_words,
)
from qmargin.quant import QuantizedTensors, QuantSpec, quantize_model, quantized_modules

ALPHA = 1e-3


class Net(nn.Module):
    """conv -> relu -> linear, optionally with an extra layer that must not disturb the others."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        if extra:
            self.aaa_extra = nn.Linear(7, 7)  # sorts and registers before the others
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc(h)))


def make_net(bits: int = 4, *, extra: bool = False, bias_bits: int | None = None, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(extra)
    quantize_model(net, QuantSpec(bits), bias_spec=QuantSpec(bias_bits) if bias_bits else None)
    return net.eval()


class TwoTensorLayer(QuantizedTensors):
    """A MonDEQ-like layer storing tensors named W and U (no 'weight')."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(8, 8))
        self.U = nn.Parameter(torch.randn(8, 3))
        self.quant_specs = {"W": QuantSpec(6), "U": QuantSpec(3)}

    def float_tensor(self, name: str) -> torch.Tensor:
        return getattr(self, name)


def codes_of(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in quantized_modules(model):
        for t in m.quant_specs:
            out[f"{name}.{t}"] = m.codes(t).clone()
    return out


def freeze(model: nn.Module) -> nn.Module:
    for _, m in quantized_modules(model):
        m.freeze()
    return model


X = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(9))


# ---------------------------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------------------------
def test_codes_change_inside_and_restore_exactly_on_exit():
    net = freeze(make_net(4, bias_bits=8))
    clean, y_clean = codes_of(net), net(X)
    buffers = {k: v.data_ptr() for k, v in net.named_buffers()}
    with inject(net, BitErrorModel(ber=0.05, tensors=("weight", "bias")), seed=1) as report:
        inside = codes_of(net)
        assert any(not torch.equal(inside[k], clean[k]) for k in clean)
        assert not torch.equal(net(X), y_clean)
        changed = sum(bit_differences(clean[k], inside[k], 4 if k.endswith("weight") else 8) for k in clean)
        assert changed == report.n_flipped == report.n_changed > 0
    after = codes_of(net)
    assert all(torch.equal(after[k], clean[k]) for k in clean)
    assert torch.equal(net(X), y_clean)
    assert {k: v.data_ptr() for k, v in net.named_buffers()} == buffers  # edited in place, not replaced


def test_restore_after_an_exception_in_the_body():
    net = freeze(make_net(8))
    clean = codes_of(net)
    with pytest.raises(RuntimeError, match="boom"), inject(net, BitErrorModel(ber=0.1), seed=3):
        assert not all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)
        raise RuntimeError("boom")
    assert all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)


def test_restore_when_injection_itself_fails_half_way():
    torch.manual_seed(0)
    net = Net()
    quantize_model(net, QuantSpec(8), include=["conv"])
    quantize_model(net, QuantSpec(3))  # fc, fc2 get 3-bit codes: bit 6 does not exist there
    freeze(net)
    clean = codes_of(net)
    with (
        pytest.raises(ConfigError, match="protected bits \\[6\\]"),
        inject(net, BitErrorModel(ber=0.2, protected_bits=(6,)), seed=0),
    ):
        pass
    assert all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)


def test_unfrozen_modules_are_frozen_inside_and_unfrozen_after():
    net = make_net(4)
    y_clean = net(X)
    with inject(net, BitErrorModel(ber=0.1), seed=0):
        assert all(m.frozen for _, m in quantized_modules(net))
        assert not torch.equal(net(X), y_clean)
    assert not any(m.frozen for _, m in quantized_modules(net))
    assert not any(k.endswith("_codes") for k, _ in net.named_buffers())
    assert torch.equal(net(X), y_clean)


def test_nested_injections_unwind_in_order():
    net = freeze(make_net(6))
    clean = codes_of(net)
    with inject(net, BitErrorModel(ber=0.05), seed=1):
        outer = codes_of(net)
        with inject(net, BitErrorModel(stuck_at_1=0.2), seed=2):
            assert any(not torch.equal(codes_of(net)[k], outer[k]) for k in outer)
        assert all(torch.equal(codes_of(net)[k], outer[k]) for k in outer)
    assert all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)


# ---------------------------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------------------------
def _pattern(net: nn.Module, model: BitErrorModel, seed: int, bits: int) -> dict[str, torch.Tensor]:
    clean = codes_of(net)
    with inject(net, model, seed):
        return {k: to_words(v, bits) ^ to_words(clean[k], bits) for k, v in codes_of(net).items()}


def test_same_seed_same_pattern_different_seed_different_pattern():
    net = freeze(make_net(4))
    model = BitErrorModel(ber=0.05)
    a, b, c = _pattern(net, model, 7, 4), _pattern(net, model, 7, 4), _pattern(net, model, 8, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_pattern_does_not_depend_on_weights_or_other_layers():
    model = BitErrorModel(ber=0.05)
    base = _pattern(freeze(make_net(4)), model, 5, 4)
    other_weights = _pattern(freeze(make_net(4, seed=1)), model, 5, 4)
    with_extra = _pattern(freeze(make_net(4, extra=True)), model, 5, 4)
    assert "aaa_extra.weight" in with_extra
    for k in base:
        assert torch.equal(base[k], other_weights[k])
        assert torch.equal(base[k], with_extra[k])
    # selecting fewer layers does not change the pattern of those still selected
    only_fc = _pattern(freeze(make_net(4)), BitErrorModel(ber=0.05, layers=("fc",)), 5, 4)
    assert torch.equal(only_fc["fc.weight"], base["fc.weight"]) and not torch.any(only_fc["conv.weight"])


def test_layers_with_identical_shapes_get_independent_patterns():
    """Two 6x6 layers: overlap of their flip patterns is Binomial(n, p^2) as for independent ones."""
    n, p = 36 * 4, 0.1
    net = freeze(make_net(4))
    twin = nn.Sequential(nn.Linear(6, 6))
    quantize_model(twin, QuantSpec(4))
    net.fc_twin = freeze(twin)
    total = 0
    for seed in range(100):
        pat = _pattern(net, BitErrorModel(ber=p, layers=("fc2", "fc_twin.*")), seed, 4)
        total += int(popcount(pat["fc2.weight"] & pat["fc_twin.0.weight"]).sum())
    assert stats.binomtest(total, n * 100, p * p).pvalue > ALPHA
    assert derive_seed(0, "fc2", "weight") != derive_seed(0, "fc_twin.0", "weight")


def test_observed_flip_rate_over_seeds_matches_ber():
    net = freeze(make_net(8))
    p = 0.01
    flips = [None] * 30
    for s in range(30):
        with inject(net, BitErrorModel(ber=p), seed=s) as report:
            flips[s] = report.n_flipped
            n_bits = report.n_bits
    assert stats.binomtest(sum(flips), n_bits * 30, p).pvalue > ALPHA
    assert report.n_exposed == n_bits == sum(m.weight.numel() * 8 for _, m in quantized_modules(net))


# ---------------------------------------------------------------------------------------------
# fault kinds through inject
# ---------------------------------------------------------------------------------------------
def test_p10_only_clears_bits_and_stuck_at_one_sets_all():
    net = freeze(make_net(5))
    clean = codes_of(net)
    with inject(net, BitErrorModel(p10=0.3), seed=0) as report:
        for k, v in codes_of(net).items():
            before, after = to_words(clean[k], 5), to_words(v, 5)
            assert torch.all(after & ~before == 0)  # no 0 -> 1
        assert report.n_flipped > 0
    with inject(net, BitErrorModel(stuck_at_1=1.0, protected_bits=(-1,)), seed=0) as report:
        for k, v in codes_of(net).items():
            assert torch.all(to_words(v, 5) & 0b01111 == 0b01111)
            assert torch.equal(to_words(v, 5) & 0b10000, to_words(clean[k], 5) & 0b10000)
        assert report.n_stuck == report.n_bits * 4 // 5
        assert report.n_changed == sum(bit_differences(clean[k], v, 5) for k, v in codes_of(net).items())
    assert all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)


def test_flips_then_stuck_report_net_changes():
    net = freeze(make_net(4))
    clean = codes_of(net)
    with inject(net, BitErrorModel(ber=0.2, stuck_at_0=0.2), seed=4) as report:
        net_changed = sum(bit_differences(clean[k], v, 4) for k, v in codes_of(net).items())
        assert report.n_changed == net_changed
        assert report.n_flipped > 0 and report.n_stuck > 0
    assert all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def _selected(net: nn.Module, **kw) -> list[str]:
    return [f"{n}.{t}" for n, _, t in select_tensors(net, BitErrorModel(ber=0.1, **kw))]


def test_selection_by_name_type_and_tensor():
    net = make_net(4, bias_bits=8)
    assert _selected(net) == ["conv.weight", "fc.weight", "fc2.weight"]
    assert _selected(net, exclude=("fc*",)) == ["conv.weight"]
    assert _selected(net, layers="fc2") == ["fc2.weight"]
    assert _selected(net, layer_types=("Conv2d",)) == ["conv.weight"]
    assert _selected(net, layer_types=(nn.Linear,)) == ["fc.weight", "fc2.weight"]
    assert _selected(net, tensors=("weight", "bias"))[:2] == ["conv.weight", "conv.bias"]
    assert _selected(net, tensors=None) == _selected(net, tensors=("weight", "bias"))
    # float biases are not stored bits: never selected
    assert _selected(make_net(4), tensors=("weight", "bias")) == ["conv.weight", "fc.weight", "fc2.weight"]


def test_modules_with_other_tensor_names():
    model = nn.Sequential(TwoTensorLayer())
    assert [t for _, _, t in select_tensors(model, BitErrorModel(ber=0.1, tensors=None))] == ["W", "U"]
    # the default selection takes the weights W and U (not biases); naming only "weight" selects nothing here
    assert [t for _, _, t in select_tensors(model, BitErrorModel(ber=0.1))] == ["W", "U"]
    with pytest.raises(ConfigError, match="selects no stored tensor"):
        select_tensors(model, BitErrorModel(ber=0.1, tensors=("weight",)))
    clean = {t: model[0].codes(t).clone() for t in ("W", "U")}
    with inject(model, BitErrorModel(ber=0.2, tensors=("U", "W")), seed=0) as report:
        assert [(r.tensor, r.bits) for r in report.tensors] == [("W", 6), ("U", 3)]
        assert any(not torch.equal(model[0].codes(t), clean[t]) for t in clean)
    assert not model[0].frozen


def test_nothing_selected_or_nothing_quantized_is_an_error():
    with pytest.raises(ConfigError, match="no quantized layers"):
        select_tensors(nn.Sequential(nn.Linear(2, 2)), BitErrorModel(ber=0.1))
    net = make_net()
    with (
        pytest.raises(ConfigError, match="selects no stored tensor"),
        inject(net, BitErrorModel(ber=0.1, layers=("decoder.*",)), seed=0),
    ):
        pass
    assert not any(m.frozen for _, m in quantized_modules(net))


def test_null_model_changes_nothing():
    net = freeze(make_net(4))
    clean = codes_of(net)
    with inject(net, BitErrorModel(), seed=0) as report:
        assert all(torch.equal(codes_of(net)[k], clean[k]) for k in clean)
        assert report.n_flipped == report.n_changed == 0 and report.n_bits > 0


# ---------------------------------------------------------------------------------------------
# BitErrorModel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"ber": -1e-3},
        {"ber": 1.01},
        {"ber": float("nan")},
        {"p01": 2.0},
        {"ber": "0.1"},
        {"ber": True},
        {"stuck_at_0": 0.6, "stuck_at_1": 0.5},
        {"protected_bits": (8,)},
        {"protected_bits": (1.5,)},
        {"layers": ()},
        {"layers": ("",)},
        {"tensors": ()},
        {"layer_types": (3,)},
    ],
)
def test_error_model_validation(kw):
    with pytest.raises(ConfigError):
        BitErrorModel(**kw)


def test_error_model_normalisation_and_round_trip():
    m = BitErrorModel(
        ber=1e-3,
        p10=0.0,
        protected_bits=(7, -1, 7),
        layers="features.*",
        layer_types=(nn.Conv2d, "Linear"),
        tensors="weight",
    )
    assert m.layers == ("features.*",) and m.tensors == ("weight",)
    assert BitErrorModel().tensors == ("weight", "W", "U")  # default: weights of every layer kind
    assert m.layer_types == ("Conv2d", "Linear") and m.protected_bits == (-1, 7)
    assert (m.rate_01, m.rate_10) == (1e-3, 0.0)
    d = json.loads(json.dumps(m.to_dict()))
    assert BitErrorModel.from_dict(d) == m
    assert m.with_ber(0.5).ber == 0.5 and m.with_ber(0.5).rate_10 == 0.0
    assert BitErrorModel().is_null and not m.is_null
    assert BitErrorModel(ber=np.float64(1e-3)).ber == 1e-3
    with pytest.raises(ConfigError, match="unknown"):
        BitErrorModel.from_dict({"bre": 0.1})
