"""A newcomer's files for the bring-your-own-model tests: a small CNN in its own ``.py`` and an ``.npz``."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import numpy as np
import torch

CNN_PY = '''
import torch
from torch import nn


class Marker:
    """Defined here so that a pickle could name it; qmargin never unpickles objects."""


def make_cnn(channels: int = 4, classes: int = 5, batchnorm: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels) if batchnorm else nn.Identity(),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, classes),
    )


def make_quantized(bits: int = 3) -> nn.Module:
    from qmargin.quant import QuantLinear, QuantSpec

    return nn.Sequential(nn.Flatten(), QuantLinear(64, 5, spec=QuantSpec(bits=bits)))


def make_activations_only() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def make_torch_quantized() -> nn.Module:
    return nn.Sequential(nn.Flatten(), torch.ao.nn.quantized.Linear(64, 5))


def make_list():
    return [1, 2, 3]


def make_raises(**kwargs):
    raise ValueError("the factory refuses: " + repr(sorted(kwargs)))
'''


def write_cnn(folder: Path, name: str = "mycnn.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(CNN_PY))
    return path


def import_file(path: Path, name: str = "helpers_cnn_direct"):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_test_set(
    path: Path, model: torch.nn.Module, n: int = 96, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``N x 1 x 8 x 8``; labels the float model's own predictions, after the bias of its last
    layer is shifted by minus the mean logit (so the classes are balanced and many samples lie near a
    decision boundary: the float model scores 100 %, its quantized twin less; the numbers are not trivial)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias -= model.eval()(torch.from_numpy(x)).mean(0)
        y = model(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)
    np.savez(path, x=x, y=y)
    return x, y


class PickleBomb:
    """A pickle payload: unpickling it would call ``open(marker, "w")`` and create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
