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

Non-finite weights. :func:`quantize` and :func:`compute_scale` refuse a tensor holding NaN or an
infinity (:class:`qmargin.quant.errors.NonFiniteTensorError`, naming the tensor): there is no stored
form of such a tensor. :func:`fake_quantize`, the training hot path, does not synchronise with the
device to check; it propagates instead (non-finite weights give non-finite outputs, so the loss shows
it) and never maps them to finite values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qmargin.quant.errors import IntegerStateError, NonFiniteTensorError
from qmargin.quant.spec import QuantSpec

__all__ = [
    "quantize",
    "dequantize",
    "fake_quantize",
    "compute_scale",
    "code_dtype",
    "check_finite",
    "check_stored",
    "word_range",
]


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


def check_finite(w: Tensor, name: str | None = None) -> None:
    """Raise :class:`NonFiniteTensorError` if ``w`` holds NaN or an infinity (``name`` in the message)."""
    if not torch.is_floating_point(w):
        return
    finite = torch.isfinite(w)
    if bool(finite.all()):
        return
    bad = w.detach()[~finite]
    n_nan = int(torch.isnan(bad).sum())
    n_pos = int((bad == float("inf")).sum())
    n_neg = int(bad.numel() - n_nan - n_pos)
    what = ", ".join(f"{n} {k}" for n, k in ((n_nan, "nan"), (n_pos, "+inf"), (n_neg, "-inf")) if n)
    label = f"{name!r}" if name else f"tensor of shape {tuple(w.shape)}"
    raise NonFiniteTensorError(f"cannot quantize {label}: it holds non-finite values ({what})")


def compute_scale(w: Tensor, spec: QuantSpec, *, name: str | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero point of ``w`` under ``spec`` (no gradient flows through them).

    A ``w`` holding NaN or an infinity raises :class:`NonFiniteTensorError` naming ``name``.
    """
    check_finite(w, name)
    return _compute_scale(w, spec)


def _compute_scale(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """:func:`compute_scale` without the finiteness check: NaN / inf statistics stay non-finite.

    Only an exactly-zero scale (an all-zero tensor or channel) is replaced by 1; the old guard
    ``where(s > 0, s, 1)`` also turned a NaN scale into 1, silently quantizing garbage.
    """
    w = w.detach()
    if spec.symmetric:
        if spec.bits == 1:
            s = _reduce(w.abs(), spec, "mean") if spec.w_max is None else _full_like(w, spec, spec.w_max)
        else:
            amax = _reduce(w.abs(), spec, "amax") if spec.w_max is None else _full_like(w, spec, spec.w_max)
            s = amax / spec.qmax
        s = torch.where(s == 0, torch.ones_like(s), s)
        return s, torch.zeros_like(s, dtype=torch.int32)
    if spec.w_max is None:
        lo = _reduce(w, spec, "amin").clamp(max=0)
        hi = _reduce(w, spec, "amax").clamp(min=0)
    else:
        lo = _full_like(w, spec, -spec.w_max)
        hi = _full_like(w, spec, spec.w_max)
    s = (hi - lo) / spec.qmax
    s = torch.where(s == 0, torch.ones_like(s), s)
    zp = torch.round(-lo / s).clamp(0, spec.qmax).to(torch.int32)
    return s, zp


def _full_like(w: Tensor, spec: QuantSpec, value: float) -> Tensor:
    if spec.per_channel and w.dim() >= 1:
        return torch.full((w.shape[0],), float(value), dtype=w.dtype, device=w.device)
    return torch.tensor(float(value), dtype=w.dtype, device=w.device)


def quantize(w: Tensor, spec: QuantSpec, *, name: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``w`` to its stored form ``(codes, scale, zero_point)``.

    ``codes`` has ``w``'s shape and dtype ``int8`` (symmetric) or ``uint8`` (asymmetric); ``scale``
    has ``w``'s float dtype; ``zero_point`` is ``int32``. Both are 0-d (per tensor) or ``[C_out]``.
    A ``w`` holding NaN or an infinity raises :class:`NonFiniteTensorError` naming ``name``.
    """
    if not torch.is_floating_point(w):
        raise TypeError(f"quantize expects a floating point tensor, got {w.dtype}")
    check_finite(w, name)
    return _quantize(w, spec)


def _quantize(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`quantize` without the finiteness check (the caller checked, or propagates)."""
    scale, zp = _compute_scale(w, spec)
    w = w.detach()
    s = _broadcast(scale, w, spec)
    if spec.symmetric and spec.bits == 1:
        codes = torch.where(w >= 0, 1, -1)
    elif spec.symmetric:
        codes = torch.round(w / s).clamp(spec.qmin, spec.qmax)
    else:
        codes = (torch.round(w / s) + _broadcast(zp, w, spec)).clamp(0, spec.qmax)
    return codes.to(code_dtype(spec)), scale, zp


def word_range(spec: QuantSpec) -> tuple[int, int]:
    """Smallest and largest code a stored b-bit word can decode to (wider than ``qmin..qmax``).

    Symmetric ``b >= 2``: ``[-2**(b-1), 2**(b-1) - 1]`` (a corrupted word may decode to ``-2**(b-1)``);
    ``b = 1``: ``[-1, 1]`` (and 0 is no code); asymmetric: ``[0, 2**b - 1]``.
    """
    if spec.symmetric:
        return (-1, 1) if spec.bits == 1 else (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1)
    return 0, 2**spec.bits - 1


def check_stored(
    codes: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, shape: tuple[int, ...], name: str
) -> None:
    """Refuse a stored form that ``quantize(w, spec)`` of a ``shape`` tensor could not have produced.

    Checks, naming the key ``{name}.codes`` / ``.scale`` / ``.zero_point``: tensors (not other
    objects); codes of exactly ``code_dtype(spec)`` (no silent cast), of ``shape``, with every value a
    word of ``spec.bits`` bits (:func:`word_range`; the sign code has no 0); a floating, finite,
    positive scale and an ``int32`` zero point, both 0-d (per tensor) or ``[C_out]`` (per channel),
    the zero point 0 for symmetric codes and in ``[0, 2**b - 1]`` otherwise. Raises
    :class:`IntegerStateError`.
    """
    for suffix, t in (("codes", codes), ("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, Tensor):
            raise IntegerStateError(f"{name}.{suffix} must be a tensor, got {type(t).__name__}")
    want = code_dtype(spec)
    if codes.dtype != want:
        raise IntegerStateError(f"{name}.codes must be {want} for {spec}, got {codes.dtype}")
    if tuple(codes.shape) != tuple(shape):
        raise IntegerStateError(
            f"{name}.codes has shape {tuple(codes.shape)}, the model's tensor has {tuple(shape)}"
        )
    lo, hi = word_range(spec)
    if codes.numel():
        c = codes.to(torch.int64)
        bad = (c < lo) | (c > hi)
        if spec.symmetric and spec.bits == 1:
            bad |= c == 0
        if bool(bad.any()):
            value = int(c[bad][0])
            raise IntegerStateError(
                f"{name}.codes holds {int(bad.sum())} values outside the {spec.bits}-bit words "
                f"(e.g. {value}; range {lo}..{hi})"
            )
    per_channel = spec.per_channel and len(shape) >= 1
    want_shape = (shape[0],) if per_channel else ()
    for suffix, t in (("scale", scale), ("zero_point", zero_point)):
        if tuple(t.shape) != want_shape:
            raise IntegerStateError(f"{name}.{suffix} has shape {tuple(t.shape)}, expected {want_shape}")
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            raise IntegerStateError(f"{name}.{suffix} holds non-finite values")
    if not torch.is_floating_point(scale):
        raise IntegerStateError(f"{name}.scale must be a floating point tensor, got {scale.dtype}")
    if scale.numel() and not bool((scale > 0).all()):
        raise IntegerStateError(f"{name}.scale must be positive, got min {float(scale.min())}")
    if zero_point.dtype != torch.int32:
        raise IntegerStateError(f"{name}.zero_point must be int32, got {zero_point.dtype}")
    if zero_point.numel():
        zmin, zmax = int(zero_point.min()), int(zero_point.max())
        zhi = 0 if spec.symmetric else spec.qmax
        if zmin < 0 or zmax > zhi:
            raise IntegerStateError(f"{name}.zero_point must be in 0..{zhi}, got {zmin}..{zmax}")


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """``w_hat = (code - zero_point) * scale`` in ``scale``'s dtype."""
    s = _broadcast(scale, codes, spec)
    if spec.symmetric:
        return codes.to(scale.dtype) * s
    return (codes.to(scale.dtype) - _broadcast(zero_point, codes, spec).to(scale.dtype)) * s


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: ``dequantize(quantize(w))`` exactly. Backward: straight-through inside the clip range."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, spec: QuantSpec) -> Tensor:
        codes, scale, zp = _quantize(w, spec)
        w_hat = dequantize(codes, scale, zp, spec)
        # No host sync here (hot path): non-finite weights stay non-finite instead of raising.
        w_hat = torch.where(torch.isfinite(w), w_hat, w.detach())
        if spec.w_max is not None:
            ctx.save_for_backward(w.abs() <= spec.w_max)
        else:
            ctx.save_for_backward()
        return w_hat

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.saved_tensors:
            (inside,) = ctx.saved_tensors
            return grad * inside.to(grad.dtype), None
        return grad, None


def fake_quantize(w: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize-dequantize with a straight-through estimator (STE).

    The forward value is bit-for-bit ``dequantize(*quantize(w, spec), spec)``, so a model trained
    through it computes exactly what the stored integer form computes. The gradient is the identity
    for weights inside the clip range and 0 for weights clipped by ``w_max``. Non-finite weights are
    passed through unchanged (NaN stays NaN), never quantized to a finite value.
    """
    return _FakeQuantSTE.apply(w, spec)
