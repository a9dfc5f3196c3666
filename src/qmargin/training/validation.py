"""Validators for everything qmargin reads back from disk: weights and the JSON files of a run.

One validator per file type, applied where the file is loaded:

* :func:`check_weights` — the tensors of ``model.safetensors`` / ``checkpoint.safetensors`` against
  the model they are loaded into: same names, shapes and **dtypes** (nothing is cast), every floating
  tensor finite. Also :func:`check_finite_tensors` for tensors without a model (optimizer state).
* :func:`validate_run_meta` — ``config.json`` (the part beside the :class:`TrainConfig`, which
  validates itself).
* :func:`validate_metrics` — ``metrics.json`` of a finished run.
* :func:`validate_history` — the per-epoch records kept in ``metrics.json`` and ``trainer_state.json``.
* :func:`validate_trainer_state` — ``trainer_state.json`` before a resume.

Each raises :class:`qmargin.errors.CheckpointError` with a one-line message naming the file and the
field (or tensor). The small field checks (:func:`req_int`, :func:`req_float`, :func:`req_accuracy`,
...) are shared with the campaign-result validator of ``qmargin.experiments.campaign``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qmargin.errors import CheckpointError

__all__ = [
    "invalid",
    "req_dict",
    "req_list",
    "req_int",
    "req_float",
    "req_accuracy",
    "req_str",
    "check_weights",
    "check_finite_tensors",
    "validate_run_meta",
    "validate_history",
    "validate_metrics",
    "validate_trainer_state",
]


def invalid(where: str | Path, what: str) -> CheckpointError:
    """The error for an invalid file: ``"{where}: invalid {what}"`` (one line)."""
    return CheckpointError(f"{where}: {what}")


def req_dict(where: str | Path, value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(where, f"{name} must be a JSON object, got {_kind(value)}")
    return value


def req_list(where: str | Path, value: Any, name: str, *, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise invalid(where, f"{name} must be a list, got {_kind(value)}")
    if length is not None and len(value) != length:
        raise invalid(where, f"{name} has {len(value)} entries, expected {length}")
    return value


def req_int(where: str | Path, value: Any, name: str, *, lo: int | None = 0, hi: int | None = None) -> int:
    """An integer (not a bool, not a float, not a string) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(where, f"{name} must be an integer, got {_kind(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise invalid(where, f"{name} must be in {rng}, got {value}")
    return value


def req_float(
    where: str | Path,
    value: Any,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    allow_nan: bool = False,
) -> float:
    """A finite number (int or float, not a bool) in ``[lo, hi]`` (``NaN`` only with ``allow_nan``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(where, f"{name} must be a number, got {_kind(value)}")
    v = float(value)
    if math.isnan(v) and allow_nan:
        return v
    if not math.isfinite(v):
        raise invalid(where, f"{name} must be a finite number, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
        raise invalid(where, f"{name} must be in {rng}, got {v:g}")
    return v


def req_accuracy(where: str | Path, value: Any, name: str, *, allow_nan: bool = False) -> float:
    """An accuracy: a fraction in ``[0, 1]``."""
    return req_float(where, value, name, lo=0.0, hi=1.0, allow_nan=allow_nan)


def req_str(where: str | Path, value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise invalid(where, f"{name} must be a string, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:17] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, int | float):
        return f"{value!r}"
    return f"a {type(value).__name__}"


# -- tensors ------------------------------------------------------------------------------------


def check_finite_tensors(where: str | Path, tensors: Mapping[str, Tensor]) -> None:
    """Every floating (or complex) tensor of ``tensors`` is finite; else name the first bad one."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise invalid(where, f"tensor {name!r} has {n_bad} non-finite value(s) (NaN or inf)")


def check_weights(where: str | Path, tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """``tensors`` fit ``expected`` (a model's ``state_dict()``) exactly: same names, shapes and dtypes
    (nothing is cast on load), and every floating tensor is finite."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
        raise CheckpointError(f"{where}: state dict does not fit the model ({what})")
    for k, v in tensors.items():
        own = expected[k]
        if tuple(own.shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, the model {tuple(own.shape)}")
        if v.dtype != own.dtype:
            raise CheckpointError(
                f"{where}: tensor {k!r} is {_dtype(v.dtype)}, the model stores {_dtype(own.dtype)} "
                "(refusing to cast)"
            )
    check_finite_tensors(where, tensors)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- config.json --------------------------------------------------------------------------------


def validate_run_meta(where: str | Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The non-config entries of ``config.json``: ``input_shape`` (positive integers),
    ``num_classes`` (>= 2), optional ``num_train`` / ``num_test`` (non-negative integers). Returns
    a copy with ``input_shape`` as a tuple."""
    out = dict(meta)
    shape = req_list(where, meta.get("input_shape"), "input_shape")
    if not shape:
        raise invalid(where, "input_shape is empty")
    out["input_shape"] = tuple(req_int(where, s, "input_shape entry", lo=1) for s in shape)
    if "num_classes" not in meta:
        raise invalid(where, "missing 'num_classes'")
    out["num_classes"] = req_int(where, meta["num_classes"], "num_classes", lo=2)
    for key in ("num_train", "num_test"):
        if key in meta:
            out[key] = req_int(where, meta[key], key, lo=0)
    return out


# -- per-epoch history, metrics.json ------------------------------------------------------------

_RECORD_FLOATS = ("lr", "train_loss", "train_time_s", "epoch_time_s", "train_loss_err")


def validate_history(where: str | Path, history: Any, *, epochs: int | None = None) -> list[dict[str, Any]]:
    """Per-epoch records: ``epoch`` = 1, 2, ..., ``steps`` non-decreasing non-negative integers,
    ``train_acc`` / ``test_acc`` accuracies, loss, learning rate and timings finite (times >= 0)."""
    records = req_list(where, history, "history", length=epochs)
    last_steps = 0
    for i, rec in enumerate(records, start=1):
        name = f"history[{i - 1}]"
        req_dict(where, rec, name)
        if req_int(where, rec.get("epoch"), f"{name}.epoch", lo=1) != i:
            raise invalid(where, f"{name}.epoch is {rec['epoch']}, expected {i}")
        steps = req_int(where, rec.get("steps"), f"{name}.steps", lo=0)
        if steps < last_steps:
            raise invalid(where, f"{name}.steps decreases ({steps} after {last_steps})")
        last_steps = steps
        req_accuracy(where, rec.get("train_acc"), f"{name}.train_acc")
        req_accuracy(where, rec.get("test_acc"), f"{name}.test_acc", allow_nan=True)
        for key in _RECORD_FLOATS:
            if key in rec or key in ("lr", "train_loss", "train_time_s"):
                lo = 0.0 if key.endswith("_s") or key == "lr" else None
                req_float(where, rec.get(key), f"{name}.{key}", lo=lo)
    return records


def validate_metrics(where: str | Path, data: Any) -> dict[str, Any]:
    """``metrics.json`` of a finished run: a history of ``epochs`` records, accuracies in ``[0, 1]``,
    counts non-negative integers, finite times."""
    req_dict(where, data, "metrics")
    epochs = req_int(where, data.get("epochs"), "epochs", lo=1)
    history = validate_history(where, data.get("history"), epochs=epochs)
    req_accuracy(where, data.get("test_acc"), "test_acc", allow_nan=True)
    req_accuracy(where, data.get("train_acc"), "train_acc")
    req_float(where, data.get("train_loss"), "train_loss")
    req_float(where, data.get("train_time_s"), "train_time_s", lo=0.0)
    steps = req_int(where, data.get("global_steps"), "global_steps", lo=0)
    if steps != history[-1]["steps"]:
        raise invalid(where, f"global_steps is {steps}, the history ends at step {history[-1]['steps']}")
    for key in ("num_params", "num_train", "num_test", "resumed_epoch"):
        if key in data:
            req_int(where, data[key], key, lo=0)
    if data.get("resumed_epoch", 0) > epochs:
        raise invalid(where, f"resumed_epoch {data['resumed_epoch']} is beyond epochs {epochs}")
    return data


# -- trainer_state.json -------------------------------------------------------------------------


def validate_trainer_state(
    where: str | Path, plain: Any, *, epochs: int | None, state_format: int
) -> dict[str, Any]:
    """``trainer_state.json`` before a resume: ``format``, ``epoch`` in ``[1, epochs]``, ``global_step``,
    a history of ``epoch`` records ending at ``global_step``, finite optimizer hyper-parameters
    (``lr`` > 0), a scheduler state with finite learning rates and the RNG scalars."""
    req_dict(where, plain, "trainer state")
    if plain.get("format") != state_format:
        raise CheckpointError(f"{where}: unknown format {plain.get('format')!r}")
    epoch = req_int(where, plain.get("epoch"), "epoch", lo=1, hi=epochs)
    step = req_int(where, plain.get("global_step"), "global_step", lo=0)
    history = validate_history(where, plain.get("history"), epochs=epoch)
    if history[-1]["steps"] != step:
        raise invalid(where, f"global_step is {step}, the history ends at step {history[-1]['steps']}")
    opt = req_dict(where, plain.get("optimizer"), "optimizer")
    groups = req_list(where, opt.get("param_groups"), "optimizer.param_groups")
    if not groups:
        raise invalid(where, "optimizer.param_groups is empty")
    for g, group in enumerate(groups):
        name = f"optimizer.param_groups[{g}]"
        req_dict(where, group, name)
        req_float(where, group.get("lr"), f"{name}.lr", lo=0.0)
        for key, value in group.items():
            if key == "params":
                for p in req_list(where, value, f"{name}.params"):
                    req_int(where, p, f"{name}.params entry", lo=0)
            elif isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
                req_float(where, value, f"{name}.{key}")
            elif isinstance(value, list):
                for v in value:
                    req_float(where, v, f"{name}.{key} entry")
    req_dict(where, opt.get("state", {}), "optimizer.state")
    sched = req_dict(where, plain.get("scheduler"), "scheduler")
    if "last_epoch" in sched and req_int(where, sched["last_epoch"], "scheduler.last_epoch", lo=0) != epoch:
        raise invalid(where, f"scheduler.last_epoch is {sched['last_epoch']}, the state is at epoch {epoch}")
    for key in ("base_lrs", "_last_lr"):
        if key in sched:
            for v in req_list(where, sched[key], f"scheduler.{key}"):
                req_float(where, v, f"scheduler.{key} entry", lo=0.0)
    rng = req_dict(where, plain.get("rng"), "rng")
    req_int(where, rng.get("cuda_devices", 0), "rng.cuda_devices", lo=0)
    npst = req_dict(where, rng.get("numpy"), "rng.numpy")
    req_str(where, npst.get("kind"), "rng.numpy.kind")
    req_int(where, npst.get("pos"), "rng.numpy.pos", lo=0, hi=624)
    req_int(where, npst.get("has_gauss"), "rng.numpy.has_gauss", lo=0, hi=1)
    req_float(where, npst.get("cached_gaussian"), "rng.numpy.cached_gaussian")
    py = req_dict(where, rng.get("python"), "rng.python")
    req_int(where, py.get("version"), "rng.python.version", lo=0)
    if py.get("gauss_next") is not None:
        req_float(where, py["gauss_next"], "rng.python.gauss_next")
    return plain
