"""Build what a :class:`~qmargin.training.config.TrainConfig` describes: spec, model, loss, optimizer,
schedule, device. One place, shared by :func:`~qmargin.training.trainer.train` and
:func:`~qmargin.training.checkpoint.load_run` (which must rebuild the exact same model).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from qmargin.errors import ConfigError
from qmargin.quant import QuantSpec
from qmargin.training.config import TrainConfig, resolve_defaults

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
    """The loss module of a config: ``qmargin.losses.build_loss(config.loss, **loss_kwargs)``.

    ``loss_kwargs`` are completed with the loss's config defaults first (as :func:`resolve_defaults`
    does), so a resolved and an unresolved config build the same loss.
    """
    from qmargin.losses import build_loss

    return build_loss(config.loss, **resolve_defaults(config).loss_kwargs)


def make_optimizer(config: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam or SGD (with ``momentum``) at ``lr`` with L2 ``weight_decay``."""
    plist = list(params)
    if config.optimizer == "adam":
        return torch.optim.Adam(plist, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(plist, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


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


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` as such.

    Anything else (``foo``, ``gpu``, ``mps``, ``cuda:x``), CUDA without a GPU, or ``cuda:N`` beyond the
    GPUs present is a :class:`~qmargin.errors.ConfigError` (one line), not torch's ``RuntimeError``.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::([0-9]+))?", name)
    if match is None:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} requested but no CUDA GPU is available; use --device cpu or auto"
        )
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device(name)
