"""Library contract of qmargin.quant under bad input: spec types, non-finite weights, corrupt integer
states, and tied (shared) modules and parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qmargin.faults import BitErrorModel, bit_differences, inject
from qmargin.quant import (
    IntegerState,
    IntegerStateError,
    NonFiniteTensorError,
    QuantConfigError,
    QuantLinear,
    QuantSpec,
    TiedParameterError,
    compute_scale,
    export_integer_state,
    fake_quantize,
    freeze_model,
    link_tied,
    load_integer_state,
    quantize,
    quantize_model,
    quantized_modules,
    tied_stored_tensors,
)

# --------------------------------------------------------------------------------------------
# QuantSpec field types
# --------------------------------------------------------------------------------------------
BAD_SPECS = [
    ({"bits": True}, "bits"),
    ({"bits": 4.0}, "bits"),
    ({"bits": "4"}, "bits"),
    ({"bits": None}, "bits"),
    ({"bits": np.int64(4)}, "bits"),
    ({"bits": 0}, "bits"),
    ({"bits": 17}, "bits"),
    ({"bits": 4, "symmetric": "no"}, "symmetric"),
    ({"bits": 4, "symmetric": "yes"}, "symmetric"),
    ({"bits": 4, "symmetric": ""}, "symmetric"),
    ({"bits": 4, "symmetric": 1}, "symmetric"),
    ({"bits": 4, "symmetric": 0}, "symmetric"),
    ({"bits": 4, "symmetric": None}, "symmetric"),
    ({"bits": 4, "symmetric": 1.0}, "symmetric"),
    ({"bits": 4, "per_channel": "False"}, "per_channel"),
    ({"bits": 4, "per_channel": 1}, "per_channel"),
    ({"bits": 4, "per_channel": None}, "per_channel"),
    ({"bits": 4, "w_max": "1"}, "w_max"),
    ({"bits": 4, "w_max": True}, "w_max"),
    ({"bits": 4, "w_max": math.nan}, "w_max"),
    ({"bits": 4, "w_max": math.inf}, "w_max"),
    ({"bits": 4, "w_max": -math.inf}, "w_max"),
    ({"bits": 4, "w_max": 0.0}, "w_max"),
    ({"bits": 4, "w_max": -1}, "w_max"),
    ({"bits": 4, "w_max": torch.tensor(1.0)}, "w_max"),
    ({"bits": 4, "w_max": 1 + 0j}, "w_max"),
    ({"bits": 1, "symmetric": False}, "1-bit"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_SPECS, ids=[repr(k) for k, _ in BAD_SPECS])
def test_quant_spec_rejects_bad_field_types_and_ranges(kwargs, field):
    with pytest.raises(QuantConfigError, match=field):
        QuantSpec(**kwargs)
    assert issubclass(QuantConfigError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "w_max"),
    [({"w_max": 1}, 1.0), ({"w_max": np.float64(0.5)}, 0.5), ({"w_max": 0.25}, 0.25), ({}, None)],
)
def test_quant_spec_normalises_w_max_to_float(kwargs, w_max):
    spec = QuantSpec(4, **kwargs)
    assert spec.w_max == w_max and (w_max is None or type(spec.w_max) is float)
    assert QuantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"bits": 4, "symmetic": True}, "unknown"),
        ({"symmetric": True}, "bits"),
        ([4], "mapping"),
        ({"bits": 4, "symmetric": "no"}, "symmetric"),
    ],
)
def test_quant_spec_from_dict_is_strict(d, match):
    with pytest.raises(QuantConfigError, match=match):
        QuantSpec.from_dict(d)


# --------------------------------------------------------------------------------------------
# non-finite weights
# --------------------------------------------------------------------------------------------
SPECS = [
    QuantSpec(4),
    QuantSpec(4, per_channel=True),
    QuantSpec(4, symmetric=False),
    QuantSpec(4, w_max=0.5),
    QuantSpec(1),
    QuantSpec(8, symmetric=False, per_channel=True, w_max=1.0),
]
BAD_VALUES = [("nan", math.nan), ("+inf", math.inf), ("-inf", -math.inf)]


def _with_bad(value: float, where: int = 5) -> torch.Tensor:
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    w.view(-1)[where] = value
    return w


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize(("kind", "value"), BAD_VALUES, ids=[k for k, _ in BAD_VALUES])
def test_quantize_and_compute_scale_refuse_non_finite(spec, kind, value):
    w = _with_bad(value)
    with pytest.raises(NonFiniteTensorError, match=f"'fc.weight'.*1 {kind.replace('+', '[+]')}"):
        quantize(w, spec, name="fc.weight")
    with pytest.raises(NonFiniteTensorError, match="fc.weight"):
        compute_scale(w, spec, name="fc.weight")
    with pytest.raises(NonFiniteTensorError, match="shape \\(4, 6\\)"):
        quantize(w, spec)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize(("kind", "value"), BAD_VALUES, ids=[k for k, _ in BAD_VALUES])
def test_fake_quantize_never_turns_non_finite_weights_finite(spec, kind, value):
    w = _with_bad(value)
    out = fake_quantize(w, spec)
    assert not torch.isfinite(out.view(-1)[5])
    clean = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fake_quantize(clean, spec), torch.as_tensor(_reference(clean, spec)))


def _reference(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    from qmargin.quant import dequantize

    return dequantize(*quantize(w, spec), spec)


@pytest.mark.parametrize(
    "spec", [QuantSpec(4), QuantSpec(4, symmetric=False), QuantSpec(4, per_channel=True)]
)
def test_all_zero_tensor_still_gets_scale_one(spec):
    scale, _ = compute_scale(torch.zeros(3, 4), spec)
    assert torch.all(scale == 1)


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(("kind", "value"), BAD_VALUES, ids=[k for k, _ in BAD_VALUES])
@pytest.mark.parametrize(("tensor", "bias_spec"), [("weight", None), ("bias", QuantSpec(8))])
def test_quantize_model_refuses_non_finite_and_changes_nothing(kind, value, tensor, bias_spec):
    model = TwoLayers()
    with torch.no_grad():
        getattr(model.fc2, tensor).view(-1)[0] = value
    with pytest.raises(NonFiniteTensorError, match=f"fc2.{tensor}"):
        quantize_model(model, QuantSpec(4), bias_spec=bias_spec)
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear  # all checks before any change


def test_quantize_model_ignores_non_finite_float_bias():
    model = TwoLayers()
    with torch.no_grad():
        model.fc2.bias[0] = math.nan
    assert quantize_model(model, QuantSpec(4)) == ["fc1", "fc2"]  # the bias stays float: nothing to store


@pytest.mark.parametrize(("kind", "value"), BAD_VALUES, ids=[k for k, _ in BAD_VALUES])
def test_freeze_refuses_non_finite_and_leaves_module_unfrozen(kind, value):
    model = TwoLayers()
    quantize_model(model, QuantSpec(4))
    with torch.no_grad():
        model.fc2.weight[1, 2] = value
    with pytest.raises(NonFiniteTensorError, match="QuantLinear.weight"):
        model.fc2.freeze()
    assert not model.fc2.frozen and not hasattr(model.fc2, "weight_codes")
    with pytest.raises(NonFiniteTensorError, match="layer 'fc2'"):
        freeze_model(model)
    with pytest.raises(NonFiniteTensorError, match="layer 'fc2'"):
        export_integer_state(model)


# --------------------------------------------------------------------------------------------
# corrupt integer states
# --------------------------------------------------------------------------------------------
def _state(spec: QuantSpec) -> tuple[IntegerState, TwoLayers]:
    model = TwoLayers()
    quantize_model(model, spec)
    return export_integer_state(model), model


def _corrupt(key: str, fn):
    def apply(state: IntegerState) -> None:
        state.tensors[key] = fn(state.tensors[key])

    return apply


def _set(value):
    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t

    return fn


CORRUPT = [
    ("scale nan", QuantSpec(4), "fc1.weight.scale", _set(math.nan), "fc1.weight.scale.*non-finite"),
    ("scale +inf", QuantSpec(4), "fc1.weight.scale", _set(math.inf), "fc1.weight.scale.*non-finite"),
    ("scale -inf", QuantSpec(4), "fc1.weight.scale", _set(-math.inf), "fc1.weight.scale.*non-finite"),
    ("scale 0", QuantSpec(4), "fc1.weight.scale", _set(0.0), "fc1.weight.scale.*positive"),
    (
        "scale < 0",
        QuantSpec(4, per_channel=True),
        "fc2.weight.scale",
        _set(-0.1),
        "fc2.weight.scale.*positive",
    ),
    (
        "scale int",
        QuantSpec(4),
        "fc1.weight.scale",
        lambda t: t.to(torch.int32),
        "fc1.weight.scale.*floating",
    ),
    ("scale shape", QuantSpec(4), "fc1.weight.scale", lambda t: t.reshape(1), "fc1.weight.scale.*shape"),
    (
        "per-channel scale shape",
        QuantSpec(4, per_channel=True),
        "fc1.weight.scale",
        lambda t: t[:-1],
        "fc1.weight.scale.*shape",
    ),
    (
        "zero point nan",
        QuantSpec(4, symmetric=False),
        "fc1.weight.zero_point",
        lambda t: torch.full(t.shape, math.nan),
        "fc1.weight.zero_point.*non-finite",
    ),
    (
        "zero point float",
        QuantSpec(4, symmetric=False),
        "fc1.weight.zero_point",
        lambda t: t.float(),
        "fc1.weight.zero_point.*int32",
    ),
    (
        "zero point range",
        QuantSpec(4, symmetric=False),
        "fc1.weight.zero_point",
        _set(16),
        "fc1.weight.zero_point.*0..15",
    ),
    ("zero point symmetric", QuantSpec(4), "fc1.weight.zero_point", _set(1), "fc1.weight.zero_point.*0..0"),
    (
        "codes float64",
        QuantSpec(4),
        "fc1.weight.codes",
        lambda t: t.double(),
        "fc1.weight.codes.*int8.*float64",
    ),
    ("codes int32", QuantSpec(4), "fc2.weight.codes", lambda t: t.to(torch.int32), "fc2.weight.codes.*int32"),
    (
        "codes int8 for uint8",
        QuantSpec(4, symmetric=False),
        "fc1.weight.codes",
        lambda t: t.to(torch.int8),
        "fc1.weight.codes.*uint8",
    ),
    ("codes > word", QuantSpec(4), "fc1.weight.codes", _set(8), "fc1.weight.codes.*-8..7"),
    ("codes < word", QuantSpec(4), "fc1.weight.codes", _set(-9), "fc1.weight.codes.*-8..7"),
    (
        "uint codes > word",
        QuantSpec(3, symmetric=False),
        "fc1.weight.codes",
        _set(8),
        "fc1.weight.codes.*0..7",
    ),
    ("sign code 0", QuantSpec(1), "fc1.weight.codes", _set(0), "fc1.weight.codes.*-1..1"),
    ("codes shape", QuantSpec(4), "fc1.weight.codes", lambda t: t.T.contiguous(), "fc1.weight.codes.*shape"),
    ("codes flat", QuantSpec(4), "fc1.weight.codes", lambda t: t.reshape(-1), "fc1.weight.codes.*shape"),
]


@pytest.mark.parametrize(
    ("spec", "key", "fn", "match"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT]
)
def test_load_integer_state_refuses_corrupt_entries(spec, key, fn, match):
    state, _ = _state(spec)
    _corrupt(key, fn)(state)
    target = TwoLayers()
    quantize_model(target, spec)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(IntegerStateError, match=match):
        load_integer_state(target, state)
    assert not any(m.frozen for _, m in quantized_modules(target))  # checked before anything is loaded
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_load_integer_state_refuses_missing_stored_entry():
    state, _ = _state(QuantSpec(4))
    del state.tensors["fc2.weight.scale"]
    target = TwoLayers()
    quantize_model(target, QuantSpec(4))
    with pytest.raises(IntegerStateError, match="lacks fc2.weight.scale"):
        load_integer_state(target, state)


def test_load_stored_checks_too():
    layer = QuantLinear(3, 2, spec=QuantSpec(4))
    codes, scale, zp = quantize(layer.weight, QuantSpec(4))
    with pytest.raises(IntegerStateError, match="weight.codes.*int8"):
        layer.load_stored("weight", codes.to(torch.int32), scale, zp)
    with pytest.raises(IntegerStateError, match="my.key.scale.*non-finite"):
        layer.load_stored("weight", codes, scale * math.nan, zp, key="my.key")
    layer.load_stored("weight", codes, scale, zp)
    assert layer.frozen and torch.equal(layer.weight_codes, codes)


# --------------------------------------------------------------------------------------------
# ties
# --------------------------------------------------------------------------------------------
class SharedModule(nn.Module):
    """One Linear registered under two names (`a` and `b`), used twice in the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(6, 6)
        self.b = self.a
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


class TiedWeight(nn.Module):
    """Two Linear layers sharing one weight Parameter (`b.weight = a.weight`), own biases."""

    def __init__(self, tie_bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        if tie_bias:
            self.b.bias = self.a.bias
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


class TiedWithEmbedding(nn.Module):
    """A Linear output layer whose weight is an Embedding's (classic weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(idx))


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))


def test_shared_module_becomes_one_quantized_module_at_every_name():
    model = SharedModule()
    assert quantize_model(model, QuantSpec(4)) == ["a", "b", "head"]
    assert isinstance(model.a, QuantLinear) and model.a is model.b
    groups = tied_stored_tensors(model)
    assert [[(n, t) for n, _, t in g] for g in groups] == [
        [("a", "weight"), ("b", "weight")],
        [("head", "weight")],
    ]


def test_tied_weight_stays_one_parameter_and_one_stored_tensor():
    model = TiedWeight()
    weight = model.a.weight
    quantize_model(model, QuantSpec(4))
    assert isinstance(model.a, QuantLinear) and isinstance(model.b, QuantLinear) and model.a is not model.b
    assert model.a.weight is weight and model.b.weight is weight  # the tied Parameter itself
    assert model.a.bias is not model.b.bias
    assert len(list(model.parameters())) == 5  # weight, a.bias, b.bias, head.weight, head.bias
    model.eval()
    y = model(X)
    freeze_model(model)
    assert model.a.weight_codes is model.b.weight_codes  # one stored tensor
    assert model.a.weight_scale is model.b.weight_scale
    assert torch.equal(model(X), y)


def test_tied_float_biases_stay_tied():
    model = TiedWeight(tie_bias=True)
    bias = model.a.bias
    quantize_model(model, QuantSpec(4))
    assert model.a.bias is bias and model.b.bias is bias


TIE_ERRORS = [
    ("embedding", TiedWithEmbedding, {}, "emb.weight \\(float\\).*out.weight"),
    ("excluded tied layer", TiedWeight, {"exclude": ["b"]}, "a.weight .*b.weight \\(float\\)"),
    ("included at one place", TiedWeight, {"include": ["a", "head"]}, "b.weight \\(float\\)"),
    (
        "tied bias, quantized at one place",
        lambda: TiedWeight(tie_bias=True),
        {"bias_spec": QuantSpec(8)},
        None,
    ),
    ("alias excluded", SharedModule, {"exclude": ["b"]}, "registered as \\['a', 'b'\\]"),
    ("alias not included", SharedModule, {"include": ["a"]}, "select \\['a'\\] but not \\['b'\\]"),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"), [c[1:] for c in TIE_ERRORS], ids=[c[0] for c in TIE_ERRORS]
)
def test_ties_that_cannot_be_kept_raise_and_change_nothing(factory, kwargs, match):
    model = factory()
    if match is None:  # tied biases: quantized with bias_spec everywhere -> fine; mixed case below
        quantize_model(model, QuantSpec(4), **kwargs)
        assert model.a.bias is model.b.bias
        return
    before = [type(m) for m in model.modules()]
    with pytest.raises(TiedParameterError, match=match):
        quantize_model(model, QuantSpec(4), **kwargs)
    assert [type(m) for m in model.modules()] == before


def test_tie_between_weight_and_differently_specified_tensor_raises():
    model = TiedWeight()
    quantize_model(model, QuantSpec(4), include=["head"])
    model.a = QuantLinear.from_float(model.a, QuantSpec(3))  # pre-quantized layer with another spec
    model.b.weight = model.a.weight
    with pytest.raises(
        TiedParameterError, match="a.weight \\(QuantSpec\\(bits=3.*b.weight \\(QuantSpec\\(bits=4"
    ):
        quantize_model(model, QuantSpec(4))


def test_freeze_model_links_separately_frozen_tied_modules_and_detects_divergence():
    model = TiedWeight()
    quantize_model(model, QuantSpec(4))
    model.a.freeze()
    model.b.freeze()
    assert model.a.weight_codes is not model.b.weight_codes
    link_tied(model)
    assert model.a.weight_codes is model.b.weight_codes
    model.b.freeze()  # separate again
    with torch.no_grad():
        model.b.weight_codes[0, 0] ^= 1
    with pytest.raises(TiedParameterError, match="a.weight and b.weight .*differ"):
        link_tied(model)
    freeze_model(model)  # refreezing recomputes both: linked again
    assert model.a.weight_codes is model.b.weight_codes


@pytest.mark.parametrize("factory", [SharedModule, TiedWeight], ids=["shared module", "tied weight"])
def test_integer_state_of_tied_model_stores_tied_tensor_once(tmp_path, factory):
    model = factory()
    quantize_model(model, QuantSpec(4), bias_spec=QuantSpec(8))
    model.eval()
    y = model(X)
    state = export_integer_state(model)
    assert "a.weight.codes" in state.tensors and "b.weight.codes" not in state.tensors
    assert state.aliases["b.weight"] == "a.weight"
    assert not any(k in state.tensors for k in ("a.weight", "b.weight"))
    state.save(tmp_path / "s.safetensors")
    loaded = IntegerState.load(tmp_path / "s.safetensors")
    assert loaded.aliases == state.aliases
    rebuilt = factory()
    quantize_model(rebuilt, QuantSpec(4), bias_spec=QuantSpec(8))
    rebuilt.eval()
    load_integer_state(rebuilt, loaded)
    assert rebuilt.a.weight_codes is rebuilt.b.weight_codes
    assert all(m.frozen for _, m in quantized_modules(rebuilt))
    assert torch.equal(rebuilt(X), y)


def test_integer_state_with_ties_refused_by_untied_model():
    model = TiedWeight()
    quantize_model(model, QuantSpec(4))
    state = export_integer_state(model)
    untied = TwoLayers()
    untied.a, untied.b = nn.Linear(6, 6), nn.Linear(6, 6)
    del untied.fc1, untied.fc2
    untied.head = nn.Linear(6, 3)
    quantize_model(untied, QuantSpec(4))
    with pytest.raises(IntegerStateError, match="ties 'b.weight' to 'a.weight'"):
        load_integer_state(untied, state)


@pytest.mark.parametrize("factory", [SharedModule, TiedWeight], ids=["shared module", "tied weight"])
@pytest.mark.parametrize("layers", [("*",), ("a",), ("b",)])
def test_inject_hits_a_tied_tensor_once_and_restores_it(factory, layers):
    model = factory()
    quantize_model(model, QuantSpec(4))
    model.eval()
    clean_y = model(X)
    freeze_model(model)
    clean = model.a.weight_codes.clone()
    em = BitErrorModel(ber=0.2, layers=layers)
    with inject(model, em, seed=5) as report:
        hit = [(t.layer, t.tensor) for t in report.tensors]
        assert hit.count(("a", "weight")) == 1 and ("b", "weight") not in hit  # once, canonical name
        assert model.a.weight_codes is model.b.weight_codes
        corrupted = model.a.weight_codes.clone()
        tied = next(t for t in report.tensors if t.layer == "a")
        assert tied.n_changed == bit_differences(clean, corrupted, 4) == tied.n_flipped > 0
    assert torch.equal(model.a.weight_codes, clean) and torch.equal(model.b.weight_codes, clean)
    assert torch.equal(model(X), clean_y)
    # the pattern is the canonical name's: same for every selection that hits the tied tensor
    with inject(model, BitErrorModel(ber=0.2, layers="a"), seed=5):
        assert torch.equal(model.a.weight_codes, corrupted)


def test_inject_freezes_every_module_of_a_tie_and_unfreezes_them():
    model = TiedWeight()
    quantize_model(model, QuantSpec(4))
    model.eval()
    with inject(model, BitErrorModel(ber=0.3, layers="b"), seed=1):
        assert model.a.frozen and model.b.frozen
        assert model.a.weight_codes is model.b.weight_codes
    assert not model.a.frozen and not model.b.frozen


def test_exclude_of_any_name_spares_a_tied_tensor():
    model = TiedWeight()
    quantize_model(model, QuantSpec(4))
    with inject(model, BitErrorModel(ber=0.3, exclude="b"), seed=1) as report:
        assert [t.layer for t in report.tensors] == ["head"]


def test_integer_state_with_two_different_copies_of_a_tied_tensor_is_refused():
    untied = TiedWeight()
    untied.b.weight = nn.Parameter(untied.a.weight.detach() + 0.5)  # untie: two stored tensors
    quantize_model(untied, QuantSpec(4))
    state = export_integer_state(untied)
    assert not state.aliases and "b.weight.codes" in state.tensors
    tied = TiedWeight()
    quantize_model(tied, QuantSpec(4))
    with pytest.raises(IntegerStateError, match="tied tensor 'b.weight' twice"):
        load_integer_state(tied, state)
