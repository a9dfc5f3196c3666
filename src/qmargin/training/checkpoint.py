"""Run directories: atomic safetensors + JSON files, resumable trainer state, :func:`load_run`.

A finished run directory holds

* ``config.json`` — ``{"config": resolved TrainConfig, "input_shape", "num_classes",
  "qmargin_version", "torch_version", "device"}``;
* ``model.safetensors`` — the float state dict (shadow weights, BatchNorm statistics);
* ``integer.safetensors`` — the stored form, :func:`qmargin.quant.export_integer_state`;
* ``metrics.json`` — per-epoch history, final clean test accuracy, training time. Written last: its
  presence marks the run as finished.

While training, ``checkpoint.safetensors`` (model, optimizer tensors, RNG states as ``uint8``) and
``trainer_state.json`` (epoch, step, history, optimizer hyper-parameters, scheduler, RNG scalars) are
rewritten after every epoch; both carry the epoch and step, and a mismatch is reported instead of
resuming from an inconsistent pair. They are removed once the run is finished. Every file is written
to a temporary name and moved into place with ``os.replace`` (:mod:`qmargin.files`; safetensors files
are serialized in memory and written by Python, so a full disk is an ``OSError`` naming the file).
No pickle anywhere.

One process at a time: :func:`locked_run_dir` (the trainer's decorator) holds the run directory's
lock (``.qmargin.lock``, :func:`qmargin.files.lock_directory`) for the whole run; a second process
gets a one-line :class:`qmargin.files.BusyError` naming the holder's PID. Results derived from a run
by default (``ber.json``, ``ber.csv``, ``ber.png``: :data:`DERIVED_FILES`) belong to its weights:
restarting the run from scratch (``force``) removes them with the run's own files.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from qmargin.errors import CheckpointError, ConfigError
from qmargin.files import lock_directory, sigint_deferred, write_json_atomic, write_safetensors_atomic
from qmargin.training.config import TrainConfig
from qmargin.training.validation import (
    check_finite_tensors,
    check_weights,
    validate_metrics,
    validate_run_meta,
    validate_trainer_state,
)

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "INTEGER_FILE",
    "METRICS_FILE",
    "CHECKPOINT_FILE",
    "STATE_FILE",
    "DERIVED_FILES",
    "locked_run_dir",
    "atomic_write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "optimizer_state_to_flat",
    "optimizer_state_from_flat",
    "rng_state",
    "set_rng_state",
    "TrainerState",
    "save_checkpoint",
    "load_checkpoint",
    "read_run_config",
    "load_run",
]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
INTEGER_FILE = "integer.safetensors"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = 1
DERIVED_FILES = ("ber.json", "ber.csv", "ber.png")
"""Results ``qmargin evaluate`` (and ``train_and_stress``) derive from a run's weights by default;
a run restarted from scratch removes them with its own files (they describe the old weights)."""

P = ParamSpec("P")
R = TypeVar("R")


# -- atomic files -------------------------------------------------------------------------------


atomic_write_json = write_json_atomic
"""``atomic_write_json(path, data)``: sorted-key JSON, :func:`qmargin.files.write_json_atomic`."""


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or unreadable file raises a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise CheckpointError(f"{path}: not valid JSON ({msg})") from None


def save_tensors(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors with safetensors, atomically (every tensor copied to a contiguous CPU tensor)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_safetensors_atomic(path, flat, metadata=metadata)


def load_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; missing/corrupt files raise :class:`CheckpointError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types (and OSError, ValueError, ...)
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({detail})") from None
    return tensors, meta


def locked_run_dir(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator of a function with a keyword argument ``out_dir`` (a run directory): check that it is
    not a file (:class:`ConfigError`), create it and hold its lock for the whole call."""

    @functools.wraps(fn)
    def locked(*args: P.args, **kwargs: P.kwargs) -> R:
        out_dir = kwargs.get("out_dir")
        if not isinstance(out_dir, (str, os.PathLike)):
            return fn(*args, **kwargs)  # the function reports the missing or wrong argument
        if os.fspath(out_dir).strip() and os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ConfigError(f"{out_dir} exists and is not a directory")
        with lock_directory(out_dir):
            return fn(*args, **kwargs)

    return locked


# -- optimizer state ----------------------------------------------------------------------------


def optimizer_state_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors ``"optim.{param}.{key}"`` and a JSON part.

    The JSON part holds ``param_groups`` (hyper-parameters, parameter indices) and every non-tensor
    per-parameter state value.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if "." in key:
                raise ValueError(f"optimizer state key {key!r} contains '.'")
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                plain.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state": plain}


def optimizer_state_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], plain: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_state_to_flat`: load the state into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, st in plain.get("state", {}).items():
        state.setdefault(int(pid), {}).update(st)
    live = optimizer.state_dict()["param_groups"]
    saved = plain["param_groups"]
    if len(saved) != len(live):
        raise CheckpointError(
            f"checkpoint has {len(saved)} optimizer parameter groups, the run has {len(live)}"
        )
    groups = []
    for g_saved, g_live in zip(saved, live, strict=True):
        g = dict(g_saved)
        for k, v in g.items():
            if isinstance(g_live.get(k), tuple) and isinstance(v, list):
                g[k] = tuple(v)
        groups.append(g)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"optimizer state does not fit the model: {str(err).splitlines()[0]}") from None


# -- RNG state ----------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Global RNG states of torch (CPU and every CUDA device), numpy and python ``random``.

    Bulk states become ``uint8`` tensors (``rng.torch``, ``rng.cuda.{i}``, ``rng.numpy``,
    ``rng.python``); the few scalars go to the JSON part.
    """
    tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
    n_cuda = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
            n_cuda += 1
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint32).view(np.uint8).copy())
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.from_numpy(np.asarray(internal, dtype=np.uint32).view(np.uint8).copy())
    plain = {
        "cuda_devices": n_cuda,
        "numpy": {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "gauss_next": gauss_next},
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, Tensor], plain: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`. CUDA states are restored when CUDA is available."""
    torch.set_rng_state(tensors["rng.torch"])
    n_cuda = int(plain.get("cuda_devices", 0))
    if n_cuda and torch.cuda.is_available():
        states = [tensors[f"rng.cuda.{i}"] for i in range(min(n_cuda, torch.cuda.device_count()))]
        for i, st in enumerate(states):
            torch.cuda.set_rng_state(st, i)
    npst = plain["numpy"]
    keys = tensors["rng.numpy"].numpy().view(np.uint32)
    np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    py = plain["python"]
    internal = tuple(int(v) for v in tensors["rng.python"].numpy().view(np.uint32))
    random.setstate((py["version"], internal, py["gauss_next"]))


# -- resumable trainer state --------------------------------------------------------------------


@dataclass
class TrainerState:
    """Where a run stands after a completed epoch."""

    epoch: int
    """Completed epochs (1-based count)."""
    global_step: int
    """Optimizer steps taken so far."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per completed epoch."""


def save_checkpoint(
    run_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
) -> None:
    """Write ``checkpoint.safetensors`` then ``trainer_state.json`` (each atomically; Ctrl-C is held
    back until both are written, so the two always carry the same epoch token)."""
    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_plain = optimizer_state_to_flat(optimizer)
    rng_tensors, rng_plain = rng_state()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    token = {"epoch": str(state.epoch), "global_step": str(state.global_step), "format": str(STATE_FORMAT)}
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    with sigint_deferred():
        save_tensors(run_dir / CHECKPOINT_FILE, tensors, metadata=token)
        atomic_write_json(
            run_dir / STATE_FILE,
            {
                "format": STATE_FORMAT,
                "epoch": state.epoch,
                "global_step": state.global_step,
                "history": state.history,
                "optimizer": opt_plain,
                "scheduler": sched,
                "rng": rng_plain,
            },
        )


def load_checkpoint(
    run_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    restore_rng: bool = True,
    epochs: int | None = None,
) -> TrainerState:
    """Load model, optimizer, scheduler (and global RNG) state saved by :func:`save_checkpoint`.

    Both files are validated before anything is loaded (:func:`validate_trainer_state`; the model
    tensors by :func:`check_weights`: names, shapes, dtypes, finite; optimizer tensors finite; RNG
    states ``uint8``); ``epochs`` (the run's configured epochs) bounds the stored epoch.
    """
    run_dir = Path(run_dir)
    plain = read_json(run_dir / STATE_FILE)
    tensors, meta = load_tensors(run_dir / CHECKPOINT_FILE)
    if isinstance(plain, dict):
        epoch, step = plain.get("epoch"), plain.get("global_step")
        if meta.get("epoch") != str(epoch) or meta.get("global_step") != str(step):
            raise CheckpointError(
                f"{run_dir}: {CHECKPOINT_FILE} (epoch {meta.get('epoch')}) and {STATE_FILE} (epoch {epoch}) "
                "disagree; restart the run with force"
            )
    validate_trainer_state(run_dir / STATE_FILE, plain, epochs=epochs, state_format=STATE_FORMAT)
    epoch, step = plain["epoch"], plain["global_step"]
    ckpt = run_dir / CHECKPOINT_FILE
    model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    optim_sd = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    rng_sd = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    check_weights(ckpt, model_sd, model.state_dict())
    check_finite_tensors(ckpt, optim_sd)
    for k, v in rng_sd.items():
        if v.dtype != torch.uint8 or v.dim() != 1:
            raise CheckpointError(f"{ckpt}: RNG state {k!r} is not a 1-d uint8 tensor")
    try:
        model.load_state_dict(model_sd, strict=True)
        optimizer_state_from_flat(optimizer, optim_sd, plain["optimizer"])
        sched = dict(plain["scheduler"])
        sched["lr_lambdas"] = [None] * len(scheduler.state_dict().get("lr_lambdas", []))
        scheduler.load_state_dict(sched)
        if restore_rng:
            set_rng_state(rng_sd, plain["rng"])
        return TrainerState(epoch, step, list(plain["history"]))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{run_dir}: incomplete or corrupt training checkpoint ({detail})") from None


def _load_state_dict(model: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    """Load ``sd`` into ``model`` after :func:`check_weights` (names, shapes, dtypes, finite values)."""
    check_weights(path, sd, model.state_dict())
    model.load_state_dict(sd, strict=True)


# -- finished runs ------------------------------------------------------------------------------


def read_run_config(run_dir: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """``(config, meta)`` from a run's ``config.json``; ``meta`` holds input_shape, num_classes, versions."""
    path = Path(run_dir) / CONFIG_FILE
    data = read_json(path)
    if not isinstance(data, dict) or "config" not in data:
        raise CheckpointError(f"{path}: not a qmargin run config (no 'config' entry)")
    try:
        config = TrainConfig.from_dict(data["config"])
        meta = validate_run_meta(path, {k: v for k, v in data.items() if k != "config"})
    except ConfigError as err:
        raise CheckpointError(f"{path}: invalid config ({err})") from None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: incomplete run config ({type(err).__name__}: {err})") from None
    return config, meta


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, dict]:
    """Rebuild a finished run's model from ``config.json`` and load ``model.safetensors``.

    Returns ``(model, config, metrics)`` with the model in eval mode on ``device``. Missing or corrupt
    files raise a one-line :class:`~qmargin.errors.CheckpointError`.
    """
    from qmargin.training.factory import make_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    config, meta = read_run_config(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        hint = " (training not finished: resume it)" if (run_dir / STATE_FILE).is_file() else ""
        raise CheckpointError(f"{run_dir / MODEL_FILE}: missing{hint}")
    tensors, _ = load_tensors(run_dir / MODEL_FILE)
    metrics = validate_metrics(run_dir / METRICS_FILE, read_json(run_dir / METRICS_FILE))
    try:
        model = make_model(config, meta["input_shape"], meta["num_classes"])
    except ConfigError as err:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: cannot rebuild the model ({err})") from None
    _load_state_dict(model, tensors, run_dir / MODEL_FILE)
    model.to(device)
    model.eval()
    return model, config, metrics
