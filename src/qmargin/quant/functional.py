"""Functional core of weight quantization (design.md §1).

Plain tensors in, plain tensors out. The stored form of a tensor is ``(codes, scale, zero_point)``:

* symmetric, ``b >= 2``: ``qmax = 2**(b-1) - 1``, ``scale = max|w| / qmax`` (``w_max / qmax`` with
  clipping), ``code = clamp(round(w / scale), -qmax, qmax)``, ``w_hat = code * scale``; codes are
  ``int8`` and the zero point is 0.
* symmetric, ``b = 1``: ``code = sign(w)`` in ``{-1, +1}`` (0 maps to +1), ``scale = mean|w|``
  (``w_max`` with clipping), ``w_hat = code * scale``.
* asymmetric: ``scale = (hi - lo) / (2**b - 1)`` with ``lo = min(min w, 0)``, ``hi = max(max w, 0)``
  (``[-w_max, w_max]`` with clipping), ``zero_point = clamp(round(-lo / scale), 0, 2**b - 1)``,
  ``code = clamp(round(w / scale) + zero_point, 0, 2**b - 1)``, ``w_hat = (code - zero_point) * scale``;
  codes are ``uint8``.

``round`` is round-half-to-even (``torch.round``). Per-channel scales run along dim 0 (output
channels) and have shape ``[C_out]``; per-tensor scales are 0-d tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qmargin.quant.spec import QuantSpec

__all__ = ["quantize", "dequantize", "fake_quantize", "compute_scale", "code_dtype"]


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """``int8`` for symmetric (two's complement) codes, ``uint8`` for asymmetric (unsigned) ones.

    Precision studies above 8 bits use ``int16`` (symmetric) and ``int32`` (asymmetric) codes.
    """
    if spec.bits > 8:
        return torch.int16 if spec.symmetric else torch.int32
    return torch.int8 if spec.symmetric else torch.uint8


def _reduce(w: Tensor, spec: QuantSpec, fn: str) -> Tensor:
    """Reduce over all dims (per tensor) or all but dim 0 (per channel)."""
    if spec.per_channel and w.dim() >= 1:
        flat = w.reshape(w.shape[0], -1)
        return getattr(flat, fn)(dim=1) if fn != "mean" else flat.mean(dim=1)
    return getattr(w, fn)()


def _broadcast(t: Tensor, w: Tensor, spec: QuantSpec) -> Tensor:
    if spec.per_channel and w.dim() >= 1 and t.dim() == 1:
        return t.reshape((-1,) + (1,) * (w.dim() - 1))
    return t


def compute_scale(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point of ``w`` under ``spec`` (no gradient flows through them)."""
    w = w.detach()
    if spec.symmetric:
        if spec.bits == 1:
            s = _reduce(w.abs(), spec, "mean") if spec.w_max is None else _full_like(w, spec, spec.w_max)
        else:
            amax = _reduce(w.abs(), spec, "amax") if spec.w_max is None else _full_like(w, spec, spec.w_max)
            s = amax / spec.qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, torch.zeros_like(s, dtype=torch.int32)
    if spec.w_max is None:
        lo = _reduce(w, spec, "amin").clamp(max=0)
        hi = _reduce(w, spec, "amax").clamp(min=0)
    else:
        lo = _full_like(w, spec, -spec.w_max)
        hi = _full_like(w, spec, spec.w_max)
    s = (hi - lo) / spec.qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    zp = torch.round(-lo / s).clamp(0, spec.qmax).to(torch.int32)
    return s, zp


def _full_like(w: Tensor, spec: QuantSpec, value: float) -> Tensor:
    if spec.per_channel and w.dim() >= 1:
        return torch.full((w.shape[0],), float(value), dtype=w.dtype, device=w.device)
    return torch.tensor(float(value), dtype=w.dtype, device=w.device)


def quantize(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``w`` to its stored form ``(codes, scale, zero_point)``.

    ``codes`` has ``w``'s shape and dtype ``int8`` (symmetric) or ``uint8`` (asymmetric); ``scale``
    has ``w``'s float dtype; ``zero_point`` is ``int32``. Both are 0-d (per tensor) or ``[C_out]``.
    """
    if not torch.is_floating_point(w):
        raise TypeError(f"quantize expects a floating point tensor, got {w.dtype}")
    scale, zp = compute_scale(w, spec)
    w = w.detach()
    s = _broadcast(scale, w, spec)
    if spec.symmetric and spec.bits == 1:
        codes = torch.where(w >= 0, 1, -1)
    elif spec.symmetric:
        codes = torch.round(w / s).clamp(spec.qmin, spec.qmax)
    else:
        codes = (torch.round(w / s) + _broadcast(zp, w, spec)).clamp(0, spec.qmax)
    return codes.to(code_dtype(spec)), scale, zp


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """``w_hat = (code - zero_point) * scale`` in ``scale``'s dtype."""
    s = _broadcast(scale, codes, spec)
    if spec.symmetric:
        return codes.to(scale.dtype) * s
    return (codes.to(scale.dtype) - _broadcast(zero_point, codes, spec).to(scale.dtype)) * s


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: ``dequantize(quantize(w))`` exactly. Backward: straight-through inside the clip range."""

    @staticmethod
    def forward(ctx, w: Tensor, spec: QuantSpec) -> Tensor:  # type: ignore[override]
        codes, scale, zp = quantize(w, spec)
        w_hat = dequantize(codes, scale, zp, spec)
        if spec.w_max is not None:
            ctx.save_for_backward(w.abs() <= spec.w_max)
        else:
            ctx.save_for_backward()
        return w_hat

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.saved_tensors:
            (inside,) = ctx.saved_tensors
            return grad * inside.to(grad.dtype), None
        return grad, None


def fake_quantize(w: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize-dequantize with a straight-through estimator (STE).

    The forward value is bit-for-bit ``dequantize(*quantize(w, spec), spec)``, so a model trained
    through it computes exactly what the stored integer form computes. The gradient is the identity
    for weights inside the clip range and 0 for weights clipped by ``w_max``.
    """
    return _FakeQuantSTE.apply(w, spec)
