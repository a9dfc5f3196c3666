"""MHL in code units (``units="codes"``): the hinge on ``z / Δ`` with ``Δ`` the output layer's scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qmargin.data import load_dataset
from qmargin.errors import ConfigError
from qmargin.losses import build_loss
from qmargin.losses.functional import margin_hinge_loss
from qmargin.quant import QuantSpec
from qmargin.quant.functional import compute_scale
from qmargin.quant.modules import QuantLinear
from qmargin.training import TrainConfig, train
from qmargin.training.code_units import InCodeUnits, output_weight_scale, wrap_loss_units


def _model(bits: int, per_channel: bool = True, symmetric: bool = True) -> nn.Module:
    torch.manual_seed(0)
    spec = QuantSpec(bits, per_channel=per_channel, symmetric=symmetric)
    return nn.Sequential(QuantLinear(6, 8, spec=spec), nn.ReLU(), QuantLinear(8, 4, spec=spec))


@pytest.mark.parametrize("bits,per_channel", [(1, True), (1, False), (4, True)])
def test_the_loss_is_the_hinge_on_outputs_divided_by_the_output_scale(bits, per_channel):
    model = _model(bits, per_channel)
    last = model[2]
    delta, _ = compute_scale(last.weight, last.quant_specs["weight"])
    assert torch.equal(output_weight_scale(model), delta)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    loss = wrap_loss_units(build_loss("mhl", b=128.0, units="codes"), model)
    assert isinstance(loss, InCodeUnits)
    z = model(x)
    assert torch.allclose(loss(z, y), margin_hinge_loss(z / delta, y, b=128.0))
    # frozen layers read the stored scale, the same number
    last.freeze()
    assert torch.equal(output_weight_scale(model), delta)
    # units="logits" is the plain loss, unwrapped
    plain = build_loss("mhl", b=128.0)
    assert wrap_loss_units(plain, model) is plain


def test_delta_is_a_constant_for_the_gradient():
    model = _model(1)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    z = model(x)
    delta = output_weight_scale(model)
    assert not delta.requires_grad
    InCodeUnits(build_loss("mhl", b=4.0, units="codes"), model)(z, y).backward()
    assert model[2].weight.grad is not None


def test_refusals():
    with pytest.raises(ConfigError, match="units"):
        build_loss("mhl", b=1.0, units="bits")
    with pytest.raises(ConfigError, match="quantized"):
        wrap_loss_units(build_loss("mhl", b=1.0, units="codes"), nn.Linear(3, 2))
    with pytest.raises(ConfigError, match="symmetric"):
        wrap_loss_units(build_loss("mhl", b=1.0, units="codes"), _model(4, symmetric=False))


def test_a_hinge_at_128_trains_a_binary_mlp_only_in_code_units(tmp_path):
    """On raw logits (Δ ~ mean |w|) the hinge at 128 is never reached and the loss is linear: chance
    (10.0 % measured). In code units, with a fan-in of 256 > b, 83.0 % in 8 epochs (with a fan-in of 64
    < b it stays at chance too: b = 128 is set for BNN layers thousands wide)."""
    data = load_dataset("digits")
    acc = {}
    for units in ("logits", "codes"):
        cfg = TrainConfig(
            dataset="digits", model="mlp", bits=1, epochs=8, seed=0, loss="mhl",
            loss_kwargs={"b": 128.0, "units": units}, model_kwargs={"hidden": [256, 256]},
        )  # fmt: skip
        acc[units] = train(cfg, dataset=data, out_dir=tmp_path / units).test_acc
    assert acc["logits"] < 0.2
    assert acc["codes"] > 0.7
