"""Model registry: build an architecture by name for a given input shape and class count.

A builder is any callable ``builder(*, input_shape, num_classes, spec, bias_spec, **kwargs) -> nn.Module``.
Built-in names: ``mlp``, ``vgg3``, ``vgg7``, ``resnet20``. Other packages add theirs with
:func:`register_model` (e.g. ``mondeq``).

A registration may say what one *hidden width* (the CLI's ``--hidden``) means for that architecture:
``hidden="n"`` (the width is the keyword argument ``n``) or a callable ``width -> kwargs`` (the MLP
makes it two layers of that width). :func:`hidden_kwargs` applies it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from torch import nn

from qmargin.errors import ConfigError
from qmargin.models.layers import check_input_shape, check_num_classes, check_specs
from qmargin.models.mlp import MLP
from qmargin.models.mobilenet import mobilenet_v2
from qmargin.models.resnet import resnet18, resnet20
from qmargin.models.vgg import vgg3, vgg7
from qmargin.quant import QuantSpec

__all__ = [
    "ModelBuilder",
    "HiddenMapper",
    "register_model",
    "build_model",
    "available_models",
    "hidden_kwargs",
    "check_model_kwargs",
]

ModelBuilder = Callable[..., nn.Module]
HiddenMapper = Callable[[int], dict[str, Any]]
"""``mapper(width) -> builder kwargs``: what one hidden width means for an architecture."""

_BUILDERS: dict[str, ModelBuilder] = {}
_HIDDEN: dict[str, HiddenMapper] = {}


def register_model(
    name: str, builder: ModelBuilder, *, hidden: str | HiddenMapper | None = None, overwrite: bool = False
) -> None:
    """Make ``builder`` available to :func:`build_model` under ``name`` (case-insensitive).

    ``hidden`` says what a single hidden width means for it (:func:`hidden_kwargs`): the name of the
    builder's keyword argument that takes it, or a callable ``width -> kwargs``; ``None``: the
    architecture has no such width. Raises ``ValueError`` if the name is taken and ``overwrite`` is
    False (a programming error).
    """
    key = name.lower()
    if not key or not callable(builder):
        raise ValueError("register_model needs a non-empty name and a callable builder")
    if key in _BUILDERS and not overwrite:
        raise ValueError(f"model {key!r} is already registered (pass overwrite=True to replace it)")
    if hidden is not None and not (isinstance(hidden, str) and hidden) and not callable(hidden):
        raise ValueError("register_model: hidden must be a keyword name, a callable or None")
    _BUILDERS[key] = builder
    _HIDDEN.pop(key, None)
    if isinstance(hidden, str):
        _HIDDEN[key] = partial(_width_as, hidden)
    elif hidden is not None:
        _HIDDEN[key] = hidden


def _width_as(keyword: str, width: int) -> dict[str, Any]:
    return {keyword: width}


def _key(name: str) -> str:
    key = str(name).lower()
    if key not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return key


def hidden_kwargs(name: str, width: int) -> dict[str, Any]:
    """The builder kwargs that give model ``name`` the hidden width ``width`` (``--hidden``).

    Built in: ``mlp`` -> ``{"hidden": [width, width]}``, ``vgg3`` / ``vgg7`` -> ``{"hidden": width}``
    (the classifier's hidden layer), ``mondeq`` -> ``{"n": width}``. An unknown model, one without a
    hidden width (``resnet20``) or a width < 1 raises :class:`~qmargin.errors.ConfigError`.
    """
    key = _key(name)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"hidden width must be a positive integer, got {width!r}")
    mapper = _HIDDEN.get(key)
    if mapper is None:
        raise ConfigError(f"model {key!r} has no single hidden width to set")
    return dict(mapper(width))


def check_model_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """``ConfigError`` unless model ``name`` is registered and its builder takes every name in ``kwargs``.

    Values are not checked here (the builder does that when it runs).
    """
    key = _key(name)
    try:
        sig = inspect.signature(_BUILDERS[key])
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    fixed = {"input_shape", "num_classes", "spec", "bias_spec"}
    options = [n for n, p in sig.parameters.items() if n not in fixed and p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        accepted = ", ".join(options) or "none"
        raise ConfigError(f"model {key!r} takes no option {', '.join(unknown)} (options: {accepted})")


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_BUILDERS)


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
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
    key = _key(name)
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
        math.prod(input_shape),
        num_classes,
        hidden,
        spec=spec,
        bias_spec=bias_spec,
        batchnorm=batchnorm,
        activation=activation,
        keep_first_last_float=keep_first_last_float,
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
        input_shape,
        num_classes,
        spec=spec,
        bias_spec=bias_spec,
        channels=channels,
        hidden=hidden,
        batchnorm=batchnorm,
        keep_first_last_float=keep_first_last_float,
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
        input_shape,
        num_classes,
        spec=spec,
        bias_spec=bias_spec,
        channels=channels,
        hidden=hidden,
        batchnorm=batchnorm,
        keep_first_last_float=keep_first_last_float,
    )


def _build_resnet20(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    shortcut: str = "A",
    widths: Sequence[int] = (16, 32, 64),
    keep_first_last_float: bool = False,
) -> nn.Module:
    return resnet20(
        num_classes,
        input_shape[0],
        spec,
        bias_spec,
        shortcut=shortcut,
        widths=widths,
        keep_first_last_float=keep_first_last_float,
    )


def _build_mobilenetv2(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    width: float = 1.0,
    keep_first_last_float: bool = False,
) -> nn.Module:
    return mobilenet_v2(
        input_shape, num_classes, spec, bias_spec, width=width, keep_first_last_float=keep_first_last_float
    )


def _build_resnet18(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    spec: QuantSpec | None,
    bias_spec: QuantSpec | None = None,
    keep_first_last_float: bool = False,
) -> nn.Module:
    return resnet18(input_shape, num_classes, spec, bias_spec, keep_first_last_float=keep_first_last_float)


def _mlp_hidden(width: int) -> dict[str, Any]:
    return {"hidden": [width, width]}  # two hidden layers of that width (the default MLP's shape)


register_model("mlp", _build_mlp, hidden=_mlp_hidden)
register_model("vgg3", _build_vgg3, hidden="hidden")
register_model("vgg7", _build_vgg7, hidden="hidden")
register_model("resnet20", _build_resnet20)
register_model("resnet18", _build_resnet18)
register_model("mobilenetv2", _build_mobilenetv2)
