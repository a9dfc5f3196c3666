"""Classification losses on logits (design.md §3): CE, MCEL, margin hinge loss.

Functional forms live in :mod:`qmargin.losses.functional`; :mod:`qmargin.losses.modules` wraps them
as ``nn.Module``s and builds them by name (:func:`build_loss`).
"""

from qmargin.losses.functional import (
    classification_margin,
    cross_entropy,
    margin_hinge_loss,
    mcel_logits,
    mcel_loss,
    soft_clamp,
)
from qmargin.losses.modules import (
    DEFAULT_MCEL_BOUND,
    DEFAULT_MCEL_MARGIN,
    LOSSES,
    CrossEntropyLoss,
    MarginHingeLoss,
    MCELoss,
    available_losses,
    build_loss,
)

__all__ = [
    "cross_entropy",
    "soft_clamp",
    "mcel_logits",
    "mcel_loss",
    "margin_hinge_loss",
    "classification_margin",
    "DEFAULT_MCEL_MARGIN",
    "DEFAULT_MCEL_BOUND",
    "CrossEntropyLoss",
    "MCELoss",
    "MarginHingeLoss",
    "LOSSES",
    "build_loss",
    "available_losses",
]
