"""Quantized activations and bit errors in activation buffers (issue 12, part 4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qmargin.errors import ConfigError
from qmargin.faults import BitErrorModel, inject
from qmargin.faults.activations import corrupt_activation_codes_, inject_activations
from qmargin.quant import QuantLinear, QuantSpec, dequantize
from qmargin.quant.activations import (
    ActivationQuantizers,
    activation_range,
    activation_scale,
    quantize_activation,
)
from qmargin.quant.codes import popcount, to_words


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        QuantLinear(16, 32, spec=QuantSpec(4)), nn.ReLU(), QuantLinear(32, 10, spec=QuantSpec(4))
    ).eval()


def _data(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


# -- calibration ------------------------------------------------------------------------------
def test_minmax_range_is_exact() -> None:
    x = torch.tensor([-3.0, -0.5, 0.25, 2.0])
    assert activation_range(x, QuantSpec(8)) == (-3.0, 3.0)
    assert activation_range(x, QuantSpec(8, symmetric=False)) == (-3.0, 2.0)
    assert activation_range(x.clamp(min=0.1), QuantSpec(8, symmetric=False)) == (0.0, 2.0)
    scale, zp = activation_scale(-3.0, 3.0, QuantSpec(8))
    assert float(scale) == pytest.approx(3.0 / 127) and int(zp) == 0
    scale, zp = activation_scale(0.0, 2.0, QuantSpec(8, symmetric=False))
    assert float(scale) == pytest.approx(2.0 / 255) and int(zp) == 0


def test_percentile_range_clips_outliers() -> None:
    x = torch.cat([torch.linspace(0, 1, 100_001), torch.tensor([1000.0])])
    lo, hi = activation_range(x, QuantSpec(8, symmetric=False), "percentile", 99.9)
    assert lo == 0.0
    assert hi == pytest.approx(float(torch.quantile(x.double(), 0.999)), rel=1e-9)
    assert hi < 1.0
    assert activation_range(x, QuantSpec(8, symmetric=False))[1] == 1000.0


def test_round_trip_error_at_most_half_a_step() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    for spec in (QuantSpec(8), QuantSpec(4, symmetric=False)):
        lo, hi = activation_range(x, spec)
        scale, zp = activation_scale(lo, hi, spec)
        codes = quantize_activation(x, scale, zp, spec)
        assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
        back = dequantize(codes, scale, zp, spec)
        assert float((back - x).abs().max()) <= float(scale) / 2 + 1e-6
        assert torch.equal(quantize_activation(back, scale, zp, spec), codes)  # codes are fixed points


def test_quantizers_calibrate_and_state_round_trip() -> None:
    model = _mlp()
    x = _data()
    clean = model(x)
    q = ActivationQuantizers(model, QuantSpec(8))
    assert q.layers == ("0", "2")
    q.calibrate([x[:32], x[32:]])
    out = model(x)
    assert not torch.equal(out, clean) and torch.allclose(out, clean, atol=0.1)
    state = q.state_dict()
    q2 = ActivationQuantizers(_mlp(), QuantSpec(8))
    q2.load_state_dict(state)
    assert torch.equal(q2.model(x), out)
    assert q.config()["layers"] == ["0", "2"] and q.config()["calibration"] == "minmax"
    q.remove()
    assert torch.equal(model(x), clean)


def test_layer_patterns_and_errors() -> None:
    model = _mlp()
    q = ActivationQuantizers(model, QuantSpec(8, symmetric=False), layers="1")  # the ReLU output
    assert q.layers == ("1",)
    with pytest.raises(ConfigError, match="not calibrated"):
        model(_data())
    with pytest.raises(ConfigError, match="matches no module"):
        ActivationQuantizers(model, QuantSpec(8), layers="fc*")
    with pytest.raises(ConfigError, match="per tensor"):
        ActivationQuantizers(model, QuantSpec(8, per_channel=True))
    with pytest.raises(ConfigError, match="percentile"):
        activation_range(torch.ones(3), QuantSpec(8), "percentile", 20.0)
    with pytest.raises(ConfigError, match="calibration method"):
        activation_range(torch.ones(3), QuantSpec(8), "mse")


# -- errors -----------------------------------------------------------------------------------
def test_activation_error_rate_is_binomial() -> None:
    """N = 800,000 bits at p = 1e-3: K ~ Binomial(N, p), mean 800, sd 28.3. Accept |K - Np| <= 5 sd:
    a correct sampler fails with probability ~6e-7 (normal approximation); the seed is fixed."""
    n, bits, p = 100_000, 8, 1e-3
    codes = torch.zeros(n, dtype=torch.uint8)
    corrupt_activation_codes_(codes, bits, BitErrorModel(ber=p), seed=3, layer="fc", batch=0)
    k = int(popcount(codes).sum())
    sd = math.sqrt(n * bits * p * (1 - p))
    assert abs(k - n * bits * p) <= 5 * sd


def test_protected_bits_and_formats() -> None:
    codes = torch.zeros(50_000, dtype=torch.int8)
    corrupt_activation_codes_(codes, 8, BitErrorModel(ber=0.05, protected_bits=(-1,)), 0, "fc", 0)
    assert int(codes.min()) >= 0 and int(codes.max()) > 0  # the sign bit is never hit
    sat = torch.zeros(50_000, dtype=torch.int8)
    corrupt_activation_codes_(sat, 4, BitErrorModel(ber=0.2), 0, "fc", 0, saturate=True)
    assert int(sat.min()) == -7  # -8 saturates to -qmax
    wrap = torch.zeros(50_000, dtype=torch.int8)
    corrupt_activation_codes_(wrap, 4, BitErrorModel(ber=0.2), 0, "fc", 0)
    assert int(wrap.min()) == -8
    off = torch.zeros(50_000, dtype=torch.int8)
    corrupt_activation_codes_(off, 4, BitErrorModel(ber=0.2, storage="offset"), 0, "fc", 0)
    # same flipped bits, other format: offset words of 0 are 1000, so the decoded codes differ
    assert torch.equal(to_words(off, 4, "offset") ^ 8, to_words(wrap, 4))


def test_same_seed_same_bits_other_batch_other_bits() -> None:
    def hit(seed: int, layer: str, batch: int) -> torch.Tensor:
        codes = torch.zeros(4096, dtype=torch.uint8)
        corrupt_activation_codes_(codes, 8, BitErrorModel(ber=1e-2), seed, layer, batch)
        return codes

    assert torch.equal(hit(5, "0", 2), hit(5, "0", 2))
    assert not torch.equal(hit(5, "0", 2), hit(5, "0", 3))
    assert not torch.equal(hit(5, "0", 2), hit(5, "2", 2))
    assert not torch.equal(hit(5, "0", 2), hit(6, "0", 2))


def _recorded_flips(model: nn.Module, x: torch.Tensor, seed: int, ber: float) -> list[torch.Tensor]:
    """The XOR of clean and corrupted activation words, per layer and batch."""
    q = ActivationQuantizers(model, QuantSpec(8, symmetric=False), layers="1")
    q.calibrate([x])
    seen: list[torch.Tensor] = []
    real_edit = None

    with inject_activations(q, BitErrorModel(ber=ber), seed) as report:
        real_edit = q._edit
        assert real_edit is not None

        def spy(layer: str, codes: torch.Tensor) -> None:
            before = codes.clone()
            real_edit(layer, codes)
            seen.append(before ^ codes)

        q.set_code_edit(spy)
        for batch in x.split(16):
            model(batch)
    assert report.batches == len(seen)
    q.remove()
    return seen


def test_pairing_across_models_of_one_shape() -> None:
    x = _data()
    a = _recorded_flips(_mlp(0), x, seed=7, ber=1e-2)
    b = _recorded_flips(_mlp(1), x, seed=7, ber=1e-2)
    assert len(a) == 4
    for fa, fb in zip(a, b, strict=True):
        assert torch.equal(fa, fb) and int(fa.count_nonzero()) > 0
    assert not torch.equal(a[0], a[1])  # fresh errors in every batch


def test_ber_zero_equals_clean_quantized_and_block_restores() -> None:
    model, x = _mlp(), _data()
    q = ActivationQuantizers(model, QuantSpec(6))
    q.calibrate([x])
    clean_q = model(x)
    with inject_activations(q, BitErrorModel(ber=0.0), seed=1):
        assert torch.equal(model(x), clean_q)
    with inject_activations(q, BitErrorModel(ber=0.05), seed=1) as report:
        noisy = model(x)
    assert not torch.equal(noisy, clean_q) and sum(report.bits_hit.values()) > 0
    assert torch.equal(model(x), clean_q)


def test_weights_and_activations_together_reproducible() -> None:
    model, x = _mlp(), _data()
    q = ActivationQuantizers(model, QuantSpec(8))
    q.calibrate([x])
    for m in model:
        if isinstance(m, QuantLinear):
            m.freeze()

    def run() -> torch.Tensor:
        ber = BitErrorModel(ber=1e-2)
        with inject(model, ber, seed=4), inject_activations(q, ber, 4):
            return torch.cat([model(b) for b in x.split(32)])

    first = run()
    assert torch.equal(first, run())
    with inject(model, BitErrorModel(ber=1e-2), seed=4):
        weights_only = torch.cat([model(b) for b in x.split(32)])
    assert not torch.equal(first, weights_only)


def test_per_layer_protection_routes_each_buffer_to_its_layer_rule() -> None:
    """``--protect`` on activations: the buffer of layer ``0`` is fully protected (msb8 on 8-bit codes),
    the buffer of layer ``2`` falls to ``*=none``; a pattern matching no layer leaves a buffer alone."""
    from qmargin.faults.protection import ProtectedErrorModel

    model, x = _mlp(), _data()
    q = ActivationQuantizers(model, QuantSpec(8), layers=["0", "2"])
    q.calibrate([x])
    clean = model(x)
    with inject_activations(q, ProtectedErrorModel("0=msb8", ber=0.1), seed=5) as report:
        hit = model(x)
    assert report.bits_hit["0"] == 0 and report.bits_hit["2"] > 0
    assert not torch.equal(clean, hit)
    with inject_activations(q, ProtectedErrorModel("0=msb8,2=msb8", ber=0.1), seed=5) as report:
        assert torch.equal(model(x), clean)
    assert report.bits_hit == {"0": 0, "2": 0}
    q.remove()
