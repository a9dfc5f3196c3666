"""Classification losses on logits (design.md §3): CE, MCEL and the margin hinge loss (MHL).

Plain tensors in, plain tensors out. ``logits`` is ``z`` of shape ``(N, C)``, ``target`` holds class
indices ``y`` of shape ``(N,)`` (integer dtype). Conventions follow ``torch.nn.functional.cross_entropy``:
``reduction`` is ``"mean"`` | ``"sum"`` | ``"none"``; an optional per-class ``weight`` of shape ``(C,)``
scales each sample's loss by ``weight[y_i]`` and ``"mean"`` then divides by ``sum_i weight[y_i]``
(``weight`` is cast to the logits' dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from qmargin.errors import ConfigError

__all__ = [
    "REDUCTIONS",
    "cross_entropy",
    "soft_clamp",
    "mcel_logits",
    "mcel_loss",
    "margin_hinge_loss",
    "classification_margin",
    "check_reduction",
    "check_label_smoothing",
    "check_mcel_params",
    "check_hinge_b",
]

REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(logits: Tensor, target: Tensor, reduction: str) -> None:
    check_reduction(reduction)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


def check_label_smoothing(label_smoothing: float) -> None:
    """``ConfigError`` unless ``0 <= label_smoothing <= 1``."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def _no_bound(bound: float | None) -> bool:
    return bound is None or (math.isinf(bound) and bound > 0)


def check_reduction(reduction: str) -> None:
    """``ConfigError`` unless ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def check_mcel_params(margin: float, bound: float | None, logit_scale: float | None) -> None:
    """``ConfigError`` unless ``0 <= margin < inf``, ``bound > 0`` (or None / +inf), ``logit_scale > 0``."""
    if not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"margin must be a finite number >= 0, got {margin}")
    if not _no_bound(bound) and not bound > 0:  # type: ignore[operator]
        raise ConfigError(f"bound must be positive (or None / inf for no clamp), got {bound}")
    if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ConfigError(f"logit_scale must be a finite positive number, got {logit_scale}")


def check_hinge_b(b: float) -> None:
    """``ConfigError`` unless the MHL margin ``b`` is finite and positive."""
    if not (math.isfinite(b) and b > 0):
        raise ConfigError(f"MHL margin b must be a finite positive number, got {b}")


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross entropy ``l_i = -log softmax(z_i)[y_i]`` (``torch.nn.functional.cross_entropy``).

    With ``label_smoothing`` eps the target distribution is ``(1 - eps) onehot(y) + eps / C``.
    """
    _check_inputs(logits, target, reduction)
    check_label_smoothing(label_smoothing)
    weight = None if weight is None else weight.to(logits.dtype)
    return F.cross_entropy(
        logits, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing
    )


def soft_clamp(logits: Tensor, bound: float | None) -> Tensor:
    """``T * tanh(z / T)``: a smooth clamp of every logit into ``(-T, T)``; identity for ``T`` None or inf.

    Its slope is ``1 - tanh(z / T)**2``: 1 at ``z = 0``, vanishing as ``|z| -> T``.
    """
    if _no_bound(bound):
        return logits
    if not bound > 0:  # type: ignore[operator]
        raise ConfigError(f"bound must be positive (or None / inf for no clamp), got {bound}")
    return bound * torch.tanh(logits / bound)  # type: ignore[operator]


def mcel_logits(
    logits: Tensor,
    target: Tensor,
    *,
    margin: float,
    bound: float | None,
    logit_scale: float | None = None,
) -> Tensor:
    """The logits MCEL feeds to cross entropy: ``T * tanh(s * z / T) - M * onehot(y)``."""
    check_mcel_params(margin, bound, logit_scale)
    z = logits if logit_scale is None else logits * logit_scale
    z = soft_clamp(z, bound)
    if margin == 0:
        return z
    onehot = F.one_hot(target.long(), num_classes=logits.shape[1]).to(z.dtype)
    return z - margin * onehot


def mcel_loss(
    logits: Tensor,
    target: Tensor,
    *,
    margin: float,
    bound: float | None,
    logit_scale: float | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Margin cross-entropy loss (MCEL, design.md §3).

    ``z_c = T * tanh(s * z / T)``, ``loss = CE(z_c - M * onehot(y), y)`` with bound ``T`` (``None`` or
    ``inf``: no clamp, ``z_c = s * z``), margin ``M >= 0`` and a fixed logit scale ``s`` (``None`` = 1)
    applied before the clamp. The clamp bounds every logit to ``(-T, T)``, so the loss cannot be driven
    down by inflating the logit scale; the margin asks the true class to lead every other class by
    about ``M``. ``M = 0`` and no bound give plain cross entropy on ``s * z``.

    Args:
        margin: ``M``, subtracted from the true-class logit after the clamp.
        bound: ``T``, the soft clamp's bound; ``None`` or ``math.inf`` disables it.
        logit_scale: ``s``; ``None`` means 1.
        weight, reduction, label_smoothing: as in ``torch.nn.functional.cross_entropy``.
    """
    _check_inputs(logits, target, reduction)
    check_label_smoothing(label_smoothing)
    z = mcel_logits(logits, target, margin=margin, bound=bound, logit_scale=logit_scale)
    weight = None if weight is None else weight.to(z.dtype)
    return F.cross_entropy(z, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing)


def margin_hinge_loss(
    logits: Tensor,
    target: Tensor,
    *,
    b: float,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Margin hinge loss (MHL, design.md §3).

    ``y_pm = 2 * onehot(y) - 1``, ``l_i = (1 / C) sum_j relu(b - y_pm_ij * z_ij) / b``: zero once the
    true logit is ``>= b`` and every other logit ``<= -b``.

    Args:
        b: the hinge's margin, ``b > 0``.
        weight: optional per-class weights ``(C,)`` as in cross entropy.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
    """
    _check_inputs(logits, target, reduction)
    check_hinge_b(b)
    y_pm = 2.0 * F.one_hot(target.long(), num_classes=logits.shape[1]).to(logits.dtype) - 1.0
    per_sample = F.relu(b - y_pm * logits).mean(dim=1) / b
    if weight is None:
        if reduction == "mean":
            return per_sample.mean()
        return per_sample.sum() if reduction == "sum" else per_sample
    w = weight.to(per_sample.dtype)[target.long()]
    weighted = w * per_sample
    if reduction == "mean":
        return weighted.sum() / w.sum()
    return weighted.sum() if reduction == "sum" else weighted


def classification_margin(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample margin ``z_y - max_{j != y} z_j`` (shape ``(N,)``); positive iff correctly classified.

    Needs ``C >= 2``.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2, got {tuple(logits.shape)}")
    t = target.long().unsqueeze(1)
    true = logits.gather(1, t).squeeze(1)
    others = logits.scatter(1, t, float("-inf"))
    return true - others.amax(dim=1)
