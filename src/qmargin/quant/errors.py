"""Errors of :mod:`qmargin.quant`: a bad spec, a non-finite tensor, a tie that cannot be kept, a corrupt
integer state.

They are :class:`qmargin.errors.ConfigError` subclasses (hence ``ValueError`` s), so the CLI shows
them as one line with exit status 2; every message names the field, tensor, layer or state key at
fault.
"""

from __future__ import annotations

from qmargin.errors import ConfigError

__all__ = ["QuantConfigError", "NonFiniteTensorError", "TiedParameterError", "IntegerStateError"]


class QuantConfigError(ConfigError):
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
