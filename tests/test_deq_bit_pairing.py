"""Certificates under random bit errors and bit-error campaigns draw the same patterns for a seed."""

from __future__ import annotations

import pytest
import torch

from qmargin.deq import MonDEQClassifier, bit_error_pattern, certify_under_bit_errors, monotonicity_margin
from qmargin.deq.bit_certificates import MONDEQ_LAYER
from qmargin.faults import BitErrorModel, inject
from qmargin.quant import QuantSpec, dequantize
from qmargin.quant.codes import bit_differences


def _small_quantized_mondeq(spec: QuantSpec) -> MonDEQClassifier:
    torch.manual_seed(0)
    model = MonDEQClassifier(5, n=7, num_classes=3, m=1.0, spec=spec)
    model.eval()
    return model


@pytest.mark.parametrize(
    ("spec", "protected"),
    [(QuantSpec(4), ()), (QuantSpec(6, per_channel=True), (-1,)), (QuantSpec(3, symmetric=False), ())],
)
def test_certificate_corrupts_the_codes_inject_corrupts(spec: QuantSpec, protected: tuple[int, ...]) -> None:
    model = _small_quantized_mondeq(spec)
    names = [name for name, module in model.named_modules() if module is model.core]
    assert names == [MONDEQ_LAYER]  # the default layer of the certificate is the classifier's core
    ber, base = 0.08, 11
    stored = model.core.stored("W")
    clean = stored.codes.clone()
    scale, zp = stored.scale.clone(), stored.zero_point.clone()
    error_model = BitErrorModel(ber=ber, tensors=("W",), protected_bits=protected)
    injected: list[torch.Tensor] = []
    n_flipped: list[int] = []
    for r in range(4):
        with inject(model, error_model, base + r) as report:
            injected.append(model.core.stored("W").codes.clone())
            n_flipped.append(report.n_flipped)
        assert torch.equal(model.core.stored("W").codes, clean)  # restored
    assert sum(n_flipped) > 0  # the comparison is not vacuous
    # the pattern function: the same corrupted codes, bit for bit
    for r in range(4):
        mine = bit_error_pattern(
            clean, spec.bits, ber, base + r, layer=MONDEQ_LAYER, tensor="W", protected_bits=protected
        )
        assert mine.dtype == injected[r].dtype
        assert torch.equal(mine, injected[r])
    # the certificate evaluates exactly those codes: pattern r of seed `base` is inject's seed base + r
    W_q = dequantize(clean, scale.double(), zp, spec)
    res = certify_under_bit_errors(W_q, clean, scale, zp, spec, ber, 4, base, protected_bits=protected)
    assert res.flips == n_flipped == [bit_differences(clean, c, spec.bits) for c in injected]
    for r in range(4):
        W_err = dequantize(injected[r], scale.double(), zp, spec)
        assert res.margins[r] == pytest.approx(float(monotonicity_margin(W_err)), abs=1e-12)


def test_another_layer_name_draws_another_pattern() -> None:
    spec = QuantSpec(4)
    model = _small_quantized_mondeq(spec)
    codes = model.core.stored("W").codes.clone()
    a = bit_error_pattern(codes, 4, 0.2, 3, layer=MONDEQ_LAYER, tensor="W")
    b = bit_error_pattern(codes, 4, 0.2, 3, layer="other", tensor="W")
    c = bit_error_pattern(codes, 4, 0.2, 3, layer=MONDEQ_LAYER, tensor="U")
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(codes, model.core.stored("W").codes)  # a copy, the stored codes are untouched
