"""Brevitas-quantized models stressed on their own integer codes (qmargin.interop.brevitas)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

brevitas = pytest.importorskip("brevitas", reason="Brevitas is not installed (pip install qmargin[brevitas])")
import brevitas.nn as qnn  # noqa: E402
from brevitas.quant import Int8WeightPerChannelFloat, ShiftedUint8WeightPerTensorFloat  # noqa: E402
from brevitas.quant.float import Fp8e4m3WeightPerTensorFloat  # noqa: E402

from qmargin.errors import ConfigError  # noqa: E402
from qmargin.experiments.campaign import run_ber_campaign  # noqa: E402
from qmargin.faults import BitErrorModel, bit_differences, inject  # noqa: E402
from qmargin.interop import stored_code_groups  # noqa: E402
from qmargin.quant import QuantConv2d, QuantLinear, QuantSpec  # noqa: E402

warnings.filterwarnings("ignore", module="brevitas")


def _net(seed: int = 0) -> nn.Sequential:
    """4-bit Brevitas CNN: a per-channel QuantConv2d and a per-tensor QuantLinear, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        qnn.QuantConv2d(1, 4, 3, weight_bit_width=4, weight_quant=Int8WeightPerChannelFloat),
        nn.ReLU(),
        nn.Flatten(),
        qnn.QuantLinear(4 * 6 * 6, 5, weight_bit_width=4),
    ).eval()


def _codes(m: nn.Sequential) -> list[torch.Tensor]:
    return [m[i].quant_weight().int().clone() for i in (0, 3)]


def test_codes_found_and_pinned_only_during_inject() -> None:
    m = _net()
    groups = stored_code_groups(m)
    assert [(p.name, g[0][0], g[0][2]) for p, g in groups] == [
        ("brevitas", "0", "weight"),
        ("brevitas", "3", "weight"),
    ]
    p, g = groups[0]
    assert p.pin(*g[0]) is True
    try:
        c = p.codes(*g[0])
        qt = m[0].quant_weight()
        assert (c.bits, c.signed, c.codes.dtype) == (4, True, torch.int8)
        assert torch.equal(c.codes, qt.int()) and torch.equal(c.scale, qt.scale)
        assert float(c.zero_point) == 0.0
        assert c.block_size == (1, 1, 3, 3) and c.granularity == "per_channel"
        assert int(c.codes.abs().max()) <= 7  # narrow range, as Brevitas quantized it
        assert torch.equal(c.dequantize(), qt.value)
    finally:
        p.unpin(*g[0])
    assert not m[0].weight_quant.export_mode and m[0].weight_quant.export_handler is None
    c3 = groups[1][0].pin(*groups[1][1][0])
    assert c3 and groups[1][0].codes(*groups[1][1][0]).granularity == "per_tensor"
    groups[1][0].unpin(*groups[1][1][0])


def test_inject_changes_exactly_the_sampled_bits_and_restores() -> None:
    m = _net()
    x = torch.randn(3, 1, 8, 8)
    floats = [m[i].weight.detach().clone() for i in (0, 3)]
    clean, out = _codes(m), m(x)
    with inject(m, BitErrorModel(ber=0.05), seed=11) as report:
        hit = _codes(m)  # what the layers compute with now
        assert sum(bit_differences(a, b, 4) for a, b in zip(clean, hit, strict=True)) == report.n_changed > 0
        assert report.n_changed == report.n_flipped and report.n_bits == 4 * (4 * 9 + 5 * 144)
        assert not torch.equal(m(x), out)
    assert torch.equal(m(x), out)
    assert all(torch.equal(a, b) for a, b in zip(clean, _codes(m), strict=True))
    assert all(torch.equal(a, m[i].weight) for a, i in zip(floats, (0, 3), strict=True))
    assert list(m.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]


def _qmargin_twin(m: nn.Sequential) -> nn.Sequential:
    """qmargin's own layers built from the Brevitas layers' codes, scales and biases."""
    twin = nn.Sequential(
        QuantConv2d(1, 4, 3, spec=QuantSpec(4, symmetric=True, per_channel=True)),
        nn.ReLU(),
        nn.Flatten(),
        QuantLinear(4 * 6 * 6, 5, spec=QuantSpec(4, symmetric=True)),
    )
    for i in (0, 3):
        qt = m[i].quant_weight()
        scale = qt.scale.detach().reshape(-1) if i == 0 else qt.scale.detach().reshape(())
        twin[i].bias.data.copy_(m[i].bias.data)
        twin[i].load_stored(
            "weight", qt.int().clone(), scale.clone(), torch.zeros_like(scale, dtype=torch.int32)
        )
    return twin


@pytest.mark.parametrize(
    "em", [BitErrorModel(ber=0.03), BitErrorModel(ber=0.02, stuck_at_0=0.01, protected_bits=(-1,))]
)
def test_same_codes_scales_and_seed_give_qmargin_layers_outputs(em: BitErrorModel) -> None:
    m = _net()
    twin = _qmargin_twin(m)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(m(x), twin(x))
    for seed in (0, 1, 2):
        with inject(m, em, seed=seed) as r1, inject(twin, em, seed=seed) as r2:
            assert r1.to_dict()["tensors"] == r2.to_dict()["tensors"]
            hit = _codes(m)
            assert all(torch.equal(h, twin[i].stored().codes) for h, i in zip(hit, (0, 3), strict=True))
            assert torch.equal(m(x), twin(x))


def test_unsigned_codes_with_zero_point() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(
        qnn.QuantLinear(16, 8, weight_bit_width=4, weight_quant=ShiftedUint8WeightPerTensorFloat)
    ).eval()
    x = torch.randn(2, 16)
    out = m(x)
    with inject(m, BitErrorModel(ber=0.05), seed=0) as report:
        qt = m[0].quant_weight()
        assert qt.int().dtype == torch.uint8 and int(qt.int().max()) <= 15 and report.n_changed > 0
        assert torch.equal(qt.value, (qt.int().float() - qt.zero_point) * qt.scale)
        torch.testing.assert_close(m(x), nn.functional.linear(x, qt.value, m[0].bias))
    assert torch.equal(m(x), out)


def test_unreachable_quantizers_are_one_line_config_errors() -> None:
    m = nn.Sequential(qnn.QuantLinear(8, 4, weight_quant=Fp8e4m3WeightPerTensorFloat)).eval()
    with pytest.raises(ConfigError) as e, inject(m, BitErrorModel(ber=0.01), seed=0):
        pass
    assert (
        "\n" not in str(e.value)
        and "'0'" in str(e.value)
        and "WeightFloatQuantProxyFromInjector" in str(e.value)
    )
    net = _net().train()
    with pytest.raises(ConfigError, match="training mode"), inject(net, BitErrorModel(ber=0.01), seed=0):
        pass
    assert not net[0].weight_quant.export_mode  # nothing left pinned


def test_campaign_runs_on_a_brevitas_model() -> None:
    m = _net()
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 5, (32,))
    expected = float((m(x).argmax(1) == y).float().mean())
    r1 = run_ber_campaign(m, x, y, bers=[1e-3, 0.1], repeats=2, base_seed=0)
    assert r1["clean_accuracy"] == pytest.approx(expected)
    assert [len(e["accuracies"]) for e in r1["results"]] == [2, 2]
    assert not any(m[i].weight_quant.export_mode for i in (0, 3))
    r2 = run_ber_campaign(m, x, y, bers=[1e-3, 0.1], repeats=2, base_seed=0)
    assert r2["results"] == r1["results"] and r2["fingerprint"] == r1["fingerprint"]
