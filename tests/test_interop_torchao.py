"""torchao-quantized models stressed on their own integer codes (qmargin.interop.torchao)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install qmargin[torchao])")
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerGroup  # noqa: E402

from qmargin.errors import ConfigError  # noqa: E402
from qmargin.experiments.campaign import run_ber_campaign  # noqa: E402
from qmargin.faults import BitErrorModel, bit_differences, inject, select_tensors  # noqa: E402
from qmargin.interop import stored_code_groups  # noqa: E402
from qmargin.quant import QuantLinear, QuantSpec  # noqa: E402

warnings.filterwarnings("ignore", module="torchao")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture
def int8_mlp() -> nn.Sequential:
    m = _mlp()
    quantize_(m, Int8WeightOnlyConfig())
    return m


def _qdata(m: nn.Module) -> list[torch.Tensor]:
    return [m[0].weight.qdata.clone(), m[2].weight.qdata.clone()]


def test_codes_found_with_bits_scale_and_zero_point(int8_mlp: nn.Sequential) -> None:
    groups = stored_code_groups(int8_mlp)
    assert [(p.name, g[0][0], g[0][2]) for p, g in groups] == [
        ("torchao", "0", "weight"),
        ("torchao", "2", "weight"),
    ]
    for (p, g), layer in zip(groups, (int8_mlp[0], int8_mlp[2]), strict=True):
        c = p.codes(*g[0])
        w = layer.weight
        assert c.codes.data_ptr() == w.qdata.data_ptr()  # the live codes, not a copy
        assert (c.bits, c.signed, c.layout) == (8, True, "torchao.Int8Tensor")
        assert torch.equal(c.scale, w.scale) and torch.equal(c.zero_point, w.zero_point)
        assert c.block_size == (1, w.shape[1]) and c.granularity == "per_channel"
        assert torch.equal(c.dequantize(), w.dequantize())


def test_inject_changes_exactly_the_sampled_bits_and_restores(int8_mlp: nn.Sequential) -> None:
    x = torch.randn(8, 16)
    clean_codes, clean_out = _qdata(int8_mlp), int8_mlp(x)
    em = BitErrorModel(ber=0.02)
    with inject(int8_mlp, em, seed=7) as report:
        hit = _qdata(int8_mlp)
        changed = sum(bit_differences(a, b, 8) for a, b in zip(clean_codes, hit, strict=True))
        assert report.n_flipped == report.n_changed == changed > 0
        assert report.n_bits == 8 * (32 * 16 + 4 * 32)
        assert not torch.equal(int8_mlp(x), clean_out)
    assert all(torch.equal(a, b) for a, b in zip(clean_codes, _qdata(int8_mlp), strict=True))
    assert torch.equal(int8_mlp(x), clean_out)


def _qmargin_twin(m: nn.Sequential) -> nn.Sequential:
    """qmargin's own layers holding the same codes, scales and biases as a torchao int8 MLP."""
    twin = nn.Sequential(
        QuantLinear(16, 32, spec=QuantSpec(8, symmetric=True, per_channel=True)),
        nn.ReLU(),
        QuantLinear(32, 4, spec=QuantSpec(8, symmetric=True, per_channel=True)),
    )
    for i in (0, 2):
        w = m[i].weight
        twin[i].bias.data.copy_(m[i].bias.data)
        scale = w.scale.flatten().clone()
        twin[i].load_stored("weight", w.qdata.clone(), scale, torch.zeros_like(scale, dtype=torch.int32))
    return twin


@pytest.mark.parametrize(
    "em", [BitErrorModel(ber=0.01), BitErrorModel(ber=0.01, stuck_at_1=0.005, protected_bits=(-1,))]
)
def test_same_codes_scales_and_seed_give_qmargin_layers_outputs(
    int8_mlp: nn.Sequential, em: BitErrorModel
) -> None:
    twin = _qmargin_twin(int8_mlp)
    x = torch.randn(16, 16)
    torch.testing.assert_close(int8_mlp(x), twin(x))
    for seed in (0, 1, 2):
        with inject(int8_mlp, em, seed=seed) as r1, inject(twin, em, seed=seed) as r2:
            assert r1.to_dict()["tensors"] == r2.to_dict()["tensors"]
            for i in (0, 2):
                assert torch.equal(int8_mlp[i].weight.qdata, twin[i].stored().codes)
                assert torch.equal(int8_mlp[i].weight.dequantize(), twin[i].stored().dequantize())
            torch.testing.assert_close(int8_mlp(x), twin(x))


def test_intx_int4_per_group_codes() -> None:
    m = _mlp()
    quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(8)))
    p, g = stored_code_groups(m)[0]
    c = p.codes(*g[0])
    assert (c.bits, c.signed, c.block_size, c.granularity) == (4, True, (1, 8), "per_group(8)")
    assert torch.equal(c.dequantize(), m[0].weight.dequantize())
    clean = _qdata(m)
    with inject(m, BitErrorModel(ber=0.05), seed=3) as report:
        hit = _qdata(m)
        assert sum(bit_differences(a, b, 4) for a, b in zip(clean, hit, strict=True)) == report.n_changed > 0
        assert all(int(h.min()) >= -8 and int(h.max()) <= 7 for h in hit)
        assert torch.equal(p.codes(*g[0]).dequantize(), m[0].weight.dequantize())
    assert all(torch.equal(a, b) for a, b in zip(clean, _qdata(m), strict=True))


def test_unreachable_layout_is_a_one_line_config_error() -> None:
    m = _mlp()
    quantize_(m[2], Float8WeightOnlyConfig())
    quantize_(m[0], Int8WeightOnlyConfig())
    with pytest.raises(ConfigError) as e, inject(m, BitErrorModel(ber=0.01), seed=0):
        pass
    msg = str(e.value)
    assert "\n" not in msg and "'2'" in msg and "Float8Tensor" in msg
    assert [n for n, _, _ in select_tensors(m, BitErrorModel(ber=0.01, exclude=("2",)))] == ["0"]
    with inject(m, BitErrorModel(ber=0.01, exclude=("2",)), seed=0) as report:
        assert [t.layer for t in report.tensors] == ["0"]


def test_campaign_runs_on_a_torchao_model(int8_mlp: nn.Sequential) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    clean = _qdata(int8_mlp)
    expected = float((int8_mlp(x).argmax(1) == y).float().mean())
    r1 = run_ber_campaign(int8_mlp, x, y, bers=[1e-3, 0.2], repeats=2, base_seed=0)
    assert r1["clean_accuracy"] == pytest.approx(expected)
    assert [len(e["accuracies"]) for e in r1["results"]] == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(clean, _qdata(int8_mlp), strict=True))
    r2 = run_ber_campaign(int8_mlp, x, y, bers=[1e-3, 0.2], repeats=2, base_seed=0)
    assert r2["results"] == r1["results"] and r2["fingerprint"] == r1["fingerprint"]
    other = copy.deepcopy(int8_mlp)
    other[0].weight.qdata[0, 0] ^= 1
    r3 = run_ber_campaign(other, x, y, bers=[1e-3], repeats=1, base_seed=0)
    assert r3["fingerprint"]["model_sha256"] != r1["fingerprint"]["model_sha256"]
