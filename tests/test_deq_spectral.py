"""qmargin.deq.spectral: the one home of mu(W), L(W) and the per-frequency blocks (even kernels too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmargin.deq import ConvOperator, DenseOperator, Operator, conv_frequency_blocks, spectral
from qmargin.deq.operators import circular_conv2d_adjoint

D64 = torch.float64


def _conv_loops(x: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``y[o, i, j] = sum K[o, c, p, q] x[c, i + p - kh // 2, j + q - kw // 2]`` (mod the grid), as loops."""
    _, _, kh, kw = K.shape
    rh, rw = kh // 2, kw // 2
    y = torch.zeros(x.shape[0], K.shape[0], *x.shape[-2:], dtype=x.dtype)
    for p in range(kh):
        for q in range(kw):
            shifted = torch.roll(x, shifts=(-(p - rh), -(q - rw)), dims=(-2, -1))
            y += torch.einsum("oc,nchw->nohw", K[:, :, p, q], shifted)
    return y


@pytest.mark.parametrize("k", [(2, 2), (4, 4), (2, 3), (3, 3)])
@pytest.mark.parametrize("grid", [(4, 4), (5, 3), (6, 5)])
def test_even_kernel_blocks_match_the_dense_operator(k, grid) -> None:
    g = torch.Generator().manual_seed(sum(k) * 31 + grid[0] * 7 + grid[1])
    c = 2
    K = torch.randn(c, c, *k, generator=g, dtype=D64) * 0.3
    op = ConvOperator(K, grid)
    dense = op.to_dense()
    n = dense.shape[0]
    assert dense.shape == (c * grid[0] * grid[1],) * 2
    # the operator applies the documented convention (centre k // 2), also for even kernels
    x = torch.randn(3, c, *grid, generator=g, dtype=D64)
    torch.testing.assert_close(op.matvec(x), _conv_loops(x, K))
    torch.testing.assert_close(op.rmatvec(x).reshape(3, -1), x.reshape(3, -1) @ dense)
    torch.testing.assert_close(
        circular_conv2d_adjoint(x, K, 1, grid).reshape(3, -1), x.reshape(3, -1) @ dense
    )
    # convolution theorem with the blocks of the one builder
    blocks = spectral.conv_blocks(K, grid).reshape(-1, c, c)
    X = torch.fft.fft2(x).permute(0, 2, 3, 1).reshape(3, -1, c)
    Y = torch.fft.fft2(op.matvec(x)).permute(0, 2, 3, 1).reshape(3, -1, c)
    torch.testing.assert_close(torch.einsum("foc,nfc->nfo", blocks, X), Y)
    # mu and L from the blocks (full and rfft half) equal those of the dense matrix
    S = np.eye(n) - dense.numpy()
    mu_np = np.linalg.eigvalsh((S + S.T) / 2)[0]
    L_np = np.linalg.norm(S, 2)
    half = spectral.conv_blocks(K, grid, half=True)
    for bl in (blocks, half):
        assert float(spectral.margin(bl)) == pytest.approx(float(spectral.margin(dense)), abs=1e-10)
        assert float(spectral.lipschitz(bl)) == pytest.approx(float(spectral.lipschitz(dense)), rel=1e-10)
        assert float(spectral.margin(bl)) == pytest.approx(mu_np, abs=1e-10)
        assert float(spectral.lipschitz(bl)) == pytest.approx(L_np, rel=1e-10)
    mu, L = op.margin_and_norm()
    assert float(mu) == pytest.approx(mu_np, abs=1e-10)
    assert float(L) == pytest.approx(L_np, rel=1e-10)
    # the certificates' blocks are the same builder
    torch.testing.assert_close(conv_frequency_blocks(K, grid), blocks)


def test_even_kernel_resolvent_matches_dense() -> None:
    g = torch.Generator().manual_seed(3)
    K = torch.randn(2, 2, 4, 4, generator=g, dtype=D64) * 0.2
    op = ConvOperator(K, (5, 4))
    dense = op.to_dense()
    eye = torch.eye(dense.shape[0], dtype=D64)
    V = torch.linalg.inv(eye + 0.7 * (eye - dense))
    z = torch.randn(2, 2, 5, 4, generator=g, dtype=D64)
    torch.testing.assert_close(op.resolvent(0.7).apply(z).reshape(2, -1), z.reshape(2, -1) @ V.T)
    torch.testing.assert_close(op.resolvent(0.7).apply_T(z).reshape(2, -1), z.reshape(2, -1) @ V)


def test_fft_path_for_even_kernels_larger_than_the_grid() -> None:
    g = torch.Generator().manual_seed(4)
    K = torch.randn(2, 2, 6, 6, generator=g, dtype=D64)
    small = ConvOperator(K, (2, 2))  # centre 3 > grid: the Fourier path
    z = torch.randn(2, 2, 2, 2, generator=g, dtype=D64)
    torch.testing.assert_close(small.matvec(z), _conv_loops(z, K))
    torch.testing.assert_close(small.rmatvec(z).reshape(2, -1), z.reshape(2, -1) @ small.to_dense())


def test_margin_and_lipschitz_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=g, dtype=D64) * 0.3
    S = np.eye(6) - W.numpy()
    assert float(spectral.margin(W)) == pytest.approx(np.linalg.eigvalsh((S + S.T) / 2)[0], abs=1e-12)
    assert float(spectral.lipschitz(W)) == pytest.approx(np.linalg.norm(S, 2), rel=1e-12)
    D = W - W.mT + 0.1 * torch.eye(6, dtype=D64)
    assert float(spectral.sym_max_eigenvalue(D)) == pytest.approx(0.1, abs=1e-12)
    # dtype-preserving: float32 in, float32 out (the solvers' step sizes run in the model's precision)
    mu32, L32 = spectral.margin_and_lipschitz(W.float())
    assert mu32.dtype == torch.float32 and L32.dtype == torch.float32
    assert DenseOperator(W).margin_and_norm() == spectral.margin_and_lipschitz(W)


def test_operators_satisfy_the_protocol() -> None:
    assert isinstance(DenseOperator(torch.zeros(3, 3)), Operator)
    assert isinstance(ConvOperator(torch.zeros(2, 2, 3, 3), (4, 4)), Operator)
    assert not isinstance(torch.zeros(3, 3), Operator)
