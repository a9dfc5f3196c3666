"""Convolutional MonDEQ certificates (exact per frequency) against dense computations on tiny operators.

The state of a tiny single-conv (2 channels on 4 x 4) or multi-tier (1 + 2 channels, 4 x 4 and 2 x 2,
polyphase on 2 x 2) network has a few dozen coordinates, so ``W``, ``U`` and ``b`` can be built as
dense matrices by applying the operators to basis vectors (circular convolutions, no FFT), and the
dense certificate functions then give the reference values.
"""

from __future__ import annotations

import math

import pytest
import torch

from qmargin.deq import (
    MonotoneConv,
    MonotoneMultiConv,
    bit_error_pattern,
    certify,
    conv_displacement_bound,
    conv_frequency_blocks,
    conv_residual_error_bound,
    displacement_bound,
    monotonicity_margin,
    residual_error_bound,
    solve,
    spectral_norm,
)
from qmargin.deq.bit_certificates import bit_flip_perturbation_bounds, code_bit_deltas
from qmargin.deq.operators import ConvOperator
from qmargin.deq.qat import certified_margin_penalty, certified_quantities
from qmargin.experiments.certify import _conv_quantized, certify_conv_weights, conv_displacement
from qmargin.quant import QuantSpec

D64 = torch.float64


def _core(kind: str, seed: int = 0) -> MonotoneMultiConv:
    torch.manual_seed(seed)
    if kind == "conv":
        core = MonotoneConv(1, 2, 4, m=0.4, dtype=D64)
    else:
        core = MonotoneMultiConv(1, [1, 2], 4, m=0.4, dtype=D64)
    with torch.no_grad():  # a more interesting spectrum than the uniform initialisation
        for p in (*core.A, *core.B, *core.D):
            p.mul_(2.0)
    return core


def _dense_kernel(kernel: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return ConvOperator(kernel, grid).to_dense()


def _dense_input(
    core: MonotoneMultiConv, U: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_dense, b_dense)`` with ``inject(x, U, b).flatten() = U_dense x.flatten() + b_dense``."""
    shape = (core.in_channels, *core.image_size)
    d = math.prod(shape)
    zero_b = torch.zeros_like(b)
    basis = torch.eye(d, dtype=D64).reshape(d, *shape)
    Ud = core.inject(basis, U, zero_b).flatten(1).T
    bd = core.inject(torch.zeros(1, *shape, dtype=D64), torch.zeros_like(U), b).flatten()
    return Ud, bd


@pytest.mark.parametrize("kind", ["conv", "multitier"])
@pytest.mark.parametrize(("bits", "per_channel"), [(3, True), (4, False), (8, True)])
def test_per_frequency_certificate_equals_the_dense_one(kind, bits, per_channel):
    core = _core(kind)
    row = certify_conv_weights(core, bits, per_channel)
    t = _conv_quantized(core, bits, per_channel)
    W, W_q = _dense_kernel(t["K"], core.grid), _dense_kernel(t["K_q"], core.grid)
    torch.testing.assert_close(W, core.to_dense(quantized=False).double(), rtol=0, atol=1e-12)
    Ud, bd = _dense_input(core, t["U"], t["b"])
    Ud_q, bd_q = _dense_input(core, t["U_q"], t["b_q"])
    dense = certify(W, W_q, U=Ud, U_q=Ud_q, b=bd, b_q=bd_q).to_dict()
    for key in (
        "margin",
        "margin_quantized",
        "delta_w_norm",
        "delta_w_sym",
        "lipschitz",
        "lipschitz_quantized",
        "delta_u_norm",
        "delta_b_norm",
        "weyl_lower_bound",
    ):
        assert row[key] == pytest.approx(dense[key], rel=1e-9, abs=1e-10), key
    for key in ("certified", "certified_sym", "monotone"):
        assert row[key] == dense[key]
    c = core.c
    assert row["block_size"] == c and row["frequencies"] == core.grid[0] * (core.grid[1] // 2 + 1)
    assert W.shape[0] == c * core.grid[0] * core.grid[1]


@pytest.mark.parametrize("kind", ["conv", "multitier"])
def test_conv_displacement_and_residual_bounds_equal_the_dense_ones(kind):
    core = _core(kind, seed=1)
    t = _conv_quantized(core, 4, True)
    grid = core.grid
    W, W_q = _dense_kernel(t["K"], grid), _dense_kernel(t["K_q"], grid)
    Ud, bd = _dense_input(core, t["U"], t["b"])
    Ud_q, bd_q = _dense_input(core, t["U_q"], t["b_q"])
    x = torch.rand(5, 1, *core.image_size, dtype=D64)
    v_f = core.inject(x, t["U"], t["b"])
    v_q = core.inject(x, t["U_q"], t["b_q"])
    z_q, st = solve(ConvOperator(t["K_q"], grid), v_q, "pr", tol=1e-6, max_iter=5000)
    du = float(spectral_norm(conv_frequency_blocks(t["U_q"] - t["U"], core.image_size)))
    db = float(torch.linalg.vector_norm(core.expanded_bias(t["b_q"] - t["b"])))
    xn = torch.linalg.vector_norm(x.flatten(1), dim=1)
    conv = conv_displacement_bound(t["K"], t["K_q"], grid, z_q, v_q - v_f, input_norm_bound=du * xn + db)
    dense = displacement_bound(W, W_q, Ud, Ud_q, bd, bd_q, x.flatten(1), z_q.flatten(1))
    for form in ("full", "norm_form", "paper"):
        torch.testing.assert_close(getattr(conv, form), getattr(dense, form), rtol=1e-9, atol=1e-12)
    assert conv.margin == pytest.approx(dense.margin, rel=1e-10)
    # an approximate iterate (loose tolerance): the a-posteriori error bounds agree too
    torch.testing.assert_close(
        conv_residual_error_bound(t["K_q"], grid, v_q, z_q),
        residual_error_bound(W_q, Ud_q, bd_q, x.flatten(1), z_q.flatten(1)),
        rtol=1e-9,
        atol=1e-12,
    )
    with pytest.raises(ValueError):
        conv_displacement_bound(t["K"], t["K_q"], grid, z_q, v_q[:, :1] - v_f[:, :1])


@pytest.mark.parametrize("kind", ["conv", "multitier"])
def test_displacement_bound_holds_on_every_sample_and_is_nearly_tight_somewhere(kind):
    core = _core(kind, seed=2)
    x = torch.rand(40, 1, *core.image_size, dtype=D64)
    for bits in (3, 6):
        d = conv_displacement(core, bits, True, x, keep_samples=True)
        assert d["samples"] == 40 and d["solver_converged"]
        assert d["share_full"] == 1.0 and d["share_norm_form"] == 1.0
        assert 0.0 < d["ratio_full_with_allowance"] <= 1.0
        assert d["ratio_norm_form"] <= d["ratio_full"] + 1e-12  # the norm form is the looser bound
        assert len(d["distances"]) == 40


@pytest.mark.parametrize("per_channel", [False, True])
def test_kernel_bit_flip_budget_is_sound_and_exact_for_one_flip(per_channel):
    """Every single flip of the kernel codes: ||dW||_2 (exact, per frequency) <= beta(1), with equality
    for the largest; and a certified budget of k flips keeps the operator monotone."""
    core = _core("conv", seed=3)
    spec = QuantSpec(4, per_channel=per_channel)
    t = _conv_quantized(core, 4, per_channel)
    codes, scale = t["codes"], t["scale"]
    beta = bit_flip_perturbation_bounds(codes, scale, spec, 2)
    deltas = code_bit_deltas(codes, spec)  # (*codes.shape, bits): code change of each single flip
    s = scale.double().reshape(-1, 1, 1, 1) if per_channel else scale.double()
    sizes = (deltas.abs() * s.unsqueeze(-1)).flatten()
    grid = core.grid
    # one flip changes every frequency block by delta * (a phase) in one entry: ||dW||_2 = |delta| exactly
    idx = int(sizes.argmax())
    flat = torch.zeros_like(deltas).flatten()
    flat[idx] = deltas.flatten()[idx]
    dK = flat.reshape(deltas.shape).sum(-1) * s
    assert float(spectral_norm(conv_frequency_blocks(dK, grid, onesided=True))) == pytest.approx(
        float(beta[1]), rel=1e-12
    )
    assert float(sizes.max()) == pytest.approx(float(beta[1]), rel=1e-12)
    row = certify_conv_weights(core, 4, per_channel)
    k = row["max_certified_bit_flips"]
    assert k is not None and (k == 0) == (float(beta[1]) >= row["margin_quantized"])
    # random patterns of k flips (and of 2 flips against beta(2)) on the exact operator
    gen = torch.Generator().manual_seed(0)
    Kq = t["K_q"]
    for _ in range(30):
        for n_flips, bound in ((max(k, 1), None), (2, float(beta[2]))):
            pos = torch.randperm(deltas.numel(), generator=gen)[:n_flips]
            flat = torch.zeros(deltas.numel(), dtype=D64)
            flat[pos] = deltas.flatten()[pos]
            dK = flat.reshape(deltas.shape).sum(-1) * s
            dw = float(spectral_norm(conv_frequency_blocks(dK, grid, onesided=True)))
            if bound is not None:
                assert dw <= bound * (1 + 1e-12)
            elif k >= 1:
                assert float(monotonicity_margin(conv_frequency_blocks(Kq + dK, grid, onesided=True))) > 0


def test_random_patterns_are_the_ones_inject_draws_on_a_conv_mondeq():
    from qmargin.faults import BitErrorModel, inject
    from qmargin.models import build_model

    torch.manual_seed(0)
    model = build_model(
        "mondeq-conv", input_shape=(1, 8, 8), num_classes=3, spec=QuantSpec(4, per_channel=True), channels=2
    )
    model.eval()
    model.core.freeze()
    stored = model.core.stored("W")
    assert stored.codes.shape == (2, 2, 5, 5)  # the assembled 5 x 5 kernel is what is stored
    clean = stored.codes.clone()
    with inject(model, BitErrorModel(ber=0.05, tensors=("W",)), 17):
        hit = model.core.stored("W").codes.clone()
    expected = bit_error_pattern(clean, 4, 0.05, 17, layer="mon.core", tensor="W")
    assert torch.equal(hit, expected) and not torch.equal(hit, clean)
    assert torch.equal(model.core.stored("W").codes, clean)  # restored


@pytest.mark.parametrize("kind", ["conv", "multitier"])
@pytest.mark.parametrize("spec", [QuantSpec(3, per_channel=True), QuantSpec(4)], ids=str)
def test_certified_qat_quantities_are_exact_and_differentiable(kind, spec):
    core = _core(kind, seed=4)
    K = core.assemble_W()
    dw, mu = certified_quantities(K, spec, grid=core.grid)
    from qmargin.quant import dequantize, quantize

    Kd = K.detach()
    W = _dense_kernel(Kd, core.grid)
    W_q = _dense_kernel(dequantize(*quantize(Kd, spec), spec), core.grid)
    assert float(dw.detach()) == pytest.approx(float(spectral_norm(W_q - W)), rel=1e-9)
    assert float(mu.detach()) == pytest.approx(float(monotonicity_margin(W)), rel=1e-9)
    # the penalty's gradient reaches the factors and agrees with central differences along a direction
    pen = certified_margin_penalty(K, spec, delta=10.0, grid=core.grid)  # large delta: hinge active
    params = [p for p in core.parameters() if p.requires_grad]
    grads = torch.autograd.grad(pen, params, allow_unused=True)
    gen = torch.Generator().manual_seed(5)
    dirs = [torch.randn(p.shape, generator=gen, dtype=D64) for p in params]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, dirs, strict=True) if g is not None)
    assert analytic != 0.0
    eps = 1e-7
    vals = []
    with torch.no_grad():
        base = [p.clone() for p in params]
        for sign in (1.0, -1.0):
            for p, p0, d in zip(params, base, dirs, strict=True):
                p.copy_(p0 + sign * eps * d)
            vals.append(float(certified_margin_penalty(core.assemble_W(), spec, delta=10.0, grid=core.grid)))
        for p, p0 in zip(params, base, strict=True):
            p.copy_(p0)
    assert (vals[0] - vals[1]) / (2 * eps) == pytest.approx(analytic, rel=1e-4, abs=1e-8)
