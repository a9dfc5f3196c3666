"""qmargin: train, stress-test and certify low-precision neural networks.

``qmargin.stress(model, data, bers=..., repeats=..., metric=...)`` is the one call that stress-tests a
quantized model under random bit errors (:func:`qmargin.engine.stress`). It is loaded on first use
(PEP 562 ``__getattr__``), so ``import qmargin`` (and ``qmargin --help``) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "stress"]

_LAZY = {"stress": "qmargin.engine.run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qmargin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
