"""Model registry: build an architecture by name for a given input shape and class count.

A builder is any callable ``builder(*, input_shape, num_classes, spec, bias_spec, **kwargs) -> nn.Module``.
Built-in names: ``mlp``, ``vgg3``, ``vgg7``, ``resnet20``. Other packages add theirs with
:func:`register_model` (e.g. ``mondeq``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from qmargin.errors import ConfigError
from qmargin.models.layers import check_input_shape, check_num_classes, check_specs
from qmargin.models.mlp import MLP
from qmargin.models.resnet import resnet20
from qmargin.models.vgg import vgg3, vgg7
from qmargin.quant import QuantSpec

__all__ = ["ModelBuilder", "register_model", "build_model", "available_models"]

ModelBuilder = Callable[..., nn.Module]

_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str, builder: ModelBuilder, *, overwrite: bool = False) -> None:
    """Make ``builder`` available to :func:`build_model` under ``name`` (case-insensitive).

    Raises ``ValueError`` if the name is taken and ``overwrite`` is False (a programming error).
    """
    key = name.lower()
    if not key or not callable(builder):
        raise ValueError("register_model needs a non-empty name and a callable builder")
    if key in _BUILDERS and not overwrite:
        raise ValueError(f"model {key!r} is already registered (pass overwrite=True to replace it)")
    _BUILDERS[key] = builder


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_BUILDERS)


def build_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered architecture ``name`` for inputs of ``input_shape = (C, H, W)``.

    ``spec=None`` gives a float model. Extra keyword arguments go to the builder (e.g. ``hidden``,
    ``batchnorm``, ``shortcut``, ``keep_first_last_float``). An unknown name, an option the builder
    does not take, or a bad value raises :class:`~qmargin.errors.ConfigError`.
    """
    key = str(name).lower()
    if key not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    builder = _BUILDERS[key]
    shape = check_input_shape(input_shape)
    check_num_classes(num_classes)
    check_specs(spec, bias_spec)
    call = dict(input_shape=shape, num_classes=num_classes, spec=spec, bias_spec=bias_spec, **kwargs)
    try:
        inspect.signature(builder).bind(**call)
    except TypeError as err:
        raise ConfigError(f"model {key!r}: {err}") from None
    except ValueError:  # builtins without a signature: let the call itself complain
        pass
    return builder(**call)


# -- built-in builders ---------------------------------------------------------------------------


def _build_mlp(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    hidden: Sequence[int] = (256, 256),
    batchnorm: bool = False,
    activation: str = "relu",
    keep_first_last_float: bool = False,
) -> nn.Module:
    return MLP(
        math.prod(input_shape), num_classes, hidden, spec=spec, bias_spec=bias_spec, batchnorm=batchnorm,
        activation=activation, keep_first_last_float=keep_first_last_float,
    )


def _build_vgg3(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    channels: Sequence[int] = (64, 64),
    hidden: int = 2048,
    batchnorm: bool = True,
    keep_first_last_float: bool = False,
) -> nn.Module:
    return vgg3(
        input_shape, num_classes, spec=spec, bias_spec=bias_spec, channels=channels, hidden=hidden,
        batchnorm=batchnorm, keep_first_last_float=keep_first_last_float,
    )


def _build_vgg7(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    channels: Sequence[int] = (128, 256, 512),
    hidden: int = 1024,
    batchnorm: bool = True,
    keep_first_last_float: bool = False,
) -> nn.Module:
    return vgg7(
        input_shape, num_classes, spec=spec, bias_spec=bias_spec, channels=channels, hidden=hidden,
        batchnorm=batchnorm, keep_first_last_float=keep_first_last_float,
    )


def _build_resnet20(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    shortcut: str = "A",
    keep_first_last_float: bool = False,
) -> nn.Module:
    return resnet20(
        num_classes, input_shape[0], spec, bias_spec, shortcut=shortcut,
        keep_first_last_float=keep_first_last_float,
    )


register_model("mlp", _build_mlp)
register_model("vgg3", _build_vgg3)
register_model("vgg7", _build_vgg7)
register_model("resnet20", _build_resnet20)
