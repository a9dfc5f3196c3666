"""Reading weight files a user brings: the one place qmargin calls ``torch.load``.

Two formats, chosen by the file name:

* ``*.safetensors``: read with ``safetensors`` (no code runs by construction);
* anything else (``*.pt``, ``*.pth``, ``*.bin``): a torch state dict read with
  ``torch.load(path, map_location="cpu", weights_only=True)``. Torch's weights-only unpickler accepts
  tensors, containers and plain values only; a file that needs any other Python object (a pickle
  payload with ``__reduce__``) is refused before anything of it runs.

The result is a plain ``{name: Tensor}``. A top-level wrapper ``{"state_dict": {...}}`` (or
``"model_state_dict"``, ``"model"``, beside at most two other entries such as ``"epoch"``) is
unwrapped. Everything that is not a dict of named tensors raises a one-line
:class:`qmargin.errors.CheckpointError` naming the file. Whether the tensors fit a model (names,
shapes, dtypes, finite values) is for the caller to check against that model.

Imports nothing of qmargin but :mod:`qmargin.errors`.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qmargin.errors import CheckpointError

__all__ = ["read_state_dict", "one_line", "SAFETENSORS_SUFFIX", "Source"]

SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPERS = ("state_dict", "model_state_dict", "model")

Source = str | os.PathLike | Mapping[str, Any]


def one_line(text: str | BaseException, limit: int = 160) -> str:
    """The first non-empty line of ``text`` (an exception's message), cut to ``limit`` characters."""
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = one_line(e)
        if "Weights only load failed" in reason:
            reason = "it needs arbitrary Python objects to load, which qmargin refuses"
        raise CheckpointError(f"cannot read {path} as a state dict of tensors: {reason}") from None
    except Exception as e:  # truncated or foreign files
        raise CheckpointError(
            f"cannot read {path} as a weights-only torch checkpoint: {type(e).__name__}: {one_line(e)}"
        ) from None


def _safetensors_load(path: Path) -> dict[str, Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # SafetensorError, a truncated header, ...
        reason = f"{type(e).__name__}: {one_line(e)}"
        raise CheckpointError(f"cannot read {path} as safetensors: {reason}") from None


def read_state_dict(source: Source) -> dict[str, Tensor]:
    """A state dict from a path (safetensors, or ``torch.load(..., weights_only=True)``) or a mapping.

    Every entry must be a tensor under a string name; a wrapper dict is unwrapped (module docstring).
    """
    where = "state dict"
    if isinstance(source, Mapping):
        obj: Any = source
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
        obj = _safetensors_load(path) if path.suffix == SAFETENSORS_SUFFIX else _torch_load(path)
    if isinstance(obj, Mapping):
        for w in _WRAPPERS:
            if w in obj and isinstance(obj[w], Mapping) and len(obj) <= 3:
                obj = obj[w]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{where}: entries that are not named tensors: {', '.join(map(str, bad[:3]))}")
    return dict(obj)
