"""Quantizers, quantized layers and the integer state round-trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qmargin.quant import (
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    dequantize,
    export_integer_state,
    fake_quantize,
    load_integer_state,
    quantize,
    quantize_model,
    quantized_modules,
)


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, True])
def test_spec_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits)


def test_wide_study_specs_use_wider_codes():
    w = torch.randn(20, 20, generator=torch.Generator().manual_seed(0))
    for spec, dtype in ((QuantSpec(12), torch.int16), (QuantSpec(10, symmetric=False), torch.int32)):
        codes, scale, zp = quantize(w, spec)
        assert codes.dtype == dtype and int(codes.abs().max()) <= 2**spec.bits
        assert torch.all((dequantize(codes, scale, zp, spec) - w).abs() <= scale / 2 + 1e-6)


def test_spec_rejects_bad_wmax_and_asym_binary():
    with pytest.raises(ValueError, match="w_max"):
        QuantSpec(4, w_max=0.0)
    with pytest.raises(ValueError, match="1-bit"):
        QuantSpec(1, symmetric=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_codes_and_ranges(bits):
    spec = QuantSpec(bits)
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(bits))
    codes, scale, zp = quantize(w, spec)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= -(2 ** (bits - 1) - 1) and int(codes.max()) <= 2 ** (bits - 1) - 1
    assert int(codes.abs().max()) == 2 ** (bits - 1) - 1  # max-scaling reaches full range
    assert torch.allclose(scale, w.abs().max() / (2 ** (bits - 1) - 1))
    assert int(zp) == 0


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_round_trip_error_at_most_half_step(bits, symmetric, per_channel, seed):
    spec = QuantSpec(bits, symmetric=symmetric, per_channel=per_channel)
    w = torch.randn(8, 5, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    codes, scale, zp = quantize(w, spec)
    w_hat = dequantize(codes, scale, zp, spec)
    s = scale.reshape(-1, 1, 1) if per_channel else scale
    # inside the clip range (max scaling: everything) the error is at most scale / 2
    assert torch.all((w_hat - w).abs() <= s / 2 + 1e-12)
    assert codes.dtype == (torch.int8 if symmetric else torch.uint8)


def test_clipping_range_and_error_inside():
    spec = QuantSpec(4, w_max=0.5)
    w = torch.linspace(-1, 1, 101)
    codes, scale, zp = quantize(w, spec)
    w_hat = dequantize(codes, scale, zp, spec)
    assert torch.isclose(scale, torch.tensor(0.5 / 7))
    inside = w.abs() <= 0.5
    assert torch.all((w_hat - w)[inside].abs() <= scale / 2 + 1e-7)
    assert torch.all(w_hat.abs() <= 0.5 + 1e-7)


def test_asymmetric_zero_point_represents_zero():
    spec = QuantSpec(3, symmetric=False)
    w = torch.tensor([-0.3, 0.0, 0.2, 1.0])
    codes, scale, zp = quantize(w, spec)
    w_hat = dequantize(codes, scale, zp, spec)
    assert w_hat[1] == 0.0
    assert 0 <= int(zp) <= 7


def test_binary_sign_code():
    spec = QuantSpec(1)
    w = torch.tensor([[-2.0, 0.0, 1.0, 3.0]])
    codes, scale, _ = quantize(w, spec)
    assert codes.tolist() == [[-1, 1, 1, 1]]
    assert torch.isclose(scale, torch.tensor(1.5))


def test_per_channel_beats_per_tensor_on_uneven_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g) * torch.logspace(-2, 0, 16).unsqueeze(1)
    err = {}
    for pc in (False, True):
        spec = QuantSpec(4, per_channel=pc)
        codes, scale, zp = quantize(w, spec)
        err[pc] = (dequantize(codes, scale, zp, spec) - w)[:8].norm()  # the small-scale rows
        assert scale.shape == ((16,) if pc else ())
    assert err[True] < 0.2 * err[False]


def test_ste_gradient_identity_and_clip_mask():
    w = torch.tensor([-1.0, -0.2, 0.1, 0.7], requires_grad=True)
    out = fake_quantize(w, QuantSpec(3))
    (out * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert w.grad.tolist() == [1.0, 2.0, 3.0, 4.0]
    w.grad = None
    fake_quantize(w, QuantSpec(3, w_max=0.5)).sum().backward()
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_fake_quantize_equals_stored_form_bit_for_bit():
    w = torch.randn(33, 17, generator=torch.Generator().manual_seed(3))
    for spec in (QuantSpec(4), QuantSpec(6, symmetric=False, per_channel=True), QuantSpec(1)):
        assert torch.equal(fake_quantize(w, spec), dequantize(*quantize(w, spec), spec))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(h)))
        y = self.bn2(self.conv2(y))
        h = torch.relu(y + self.shortcut(h))
        return self.fc(h.mean(dim=(2, 3)))


def _trained_like(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):  # populate BatchNorm running statistics
            model(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def test_quantize_model_converts_resnet_and_reports_names():
    torch.manual_seed(0)
    model = TinyResNet()
    names = quantize_model(model, QuantSpec(4, per_channel=True))
    assert names == ["stem.0", "conv1", "conv2", "shortcut.0", "fc"]
    assert isinstance(model.stem[0], QuantConv2d) and isinstance(model.fc, QuantLinear)
    assert isinstance(model.bn1, nn.BatchNorm2d) and not isinstance(model.bn1, QuantLinear)
    assert quantize_model(model, QuantSpec(4)) == []  # already converted
    model2 = TinyResNet()
    assert quantize_model(model2, QuantSpec(4), exclude=["fc", "stem.*"]) == ["conv1", "conv2", "shortcut.0"]
    assert quantize_model(TinyResNet(), QuantSpec(4), include=["conv*"]) == ["conv1", "conv2"]


def test_quantized_model_matches_float_with_dequantized_weights():
    torch.manual_seed(0)
    model = _trained_like(TinyResNet())
    qmodel = _trained_like(TinyResNet())
    qmodel.load_state_dict(model.state_dict())
    spec = QuantSpec(5)
    quantize_model(qmodel, spec)
    qmodel.eval()
    with torch.no_grad():
        for _name, m in model.named_modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.copy_(fake_quantize(m.weight, spec))
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(model(x), qmodel(x), atol=1e-6)


@pytest.mark.parametrize(
    "spec", [QuantSpec(4), QuantSpec(8, symmetric=False, per_channel=True), QuantSpec(2, per_channel=True)]
)
def test_integer_state_round_trip_bit_for_bit(tmp_path, spec):
    torch.manual_seed(1)
    model = _trained_like(TinyResNet())
    quantize_model(model, spec, bias_spec=QuantSpec(8))
    model.eval()
    x = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    state = export_integer_state(model)
    codes = [v for k, v in state.tensors.items() if k.endswith(".codes")]
    assert codes and all(c.dtype in (torch.int8, torch.uint8) for c in codes)
    assert "fc.bias.codes" in state.tensors  # bias stored as codes with bias_spec
    assert not any(k.endswith("conv1.weight") for k in state.tensors)  # no float shadow weight exported
    state.save(tmp_path / "int.safetensors")
    rebuilt = TinyResNet()
    quantize_model(rebuilt, spec, bias_spec=QuantSpec(8))
    rebuilt.eval()
    load_integer_state(rebuilt, type(state).load(tmp_path / "int.safetensors"))
    assert all(m.frozen for _, m in quantized_modules(rebuilt))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), y)


def test_frozen_and_training_forward_identical_and_train_unfreezes():
    layer = QuantLinear(6, 3, spec=QuantSpec(3))
    layer.eval()
    x = torch.randn(5, 6)
    y = layer(x)
    layer.freeze()
    assert layer.frozen and layer.weight_codes.dtype == torch.int8
    assert torch.equal(layer(x), y)
    layer.train()
    assert not layer.frozen


def test_load_integer_state_rejects_spec_mismatch():
    model = TinyResNet()
    quantize_model(model, QuantSpec(4))
    state = export_integer_state(model)
    other = TinyResNet()
    quantize_model(other, QuantSpec(3))
    with pytest.raises(ValueError, match="differs"):
        load_integer_state(other, state)
