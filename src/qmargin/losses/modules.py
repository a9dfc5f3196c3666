"""``nn.Module`` wrappers of :mod:`qmargin.losses.functional`; they only hold the hyper-parameters.

Build them by name with :func:`qmargin.losses.build_loss` (:mod:`qmargin.losses.registry`).
"""

from __future__ import annotations

from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.losses.defaults import DEFAULT_MCEL_BOUND, DEFAULT_MCEL_MARGIN
from qmargin.losses.functional import (
    check_hinge_b,
    check_label_smoothing,
    check_mcel_params,
    check_reduction,
    margin_hinge_loss,
    mcel_loss,
)

__all__ = [
    "CrossEntropyLoss",
    "MCELoss",
    "MarginHingeLoss",
    "HINGE_UNITS",
]

HINGE_UNITS = ("logits", "codes")
"""What MHL's ``z`` is measured in (:class:`MarginHingeLoss`)."""

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
            logits,
            target,
            margin=self.margin,
            bound=self.bound,
            logit_scale=self.logit_scale,
            weight=self.weight,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, bound={self.bound}, logit_scale={self.logit_scale}, "
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
        )


class MarginHingeLoss(nn.Module):
    """Margin hinge loss ``mean_j relu(b - y_pm_j z_j) / b`` with ``y_pm = 2 onehot(y) - 1``.

    See :func:`qmargin.losses.functional.margin_hinge_loss`. ``units`` says what ``z`` is:
    ``"logits"`` (default) the model's outputs; ``"codes"`` the outputs in units of the output layer's
    weight scale, ``z_j / Δ_j`` (for sign weights, the popcount a BNN computes, the units in which the
    BNN bit-error work sets ``b = 128``). The trainer applies ``"codes"``
    (:class:`qmargin.training.code_units.InCodeUnits`); this module only records it.
    """

    weight: Tensor | None

    def __init__(
        self, b: float, *, weight: Tensor | None = None, reduction: str = "mean", units: str = "logits"
    ) -> None:
        super().__init__()
        check_hinge_b(b)
        check_reduction(reduction)
        if units not in HINGE_UNITS:
            raise ConfigError(f"MHL units must be one of {', '.join(HINGE_UNITS)}, got {units!r}")
        self.b = float(b)
        self.reduction = reduction
        self.units = units
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return margin_hinge_loss(logits, target, b=self.b, weight=self.weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"b={self.b}, reduction={self.reduction!r}, units={self.units!r}"
