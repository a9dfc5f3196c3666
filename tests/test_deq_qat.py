"""qmargin.deq.qat: the quantization residual, the differentiable margin and the certified-QAT penalty."""

from __future__ import annotations

import pytest
import torch

from qmargin.deq import assemble_fc_W, certify, monotonicity_margin, spectral
from qmargin.deq.qat import certified_margin_penalty, differentiable_margin, quantization_residual
from qmargin.quant import QuantSpec, dequantize, quantize

D64 = torch.float64


def _mondeq_W(seed: int, n: int, m: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=D64) / n**0.5
    B = torch.randn(n, n, generator=g, dtype=D64) / n**0.5
    return assemble_fc_W(A, B, m)


SPECS = [
    QuantSpec(4),
    QuantSpec(3, per_channel=True),
    QuantSpec(8, per_channel=True),
    QuantSpec(4, symmetric=False),
    QuantSpec(2, symmetric=False, per_channel=True),
    QuantSpec(4, w_max=0.5),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantization_residual_is_the_quantization_error(spec: QuantSpec) -> None:
    W = _mondeq_W(0, 6, 0.5)
    dW = quantization_residual(W, spec)
    # dW = Q(W) - W  (= W~ - W, the perturbation the certificate bounds)
    expected = dequantize(*quantize(W, spec), spec) - W
    torch.testing.assert_close(dW, expected, rtol=0.0, atol=1e-15)


@pytest.mark.parametrize("per_channel", [False, True])
def test_residual_gradient_flows_through_the_scale_with_the_codes_fixed(per_channel: bool) -> None:
    """dW = s(W) code - W, s = max|W_row| / qmax: d(sum dW)/dW = -1 + [argmax] sign(W) sum(code) / qmax."""
    spec = QuantSpec(4, per_channel=per_channel)
    W = _mondeq_W(1, 5, 0.3).requires_grad_(True)
    quantization_residual(W, spec).sum().backward()
    assert W.grad is not None
    Wd = W.detach()
    codes = quantize(Wd, spec)[0].to(D64)
    expected = -torch.ones_like(Wd)
    if per_channel:
        for r in range(Wd.shape[0]):
            j = int(Wd[r].abs().argmax())
            expected[r, j] += torch.sign(Wd[r, j]) * codes[r].sum() / spec.qmax
    else:
        i = int(Wd.abs().argmax())
        expected.view(-1)[i] += torch.sign(Wd.view(-1)[i]) * codes.sum() / spec.qmax
    torch.testing.assert_close(W.grad, expected, rtol=0.0, atol=1e-12)
    # straight-through estimators would give 0 here: the codes really are held fixed, the scale moves
    assert bool((W.grad != -1).any())


def test_differentiable_margin_is_the_spectral_margin() -> None:
    W = _mondeq_W(2, 7, 0.4)
    mu = differentiable_margin(W)
    assert mu.dtype == D64
    assert float(mu) == float(spectral.margin(W)) == float(monotonicity_margin(W))
    assert float(mu) >= 0.4 - 1e-12  # sym(I - W) = m I + A^T A
    # blocks of a convolution: the same formula, min over blocks
    K = torch.randn(2, 2, 3, 3, dtype=D64, generator=torch.Generator().manual_seed(3)) * 0.2
    blocks = spectral.conv_blocks(K, (4, 4)).reshape(-1, 2, 2)
    assert float(differentiable_margin(blocks)) == float(spectral.margin(blocks))


def test_differentiable_margin_gradient_matches_finite_differences() -> None:
    W = _mondeq_W(4, 6, 0.3).requires_grad_(True)
    S = torch.eye(6, dtype=D64) - W.detach()
    eig = torch.linalg.eigvalsh(S + S.mT)
    assert float(eig[1] - eig[0]) > 1e-3  # a simple smallest eigenvalue: mu is differentiable at W
    assert torch.autograd.gradcheck(differentiable_margin, (W,), eps=1e-6, atol=1e-7)
    # and the gradient is -sym(v v^T) for the unit eigenvector v of the smallest eigenvalue
    (g,) = torch.autograd.grad(differentiable_margin(W), W)
    v = torch.linalg.eigh((S + S.mT) / 2).eigenvectors[:, 0]
    torch.testing.assert_close(g, -torch.outer(v, v), rtol=0.0, atol=1e-10)


def test_certified_margin_penalty_is_a_hinge_on_the_certificate() -> None:
    W = _mondeq_W(5, 8, 1.0)
    for spec, delta in [(QuantSpec(8, per_channel=True), 0.05), (QuantSpec(6, per_channel=True), 0.0)]:
        cert = certify(W, dequantize(*quantize(W, spec), spec))
        assert cert.delta_w_norm + delta <= cert.margin  # certified with slack delta
        assert float(certified_margin_penalty(W, spec, delta=delta)) == 0.0
    spec = QuantSpec(2)
    cert = certify(W, dequantize(*quantize(W, spec), spec))
    for delta in (0.05, cert.margin + 1.0):
        if cert.delta_w_norm + delta <= cert.margin:
            continue
        p = certified_margin_penalty(W, spec, delta=delta)
        assert float(p) > 0.0
        assert float(p) == pytest.approx(cert.delta_w_norm + delta - cert.margin, rel=1e-12, abs=1e-14)
    # the penalty has a gradient once active (it pulls the weights towards a certified W)
    Wg = W.clone().requires_grad_(True)
    certified_margin_penalty(Wg, QuantSpec(8, per_channel=True), delta=cert.margin + 1.0).backward()
    assert Wg.grad is not None and float(Wg.grad.abs().sum()) > 0.0
