"""Errors of :mod:`qmargin.quant`: a bad spec, a non-finite tensor, a tie that cannot be kept, a corrupt
integer state.

``qmargin.quant`` imports nothing of qmargin (docs/architecture.md), so these are ``ValueError``
subclasses rooted here, not :class:`qmargin.errors.ConfigError`; every message is one line and names
the field, tensor, layer or state key at fault.
"""

from __future__ import annotations

__all__ = ["QuantConfigError", "NonFiniteTensorError", "TiedParameterError", "IntegerStateError"]


class QuantConfigError(ValueError):
    """A quantization input is wrong: a ``QuantSpec`` field of the wrong type or out of range, ..."""


class NonFiniteTensorError(QuantConfigError):
    """A tensor to be quantized, or a stored scale / zero point, holds NaN or an infinity."""


class TiedParameterError(QuantConfigError):
    """A tie (one module under two names, one Parameter in two places) that cannot be kept.

    Raised by :func:`qmargin.quant.quantize_model` when the places of one shared module or Parameter
    would be treated differently (quantized at one, float at another, or with different specs), and
    when tied stored tensors disagree.
    """


class IntegerStateError(QuantConfigError):
    """An integer state (codes, scales, zero points) is corrupt or does not fit the model."""
