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
differentiable through ``torch.linalg.eigvalsh`` / ``matrix_norm``. Implemented for fully connected W.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qmargin.deq import spectral
from qmargin.quant import QuantSpec, quantize
from qmargin.quant.functional import compute_scale

__all__ = ["quantization_residual", "differentiable_margin", "certified_margin_penalty"]


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


def certified_margin_penalty(W: Tensor, spec: QuantSpec, *, delta: float = 0.05) -> Tensor:
    """``relu(||dW||_2 + delta - mu(W))`` for a dense (fully connected) ``W``; 0 once certified with slack."""
    dW = quantization_residual(W, spec)
    return torch.relu(spectral.spectral_norm(dW) + delta - spectral.margin(W))
