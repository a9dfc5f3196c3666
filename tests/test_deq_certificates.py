"""Quantization certificates of MonDEQs (design.md §5): margins, norms, per-frequency blocks,
the a-priori certificate, solver rates and the equilibrium displacement bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from qmargin.deq import (
    Certificate,
    certify,
    conv_frequency_blocks,
    displacement_bound,
    fb_rate,
    lipschitz_constant,
    monotonicity_margin,
    pr_rate,
    residual_error_bound,
    solver_rates,
    spectral_norm,
    sym_max_eigenvalue,
)
from qmargin.quant import QuantSpec, fake_quantize

DT = torch.float64
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------
# helpers (float64 reference code written independently of the library)
# ------------------------------------------------------------------------------------------------
def mondeq_w(seed: int, n: int, r: int, m: float, sa: float, sb: float) -> torch.Tensor:
    """``W = (1 - m) I - A^T A + B - B^T`` (Winston & Kolter): ``sym(I - W) = m I + A^T A``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=DT) * sa / math.sqrt(n)
    B = torch.randn(n, n, generator=g, dtype=DT) * sb / math.sqrt(n)
    return (1 - m) * torch.eye(n, dtype=DT) - A.T @ A + B - B.T


def inputs(seed: int, n: int, d: int, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7919)
    U = torch.randn(n, d, generator=g, dtype=DT)
    b = torch.randn(n, generator=g, dtype=DT) * 0.5
    x = torch.randn(N, d, generator=g, dtype=DT)
    return U, b, x


def pr_iterate(W, U, b, x, a: float, iters: int):
    """Tiny dense Peaceman-Rachford (design.md §5); returns z and the per-step ||u_{k+1} - u_k||."""
    n = W.shape[0]
    eye = torch.eye(n, dtype=DT)
    V = torch.linalg.inv(eye + a * (eye - W))
    c = a * (x @ U.T + b)
    u = torch.zeros_like(c)
    z = torch.zeros_like(c)
    steps = []
    for _ in range(iters):
        u_h = 2 * z - u
        z_h = (u_h + c) @ V.T
        u_new = 2 * z_h - u_h
        steps.append(float(torch.linalg.vector_norm(u_new - u)))
        u = u_new
        z = torch.relu(u)
    return z, steps


def fb_iterate(W, U, b, x, a: float, iters: int):
    n = W.shape[0]
    S = torch.eye(n, dtype=DT) - W
    c = x @ U.T + b
    z = torch.zeros_like(c)
    steps = []
    for _ in range(iters):
        z_new = torch.relu(z - a * (z @ S.T - c))
        steps.append(float(torch.linalg.vector_norm(z_new - z)))
        z = z_new
    return z, steps


def solve(W, U, b, x, iters: int = 20_000) -> torch.Tensor:
    """Equilibrium of a strongly monotone network by PR, stopped once the iterate no longer moves."""
    n = W.shape[0]
    eye = torch.eye(n, dtype=DT)
    a = 1.0 / float(torch.linalg.matrix_norm(eye - W, ord=2))
    V = torch.linalg.inv(eye + a * (eye - W))
    c = a * (x @ U.T + b)
    u = torch.zeros_like(c)
    z = torch.zeros_like(c)
    for _ in range(iters):
        u_h = 2 * z - u
        u_new = 2 * ((u_h + c) @ V.T) - u_h
        done = float((u_new - u).abs().max()) < 1e-14 * (1.0 + float(u.abs().max()))
        u = u_new
        z = torch.relu(u)
        if done:
            break
    return z


def padded_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The convention as PyTorch computes it (needs pads no larger than the image)."""
    kh, kw = kernel.shape[-2:]
    ph, pw = kh // 2, kw // 2
    return F.conv2d(F.pad(x, (pw, kw - 1 - pw, ph, kh - 1 - ph), mode="circular"), kernel.to(DT))


def dense_of_conv(kernel: torch.Tensor, H: int, Wd: int) -> torch.Tensor:
    """Dense matrix of the circular convolution, built by applying it to basis vectors."""
    c_out, c_in, kh, kw = kernel.shape
    n_in = c_in * H * Wd
    basis = torch.eye(n_in, dtype=DT).reshape(n_in, c_in, H, Wd)
    if kh - 1 <= H and kw - 1 <= Wd:
        cols = padded_conv(basis, kernel)
    else:  # kernel wraps around more than once: F.pad refuses, use the loop form
        cols = torch.stack([conv_direct(e, kernel) for e in basis])
    return cols.reshape(n_in, -1).T


def conv_direct(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The documented convention written out as loops over taps."""
    c_out, c_in, kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    y = torch.zeros(c_out, *x.shape[1:], dtype=DT)
    for p in range(kh):
        for q in range(kw):
            shifted = torch.roll(x, shifts=(-(p - ph), -(q - pw)), dims=(1, 2))
            y += torch.einsum("oc,chw->ohw", kernel[:, :, p, q].to(DT), shifted)
    return y


params = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "n": st.integers(2, 9),
        "r_frac": st.floats(0.1, 1.0),
        "m": st.floats(0.01, 1.0),
        "sa": st.floats(0.0, 3.0),
        "sb": st.floats(0.0, 3.0),
        "bits": st.integers(2, 8),
        "per_channel": st.booleans(),
        "symmetric": st.booleans(),
    }
)


def build(p: dict) -> tuple[torch.Tensor, torch.Tensor, QuantSpec]:
    n = p["n"]
    r = max(1, round(p["r_frac"] * n))
    W = mondeq_w(p["seed"], n, r, p["m"], p["sa"], p["sb"])
    spec = QuantSpec(bits=p["bits"], per_channel=p["per_channel"], symmetric=p["symmetric"])
    return W, fake_quantize(W, spec), spec


# ------------------------------------------------------------------------------------------------
# margins and norms
# ------------------------------------------------------------------------------------------------
def test_margin_of_parameterization_is_m_and_matches_numpy() -> None:
    W = mondeq_w(3, 8, 3, 0.37, 1.0, 1.0)  # r < n: lambda_min(A^T A) = 0, so mu = m
    assert float(monotonicity_margin(W)) == pytest.approx(0.37, abs=1e-12)
    Wn = W.numpy()
    S = np.eye(8) - Wn
    assert float(monotonicity_margin(W)) == pytest.approx(np.linalg.eigvalsh((S + S.T) / 2)[0], abs=1e-12)
    assert float(lipschitz_constant(W)) == pytest.approx(np.linalg.norm(S, 2), rel=1e-12)
    D = torch.randn(5, 3, dtype=DT)
    assert float(spectral_norm(D)) == pytest.approx(np.linalg.norm(D.numpy(), 2), rel=1e-12)
    assert float(spectral_norm(torch.tensor([3.0, 4.0]))) == pytest.approx(5.0)
    assert monotonicity_margin(W.float()).dtype == torch.float64


def test_margin_of_blocks_equals_block_diagonal_dense() -> None:
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(6, 3, 3, dtype=torch.complex128, generator=g)
    dense = torch.block_diag(*blocks)
    assert float(monotonicity_margin(blocks)) == pytest.approx(float(monotonicity_margin(dense)), abs=1e-12)
    assert float(lipschitz_constant(blocks)) == pytest.approx(float(lipschitz_constant(dense)), rel=1e-12)
    assert float(spectral_norm(blocks)) == pytest.approx(float(spectral_norm(dense)), rel=1e-12)
    assert float(sym_max_eigenvalue(blocks)) == pytest.approx(float(sym_max_eigenvalue(dense)), abs=1e-12)


def test_bad_operator_shapes_raise() -> None:
    with pytest.raises(ValueError):
        monotonicity_margin(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        monotonicity_margin(torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError):
        monotonicity_margin(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError):
        certify(torch.zeros(3, 3), torch.zeros(4, 4))


# ------------------------------------------------------------------------------------------------
# per-frequency blocks of a circular convolution
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    c_out=st.integers(1, 3),
    c_in=st.integers(1, 3),
    H=st.integers(1, 5),
    Wd=st.integers(1, 5),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
)
def test_conv_blocks_equal_dense_matrix(seed, c_out, c_in, H, Wd, kh, kw) -> None:
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=DT)
    dense = dense_of_conv(K, H, Wd)
    # the documented convention, written as explicit loops, is what F.conv2d + circular pad computes
    x = torch.randn(c_in, H, Wd, generator=g, dtype=DT)
    assert torch.allclose(dense @ x.reshape(-1), conv_direct(x, K).reshape(-1), atol=1e-12)
    blocks = conv_frequency_blocks(K, (H, Wd))
    assert blocks.shape == (H * Wd, c_out, c_in)
    # convolution theorem: fft2(y)[:, f] = K_f fft2(x)[:, f]
    X = torch.fft.fft2(x).permute(1, 2, 0).reshape(-1, c_in)
    Y = torch.fft.fft2((dense @ x.reshape(-1)).reshape(c_out, H, Wd)).permute(1, 2, 0).reshape(-1, c_out)
    assert torch.allclose(torch.einsum("foc,fc->fo", blocks, X), Y, atol=1e-10)
    # exact spectral quantities agree with the dense matrix
    half = conv_frequency_blocks(K, (H, Wd), onesided=True)
    assert half.shape == (H * (Wd // 2 + 1), c_out, c_in)
    for bl in (blocks, half):
        assert float(spectral_norm(bl)) == pytest.approx(float(spectral_norm(dense)), rel=1e-9, abs=1e-12)
    if c_out == c_in:
        for bl in (blocks, half):
            mu_dense = float(monotonicity_margin(dense))
            assert float(monotonicity_margin(bl)) == pytest.approx(mu_dense, abs=1e-9)
            assert float(lipschitz_constant(bl)) == pytest.approx(float(lipschitz_constant(dense)), rel=1e-9)


def test_conv_certificate_equals_dense_certificate() -> None:
    """A quantized conv operator: the per-frequency certificate is the dense one."""
    g = torch.Generator().manual_seed(5)
    C, H, Wd = 3, 5, 4
    K = torch.randn(C, C, 3, 3, generator=g, dtype=DT) * 0.15
    K[:, :, 1, 1] -= 0.5 * torch.eye(C, dtype=DT)  # make I - W comfortably monotone
    Kq = fake_quantize(K, QuantSpec(bits=4, per_channel=True))
    cb = certify(conv_frequency_blocks(K, (H, Wd)), conv_frequency_blocks(Kq, (H, Wd)))
    cd = certify(dense_of_conv(K, H, Wd), dense_of_conv(Kq, H, Wd))
    for key, val in cd.to_dict().items():
        other = cb.to_dict()[key]
        if isinstance(val, float):
            assert other == pytest.approx(val, rel=1e-9, abs=1e-12), key
        else:
            assert other == val, key


def test_blocks_agree_with_the_networks_operator_convention() -> None:
    ops = pytest.importorskip("qmargin.deq.operators")
    if not hasattr(ops, "conv_blocks"):
        pytest.skip("qmargin.deq.operators.conv_blocks not available")
    K = torch.randn(2, 2, 3, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    theirs = ops.conv_blocks(K, (4, 5)).reshape(-1, 2, 2)
    assert torch.allclose(conv_frequency_blocks(K, (4, 5)), theirs.to(torch.complex128), atol=1e-12)


# ------------------------------------------------------------------------------------------------
# the certificate and the solver rates
# ------------------------------------------------------------------------------------------------
def test_rates_formulas() -> None:
    mu, L = 0.3, 1.7
    r = solver_rates(mu, L)
    assert r.fb_step == pytest.approx(mu / L**2)
    assert r.fb_rate == pytest.approx(math.sqrt(1 - mu**2 / L**2))
    assert r.fb_rate == pytest.approx(fb_rate(mu / L**2, mu, L))
    assert r.pr_step == pytest.approx(1 / L)
    assert r.pr_rate == pytest.approx(math.sqrt(1 - mu / L))
    # the best steps minimize the rate functions
    grid = np.linspace(1e-4, 2 * mu / L**2, 400)
    assert min(fb_rate(a, mu, L) for a in grid) >= r.fb_rate - 1e-12
    grid = np.linspace(1e-3, 20 / L, 400)
    assert min(pr_rate(a, mu, L) for a in grid) >= r.pr_rate - 1e-12
    # not monotone: no rates, no NaN
    none = {"fb_step": None, "fb_rate": None, "pr_step": None, "pr_rate": None}
    assert solver_rates(-0.1, 1.0).to_dict() == none
    assert solver_rates(0.0, 1.0).pr_rate is None


def test_certificate_not_monotone_has_no_rates_and_is_json_safe() -> None:
    W = mondeq_w(0, 6, 2, 0.05, 1.0, 1.0)
    W_q = W + 0.2 * torch.eye(6, dtype=DT)  # moves the margin to -0.15
    c = certify(W, W_q)
    assert not c.certified and not c.certified_sym and not c.monotone
    assert c.margin_quantized == pytest.approx(-0.15, abs=1e-12)
    assert c.kappa is None and c.fb_rate is None and c.pr_step is None
    assert c.delta_u_norm is None and c.delta_b_norm is None
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert set(d) == set(Certificate.__dataclass_fields__)


def test_sufficient_not_necessary() -> None:
    """A skew perturbation leaves the margin alone: not certified by ||dW||_2, yet monotone
    (and certified by the sharper symmetric-part test)."""
    W = mondeq_w(1, 6, 2, 0.1, 1.0, 1.0)
    S = torch.randn(6, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    c = certify(W, W + (S - S.T))
    assert not c.certified and c.monotone and c.certified_sym
    assert c.margin_quantized == pytest.approx(c.margin, abs=1e-12)


@SETTINGS
@given(p=params)
@example(  # found by hypothesis: W~ = c I gives rate 0 with steps ~1e3 (round-off allowance)
    p={
        "seed": 5400,
        "n": 7,
        "r_frac": 0.5,
        "m": 0.0625,
        "sa": 0.0,
        "sb": 0.0625,
        "bits": 2,
        "per_channel": False,
        "symmetric": False,
    }
)
def test_certified_implies_monotone_and_solvers_converge(p) -> None:
    W, W_q, spec = build(p)
    n = W.shape[0]
    U, b, x = inputs(p["seed"], n, 3, 4)
    U_q, b_q = fake_quantize(U, spec), fake_quantize(b, QuantSpec(bits=p["bits"]))
    c = certify(W, W_q, U=U, U_q=U_q, b=b, b_q=b_q)
    event(f"certified={c.certified} certified_sym={c.certified_sym} monotone={c.monotone}")
    assert c.delta_u_norm == pytest.approx(float(spectral_norm(U_q - U)))
    assert c.delta_b_norm == pytest.approx(float(torch.linalg.vector_norm(b_q - b)))
    # Weyl, both forms, always (certificate or not)
    assert c.weyl_lower_bound <= c.weyl_lower_bound_sym + 1e-12
    assert c.weyl_lower_bound_sym <= c.margin_quantized + 1e-10
    assert c.delta_w_sym <= c.delta_w_norm + 1e-12
    if c.certified:
        assert c.certified_sym
    if c.certified_sym:
        assert c.margin_quantized > 0 and c.monotone
    assert c.monotone == (c.margin_quantized > 0)
    assert c.margin == pytest.approx(float(monotonicity_margin(W)))
    assert c.lipschitz_quantized == pytest.approx(float(lipschitz_constant(W_q)))
    if not c.monotone:
        assert c.pr_rate is None and c.fb_rate is None and c.kappa is None
        return
    assert c.kappa == pytest.approx(c.lipschitz_quantized / c.margin_quantized)
    assert 0 <= c.fb_rate < 1 and 0 <= c.pr_rate < 1
    # PR and FB contract the quantized network with (at most) the certified rates, step by step
    for (z, steps), rate in (
        (pr_iterate(W_q, U_q, b_q, x, c.pr_step, 300), c.pr_rate),
        (fb_iterate(W_q, U_q, b_q, x, c.fb_step, 300), c.fb_rate),
    ):
        # round-off allowance scaled to the iterates (an absolute 1e-13 is below float64 resolution
        # once the first step is ~1e3, e.g. when the rate is 0 because W~ is a multiple of I)
        eps = 1e-13 * max(1.0, float(steps[0]))
        for k in range(1, len(steps)):
            assert steps[k] <= rate * steps[k - 1] * (1 + 1e-9) + eps
        if rate**300 < 1e-9:
            residual = z - torch.relu(z @ W_q.T + x @ U_q.T + b_q)
            assert float(residual.abs().max()) < 1e-6


def test_certified_branch_is_exercised() -> None:
    """Deterministic anchors: an 8-bit certified case; a 3-bit one monotone but not certified."""
    W = mondeq_w(11, 8, 3, 0.5, 1.0, 1.0)
    c8 = certify(W, fake_quantize(W, QuantSpec(bits=8)))
    assert c8.certified and c8.monotone
    found = False
    for seed in range(50):
        W = mondeq_w(seed, 8, 3, 0.2, 1.0, 1.0)
        c = certify(W, fake_quantize(W, QuantSpec(bits=3)))
        if c.monotone and not c.certified:
            found = True
            break
    assert found


# ------------------------------------------------------------------------------------------------
# displacement of the equilibrium
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(p=params, u_bits=st.integers(2, 8))
def test_full_displacement_bound_holds_on_every_sample(p, u_bits) -> None:
    W, W_q, spec = build(p)
    n = W.shape[0]
    U, b, x = inputs(p["seed"], n, 3, 6)
    uspec = QuantSpec(bits=u_bits, per_channel=p["per_channel"])
    U_q, b_q = fake_quantize(U, uspec), fake_quantize(b, QuantSpec(bits=u_bits))
    # the quantized equilibrium must exist and both solves must be quick (kappa <= 20 each)
    assume(float(monotonicity_margin(W_q)) > 0.05 * float(lipschitz_constant(W_q)))
    assume(float(monotonicity_margin(W)) > 0.05 * float(lipschitz_constant(W)))
    z = solve(W, U, b, x)
    z_q = solve(W_q, U_q, b_q, x)
    eps = residual_error_bound(W, U, b, x, z)  # ||z - z*||, rigorous
    eps_q = residual_error_bound(W_q, U_q, b_q, x, z_q)  # ||z_q - z~*||, rigorous
    assert float(eps.max()) < 1e-6 and float(eps_q.max()) < 1e-6
    bound = displacement_bound(W, W_q, U, U_q, b, b_q, x, z_q)
    mu = bound.margin
    dist = torch.linalg.vector_norm(z - z_q, dim=1)
    # the bound is evaluated at z_q, not at z~*: it moves by at most ||dW||_2 eps_q / mu
    slack = eps + eps_q + float(spectral_norm(W_q - W)) * eps_q / mu + 1e-12
    assert bool((dist <= bound.full + slack).all())
    assert bool((bound.full <= bound.norm_form * (1 + 1e-12) + 1e-15).all())
    assert bool((bound.paper <= bound.norm_form * (1 + 1e-12) + 1e-15).all())


def test_paper_dw_only_form_fails_when_u_and_b_are_quantized() -> None:
    """Constructed case: W is exactly representable (dW = 0), so the paper's bound is 0, while the
    quantized U and b move every equilibrium. The full bound still holds."""
    n, d, N = 6, 4, 16
    W = 0.5 * torch.eye(n, dtype=DT)
    W_q = fake_quantize(W, QuantSpec(bits=4))
    assert torch.equal(W, W_q)
    U, b, x = inputs(0, n, d, N)
    U_q, b_q = fake_quantize(U, QuantSpec(bits=3)), fake_quantize(b, QuantSpec(bits=3))
    z, z_q = solve(W, U, b, x), solve(W_q, U_q, b_q, x)
    bound = displacement_bound(W, W_q, U, U_q, b, b_q, x, z_q)
    dist = torch.linalg.vector_norm(z - z_q, dim=1)
    assert bool((bound.paper == 0).all())
    assert bool((dist > 1e-3).sum() >= N // 2)  # the paper's bound fails on these samples
    tol = residual_error_bound(W, U, b, x, z) + residual_error_bound(W_q, U_q, b_q, x, z_q)
    assert bool((dist <= bound.full + tol + 1e-12).all())


def test_paper_form_fails_on_a_share_of_samples_for_a_generic_network() -> None:
    """A generic MonDEQ (W at 8 bits, U and b at 4 bits): the paper's form is violated on a share of
    samples, the full form on none."""
    n, d, N = 10, 5, 64
    W = mondeq_w(4, n, 4, 0.5, 1.0, 1.0)
    W_q = fake_quantize(W, QuantSpec(bits=8))
    U, b, x = inputs(4, n, d, N)
    U_q, b_q = fake_quantize(U, QuantSpec(bits=4)), fake_quantize(b, QuantSpec(bits=4))
    z, z_q = solve(W, U, b, x), solve(W_q, U_q, b_q, x)
    bound = displacement_bound(W, W_q, U, U_q, b, b_q, x, z_q)
    dist = torch.linalg.vector_norm(z - z_q, dim=1)
    tol = residual_error_bound(W, U, b, x, z) + residual_error_bound(W_q, U_q, b_q, x, z_q) + 1e-12
    violated = dist > bound.paper + tol
    assert int(violated.sum()) > 0
    assert bool((dist <= bound.full + tol).all())


def test_displacement_bound_is_tight_for_a_linear_interior_case() -> None:
    """With a strictly positive equilibrium and dW = 0, dU = 0 and db = mu-eigenvector, the relu is
    inactive, d = (I - W)^{-1} db, and the full bound is attained when I - W = mu I."""
    n = 4
    W = 0.7 * torch.eye(n, dtype=DT)  # I - W = 0.3 I
    U = torch.zeros(n, 1, dtype=DT)
    b = torch.ones(n, dtype=DT)
    b_q = b + 0.01
    x = torch.zeros(1, 1, dtype=DT)
    z, z_q = solve(W, U, b, x), solve(W, U, b_q, x)
    bound = displacement_bound(W, W, U, U, b, b_q, x, z_q)
    dist = float(torch.linalg.vector_norm(z - z_q))
    assert dist == pytest.approx(float(bound.full[0]), rel=1e-9)


def test_displacement_bound_rejects_non_monotone_float_operator() -> None:
    W = 1.5 * torch.eye(3, dtype=DT)
    with pytest.raises(ValueError, match="not strongly monotone"):
        displacement_bound(W, W, None, None, None, None, torch.zeros(2, 1), torch.zeros(2, 3))


def test_residual_error_bound_is_rigorous() -> None:
    W = mondeq_w(8, 7, 3, 0.2, 1.0, 1.0)
    U, b, x = inputs(8, 7, 3, 5)
    z = solve(W, U, b, x, iters=6000)
    g = torch.Generator().manual_seed(3)
    for scale in (1e-1, 1e-3, 1e-6):
        z_hat = z + scale * torch.randn(z.shape, generator=g, dtype=DT)
        bound = residual_error_bound(W, U, b, x, z_hat)
        dist = torch.linalg.vector_norm(z_hat - z, dim=1)
        assert bool((dist <= bound + 1e-12).all())
