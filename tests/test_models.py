"""Tests of qmargin.models: shapes, which layers are quantized, parameter counts, integer state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qmargin.errors import ConfigError
from qmargin.models import MLP, available_models, build_model, register_model, resnet20, vgg3, vgg7
from qmargin.models import registry as registry_mod
from qmargin.models.resnet import _PadShortcut
from qmargin.quant import (
    IntegerState,
    QuantConv2d,
    QuantizedTensors,
    QuantLinear,
    QuantSpec,
    export_integer_state,
    freeze_model,
    load_integer_state,
    quantized_modules,
)

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
SPEC = QuantSpec(4)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _weight_layers(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, nn.Linear | nn.Conv2d)]


# Number of weight layers (conv + linear) each default architecture has.
EXPECTED_LAYERS = {"mlp": 3, "vgg3": 4, "vgg7": 8, "resnet20": 20}


def test_registry_lists_the_builtins():
    assert set(EXPECTED_LAYERS) <= set(available_models())
    assert available_models() == sorted(available_models())


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
@pytest.mark.parametrize("shape", SHAPES)
def test_output_shapes_and_quantized_layers(name, shape):
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=7, spec=SPEC).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    qmods = [m for m in model.modules() if isinstance(m, QuantizedTensors)]
    assert len(qmods) == EXPECTED_LAYERS[name]
    # every weight layer is quantized, all with the requested spec
    assert len(_weight_layers(model)) == len(qmods)
    assert all(m.quant_specs["weight"] == SPEC for m in qmods)


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_float_model_has_no_quantized_layer(name):
    model = build_model(name, input_shape=(1, 28, 28), num_classes=10, spec=None)
    assert not any(isinstance(m, QuantizedTensors) for m in model.modules())
    assert len(_weight_layers(model)) == EXPECTED_LAYERS[name]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # train mode, BatchNorm batch stats


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_keep_first_last_float(name):
    model = build_model(name, input_shape=(3, 32, 32), num_classes=10, spec=SPEC, keep_first_last_float=True)
    layers = _weight_layers(model)
    first, last = layers[0], layers[-1]
    assert not isinstance(first, QuantizedTensors) and not isinstance(last, QuantizedTensors)
    assert isinstance(last, nn.Linear) and last.out_features == 10
    assert sum(isinstance(m, QuantizedTensors) for m in layers) == EXPECTED_LAYERS[name] - 2


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_bias_spec_reaches_every_existing_bias(name):
    bspec = QuantSpec(8)
    model = build_model(name, input_shape=(1, 8, 8), num_classes=3, spec=SPEC, bias_spec=bspec)
    with_bias = [m for _, m in quantized_modules(model) if m.bias is not None]
    assert with_bias, "every architecture has at least the classifier's bias"
    assert all(m.quant_specs.get("bias") == bspec for m in with_bias)
    assert all("bias" not in m.quant_specs for _, m in quantized_modules(model) if m.bias is None)


def test_resnet20_parameter_count():
    def conv(cin: int, cout: int, k: int = 3) -> int:
        return cin * cout * k * k

    def block(cin: int, cout: int) -> int:  # two 3x3 convs + two BatchNorms (gamma, beta)
        return conv(cin, cout) + conv(cout, cout) + 4 * cout

    expected = conv(3, 16) + 2 * 16  # stem
    for cin, cout in [(16, 16), (32, 32), (64, 64)]:
        expected += block(cin if cin == 16 else cin // 2, cout) + 2 * block(cout, cout)
    expected += 64 * 10 + 10  # fc
    m = resnet20()
    assert _n_params(m) == expected
    assert 0.26e6 < _n_params(m) < 0.28e6  # "0.27M" of He et al.
    # option B adds the two 1x1 projections and their BatchNorms
    mb = resnet20(shortcut="B")
    assert _n_params(mb) - _n_params(m) == conv(16, 32, 1) + 2 * 32 + conv(32, 64, 1) + 2 * 64
    assert _n_params(resnet20(spec=SPEC)) == expected  # quantization adds no parameters


def test_resnet20_option_b_quantizes_the_projections():
    m = resnet20(spec=SPEC, shortcut="B")
    names = [n for n, _ in quantized_modules(m)]
    assert len(names) == 22
    assert "layer2.0.shortcut.0" in names and "layer3.0.shortcut.0" in names
    assert isinstance(m.get_submodule("layer2.0.shortcut.0"), QuantConv2d)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    out = _PadShortcut(4, 8, 2)(x)
    assert out.shape == (2, 8, 2, 2)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert out[:, :2].abs().sum() == 0 and out[:, 6:].abs().sum() == 0


def test_vgg_parameter_counts_follow_the_architecture():
    # VGG3 on 1x28x28: conv64 - pool - conv64 - pool - fc2048 - fc10, BN after convs and fc2048
    flat = 64 * 7 * 7
    expected = (1 * 64 * 9) + (64 * 64 * 9) + flat * 2048 + (2048 * 10 + 10) + 2 * (64 + 64 + 2048)
    assert _n_params(vgg3((1, 28, 28), 10)) == expected
    # without BN every layer carries a bias instead
    expected_nobn = (64 * 9 + 64) + (64 * 64 * 9 + 64) + (flat * 2048 + 2048) + (2048 * 10 + 10)
    assert _n_params(vgg3((1, 28, 28), 10, batchnorm=False)) == expected_nobn
    # VGG7 on 3x32x32: 4x4x512 features after three pools
    convs = 3 * 128 * 9 + 128 * 128 * 9 + 128 * 256 * 9 + 256 * 256 * 9 + 256 * 512 * 9 + 512 * 512 * 9
    bns = 2 * (2 * 128 + 2 * 256 + 2 * 512 + 1024)
    expected7 = convs + 512 * 16 * 1024 + (1024 * 10 + 10) + bns
    assert _n_params(vgg7((3, 32, 32), 10)) == expected7


def test_vgg_widths_are_configurable_and_small_inputs_rejected():
    m = build_model("vgg3", input_shape=(3, 32, 32), num_classes=4, spec=None, channels=(8, 16), hidden=32)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ConfigError, match="too small"):
        build_model("vgg7", input_shape=(1, 4, 4), num_classes=10, spec=None)


def test_mlp_options():
    m = MLP(64, 10, (32, 16), spec=SPEC, batchnorm=True, activation="tanh")
    assert [n for n, _ in quantized_modules(m)] == ["fc1", "fc2", "fc3"]
    assert m.fc1.bias is None and m.fc3.bias is not None  # BN supplies the hidden biases
    assert isinstance(m.act1, nn.Tanh) and isinstance(m.bn2, nn.BatchNorm1d)
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    lin = MLP(64, 10, (), spec=SPEC, keep_first_last_float=True)
    assert type(lin.fc1) is nn.Linear
    with pytest.raises(ConfigError, match="activation"):
        MLP(64, 10, activation="swishy")


def test_quantized_models_train():
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 8, 8), num_classes=10, spec=QuantSpec(2), bias_spec=SPEC)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.fc.weight.grad.abs().sum() > 0  # the STE passes gradients to the float weights


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet20_integer_state_round_trip(tmp_path, shortcut):
    torch.manual_seed(1)
    spec, bspec = QuantSpec(4, per_channel=True), QuantSpec(8)
    model = resnet20(10, 3, spec, bspec, shortcut=shortcut)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(2):
            model(torch.randn(8, 3, 16, 16))
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        fake_quant_out = model(x)
        freeze_model(model)
        frozen_out = model(x)
    assert torch.equal(fake_quant_out, frozen_out)
    path = tmp_path / "resnet20.safetensors"
    export_integer_state(model).save(path)
    fresh = resnet20(10, 3, spec, bspec, shortcut=shortcut)
    load_integer_state(fresh, IntegerState.load(path))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), frozen_out)
    for (n1, m1), (n2, m2) in zip(quantized_modules(model), quantized_modules(fresh), strict=True):
        assert n1 == n2 and torch.equal(m1.stored("weight").codes, m2.stored("weight").codes)


def test_registry_errors_and_extension(monkeypatch):
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("alexnet", input_shape=(1, 28, 28), num_classes=10, spec=None)
    with pytest.raises(ConfigError, match="resnet20"):
        build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, spec=None, hidden=(5,))
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("mlp", input_shape=(28, 28), num_classes=10, spec=None)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("mlp", input_shape=(1, 8, 8), num_classes=0, spec=None)
    with pytest.raises(ConfigError, match="bias_spec"):
        build_model("mlp", input_shape=(1, 8, 8), num_classes=10, spec=None, bias_spec=SPEC)
    with pytest.raises(ConfigError, match="shortcut"):
        build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, spec=None, shortcut="C")

    monkeypatch.setattr(registry_mod, "_BUILDERS", dict(registry_mod._BUILDERS))

    def tiny(*, input_shape, num_classes, spec, bias_spec=None, width=4):
        return MLP(input_shape[0] * input_shape[1] * input_shape[2], num_classes, (width,), spec=spec)

    register_model("Tiny", tiny)
    assert "tiny" in available_models()
    m = build_model("TINY", input_shape=(1, 8, 8), num_classes=3, spec=SPEC, width=6)
    assert isinstance(m.fc1, QuantLinear) and m.fc1.out_features == 6
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny", tiny)
    register_model("tiny", tiny, overwrite=True)


# -- what one hidden width (--hidden) means per architecture --------------------------------------

# The mapping qmargin train --hidden H applied before the registry owned it (cli/app.py at 83cca8d).
OLD_HIDDEN = {
    "mlp": lambda h: {"hidden": [h, h]},
    "vgg3": lambda h: {"hidden": h},
    "vgg7": lambda h: {"hidden": h},
    "mondeq": lambda h: {"n": h},
}


@pytest.mark.parametrize("name", sorted(OLD_HIDDEN))
def test_hidden_width_gives_the_model_it_gave_before(name):
    from qmargin.models import hidden_kwargs

    assert hidden_kwargs(name, 24) == OLD_HIDDEN[name](24)
    shape = (3, 32, 32) if name.startswith("vgg") else (1, 8, 8)
    kw = {"channels": (4, 4, 4)[: 2 if name == "vgg3" else 3]} if name.startswith("vgg") else {}
    torch.manual_seed(0)
    new = build_model(name, input_shape=shape, num_classes=5, spec=SPEC, **hidden_kwargs(name, 24), **kw)
    torch.manual_seed(0)
    old = build_model(name, input_shape=shape, num_classes=5, spec=SPEC, **OLD_HIDDEN[name](24), **kw)
    assert repr(new) == repr(old)
    sn, so = new.state_dict(), old.state_dict()
    assert sn.keys() == so.keys() and all(torch.equal(sn[k], so[k]) for k in sn)
    widths = {p.shape[0] for n, p in new.named_parameters() if p.dim() == 2 and n != "head.weight"}
    assert 24 in widths


def test_hidden_width_errors():
    from qmargin.models import check_model_kwargs, hidden_kwargs

    with pytest.raises(ConfigError, match="resnet20"):
        hidden_kwargs("resnet20", 16)  # no single hidden width (before: an unexpected keyword 'hidden')
    with pytest.raises(ConfigError, match="unknown model"):
        hidden_kwargs("alexnet", 16)
    with pytest.raises(ConfigError, match="positive"):
        hidden_kwargs("mlp", 0)
    check_model_kwargs("mondeq", {"n": 8, "certify": True})
    with pytest.raises(ConfigError, match=r"model 'mlp' takes no option certify"):
        check_model_kwargs("mlp", {"hidden": [8, 8], "certify": True})


def test_register_model_with_a_hidden_mapping(monkeypatch):
    from qmargin.models import hidden_kwargs

    monkeypatch.setattr(registry_mod, "_BUILDERS", dict(registry_mod._BUILDERS))
    monkeypatch.setattr(registry_mod, "_HIDDEN", dict(registry_mod._HIDDEN))

    def tiny(*, input_shape, num_classes, spec, bias_spec=None, width=4, depth=1):
        return MLP(input_shape[0] * input_shape[1] * input_shape[2], num_classes, (width,) * depth, spec=spec)

    register_model("tiny", tiny, hidden="width")
    assert hidden_kwargs("tiny", 6) == {"width": 6}
    register_model("tiny", tiny, hidden=lambda h: {"width": h, "depth": 2}, overwrite=True)
    m = build_model("tiny", input_shape=(1, 8, 8), num_classes=3, spec=SPEC, **hidden_kwargs("tiny", 6))
    assert m.fc1.out_features == 6 and m.fc2.out_features == 6
    register_model("tiny", tiny, overwrite=True)  # re-registered without: no hidden width any more
    with pytest.raises(ConfigError, match="tiny"):
        hidden_kwargs("tiny", 6)
    with pytest.raises(ValueError):
        register_model("tiny2", tiny, hidden=3)  # type: ignore[arg-type]
