"""Realized linear operators ``W`` of a monotone equilibrium network (design.md §5): the functional core.

A *realized operator* holds one plain tensor (its ``weight``) and knows how to apply ``W``, ``W^T``,
the linear resolvent ``V = (I + a (I - W))^{-1}`` (and ``V^T``), and its exact monotonicity margin
``mu(W) = lambda_min(sym(I - W))`` and Lipschitz constant ``L(W) = ||I - W||_2``. The solvers
(:mod:`qmargin.deq.solvers`) and the implicit backward (:mod:`qmargin.deq.layer`) only see this
interface, so they serve every parameterization, float or quantized.

* :class:`DenseOperator`: ``weight`` is the ``(n, n)`` matrix ``W``; states are ``(N, n)``.
* :class:`ConvOperator`: ``weight`` is a ``(c, c, kh, kw)`` kernel (any size) of a circular
  convolution on a ``(H, W)`` grid; states are ``(N, c, H, W)``. The operator is block-diagonal in
  the 2-D DFT: one ``c x c`` complex block per frequency
  (:func:`qmargin.deq.spectral.conv_blocks`), so the resolvent,
  ``mu`` and ``L`` are exact per-frequency computations (no CG, no power iteration). A multi-tier
  network becomes a ``ConvOperator`` on its polyphase (space-to-depth) state, see
  :mod:`qmargin.deq.monotone`.

The convolution convention (kernel centred at ``(kh // 2, kw // 2)``, odd and even sizes), the
per-frequency blocks and the formulas for ``mu`` and ``L`` live in :mod:`qmargin.deq.spectral`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from qmargin.deq.spectral import conv_blocks, kernel_centre, margin_and_lipschitz

__all__ = [
    "Operator",
    "Resolvent",
    "DenseOperator",
    "ConvOperator",
    "DenseResolvent",
    "FourierResolvent",
    "circular_conv2d",
    "circular_conv2d_adjoint",
    "tiers_to_polyphase",
    "polyphase_to_tiers",
]


# --------------------------------------------------------------------------------------------------
# Circular convolutions and the polyphase (space-to-depth) form of multi-resolution states
# --------------------------------------------------------------------------------------------------
def circular_conv2d(
    x: Tensor, kernel: Tensor, stride: int = 1, centre: tuple[int, int] | None = None
) -> Tensor:
    """``F.conv2d`` of ``x`` padded circularly so that tap ``centre`` sits on the output pixel.

    ``y[o, i, j] = sum_{c, p, q} K[o, c, p, q] x[c, s i + p - rh, s j + q - rw]`` (indices mod the
    grid) with ``(rh, rw) = centre``, by default ``(kh // 2, kw // 2)``
    (:func:`qmargin.deq.spectral.kernel_centre`): padding ``rh`` before and ``kh - 1 - rh`` after, so
    the output has the input's size (divided by the stride) for odd and even kernels alike.
    """
    kh, kw = kernel.shape[-2], kernel.shape[-1]
    rh, rw = (kernel_centre(kh), kernel_centre(kw)) if centre is None else centre
    return F.conv2d(F.pad(x, (rw, kw - 1 - rw, rh, kh - 1 - rh), mode="circular"), kernel, stride=stride)


def _adjoint_kernel(kernel: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Kernel and centre of ``W^T`` for the stride-1 circular convolution ``W`` with ``kernel``.

    ``W^T`` is the convolution with the transposed, flipped kernel, whose centre is ``k - 1 - k // 2``
    (the same as ``k // 2`` for odd ``k``, one less for even ``k``).
    """
    kh, kw = kernel.shape[-2], kernel.shape[-1]
    centre = (kh - 1 - kernel_centre(kh), kw - 1 - kernel_centre(kw))
    return kernel.transpose(0, 1).flip(-2, -1), centre


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
    if stride == 1:
        kernel_T, centre = _adjoint_kernel(kernel)
        return circular_conv2d(y, kernel_T, centre=centre)
    if kernel.shape[-2] % 2 == 0 or kernel.shape[-1] % 2 == 0:
        raise ValueError(f"the strided adjoint needs an odd kernel, got {tuple(kernel.shape[-2:])}")
    rh, rw = kernel.shape[-2] // 2, kernel.shape[-1] // 2
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
# The operator protocol
# --------------------------------------------------------------------------------------------------
@runtime_checkable
class Resolvent(Protocol):
    """``V = (I + a (I - W))^{-1}`` for one step ``a``: applies ``V`` and ``V^T`` to states."""

    alpha: float

    def apply(self, z: Tensor) -> Tensor: ...

    def apply_T(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class Operator(Protocol):
    """A realized linear operator ``W``: what the solvers and the implicit backward see.

    ``weight`` is the one tensor behind it; ``state_shape`` the shape of one state (without the
    batch dimension). :class:`DenseOperator` and :class:`ConvOperator` satisfy it.
    """

    weight: Tensor

    @property
    def state_shape(self) -> tuple[int, ...]: ...

    def with_weight(self, weight: Tensor) -> Operator:
        """The same kind of operator with another weight (same shape)."""
        ...

    def matvec(self, z: Tensor) -> Tensor:
        """``W z`` for states ``(N, *state_shape)``."""
        ...

    def rmatvec(self, z: Tensor) -> Tensor:
        """``W^T z``."""
        ...

    def resolvent(self, alpha: float) -> Resolvent:
        """``V = (I + alpha (I - W))^{-1}``."""
        ...

    def margin_and_norm(self) -> tuple[Tensor, Tensor]:
        """Exact ``(mu(W), L(W))`` (:func:`qmargin.deq.spectral.margin_and_lipschitz`)."""
        ...

    def to_dense(self) -> Tensor:
        """``W`` as a dense matrix on the flattened state."""
        ...


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
            self._margin = margin_and_lipschitz(self.weight.detach())
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
        """Circular padding (at most ``k // 2`` per side) needs pads no larger than the grid."""
        kh, kw = self.weight.shape[-2], self.weight.shape[-1]
        return kernel_centre(kh) <= self.grid[0] and kernel_centre(kw) <= self.grid[1]

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
            kernel_T, centre = _adjoint_kernel(self.weight)
            return circular_conv2d(z, kernel_T, centre=centre)
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
            self._margin = margin_and_lipschitz(self.half_blocks().detach())
        return self._margin

    def to_dense(self) -> Tensor:
        """Dense ``(c H W, c H W)`` matrix (row-major flattening of ``(c, H, W)``); small sizes only."""
        n = math.prod(self.state_shape)
        basis = torch.eye(n, dtype=self.weight.dtype, device=self.weight.device).reshape(n, *self.state_shape)
        return self.matvec(basis).reshape(n, n).mT
