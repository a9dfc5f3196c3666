"""Margin-aware quantization-aware training of MonDEQs: keep ``||dW||_2 < mu(W)`` while training.

The certificate of design.md §5 asks ``||Q(W) - W||_2 < mu(W)``. Under a straight-through estimator
``Q(W) - W`` has no gradient, so :func:`quantization_residual` rebuilds it with the integer codes held
fixed and the scale differentiable,

    dW(W) = s(W) * stopgrad(code(W)) - W,      s = max|W_row| / qmax  (per row)  or  max|W| / qmax,

whose gradient pulls each weight towards its grid point and shrinks the largest weights that set the
step s. :func:`certified_margin_penalty` is the hinge

    P(W) = relu(||dW||_2 + delta - mu(W)),

zero once the model is certified with slack ``delta``; ``mu(W) = lambda_min(sym(I - W))`` and
``||dW||_2`` are :func:`qmargin.deq.spectral.margin` / :func:`~qmargin.deq.spectral.spectral_norm`,
differentiable through ``torch.linalg.eigvalsh`` / ``matrix_norm``.

Convolutional ``W`` (single convolution, or a multi-tier network on its polyphase grid, see
:mod:`qmargin.deq.monotone`): what is quantized is the assembled kernel ``K_W`` of the circular
convolution ``W`` on a ``grid = (H, W)``, so ``dW`` is the circular convolution with
``dK = s(K_W) * stopgrad(code(K_W)) - K_W`` (per output channel or per tensor). The unitary 2-D DFT
block-diagonalises both (design.md §5, :func:`qmargin.deq.spectral.conv_blocks`), so

    ||dW||_2 = max_f ||dK_f||_2,        mu(W) = min_f lambda_min(Herm(I - K_f)),

over the ``H (W // 2 + 1)`` rfft frequencies ``f`` (the others are complex conjugates with the same
singular values and eigenvalues). Both are *exact*, not bounds: the penalty of a convolutional
network is the FC penalty of the ``c H W``-dimensional operator, computed on ``c x c`` blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qmargin.deq import spectral
from qmargin.quant import QuantSpec, quantize
from qmargin.quant.functional import compute_scale

__all__ = [
    "quantization_residual",
    "differentiable_margin",
    "certified_quantities",
    "certified_margin_penalty",
]


def quantization_residual(W: Tensor, spec: QuantSpec) -> Tensor:
    """``dW = s(W) * code - W`` with the codes fixed and the scale ``s`` differentiable (see module doc)."""
    codes, _, zp = quantize(W, spec)
    codes = codes.to(W.dtype)
    if spec.symmetric and spec.bits > 1 and spec.w_max is None:
        if spec.per_channel:
            amax = W.abs().reshape(W.shape[0], -1).amax(dim=1).clamp_min(1e-12)
            s = (amax / spec.qmax).reshape((-1,) + (1,) * (W.dim() - 1))
        else:
            s = W.abs().amax().clamp_min(1e-12) / spec.qmax
        return s * codes - W
    # other quantizers: fixed scale and zero point
    scale, zp = compute_scale(W, spec)
    if spec.per_channel:
        scale = scale.reshape((-1,) + (1,) * (W.dim() - 1))
        zp = zp.reshape((-1,) + (1,) * (W.dim() - 1))
    return (codes - zp.to(W.dtype)) * scale - W


def differentiable_margin(W: Tensor) -> Tensor:
    """``mu(W) = lambda_min((I - W + (I - W)^H) / 2)`` for a dense ``(n, n)`` W or ``(F, c, c)`` blocks.

    :func:`qmargin.deq.spectral.margin` in ``W``'s precision, differentiable (where the smallest
    eigenvalue is simple).
    """
    return spectral.margin(W)


def certified_quantities(
    W: Tensor, spec: QuantSpec, *, grid: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """Differentiable ``(||dW||_2, mu(W))`` of the stored ``W``, exact (see the module doc).

    ``grid=None``: ``W`` is the dense ``(n, n)`` matrix. ``grid=(H, W)``: ``W`` is the ``(c, c, kh, kw)``
    kernel of a circular convolution on that grid, and both quantities are the max / min over the
    per-frequency blocks ``K_f = sum_{p,q} K[:, :, p, q] exp(2 pi i (u (p - rh) / H + v (q - rw) / W))``.
    """
    dW = quantization_residual(W, spec)
    if grid is None:
        return spectral.spectral_norm(dW), spectral.margin(W)
    if W.dim() != 4 or W.shape[0] != W.shape[1]:
        raise ValueError(f"a convolutional W is a (c, c, kh, kw) kernel, got shape {tuple(W.shape)}")
    return (
        spectral.spectral_norm(spectral.conv_blocks(dW, grid, half=True)),
        spectral.margin(spectral.conv_blocks(W, grid, half=True)),
    )


def certified_margin_penalty(
    W: Tensor, spec: QuantSpec, *, delta: float = 0.05, grid: tuple[int, int] | None = None
) -> Tensor:
    """``relu(||dW||_2 + delta - mu(W))``; 0 once certified with slack ``delta``.

    Dense (fully connected) ``W`` with ``grid=None``; the ``(c, c, kh, kw)`` kernel of a circular
    convolution on ``grid`` otherwise, with the exact per-frequency ``||dW||_2`` and ``mu(W)``
    (:func:`certified_quantities`).
    """
    dw, mu = certified_quantities(W, spec, grid=grid)
    return torch.relu(dw + delta - mu)
