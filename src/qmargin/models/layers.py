"""Layer factories shared by the architectures: float when ``spec`` is None, quantized otherwise.

Every architecture of :mod:`qmargin.models` builds its weight layers through :func:`linear` and
:func:`conv2d`. With ``spec=None`` they return plain ``nn.Linear`` / ``nn.Conv2d``; with a
:class:`~qmargin.quant.QuantSpec` they return :class:`~qmargin.quant.QuantLinear` /
:class:`~qmargin.quant.QuantConv2d`, whose weight (and, with ``bias_spec``, bias) is stored as integer
codes and seen by ``qmargin.faults.inject``. BatchNorm parameters and statistics always stay float.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from qmargin.errors import ConfigError
from qmargin.quant import QuantConv2d, QuantLinear, QuantSpec

__all__ = [
    "linear",
    "conv2d",
    "activation",
    "check_specs",
    "check_input_shape",
    "check_num_classes",
    "ACTIVATIONS",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "hardtanh": nn.Hardtanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


def linear(
    in_features: int,
    out_features: int,
    *,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    bias: bool = True,
) -> nn.Linear:
    """``nn.Linear`` (``spec=None``) or ``QuantLinear`` storing its weight under ``spec``."""
    if spec is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return QuantLinear(in_features, out_features, bias=bias, spec=spec, bias_spec=bias_spec)


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
    groups: int = 1,
) -> nn.Conv2d:
    """``nn.Conv2d`` (``spec=None``) or ``QuantConv2d`` storing its weight under ``spec``; ``groups``
    as in ``nn.Conv2d`` (``groups = in_channels = out_channels``: a depthwise convolution, whose
    ``[C, 1, k, k]`` kernel is stored as codes like any other, per-channel scales per output channel)."""
    if spec is None:
        return nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias, groups=groups
        )
    return QuantConv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        bias=bias,
        groups=groups,
        spec=spec,
        bias_spec=bias_spec,
    )


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (``relu``, ``tanh``, ``hardtanh``, ``gelu``, ``sigmoid``)."""
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[key]()


def check_specs(spec: QuantSpec | None, bias_spec: QuantSpec | None) -> None:
    """Reject a ``bias_spec`` without a weight ``spec`` (a float model stores nothing as codes)."""
    if spec is not None and not isinstance(spec, QuantSpec):
        raise ConfigError(f"spec must be a QuantSpec or None, got {type(spec).__name__}")
    if bias_spec is not None and not isinstance(bias_spec, QuantSpec):
        raise ConfigError(f"bias_spec must be a QuantSpec or None, got {type(bias_spec).__name__}")
    if spec is None and bias_spec is not None:
        raise ConfigError("bias_spec given without spec: a float model (spec=None) stores no codes")


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` as a tuple of positive ints, or a ``ConfigError``."""
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ConfigError(f"input_shape must be (channels, height, width) of positive ints, got {shape}")
    c, h, w = shape
    return (c, h, w)


def check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes
