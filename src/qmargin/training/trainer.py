"""The trainer: one resumable training run from a :class:`TrainConfig` into a run directory.

Per step (mini-batch ``(x, y)`` of the in-memory training tensors, order from a seeded
``torch.Generator``), with logits ``z = f(x)`` of the quantized model (fake-quantized weights,
design.md §1) and objective

    L = loss(z, y) + model.auxiliary_loss()      (the second term only if the model defines it)

the gradient is ``dL/dw`` (or the RandBET average ``0.5 * (g_clean + g_err)`` when
``train_ber > 0``), then one optimizer step, then the weight clipping projection
``w <- clamp(w, -w_max, w_max)`` when ``w_max`` is set. Per epoch the trainer records the mean
training loss and accuracy, the clean test accuracy of the quantized model, the learning rate and
timings, writes a resumable checkpoint and reports to the optional ``progress`` callback. The
library never prints.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

import qmargin
from qmargin.errors import ConfigError, DataError
from qmargin.models.protocols import HasAuxiliaryLoss
from qmargin.quant import export_integer_state
from qmargin.training.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    DERIVED_FILES,
    INTEGER_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    TrainerState,
    atomic_write_json,
    load_checkpoint,
    load_run,
    locked_run_dir,
    read_run_config,
    save_checkpoint,
    save_tensors,
)
from qmargin.training.code_units import wrap_loss_units
from qmargin.training.config import TrainConfig, resolve_defaults
from qmargin.training.factory import make_loss, make_model, make_optimizer, make_scheduler, resolve_device
from qmargin.training.randbet import RandBET, clip_weights_

__all__ = [
    "TrainingData",
    "ProgressCallback",
    "TrainResult",
    "train",
    "evaluate_accuracy",
    "objective",
    "seed_everything",
    "epoch_permutation",
    "RUN_FILES",
    "TrainingDivergedError",
]

RUN_FILES = (CONFIG_FILE, MODEL_FILE, INTEGER_FILE, METRICS_FILE, CHECKPOINT_FILE, STATE_FILE)
"""Every file the trainer writes into a run directory (``force`` removes exactly these)."""

# Config fields that may differ between the run that started a directory and the one resuming it.
_RESUMABLE_DIFFERENCES = frozenset({"device", "data_dir"})


class _DataInfo(Protocol):
    @property
    def input_shape(self) -> Sequence[int]: ...

    @property
    def num_classes(self) -> int: ...


class TrainingData(Protocol):
    """What :func:`train` reads of a dataset (``qmargin.data.Dataset`` is one): the four tensors and
    ``info.input_shape`` / ``info.num_classes`` (``info.name``, when present, is recorded)."""

    @property
    def x_train(self) -> Tensor: ...

    @property
    def y_train(self) -> Tensor: ...

    @property
    def x_test(self) -> Tensor: ...

    @property
    def y_test(self) -> Tensor: ...

    @property
    def info(self) -> _DataInfo: ...


class ProgressCallback(Protocol):
    """``progress(epoch, step, metrics)``, called by :func:`train`.

    ``metrics["event"]`` tells what happened:

    * ``"start"``: before the first epoch run now; ``epoch`` is that epoch, ``step`` the global step
      so far; metrics ``epochs``, ``steps_per_epoch``, ``resumed_epoch`` (0 for a fresh run).
    * ``"step"``: after every optimizer step; ``epoch`` (1-based), ``step`` (global, 1-based);
      metrics ``batch`` (1-based within the epoch), ``steps_per_epoch``, ``loss``, ``acc`` (of this
      batch, clean pass) and, with RandBET, ``loss_err``.
    * ``"epoch"``: after an epoch is complete and checkpointed; metrics are the epoch record
      (``train_loss``, ``train_acc``, ``test_acc``, ``lr``, ``train_time_s``, ...).

    An exception raised by the callback stops training; the run resumes from the last completed epoch.
    """

    def __call__(self, epoch: int, step: int, metrics: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """The outcome of :func:`train`."""

    run_dir: Path
    config: TrainConfig
    """The resolved config."""
    model: nn.Module
    """The trained model (eval mode) on the training device."""
    history: list[dict[str, Any]]
    """One record per epoch."""
    test_acc: float
    """Clean test accuracy of the quantized model after the last epoch."""
    train_time_s: float
    """Seconds spent in training steps, summed over all epochs (evaluation and checkpoints excluded)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The content of ``metrics.json``."""
    resumed_epoch: int = 0
    """Epochs restored from a checkpoint (0: trained from scratch)."""
    skipped: bool = False
    """True when the run directory already held a finished run and nothing was trained."""


# -- small pure helpers -------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and python ``random`` from ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _mix(*ints: int) -> int:
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint64)[0] >> 1)


def epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    """Order of the ``n`` training samples in ``epoch``: ``randperm`` from a ``torch.Generator`` seeded by
    a hash of ``(seed, epoch)``, so it does not depend on anything else that consumed randomness."""
    gen = torch.Generator().manual_seed(_mix(seed, epoch, 0xDA7A))
    return torch.randperm(n, generator=gen)


def objective(model: nn.Module, x: Tensor, y: Tensor, loss_fn: nn.Module) -> tuple[Tensor, Tensor]:
    """``(loss(f(x), y) + f.auxiliary_loss(), f(x))``; the auxiliary term only if the model defines it."""
    logits = model(x)
    loss = loss_fn(logits, y)
    if isinstance(model, HasAuxiliaryLoss):
        loss = loss + model.auxiliary_loss()
    return loss, logits


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy ``mean(argmax f(x) == y)`` in eval mode (the training mode is restored)."""
    if x.shape[0] == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        correct = torch.zeros((), dtype=torch.long, device=y.device)
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i : i + batch_size])
            correct += (logits.argmax(dim=1) == y[i : i + batch_size]).sum()
        return float(correct.item()) / x.shape[0]
    finally:
        model.train(was_training)


def _batches(perm: Tensor, batch_size: int) -> list[Tensor]:
    """Consecutive slices of ``perm``; a trailing batch of one sample is dropped (BatchNorm needs 2)."""
    out = list(torch.split(perm, batch_size))
    if len(out) > 1 and out[-1].numel() == 1:
        out.pop()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [k for k in da if k not in _RESUMABLE_DIFFERENCES and da[k] != db.get(k)]


def _check_same_config(run_dir: Path, stored: TrainConfig, config: TrainConfig) -> None:
    diff = _config_diff(stored, config)
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({k}: {getattr(stored, k)!r} there, "
            f"{getattr(config, k)!r} now); use another directory or force"
        )


def _tensors(dataset: TrainingData, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        parts = [dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test]
    except AttributeError as err:
        raise DataError(f"dataset lacks {err.name!r} (needs x_train, y_train, x_test, y_test)") from None
    x_tr, y_tr, x_te, y_te = (torch.as_tensor(p) for p in parts)
    if x_tr.shape[0] != y_tr.shape[0] or x_te.shape[0] != y_te.shape[0]:
        raise DataError("dataset: images and labels differ in number")
    if x_tr.shape[0] < 2:
        raise DataError(f"dataset: {x_tr.shape[0]} training samples; need at least 2")
    x_tr = x_tr if x_tr.is_floating_point() else x_tr.float()
    x_te = x_te if x_te.is_floating_point() else x_te.float()
    return x_tr.to(device), y_tr.long().to(device), x_te.to(device), y_te.long().to(device)


class TrainingDivergedError(ConfigError):
    """Training produced a non-finite loss, weight or optimizer state (a learning rate too large, ...).

    Raised before the epoch is checkpointed: the run directory keeps the last finite epoch."""


def _first_non_finite(tensors: dict[str, Tensor]) -> str | None:
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def _check_not_diverged(
    run_dir: Path, epoch: int, record: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Raise :class:`TrainingDivergedError` when the epoch's loss, the weights (state dict) or the
    optimizer state are not finite, naming what and where the run stands."""
    what = None
    for key in ("train_loss", "train_loss_err"):
        if key in record and not math.isfinite(record[key]):
            what = f"the training loss is {record[key]}"
            break
    if what is None:
        bad = _first_non_finite(dict(model.state_dict()))
        if bad is not None:
            what = f"weight {bad!r} is not finite"
    if what is None:
        for i, st in enumerate(optimizer.state.values()):
            bad = _first_non_finite({k: v for k, v in st.items() if isinstance(v, Tensor)})
            if bad is not None:
                what = f"optimizer state {bad!r} of parameter {i} is not finite"
                break
    if what is None:
        return
    kept = (
        f"{run_dir} keeps the checkpoint of epoch {epoch - 1}"
        if epoch > 1 and (run_dir / STATE_FILE).is_file()
        else f"nothing was checkpointed in {run_dir}"
    )
    raise TrainingDivergedError(
        f"training diverged in epoch {epoch} ({what}); {kept}. Lower the learning rate "
        "(--lr) and train again with --force or into another directory"
    )


def _remove_run_files(run_dir: Path) -> None:
    for name in RUN_FILES + DERIVED_FILES:  # results of the old weights go with them
        (run_dir / name).unlink(missing_ok=True)


# -- the trainer --------------------------------------------------------------------------------


@locked_run_dir  # one process per run directory, for the whole run
def train(
    config: TrainConfig,
    *,
    dataset: TrainingData | None = None,
    out_dir: str | Path,
    progress: ProgressCallback | Callable[[int, int, dict[str, Any]], None] | None = None,
    resume: bool = True,
    force: bool = False,
) -> TrainResult:
    """Train ``config`` into the run directory ``out_dir`` and return the result.

    Args:
        config: the run; loss defaults are resolved with :func:`resolve_defaults`.
        dataset: a loaded dataset (``x_train, y_train, x_test, y_test`` tensors and ``info`` with
            ``input_shape``, ``num_classes``); default ``qmargin.data.load_dataset(config.dataset,
            data_dir=config.data_dir)``.
        out_dir: the run directory (created if needed).
        progress: optional :class:`ProgressCallback`.
        resume: continue from ``checkpoint.safetensors`` when the directory holds an unfinished run
            of the same config (else start over).
        force: discard whatever the directory holds (finished or not) and train from scratch.

    A directory that already holds a finished run of the same config is not trained again: its
    stored result is returned (``skipped=True``). A directory holding a different config raises
    :class:`~qmargin.errors.ConfigError` unless ``force``.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train expects a TrainConfig, got {type(config).__name__}")
    cfg = resolve_defaults(config)
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)

    if force:
        _remove_run_files(run_dir)
    elif (run_dir / METRICS_FILE).is_file():
        stored, _ = read_run_config(run_dir)
        _check_same_config(run_dir, stored, cfg)
        return _stored_result(run_dir, device)

    if dataset is None:
        from qmargin.data import load_dataset

        dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    try:
        input_shape = tuple(int(s) for s in dataset.info.input_shape)
        num_classes = int(dataset.info.num_classes)
    except AttributeError:
        raise DataError("dataset lacks info.input_shape / info.num_classes") from None
    x_train, y_train, x_test, y_test = _tensors(dataset, device)

    seed_everything(cfg.seed)
    model = make_model(cfg, input_shape, num_classes).to(device)
    loss_fn = wrap_loss_units(make_loss(cfg).to(device), model)
    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = make_scheduler(cfg, optimizer)
    randbet = RandBET(cfg.train_ber, cfg.seed) if cfg.randbet else None

    meta: dict[str, Any] = {
        "config": cfg.to_dict(),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "num_train": int(x_train.shape[0]),
        "num_test": int(x_test.shape[0]),
        "dataset_name": str(getattr(dataset.info, "name", cfg.dataset)),
        "qmargin_version": qmargin.__version__,
        "torch_version": torch.__version__,
        "device": str(device),
    }
    state = TrainerState(epoch=0, global_step=0, history=[])
    has_ckpt = (run_dir / STATE_FILE).is_file() or (run_dir / CHECKPOINT_FILE).is_file()
    if has_ckpt and resume:
        stored, stored_meta = read_run_config(run_dir)
        _check_same_config(run_dir, stored, cfg)
        for key in ("input_shape", "num_classes", "num_train", "num_test"):
            if key in stored_meta and list(np.atleast_1d(stored_meta[key])) != list(np.atleast_1d(meta[key])):
                raise ConfigError(f"{run_dir}: the dataset differs from the one the run started with ({key})")
        state = load_checkpoint(
            run_dir, model=model, optimizer=optimizer, scheduler=scheduler, epochs=cfg.epochs
        )
    elif has_ckpt:
        _remove_run_files(run_dir)
    resumed_epoch = state.epoch
    atomic_write_json(run_dir / CONFIG_FILE, meta)

    n = int(x_train.shape[0])
    steps_per_epoch = len(_batches(torch.arange(n), cfg.batch_size))
    if progress is not None and state.epoch < cfg.epochs:
        progress(
            state.epoch + 1,
            state.global_step,
            {
                "event": "start",
                "epochs": cfg.epochs,
                "steps_per_epoch": steps_per_epoch,
                "resumed_epoch": resumed_epoch,
            },
        )

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        lr = float(optimizer.param_groups[0]["lr"])
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        loss_err_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for b, idx in enumerate(_batches(epoch_permutation(cfg.seed, epoch, n), cfg.batch_size), start=1):
            idx = idx.to(device)
            xb, yb = x_train[idx], y_train[idx]
            optimizer.zero_grad(set_to_none=True)
            if randbet is not None:
                out = randbet.backward(
                    model, partial(objective, x=xb, y=yb, loss_fn=loss_fn), state.global_step
                )
                loss, logits, loss_err = out.loss, out.logits, out.loss_err
            else:
                loss, logits = objective(model, xb, yb, loss_fn)
                loss.backward()
                loss, logits, loss_err = loss.detach(), logits.detach(), None
            optimizer.step()
            if cfg.w_max is not None:
                clip_weights_(model, cfg.w_max)
            state.global_step += 1
            bs = int(yb.shape[0])
            seen += bs
            batch_correct = (logits.argmax(dim=1) == yb).sum()
            correct += batch_correct
            loss_sum += loss.double() * bs
            if loss_err is not None:
                loss_err_sum += loss_err.double() * bs
            if progress is not None:
                step_metrics = {
                    "event": "step",
                    "batch": b,
                    "steps_per_epoch": steps_per_epoch,
                    "loss": float(loss),
                    "acc": float(batch_correct) / bs,
                }
                if loss_err is not None:
                    step_metrics["loss_err"] = float(loss_err)
                progress(epoch, state.global_step, step_metrics)
        _sync(device)
        train_time = time.perf_counter() - t0
        scheduler.step()
        test_acc = evaluate_accuracy(model, x_test, y_test, batch_size=max(1024, cfg.batch_size))
        record: dict[str, Any] = {
            "epoch": epoch,
            "steps": state.global_step,
            "lr": lr,
            "train_loss": float(loss_sum) / seen,
            "train_acc": float(correct) / seen,
            "test_acc": test_acc,
            "train_time_s": train_time,
            "epoch_time_s": time.perf_counter() - t0,
        }
        if randbet is not None:
            record["train_loss_err"] = float(loss_err_sum) / seen
        _check_not_diverged(run_dir, epoch, record, model, optimizer)
        state.history.append(record)
        state.epoch = epoch
        save_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler, state=state)
        if progress is not None:
            progress(epoch, state.global_step, {"event": "epoch", **record})

    return _finish(run_dir, cfg, model, state, meta, resumed_epoch)


def _finish(
    run_dir: Path, cfg: TrainConfig, model: nn.Module, state: TrainerState, meta: dict, resumed_epoch: int
) -> TrainResult:
    model.eval()
    save_tensors(run_dir / MODEL_FILE, dict(model.state_dict()))
    if cfg.quantized:
        export_integer_state(model).save(run_dir / INTEGER_FILE)
    history = state.history
    last = history[-1] if history else {}
    metrics = {
        "history": history,
        "test_acc": last.get("test_acc", float("nan")),
        "train_acc": last.get("train_acc", float("nan")),
        "train_loss": last.get("train_loss", float("nan")),
        "train_time_s": float(sum(r["train_time_s"] for r in history)),
        "epochs": len(history),
        "global_steps": state.global_step,
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "num_train": meta["num_train"],
        "num_test": meta["num_test"],
        "device": meta["device"],
        "resumed_epoch": resumed_epoch,
        "diverged": any(r.get("diverged", False) for r in history),
    }
    atomic_write_json(run_dir / METRICS_FILE, metrics)
    for name in (CHECKPOINT_FILE, STATE_FILE):
        (run_dir / name).unlink(missing_ok=True)
    return TrainResult(
        run_dir=run_dir,
        config=cfg,
        model=model,
        history=history,
        test_acc=float(metrics["test_acc"]),
        train_time_s=metrics["train_time_s"],
        metrics=metrics,
        resumed_epoch=resumed_epoch,
    )


def _stored_result(run_dir: Path, device: torch.device) -> TrainResult:
    model, cfg, metrics = load_run(run_dir, device=device)  # metrics validated by load_run
    return TrainResult(
        run_dir=run_dir,
        config=cfg,
        model=model,
        history=list(metrics["history"]),
        test_acc=float(metrics["test_acc"]),
        train_time_s=float(metrics["train_time_s"]),
        metrics=metrics,
        resumed_epoch=int(metrics.get("resumed_epoch", 0)),
        skipped=True,
    )
