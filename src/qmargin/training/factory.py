"""Build what a :class:`~qmargin.training.config.TrainConfig` describes: spec, model, loss, optimizer,
schedule, device. One place, shared by :func:`~qmargin.training.trainer.train` and
:func:`~qmargin.training.checkpoint.load_run` (which must rebuild the exact same model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from qmargin.errors import ConfigError
from qmargin.quant import QuantSpec
from qmargin.training.config import TrainConfig

__all__ = [
    "quant_spec",
    "make_model",
    "make_loss",
    "make_optimizer",
    "make_scheduler",
    "lr_factor",
    "resolve_device",
]


def quant_spec(config: TrainConfig) -> QuantSpec | None:
    """``QuantSpec(bits, symmetric, per_channel, w_max)`` of the weights, ``None`` for ``bits = 32``.

    With weight clipping the quantizer scale is ``w_max / qmax`` (design.md §1).
    """
    if not config.quantized:
        return None
    return QuantSpec(
        config.bits, symmetric=config.quant == "sym", per_channel=config.per_channel, w_max=config.w_max
    )


def make_model(config: TrainConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """``qmargin.models.build_model(config.model, ...)`` with the config's weight spec and kwargs."""
    from qmargin.models import build_model

    return build_model(
        config.model,
        input_shape=tuple(int(s) for s in input_shape),
        num_classes=int(num_classes),
        spec=quant_spec(config),
        **config.model_kwargs,
    )


def make_loss(config: TrainConfig) -> nn.Module:
    """The loss module of a *resolved* config (``qmargin.losses.build_loss``)."""
    from qmargin.losses import build_loss

    if config.loss == "ce":
        return build_loss("ce", label_smoothing=config.label_smoothing)
    if config.loss == "mcel":
        return build_loss(
            "mcel", margin=config.margin, bound=config.bound, logit_scale=config.logit_scale,
            label_smoothing=config.label_smoothing,
        )
    if config.hinge_b is None:
        raise ConfigError("loss 'mhl' needs hinge_b (resolve the config with resolve_defaults first)")
    return build_loss("mhl", b=config.hinge_b)


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """Adam or SGD (with ``momentum``) at ``lr`` with L2 ``weight_decay``."""
    params = list(params)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate factor after ``epoch`` completed epochs (0-based count) of ``epochs``.

    ``none``: 1. ``cosine``: ``0.5 * (1 + cos(pi * epoch / epochs))``. ``step``: ``0.1`` from
    ``epoch >= epochs / 2`` and ``0.01`` from ``epoch >= 3 epochs / 4``.
    """
    if schedule == "none":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))
    if schedule == "step":
        return 0.1 ** (int(epoch >= epochs / 2) + int(epoch >= 3 * epochs / 4))
    raise ConfigError(f"unknown schedule {schedule!r}")


def make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch ``LambdaLR`` with :func:`lr_factor` (its state is plain JSON)."""
    schedule, epochs = config.schedule, config.epochs
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(schedule, e, epochs))


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is a ``ConfigError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)
