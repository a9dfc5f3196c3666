"""``nn.Module`` wrappers of :mod:`qmargin.losses.functional`; they only hold the hyper-parameters."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.losses.functional import (
    check_hinge_b,
    check_label_smoothing,
    check_mcel_params,
    check_reduction,
    margin_hinge_loss,
    mcel_loss,
)

__all__ = [
    "DEFAULT_MCEL_MARGIN",
    "DEFAULT_MCEL_BOUND",
    "CrossEntropyLoss",
    "MCELoss",
    "MarginHingeLoss",
    "LOSSES",
    "build_loss",
    "available_losses",
]

# Set by the ablation (docs/results/mcel_ablation.md, `qmargin reproduce mcel-ablation`): the most robust
# (bound, margin) on mnist5k at 2 and 4 bits whose clean accuracy stays within 1 point of CE.
DEFAULT_MCEL_MARGIN: float = 30.0
DEFAULT_MCEL_BOUND: float = 30.0

CrossEntropyLoss = nn.CrossEntropyLoss
"""Plain cross entropy: ``torch.nn.CrossEntropyLoss`` itself (re-exported for symmetry)."""


class MCELoss(nn.Module):
    """Margin cross-entropy loss: ``CE(T * tanh(s * z / T) - M * onehot(y), y)``.

    See :func:`qmargin.losses.functional.mcel_loss`. ``margin`` is ``M``, ``bound`` is ``T``
    (``None`` or ``inf``: no clamp), ``logit_scale`` is ``s`` (``None`` = 1). ``weight`` is kept as a
    buffer (it follows ``.to(device)``), as in ``torch.nn.CrossEntropyLoss``.
    """

    weight: Tensor | None

    def __init__(
        self,
        margin: float = DEFAULT_MCEL_MARGIN,
        bound: float | None = DEFAULT_MCEL_BOUND,
        logit_scale: float | None = None,
        *,
        weight: Tensor | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_mcel_params(margin, bound, logit_scale)
        check_reduction(reduction)
        check_label_smoothing(label_smoothing)
        self.margin = float(margin)
        self.bound = None if bound is None else float(bound)
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return mcel_loss(
            logits, target, margin=self.margin, bound=self.bound, logit_scale=self.logit_scale,
            weight=self.weight, reduction=self.reduction, label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, bound={self.bound}, logit_scale={self.logit_scale}, "
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
        )


class MarginHingeLoss(nn.Module):
    """Margin hinge loss ``mean_j relu(b - y_pm_j z_j) / b`` with ``y_pm = 2 onehot(y) - 1``.

    See :func:`qmargin.losses.functional.margin_hinge_loss`.
    """

    weight: Tensor | None

    def __init__(self, b: float, *, weight: Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        check_hinge_b(b)
        check_reduction(reduction)
        self.b = float(b)
        self.reduction = reduction
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return margin_hinge_loss(logits, target, b=self.b, weight=self.weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"b={self.b}, reduction={self.reduction!r}"


LOSSES: dict[str, type[nn.Module]] = {
    "ce": nn.CrossEntropyLoss,
    "mcel": MCELoss,
    "mhl": MarginHingeLoss,
}

# Options each loss accepts through build_loss (torch's CE also has legacy / exotic arguments we hide).
_OPTIONS: dict[str, tuple[str, ...]] = {
    "ce": ("weight", "reduction", "label_smoothing"),
    "mcel": ("margin", "bound", "logit_scale", "weight", "reduction", "label_smoothing"),
    "mhl": ("b", "weight", "reduction"),
}


def available_losses() -> list[str]:
    """Names :func:`build_loss` knows, sorted."""
    return sorted(LOSSES)


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """The loss module ``name`` (``ce`` | ``mcel`` | ``mhl``) with the given options.

    Unknown names, unknown or missing options and out-of-range values raise
    :class:`~qmargin.errors.ConfigError`.
    """
    key = str(name).lower()
    if key not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    unknown = sorted(set(kwargs) - set(_OPTIONS[key]))
    if unknown:
        raise ConfigError(
            f"loss {key!r} takes no option {', '.join(unknown)} (options: {', '.join(_OPTIONS[key])})"
        )
    cls = LOSSES[key]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(f"loss {key!r}: {err}") from None
    if "reduction" in kwargs:
        check_reduction(kwargs["reduction"])
    if "label_smoothing" in kwargs:
        check_label_smoothing(kwargs["label_smoothing"])
    if kwargs.get("weight") is not None and not isinstance(kwargs["weight"], Tensor):
        kwargs["weight"] = torch.as_tensor(kwargs["weight"], dtype=torch.float32)
    return cls(**kwargs)
