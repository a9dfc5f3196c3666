"""Monotone parameterizations and realized operators: structure, exact per-frequency blocks, quantization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qmargin.deq import (
    ConvOperator,
    DenseOperator,
    MonotoneConv,
    MonotoneLinear,
    MonotoneMultiConv,
    assemble_fc_W,
    conv_blocks,
)
from qmargin.deq.operators import circular_conv2d, circular_conv2d_adjoint
from qmargin.quant import QuantSpec, export_integer_state, load_integer_state

D64 = torch.float64


def _sym_eigs(Wd: torch.Tensor) -> torch.Tensor:
    S = torch.eye(Wd.shape[0], dtype=Wd.dtype) - Wd
    return torch.linalg.eigvalsh((S + S.T) / 2)


def _block_sym_eigs(blocks: torch.Tensor) -> torch.Tensor:
    S = torch.eye(blocks.shape[-1], dtype=blocks.dtype) - blocks
    return torch.linalg.eigvalsh((S + S.mH) / 2).flatten().sort().values


# ---------------------------------------------------------------------------------------------- FC
def test_fc_W_formula_and_margin():
    torch.manual_seed(0)
    core = MonotoneLinear(7, 6, r=4, m=0.3, dtype=D64)
    W = core.float_tensor("W")
    A, B = core.A.detach(), core.B.detach()
    expected = 0.7 * torch.eye(6, dtype=D64) - A.T @ A + B - B.T
    torch.testing.assert_close(W, expected)
    # sym(I - W) = m I + A^T A >= m I, and A (4 x 6) has a 2-dim kernel: the bound is attained
    mu, L = core.margin_and_norm()
    assert mu.item() == pytest.approx(0.3, abs=1e-10)
    assert L.item() == pytest.approx(torch.linalg.matrix_norm(torch.eye(6, dtype=D64) - W, 2).item())


def test_learnable_m_is_softplus_plus_eps():
    core = MonotoneLinear(3, 4, m=0.5, learn_m=True, dtype=D64)
    assert core.m.item() == pytest.approx(0.5, rel=1e-12)
    with torch.no_grad():
        core.m_raw.fill_(-3.0)
    assert core.m.item() == pytest.approx(math.log1p(math.exp(-3.0)) + 1e-4)
    assert "m_raw" in dict(core.named_parameters())


def test_dense_resolvent_matches_inverse():
    torch.manual_seed(1)
    W = assemble_fc_W(torch.randn(5, 5, dtype=D64), torch.randn(5, 5, dtype=D64), 0.5)
    op = DenseOperator(W)
    z = torch.randn(3, 5, dtype=D64)
    Vd = torch.linalg.inv(torch.eye(5, dtype=D64) + 0.7 * (torch.eye(5, dtype=D64) - W))
    res = op.resolvent(0.7)
    torch.testing.assert_close(res.apply(z), z @ Vd.T)
    torch.testing.assert_close(res.apply_T(z), z @ Vd)
    torch.testing.assert_close(op.rmatvec(z), z @ W)


# ------------------------------------------------------------------------------------ conv helpers
@pytest.mark.parametrize("stride", [1, 2])
def test_circular_conv_adjoint(stride):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 6, dtype=D64)
    K = torch.randn(4, 3, 3, 3, dtype=D64)
    y = circular_conv2d(x, K, stride)
    w = torch.randn_like(y)
    lhs = (y * w).sum()
    rhs = (x * circular_conv2d_adjoint(w, K, stride, (8, 6))).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)


def test_single_conv_kernel_is_assembled_formula():
    torch.manual_seed(3)
    core = MonotoneConv(2, 3, 6, kernel_size=3, m=0.4, dtype=D64)
    K = core.float_tensor("W")
    assert K.shape == (3, 3, 5, 5)  # (2k - 1) x (2k - 1)
    A, B = core.A[0].detach(), core.B[0].detach()
    # independent route: A^T * A as a full 2-D convolution of the kernels
    K_ata = F.conv2d(A.transpose(0, 1), A.transpose(0, 1), padding=2).flip(-2, -1)
    delta = torch.zeros(3, 3, 5, 5, dtype=D64)
    delta[range(3), range(3), 2, 2] = 1
    BT = B.transpose(0, 1).flip(-2, -1)
    expected = 0.6 * delta - K_ata + F.pad(B, (1, 1, 1, 1)) - F.pad(BT, (1, 1, 1, 1))
    torch.testing.assert_close(K, expected)


@pytest.mark.parametrize("grid", [(6, 6), (5, 4), (3, 3)])
def test_conv_blocks_reproduce_dense_spectrum(grid):
    torch.manual_seed(4)
    K = torch.randn(2, 2, 5, 5, dtype=D64) * 0.3
    op = ConvOperator(K, grid)
    Wd = op.to_dense()
    blocks = op.frequency_blocks()
    assert blocks.shape == (grid[0] * grid[1], 2, 2)
    torch.testing.assert_close(_block_sym_eigs(blocks), _sym_eigs(Wd))
    I = torch.eye(Wd.shape[0], dtype=D64)
    sv_dense = torch.linalg.svdvals(I - Wd).sort().values
    sv_blocks = torch.linalg.svdvals(torch.eye(2, dtype=D64) - blocks).flatten().sort().values
    torch.testing.assert_close(sv_blocks, sv_dense)
    # the rfft half gives the same exact margin and norm
    mu, L = op.margin_and_norm()
    assert mu.item() == pytest.approx(_sym_eigs(Wd)[0].item(), abs=1e-10)
    assert L.item() == pytest.approx(sv_dense[-1].item(), rel=1e-10)
    # transpose and resolvent (and its transpose) against the dense matrix
    z = torch.randn(3, 2, *grid, dtype=D64)
    zf = z.reshape(3, -1)
    torch.testing.assert_close(op.rmatvec(z).reshape(3, -1), zf @ Wd)
    Vd = torch.linalg.inv(I + 0.6 * (I - Wd))
    res = op.resolvent(0.6)
    torch.testing.assert_close(res.apply(z).reshape(3, -1), zf @ Vd.T)
    torch.testing.assert_close(res.apply_T(z).reshape(3, -1), zf @ Vd)


def test_conv_blocks_match_certificates_convention():
    certificates = pytest.importorskip("qmargin.deq.certificates")
    if not hasattr(certificates, "conv_frequency_blocks"):
        pytest.skip("certificates has no conv_frequency_blocks")
    K = torch.randn(3, 3, 5, 5, dtype=D64)
    ours = conv_blocks(K, (6, 5)).reshape(-1, 3, 3)
    theirs = certificates.conv_frequency_blocks(K, (6, 5))
    torch.testing.assert_close(ours, theirs.to(ours.dtype))


def test_fft_matvec_when_kernel_exceeds_grid():
    torch.manual_seed(5)
    K = torch.randn(2, 2, 7, 7, dtype=D64)
    small = ConvOperator(K, (2, 2))  # reach 3 > grid: Fourier path
    assert not small._fits()
    z = torch.randn(2, 2, 2, 2, dtype=D64)
    # fold the kernel modulo the grid by hand: the same circular operator
    folded = torch.zeros(2, 2, 3, 3, dtype=D64)
    for p in range(7):
        for q in range(7):
            folded[:, :, (p - 3) % 2 + 1, (q - 3) % 2 + 1] += K[:, :, p, q]
    ref = F.conv2d(F.pad(z, (1, 1, 1, 1), mode="circular"), folded)
    torch.testing.assert_close(small.matvec(z), ref)


# ----------------------------------------------------------------------------------- multi-tier
@pytest.mark.parametrize("channels,size", [([2, 3], 8), ([1, 2, 2], 8)])
def test_multitier_exact_blocks(channels, size):
    torch.manual_seed(6)
    core = MonotoneMultiConv(1, channels, size, m=0.2, dtype=D64)
    T = len(channels)
    assert core.c == sum(C * 4 ** (T - 1 - t) for t, C in enumerate(channels))
    op = core.operator()
    # the polyphase convolution is exactly the factored operator on the tiers
    z = torch.randn(2, *core.state_shape, dtype=D64)
    fact = core.to_polyphase(core.apply_W_factored(core.to_tiers(z)))
    torch.testing.assert_close(op.matvec(z), fact)
    # monotone: sym(I - W) >= m I, and blocks reproduce the dense spectrum
    Wd = op.to_dense()
    eig = _sym_eigs(Wd)
    assert eig[0].item() >= 0.2 - 1e-10
    blocks = core.frequency_blocks()
    assert blocks.shape == (core.grid[0] * core.grid[1], core.c, core.c)
    torch.testing.assert_close(_block_sym_eigs(blocks), eig)
    # A^T is the exact adjoint of A
    y = [torch.randn_like(t) for t in core.apply_A(core.to_tiers(z))]
    lhs = sum((a * b).sum() for a, b in zip(core.apply_A(core.to_tiers(z)), y, strict=True))
    rhs = sum((a * b).sum() for a, b in zip(core.to_tiers(z), core.apply_AT(y), strict=True))
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)


def test_multitier_injection_shapes():
    core = MonotoneMultiConv(3, [4, 2], (8, 4), dtype=D64)
    v = core.injection(torch.randn(2, 3, 8, 4, dtype=D64))
    assert v.shape == (2, 4 * 4 + 2, 4, 2)
    tiers = core.to_output(v)
    assert [tuple(t.shape) for t in tiers] == [(2, 4, 8, 4), (2, 2, 4, 2)]
    with pytest.raises(ValueError):
        MonotoneMultiConv(1, [2, 2, 2], 6)


# ---------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_quantized_tensors_protocol(kind):
    torch.manual_seed(7)
    spec = QuantSpec(4)
    if kind == "fc":
        core = MonotoneLinear(5, 6, spec=spec, bias_spec=QuantSpec(8))
        x = torch.randn(3, 5)
    else:
        core = MonotoneConv(1, 2, 4, spec=spec, bias_spec=QuantSpec(8))
        x = torch.randn(3, 1, 4, 4)
    assert set(core.quant_specs) == {"W", "U", "b"}
    assert MonotoneLinear(2, 2).quant_specs == {}
    Wf = core.float_tensor("W")
    Wq = core.quantized_tensor("W")
    assert not torch.equal(Wf, Wq)
    assert torch.unique(Wq).numel() <= 15  # 4-bit symmetric codes
    # training-mode (fake-quantized) operator == frozen (stored codes) operator, bit for bit
    v_train, W_train = core.injection(x), core.tensor("W")
    core.freeze()
    assert core.stored("W").codes.shape == Wf.shape
    torch.testing.assert_close(core.tensor("W"), W_train, rtol=0, atol=0)
    torch.testing.assert_close(core.injection(x), v_train, rtol=0, atol=0)
    # a bit error in the stored W changes the operator the forward uses; restoring restores it
    codes = core.stored("W").codes
    old = codes.clone()
    codes.view(-1)[0] ^= 0b0100
    assert not torch.equal(core.tensor("W"), W_train)
    codes.copy_(old)
    torch.testing.assert_close(core.tensor("W"), W_train, rtol=0, atol=0)


def test_integer_state_round_trip_uses_stored_W():
    torch.manual_seed(8)
    spec = QuantSpec(5)
    a = MonotoneLinear(4, 5, spec=spec, bias_spec=spec)
    a.freeze()
    a.stored("W").codes.view(-1)[3] ^= 1  # a stored W that no (A, B, m) produces
    state = export_integer_state(a)
    assert "W.codes" in state.tensors and "U.codes" in state.tensors
    b = MonotoneLinear(4, 5, spec=spec, bias_spec=spec)
    load_integer_state(b, state)
    assert b.frozen
    torch.testing.assert_close(b.tensor("W"), a.tensor("W"), rtol=0, atol=0)
    torch.testing.assert_close(b.float_tensor("W"), a.tensor("W"), rtol=0, atol=0)  # the override
    b.unfreeze()  # back to the factors: W assembled from the loaded A, B, m
    torch.testing.assert_close(b.float_tensor("W"), a.assemble_W().detach())


def test_quantized_conv_blocks_reproduce_quantized_dense():
    torch.manual_seed(9)
    core = MonotoneMultiConv(1, [2, 1], 4, m=0.3, spec=QuantSpec(3), dtype=D64)
    Wq = core.to_dense(quantized=True)
    Wf = core.to_dense(quantized=False)
    assert not torch.allclose(Wq, Wf)
    torch.testing.assert_close(_block_sym_eigs(core.frequency_blocks(quantized=True)), _sym_eigs(Wq))
    mu_q, _ = core.margin_and_norm(quantized=True)
    assert mu_q.item() == pytest.approx(_sym_eigs(Wq)[0].item(), abs=1e-10)
    # the operator the forward uses is the quantized one
    torch.testing.assert_close(core.to_dense(), Wq)
