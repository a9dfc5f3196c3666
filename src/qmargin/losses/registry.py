"""The loss registry: build a loss by name from keyword options its own builder validates.

A *builder* is any callable ``builder(**options) -> nn.Module``. :func:`register_loss` records it with

* the options it accepts (default: the keyword parameters of its signature), so an unknown option is
  one :class:`~qmargin.errors.ConfigError` naming the loss and what it accepts;
* its *config defaults* (default: the signature's keyword defaults that are not ``None``): the values
  :func:`loss_defaults` reports and ``qmargin.training.resolve_defaults`` writes into a run's
  ``loss_kwargs``, so ``config.json`` records every setting a run used.

Bad values are the builder's business: it raises ``ConfigError`` (``ValueError`` / ``TypeError`` are
turned into one). Built in: ``ce``, ``mcel``, ``mhl`` (design.md §3).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.losses import defaults
from qmargin.losses.defaults import DEFAULT_MCEL_BOUND, DEFAULT_MCEL_MARGIN
from qmargin.losses.functional import check_hinge_b, check_mcel_params, check_reduction
from qmargin.losses.modules import MarginHingeLoss, MCELoss

__all__ = [
    "LossBuilder",
    "register_loss",
    "available_losses",
    "build_loss",
    "loss_options",
    "loss_defaults",
    "check_loss_kwargs",
]

LossBuilder = Callable[..., nn.Module]
"""``builder(**options) -> nn.Module``: validates its options (``ConfigError``) and returns the loss."""

Defaults = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class _Entry:
    builder: LossBuilder
    options: tuple[str, ...] | None  # None: the builder takes **kwargs and checks names itself
    defaults: Defaults


_LOSSES: dict[str, _Entry] = {}


def _signature(builder: LossBuilder) -> inspect.Signature | None:
    try:
        return inspect.signature(builder)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def _keyword_params(sig: inspect.Signature) -> list[inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p in sig.parameters.values() if p.kind in kinds]


def register_loss(
    name: str,
    builder: LossBuilder,
    *,
    options: Iterable[str] | None = None,
    defaults: Defaults | None = None,
    overwrite: bool = False,
) -> None:
    """Make ``builder`` available to :func:`build_loss` and ``TrainConfig(loss=name)`` (case-insensitive).

    Args:
        builder: ``builder(**options) -> nn.Module``; raises ``ConfigError`` on a bad value.
        options: the option names it accepts (default: its signature's keyword parameters; a builder
            taking ``**kwargs`` with no ``options`` checks names itself).
        defaults: the values a training config resolves to when it does not set them, as a mapping or a
            zero-argument callable read at resolution time (default: the signature's keyword defaults
            that are not ``None``).
        overwrite: replace an existing entry instead of raising ``ValueError`` (a programming error).
    """
    key = str(name).lower()
    if not key or not callable(builder):
        raise ValueError("register_loss needs a non-empty name and a callable builder")
    if key in _LOSSES and not overwrite:
        raise ValueError(f"loss {key!r} is already registered (pass overwrite=True to replace it)")
    sig = _signature(builder)
    if options is not None:
        names: tuple[str, ...] | None = tuple(options)
    elif sig is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        names = None
    else:
        names = tuple(p.name for p in _keyword_params(sig))
    if defaults is None:
        params = _keyword_params(sig) if sig is not None else []
        defaults = {p.name: p.default for p in params if p.default not in (inspect.Parameter.empty, None)}
    _LOSSES[key] = _Entry(builder, names, defaults)


def available_losses() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_LOSSES)


def _entry(name: str) -> tuple[str, _Entry]:
    key = str(name).lower()
    if key not in _LOSSES:
        raise ConfigError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    return key, _LOSSES[key]


def loss_options(name: str) -> tuple[str, ...] | None:
    """Option names loss ``name`` accepts (``None``: its builder checks them itself)."""
    return _entry(name)[1].options


def loss_defaults(name: str) -> dict[str, Any]:
    """The config defaults of loss ``name`` (read now, so changed constants take effect)."""
    defaults = _entry(name)[1].defaults
    return dict(defaults() if callable(defaults) else defaults)


def _check_names(key: str, entry: _Entry, kwargs: Mapping[str, Any]) -> None:
    if entry.options is None:
        return
    unknown = sorted(set(kwargs) - set(entry.options))
    if unknown:
        accepted = ", ".join(sorted(entry.options)) or "none"
        raise ConfigError(f"loss {key!r} takes no option {', '.join(unknown)} (options: {accepted})")


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """The loss module ``name`` built with ``kwargs`` (no defaults are added: see :func:`loss_defaults`).

    An unknown name, an unknown or missing option and a bad value raise
    :class:`~qmargin.errors.ConfigError`.
    """
    key, entry = _entry(name)
    _check_names(key, entry, kwargs)
    sig = _signature(entry.builder)
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as err:
            raise ConfigError(f"loss {key!r}: {err}") from None
    try:
        loss = entry.builder(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"loss {key!r}: {err}") from None
    if not isinstance(loss, nn.Module):
        raise TypeError(f"the builder of loss {key!r} returned {type(loss).__name__}, not an nn.Module")
    return loss


def check_loss_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """``ConfigError`` unless loss ``name`` builds from its config defaults updated by ``kwargs``."""
    build_loss(name, **{**loss_defaults(name), **kwargs})


# -- built-in builders ---------------------------------------------------------------------------


def _weight(weight: Any) -> Tensor | None:
    if weight is None or isinstance(weight, Tensor):
        return weight
    try:
        w = torch.as_tensor(weight, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"weight must be a list of per-class numbers, got {weight!r}") from None
    if w.dim() != 1:
        raise ConfigError(f"weight must be a list of per-class numbers, got shape {tuple(w.shape)}")
    return w


def _number(name: str, value: Any, *, allow_none: bool = False, allow_inf: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _smoothing(value: Any) -> float:
    v = _number("label_smoothing", value)
    assert v is not None
    if not 0.0 <= v < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {v}")
    return v


def _build_ce(*, label_smoothing: float = 0.0, weight: Any = None, reduction: str = "mean") -> nn.Module:
    check_reduction(reduction)
    smoothing = _smoothing(label_smoothing)
    return nn.CrossEntropyLoss(weight=_weight(weight), reduction=reduction, label_smoothing=smoothing)


def _mcel_defaults() -> dict[str, float]:
    # The public constants (set by the ablation), read at resolution time.
    return {"margin": float(defaults.DEFAULT_MCEL_MARGIN), "bound": float(defaults.DEFAULT_MCEL_BOUND)}


def _mhl_defaults() -> dict[str, float]:
    return {"b": float(defaults.DEFAULT_MHL_B)}


def _build_mcel(
    *,
    margin: float = DEFAULT_MCEL_MARGIN,
    bound: float | None = DEFAULT_MCEL_BOUND,
    logit_scale: float | None = None,
    label_smoothing: float = 0.0,
    weight: Any = None,
    reduction: str = "mean",
) -> nn.Module:
    m = _number("margin", margin)
    t = _number("bound", bound, allow_none=True, allow_inf=True)
    s = _number("logit_scale", logit_scale, allow_none=True)
    assert m is not None
    check_mcel_params(m, t, s)
    if t is not None and m >= 2 * t:
        raise ConfigError(f"margin {m} >= 2 * bound {t}: logits clamped to (-T, T) cannot reach it")
    check_reduction(reduction)
    return MCELoss(
        m, t, s, weight=_weight(weight), reduction=reduction, label_smoothing=_smoothing(label_smoothing)
    )


def _build_mhl(*, b: float, weight: Any = None, reduction: str = "mean", units: str = "logits") -> nn.Module:
    hinge = _number("b (MHL hinge)", b)
    assert hinge is not None
    check_hinge_b(hinge)
    check_reduction(reduction)
    return MarginHingeLoss(hinge, weight=_weight(weight), reduction=reduction, units=units)


register_loss("ce", _build_ce, defaults={})
register_loss("mcel", _build_mcel, defaults=_mcel_defaults)
register_loss("mhl", _build_mhl, defaults=_mhl_defaults)
