"""Hardening, class 4: bad numbers in weights (non-finite values, unexpected dtypes) and diverged training.

Every loader refuses a non-finite or wrongly typed tensor, naming it: ``load_run`` (``qmargin
evaluate`` / ``certify`` on a run directory), the trainer's resume from ``checkpoint.safetensors``
and the MonDEQ importers (``.pt`` state dicts). A diverging training run stops with one line and
keeps its last finite checkpoint. Real files: one run is trained per module, copies are damaged.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qmargin.errors import CheckpointError
from qmargin.experiments.runs import TrainConfig, hidden_kwargs, load_dataset
from qmargin.training import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    TrainingDivergedError,
    load_run,
    train,
)

# The run the CLI's `train --out D --hidden 16 --bits 4 --epochs 2 --device cpu` makes.
CLI_TRAIN = ["--dataset", "digits", "--hidden", "16", "--bits", "4", "--epochs", "2", "--device", "cpu", "-q"]


def cli_config(epochs: int = 2) -> TrainConfig:
    return TrainConfig(
        dataset="digits",
        model="mlp",
        bits=4,
        epochs=epochs,
        device="cpu",
        model_kwargs=hidden_kwargs("mlp", 16),
    )


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qmargin", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qmargin: error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def edit_safetensors(path: Path, name: str, edit) -> None:
    tensors, meta = read_safetensors(path)
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, str(path), metadata=meta)


def _set(value: float):
    def edit(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[0] = value
        return t

    return edit


WEIGHT_CASES = {
    "nan weight": ("{w}", _set(math.nan), ["non-finite", "{w}"]),
    "inf weight": ("{w}", _set(math.inf), ["non-finite", "{w}"]),
    "-inf bias": ("{b}", _set(-math.inf), ["non-finite", "{b}"]),
    "float64 weight": ("{w}", lambda t: t.double(), ["float64", "{w}"]),
    "float16 weight": ("{w}", lambda t: t.half(), ["float16", "{w}"]),
    "int32 weight": ("{w}", lambda t: t.round().int(), ["int32", "{w}"]),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-epoch run written by the CLI."""
    run = tmp_path_factory.mktemp("weights") / "run"
    proc = run_cli("train", "--out", run, *CLI_TRAIN)
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory) -> Path:
    """The same run stopped after epoch 1 of 2 (checkpoint.safetensors + trainer_state.json)."""

    class StopError(Exception):
        pass

    def stop(epoch, step, metrics):
        if metrics["event"] == "epoch":
            raise StopError

    run = tmp_path_factory.mktemp("weights") / "unfinished"
    with pytest.raises(StopError):
        train(cli_config(), dataset=load_dataset("digits"), out_dir=run, progress=stop)
    assert (run / STATE_FILE).is_file() and not (run / METRICS_FILE).exists()
    return run


def _names(run: Path, prefix: str = "") -> tuple[str, str]:
    tensors, _ = read_safetensors(run / (CHECKPOINT_FILE if prefix else MODEL_FILE))
    weight = next(k for k in sorted(tensors) if k.startswith(prefix) and k.endswith("weight"))
    bias = next(k for k in sorted(tensors) if k.startswith(prefix) and k.endswith("bias"))
    return weight, bias


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_evaluate_refuses_bad_weights_in_model_file(finished_run, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    w, b = _names(run)
    key, edit, needles = WEIGHT_CASES[case]
    edit_safetensors(run / MODEL_FILE, key.format(w=w, b=b), edit)
    out = tmp_path / "ber.json"
    proc = run_cli("evaluate", run, "--ber", "0,0.01", "--repeats", "2", "--out", out, "--no-plot", "-q")
    one_line_error(proc, MODEL_FILE, *(n.format(w=w, b=b) for n in needles))
    assert not out.exists() and not out.with_suffix(".csv").exists()
    with pytest.raises(CheckpointError):  # the library loader is the one that refuses
        load_run(run)


def test_evaluate_accepts_the_undamaged_run(finished_run, tmp_path):
    out = tmp_path / "ber.json"
    proc = run_cli(
        "evaluate", finished_run, "--ber", "0,0.01", "--repeats", "2", "--out", out, "--no-plot", "-q"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["status"] == "complete"


CHECKPOINT_CASES = {
    **{f"model {k}": v for k, v in WEIGHT_CASES.items()},
    "nan optimizer moment": ("optim.0.exp_avg", _set(math.nan), ["non-finite", "optim.0.exp_avg"]),
    "inf optimizer second moment": (
        "optim.0.exp_avg_sq",
        _set(math.inf),
        ["non-finite", "optim.0.exp_avg_sq"],
    ),
    "float RNG state": ("rng.torch", lambda t: t.float(), ["rng.torch"]),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_resume_refuses_bad_tensors_in_checkpoint(unfinished_run, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(unfinished_run, run)
    w, b = (k.removeprefix("model.") for k in _names(run, "model."))
    key, edit, needles = CHECKPOINT_CASES[case]
    name = key.format(w=w, b=b)
    if not name.startswith(("optim.", "rng.")):
        name = f"model.{name}"
    edit_safetensors(run / CHECKPOINT_FILE, name, edit)
    proc = run_cli("train", "--out", run, *CLI_TRAIN)
    one_line_error(proc, CHECKPOINT_FILE, *(n.format(w=w, b=b) for n in needles))
    assert not (run / METRICS_FILE).exists() and not (run / MODEL_FILE).exists()


def test_resume_from_the_undamaged_checkpoint(unfinished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(unfinished_run, run)
    proc = run_cli("train", "--out", run, *CLI_TRAIN)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / METRICS_FILE).read_text())["resumed_epoch"] == 1


# -- diverging training -------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_cli_training_with_huge_lr_stops_and_saves_nothing_non_finite(tmp_path, optimizer):
    run = tmp_path / "run"
    proc = run_cli("train", "--out", run, *CLI_TRAIN, "--lr", "1e30", "--optimizer", optimizer)
    one_line_error(proc)
    assert not (run / METRICS_FILE).exists() and not (run / MODEL_FILE).exists()
    for name in (CHECKPOINT_FILE, MODEL_FILE):
        if (run / name).exists():
            tensors, _ = read_safetensors(run / name)
            assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


@pytest.mark.parametrize("what", ["weight", "loss"])
def test_divergence_keeps_the_last_finite_checkpoint_and_resumes_from_it(tmp_path, monkeypatch, what):
    """Epoch 2 of 3 turns non-finite: training stops, the directory keeps epoch 1, resume works."""
    import qmargin.training.trainer as trainer_mod

    data = load_dataset("digits")
    cfg = cli_config(epochs=3)
    run = tmp_path / "run"
    real_objective = trainer_mod.objective
    state = {"epoch": 0}

    def progress(epoch, step, metrics):
        state["epoch"] = epoch

    def objective(model, x, y, loss_fn):
        loss, logits = real_objective(model, x, y, loss_fn)
        if state["epoch"] == 2:
            if what == "weight":
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = math.nan
            else:
                loss = loss * math.inf
        return loss, logits

    monkeypatch.setattr(trainer_mod, "objective", objective)
    with pytest.raises(TrainingDivergedError, match="epoch 2") as info:
        train(cfg, dataset=data, out_dir=run, progress=progress)
    assert "keeps the checkpoint of epoch 1" in str(info.value) and "\n" not in str(info.value)
    assert json.loads((run / STATE_FILE).read_text())["epoch"] == 1
    tensors, meta = read_safetensors(run / CHECKPOINT_FILE)
    assert meta["epoch"] == "1"
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    assert not (run / METRICS_FILE).exists() and not (run / MODEL_FILE).exists()

    monkeypatch.setattr(trainer_mod, "objective", real_objective)
    result = train(cfg, dataset=data, out_dir=run)
    assert result.resumed_epoch == 1 and len(result.history) == 3
    assert math.isfinite(result.history[-1]["train_loss"])
    load_run(run)  # the finished run loads: everything finite


def test_divergence_in_the_first_epoch_checkpoints_nothing(tmp_path, monkeypatch):
    import qmargin.training.trainer as trainer_mod

    real_objective = trainer_mod.objective

    def objective(model, x, y, loss_fn):
        loss, logits = real_objective(model, x, y, loss_fn)
        return loss * math.nan, logits

    monkeypatch.setattr(trainer_mod, "objective", objective)
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="nothing was checkpointed"):
        train(cli_config(), dataset=load_dataset("digits"), out_dir=run)
    assert not (run / CHECKPOINT_FILE).exists() and not (run / STATE_FILE).exists()
    assert not (run / METRICS_FILE).exists() and not (run / MODEL_FILE).exists()


# -- MonDEQ importers (.pt state dicts, torch.load(weights_only=True)) ------------------------------


def _companion_2026(n: int = 8, d: int = 64, r: int = 3, classes: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "mon.core.A": 0.1 * torch.randn(r, n, generator=g),
        "mon.core.S": 0.1 * torch.randn(n, n, generator=g),
        "mon.core.m_raw": torch.tensor(0.5),
        "mon.core.U": 0.1 * torch.randn(n, d, generator=g),
        "mon.core.b": 0.1 * torch.randn(n, generator=g),
        "classifier.weight": 0.1 * torch.randn(classes, n, generator=g),
        "classifier.bias": 0.1 * torch.randn(classes, generator=g),
    }


IMPORT_CASES = {
    "nan in S": ("mon.core.S", _set(math.nan), "non-finite"),
    "inf in U": ("mon.core.U", _set(math.inf), "non-finite"),
    "nan m_raw": ("mon.core.m_raw", lambda t: torch.tensor(math.nan), "non-finite"),
    "float64 A": ("mon.core.A", lambda t: t.double(), "float64"),
    "float16 head": ("classifier.weight", lambda t: t.half(), "float16"),
    "bfloat16 bias": ("mon.core.b", lambda t: t.bfloat16(), "bfloat16"),
    "int64 bias": ("classifier.bias", lambda t: t.long(), "int64"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_certify_refuses_bad_imported_state_dicts(tmp_path, case):
    key, edit, needle = IMPORT_CASES[case]
    sd = _companion_2026()
    sd[key] = edit(sd[key].clone())
    path = tmp_path / "mondeq.pt"
    torch.save(sd, path)
    out = tmp_path / "cert.json"
    one_line_error(run_cli("certify", path, "--bits", "4", "--out", out), key, needle)
    assert not out.exists()


def test_certify_accepts_the_undamaged_state_dict(tmp_path):
    path = tmp_path / "mondeq.pt"
    torch.save(_companion_2026(), path)
    out = tmp_path / "cert.json"
    proc = run_cli("certify", path, "--bits", "4", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
