"""Classification losses on logits (design.md §3): CE, MCEL, margin hinge loss.

Functional forms live in :mod:`qmargin.losses.functional`; :mod:`qmargin.losses.modules` wraps them
as ``nn.Module``s; :mod:`qmargin.losses.registry` builds them by name (:func:`build_loss`) and takes
new ones (:func:`register_loss`), each builder validating its own options.
"""

from qmargin.losses import defaults
from qmargin.losses.defaults import DEFAULT_MCEL_BOUND, DEFAULT_MCEL_MARGIN, DEFAULT_MHL_B
from qmargin.losses.functional import (
    classification_margin,
    cross_entropy,
    margin_hinge_loss,
    mcel_logits,
    mcel_loss,
    soft_clamp,
)
from qmargin.losses.modules import (
    CrossEntropyLoss,
    MarginHingeLoss,
    MCELoss,
)
from qmargin.losses.registry import (
    LossBuilder,
    available_losses,
    build_loss,
    check_loss_kwargs,
    loss_defaults,
    loss_options,
    register_loss,
)

__all__ = [
    "defaults",
    "cross_entropy",
    "soft_clamp",
    "mcel_logits",
    "mcel_loss",
    "margin_hinge_loss",
    "classification_margin",
    "DEFAULT_MCEL_MARGIN",
    "DEFAULT_MCEL_BOUND",
    "DEFAULT_MHL_B",
    "CrossEntropyLoss",
    "MCELoss",
    "MarginHingeLoss",
    "LossBuilder",
    "register_loss",
    "build_loss",
    "available_losses",
    "loss_options",
    "loss_defaults",
    "check_loss_kwargs",
]
