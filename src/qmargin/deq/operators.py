"""Realized linear operators ``W`` of a monotone equilibrium network (design.md §5): the functional core.

A *realized operator* holds one plain tensor (its ``weight``) and knows how to apply ``W``, ``W^T``,
the linear resolvent ``V = (I + a (I - W))^{-1}`` (and ``V^T``), and its exact monotonicity margin
``mu(W) = lambda_min(sym(I - W))`` and Lipschitz constant ``L(W) = ||I - W||_2``. The solvers
(:mod:`qmargin.deq.solvers`) and the implicit backward (:mod:`qmargin.deq.layer`) only see this
interface, so they serve every parameterization, float or quantized.

* :class:`DenseOperator`: ``weight`` is the ``(n, n)`` matrix ``W``; states are ``(N, n)``.
* :class:`ConvOperator`: ``weight`` is a ``(c, c, kh, kw)`` kernel (odd sizes) of a circular
  convolution on a ``(H, W)`` grid; states are ``(N, c, H, W)``. The operator is block-diagonal in
  the 2-D DFT: one ``c x c`` complex block per frequency (:func:`conv_blocks`), so the resolvent,
  ``mu`` and ``L`` are exact per-frequency computations (no CG, no power iteration). A multi-tier
  network becomes a ``ConvOperator`` on its polyphase (space-to-depth) state, see
  :mod:`qmargin.deq.monotone`.

Convolution convention (PyTorch cross-correlation, kernel centred at ``(rh, rw) = (kh // 2, kw // 2)``)::

    (W z)[o, i, j] = sum_{c, p, q} K[o, c, p, q] z[c, (i + p - rh) mod H, (j + q - rw) mod W]

With ``Z = fft2(z)`` this reads ``(W z)^[:, u, v] = K_(u, v) Z[:, u, v]`` with the block
``K_(u, v)[o, c] = sum_{p, q} K[o, c, p, q] exp(+2 pi i (u (p - rh) / H + v (q - rw) / W))``,
blocks ordered ``f = u * W + v`` (the convention of :mod:`qmargin.deq.certificates` too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DenseOperator",
    "ConvOperator",
    "DenseResolvent",
    "FourierResolvent",
    "conv_blocks",
    "dense_margin_and_norm",
    "blocks_margin_and_norm",
    "circular_conv2d",
    "circular_conv2d_adjoint",
    "tiers_to_polyphase",
    "polyphase_to_tiers",
]


# --------------------------------------------------------------------------------------------------
# Exact margins and norms
# --------------------------------------------------------------------------------------------------
def dense_margin_and_norm(W: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu, L)`` of a dense ``W``: ``mu = lambda_min((S + S^T) / 2)``, ``L = ||S||_2`` with ``S = I - W``.

    Exact (``eigvalsh`` and ``matrix_norm(ord=2)``); 0-d tensors in ``W``'s dtype and device.
    """
    S = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device) - W
    mu = torch.linalg.eigvalsh((S + S.mT) / 2)[..., 0]
    return mu, torch.linalg.matrix_norm(S, ord=2)


def blocks_margin_and_norm(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu, L)`` of a block-diagonal operator given as a ``(..., c, c)`` stack of blocks ``W_f``.

    ``mu = min_f lambda_min(Herm(I - W_f))``, ``L = max_f sigma_max(I - W_f)``; 0-d real tensors.
    """
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    S = (eye - blocks).reshape(-1, blocks.shape[-2], blocks.shape[-1])
    mu = torch.linalg.eigvalsh((S + S.mH) / 2)[:, 0].min()
    L = torch.linalg.matrix_norm(S, ord=2).max()
    return mu, L


# --------------------------------------------------------------------------------------------------
# Circular convolutions and the polyphase (space-to-depth) form of multi-resolution states
# --------------------------------------------------------------------------------------------------
def circular_conv2d(x: Tensor, kernel: Tensor, stride: int = 1) -> Tensor:
    """``F.conv2d`` of ``x`` circularly padded by ``k // 2`` on each side (odd kernels)."""
    rh, rw = kernel.shape[-2] // 2, kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (rw, rw, rh, rh), mode="circular"), kernel, stride=stride)


def _fold_circular(t: Tensor, r: int, dim: int) -> Tensor:
    """Adjoint of circular padding by ``r`` along ``dim``: add the margins back to the opposite sides."""
    if r == 0:
        return t
    n = t.shape[dim] - 2 * r
    mid = t.narrow(dim, r, n)
    left = t.narrow(dim, 0, r)  # copies of x[n - r : n]
    right = t.narrow(dim, n + r, r)  # copies of x[0 : r]
    zshape = list(t.shape)
    zshape[dim] = n - r
    zeros = t.new_zeros(zshape)
    return mid + torch.cat([zeros, left], dim) + torch.cat([right, zeros], dim)


def circular_conv2d_adjoint(y: Tensor, kernel: Tensor, stride: int, out_hw: tuple[int, int]) -> Tensor:
    """Exact adjoint (transpose) of :func:`circular_conv2d` with ``stride`` onto a ``out_hw`` grid.

    ``<circular_conv2d(x, K, s), y> = <x, circular_conv2d_adjoint(y, K, s, x.shape[-2:])>``.
    """
    rh, rw = kernel.shape[-2] // 2, kernel.shape[-1] // 2
    if stride == 1:
        return circular_conv2d(y, kernel.transpose(0, 1).flip(-2, -1))
    H, W = out_hw
    ph, pw = H + 2 * rh, W + 2 * rw
    oh = ph - ((y.shape[-2] - 1) * stride + kernel.shape[-2])
    ow = pw - ((y.shape[-1] - 1) * stride + kernel.shape[-1])
    t = F.conv_transpose2d(y, kernel, stride=stride, output_padding=(oh, ow))
    return _fold_circular(_fold_circular(t, rh, -2), rw, -1)


def tiers_to_polyphase(tiers: list[Tensor] | tuple[Tensor, ...], scales: list[int]) -> Tensor:
    """Stack tiers ``z_t`` (``(N, C_t, H / 2^t, W / 2^t)``) into one coarse-grid state.

    Tier ``t`` is space-to-depth'ed by ``s_t = scales[t]`` (``F.pixel_unshuffle``: channel
    ``c s_t^2 + i s_t + j`` holds ``z_t[c, s_t h + i, s_t w + j]``) and the tiers are concatenated
    along channels: ``(N, sum_t C_t s_t^2, H_c, W_c)``. A permutation of coordinates, hence unitary.
    """
    return torch.cat([F.pixel_unshuffle(z, s) if s > 1 else z for z, s in zip(tiers, scales, strict=True)], 1)


def polyphase_to_tiers(z: Tensor, channels: list[int], scales: list[int]) -> list[Tensor]:
    """Inverse of :func:`tiers_to_polyphase`."""
    parts = torch.split(z, [c * s * s for c, s in zip(channels, scales, strict=True)], dim=1)
    return [F.pixel_shuffle(p, s) if s > 1 else p for p, s in zip(parts, scales, strict=True)]


# --------------------------------------------------------------------------------------------------
# Per-frequency blocks
# --------------------------------------------------------------------------------------------------
def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _phases(n: int, freqs: Tensor, k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``exp(+2 pi i f (p - k // 2) / n)`` for ``f`` in ``freqs``, ``p = 0..k-1``: ``(len(freqs), k)``."""
    offs = torch.arange(k, device=device, dtype=torch.int64) - k // 2
    steps = torch.remainder(freqs[:, None].to(torch.int64) * offs[None, :], n)
    ang = steps.to(torch.float64) * (2 * math.pi / n)
    return torch.polar(torch.ones_like(ang), ang).to(dtype)


def conv_blocks(kernel: Tensor, grid: tuple[int, int], *, half: bool = False) -> Tensor:
    """Per-frequency blocks of the circular convolution with ``kernel`` on ``grid``: ``(H, W', c_out, c_in)``.

    ``K_(u, v) = sum_{p, q} K[:, :, p, q] exp(+2 pi i (u (p - rh) / H + v (q - rw) / W))`` for
    ``u = 0..H-1`` and ``v = 0..W-1`` (``W' = W``) or, with ``half``, ``v = 0..W//2`` (the rfft
    frequencies, ``W' = W // 2 + 1``; the others are complex conjugates of these). Differentiable,
    complex in the precision of ``kernel`` (complex64 for float32, complex128 for float64). Kernels
    larger than the grid wrap around exactly as the circular convolution does.
    """
    H, W = grid
    cd = _complex_dtype(kernel.dtype)
    dev = kernel.device
    fh = torch.arange(H, device=dev)
    fw = torch.arange(W // 2 + 1 if half else W, device=dev)
    Eh = _phases(H, fh, kernel.shape[-2], dev, cd)
    Ew = _phases(W, fw, kernel.shape[-1], dev, cd)
    return torch.einsum("oipq,up,vq->uvoi", kernel.to(cd), Eh, Ew)


def _apply_blocks(z: Tensor, blocks: Tensor, grid: tuple[int, int], adjoint: bool = False) -> Tensor:
    """Apply a block-diagonal (in rfft2 frequencies) real operator: ``y^_f = B_f z^_f`` (or ``B_f^H``)."""
    Z = torch.fft.rfft2(z)  # (N, c, H, W//2+1)
    M = blocks.mH if adjoint else blocks
    Y = M @ Z.permute(2, 3, 1, 0)  # (H, W', c, N)
    return torch.fft.irfft2(Y.permute(3, 2, 0, 1), s=grid)


# --------------------------------------------------------------------------------------------------
# Resolvents
# --------------------------------------------------------------------------------------------------
def _inverse_or_nan(M: Tensor) -> Tensor:
    """Batched inverse; a singular matrix (possible only for a non-monotone ``W``) gives an all-NaN
    inverse, so the solve reports non-finite iterates instead of raising (no host sync here)."""
    V, info = torch.linalg.inv_ex(M)
    bad = (info != 0).reshape(*info.shape, 1, 1)
    return torch.where(bad, torch.full_like(V, float("nan")), V)


@dataclass(eq=False)
class DenseResolvent:
    """``V = (I + a (I - W))^{-1}`` as an explicit matrix (computed once, applied per iteration)."""

    alpha: float
    V: Tensor

    def apply(self, z: Tensor) -> Tensor:
        """``V z`` for row states ``z`` of shape ``(N, n)``."""
        return z @ self.V.mT

    def apply_T(self, z: Tensor) -> Tensor:
        """``V^T z``."""
        return z @ self.V


@dataclass(eq=False)
class FourierResolvent:
    """``V = (I + a (I - W))^{-1}`` of a circular convolution: one inverted ``c x c`` block per frequency."""

    alpha: float
    blocks: Tensor  # (H, W//2+1, c, c) complex
    grid: tuple[int, int]

    def apply(self, z: Tensor) -> Tensor:
        return _apply_blocks(z, self.blocks, self.grid)

    def apply_T(self, z: Tensor) -> Tensor:
        return _apply_blocks(z, self.blocks, self.grid, adjoint=True)


# --------------------------------------------------------------------------------------------------
# Realized operators
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class DenseOperator:
    """``W`` as a dense ``(n, n)`` matrix acting on row states ``z`` of shape ``(N, n)``."""

    weight: Tensor
    _margin: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _res: DenseResolvent | None = field(default=None, repr=False)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.weight.shape[0],)

    def with_weight(self, weight: Tensor) -> DenseOperator:
        return DenseOperator(weight)

    def matvec(self, z: Tensor) -> Tensor:
        """``W z``."""
        return z @ self.weight.mT

    def rmatvec(self, z: Tensor) -> Tensor:
        """``W^T z``."""
        return z @ self.weight

    def resolvent(self, alpha: float) -> DenseResolvent:
        """``V = (I + a (I - W))^{-1}`` (cached for the last ``alpha``)."""
        if self._res is None or self._res.alpha != alpha:
            W = self.weight
            eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
            self._res = DenseResolvent(alpha, _inverse_or_nan(eye + alpha * (eye - W)))
        return self._res

    def margin_and_norm(self) -> tuple[Tensor, Tensor]:
        """Exact ``(mu(W), L(W))`` (cached)."""
        if self._margin is None:
            self._margin = dense_margin_and_norm(self.weight.detach())
        return self._margin

    def to_dense(self) -> Tensor:
        return self.weight


@dataclass(eq=False)
class ConvOperator:
    """``W`` as a circular convolution with a ``(c, c, kh, kw)`` kernel on a ``grid = (H, W)``.

    States are ``(N, c, H, W)``. ``W^T`` is the circular convolution with the transposed, flipped
    kernel; ``V`` and ``(mu, L)`` come from the ``H * (W // 2 + 1)`` rfft blocks (exact).
    """

    weight: Tensor
    grid: tuple[int, int]
    _margin: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _res: FourierResolvent | None = field(default=None, repr=False)
    _half: Tensor | None = field(default=None, repr=False)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.weight.shape[0], *self.grid)

    def with_weight(self, weight: Tensor) -> ConvOperator:
        return ConvOperator(weight, self.grid)

    def _fits(self) -> bool:
        return self.weight.shape[-2] // 2 <= self.grid[0] and self.weight.shape[-1] // 2 <= self.grid[1]

    def half_blocks(self) -> Tensor:
        """rfft blocks ``(H, W // 2 + 1, c, c)`` (cached)."""
        if self._half is None:
            self._half = conv_blocks(self.weight, self.grid, half=True)
        return self._half

    def matvec(self, z: Tensor) -> Tensor:
        """``W z``."""
        if self._fits():
            return circular_conv2d(z, self.weight)
        return _apply_blocks(z, conv_blocks(self.weight, self.grid, half=True), self.grid)

    def rmatvec(self, z: Tensor) -> Tensor:
        """``W^T z``."""
        if self._fits():
            return circular_conv2d(z, self.weight.transpose(0, 1).flip(-2, -1))
        return _apply_blocks(z, conv_blocks(self.weight, self.grid, half=True), self.grid, adjoint=True)

    def frequency_blocks(self, half: bool = False) -> Tensor:
        """``(F, c, c)`` complex blocks ``W_f``, ``F = H W`` (or ``H (W // 2 + 1)`` with ``half``)."""
        b = conv_blocks(self.weight, self.grid, half=half)
        return b.reshape(-1, b.shape[-2], b.shape[-1])

    def resolvent(self, alpha: float) -> FourierResolvent:
        """Per frequency ``V_f = (I + a (I - W_f))^{-1}``, inverted once (cached for the last ``alpha``)."""
        if self._res is None or self._res.alpha != alpha:
            Kf = self.half_blocks().detach()
            eye = torch.eye(Kf.shape[-1], dtype=Kf.dtype, device=Kf.device)
            self._res = FourierResolvent(alpha, _inverse_or_nan(eye + alpha * (eye - Kf)), self.grid)
        return self._res

    def margin_and_norm(self) -> tuple[Tensor, Tensor]:
        """Exact ``(mu(W), L(W))`` from the rfft blocks (cached)."""
        if self._margin is None:
            self._margin = blocks_margin_and_norm(self.half_blocks().detach())
        return self._margin

    def to_dense(self) -> Tensor:
        """Dense ``(c H W, c H W)`` matrix (row-major flattening of ``(c, H, W)``); small sizes only."""
        n = math.prod(self.state_shape)
        basis = torch.eye(n, dtype=self.weight.dtype, device=self.weight.device).reshape(n, *self.state_shape)
        return self.matvec(basis).reshape(n, n).mT


LinearOperatorLike = DenseOperator | ConvOperator
