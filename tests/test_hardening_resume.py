"""Hardening, class 5: resuming from (or displaying) files that were edited or damaged.

Every JSON file qmargin reads back is validated on load, in one place per file type:
``ber.json`` (``qmargin.experiments.campaign.validate_campaign``: ``evaluate`` resumes it, ``compare``
shows it), ``trainer_state.json``, ``config.json`` and ``metrics.json``
(``qmargin.training.validation``). Each case damages a copy of a real file written once per module
and runs the CLI: exit status 2, one line on stderr, and nothing "complete" written from the bad data.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmargin.cli import main
from qmargin.errors import CheckpointError
from qmargin.experiments.campaign import load_campaign
from qmargin.experiments.runs import TrainConfig, hidden_kwargs, load_dataset
from qmargin.training import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_run,
    train,
)

CLI_TRAIN = ["--dataset", "digits", "--hidden", "16", "--bits", "4", "--epochs", "2", "--device", "cpu", "-q"]
EVALUATE = ["--ber", "0,0.01", "--repeats", "3", "--device", "cpu", "--no-plot", "-q"]


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


def edit_json(path: Path, edit: Callable[[Any], Any]) -> str:
    data = json.loads(path.read_text())
    new = edit(data)
    text = json.dumps(data if new is None else new, allow_nan=True)
    path.write_text(text)
    return text


def setter(*keys: Any, value: Any) -> Callable[[Any], None]:
    """An edit that sets ``data[k0][k1]...[kn] = value``."""

    def edit(data: Any) -> None:
        target = data
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return edit


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run (CLI) with a complete campaign ``ber.json`` (CLI; BER 0 and 0.01, 3 patterns)."""
    run = tmp_path_factory.mktemp("resume") / "run"
    proc = run_cli("train", "--out", run, *CLI_TRAIN)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("evaluate", run, *EVALUATE)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "ber.json").read_text())["status"] == "complete"
    return run


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory) -> Path:
    """The CLI's run stopped after epoch 1 of 2 (the library with a progress callback that raises)."""

    class StopError(Exception):
        pass

    def stop(epoch, step, metrics):
        if metrics["event"] == "epoch":
            raise StopError

    cfg = TrainConfig(
        dataset="digits", model="mlp", bits=4, epochs=2, device="cpu", model_kwargs=hidden_kwargs("mlp", 16)
    )
    run = tmp_path_factory.mktemp("resume") / "unfinished"
    with pytest.raises(StopError):
        train(cfg, dataset=load_dataset("digits"), out_dir=run, progress=stop)
    return run


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for name in ("ber.csv", "ber.png"):
        (dst / name).unlink(missing_ok=True)
    return dst


# -- ber.json: evaluate (resume) and compare (display) ------------------------------------------


def _pop_result(data):
    data["results"].pop()


def _one_more_accuracy(data):
    data["results"][1]["accuracies"].append(0.5)


def _one_less_accuracy(data):
    data["results"][1]["accuracies"].pop()


CAMPAIGN_CASES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "accuracy 7.0": (setter("results", 1, "accuracies", 0, value=7.0), "accuracies"),
    "string accuracy": (setter("results", 1, "accuracies", 0, value="0.9"), "string"),
    "null accuracy": (setter("results", 1, "accuracies", 0, value=None), "null"),
    "infinite accuracy": (setter("results", 1, "accuracies", 0, value=math.inf), "finite"),
    "clean accuracy 1.5": (setter("clean_accuracy", value=1.5), "clean_accuracy"),
    "clean accuracy NaN": (setter("clean_accuracy", value=math.nan), "clean_accuracy"),
    "results shortened": (_pop_result, "results"),
    "results empty": (setter("results", value=[]), "results"),
    "more accuracies than repeats": (_one_more_accuracy, "repeats"),
    "complete with too few accuracies": (_one_less_accuracy, "complete"),
    "mean disagrees with accuracies": (setter("results", 1, "mean", value=3.95), "mean"),
    "std NaN": (setter("results", 1, "std", value=math.nan), "std"),
    "ber not on the grid": (setter("results", 1, "ber", value=0.5), "ber"),
    "repeats a string": (setter("repeats", value="3"), "repeats"),
    "seeds edited": (setter("seeds", 1, value=7), "seeds"),
    "unknown status": (setter("status", value="done"), "status"),
    "not an object": (lambda data: [data], "campaign"),
}


def _campaign_copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of the run's ``ber.json`` outside the run (``evaluate RUN --out COPY`` resumes it)."""
    out = tmp_path / "ber.json"
    shutil.copyfile(finished / "ber.json", out)
    return out


@pytest.mark.parametrize("case", sorted(CAMPAIGN_CASES))
def test_evaluate_and_compare_refuse_a_damaged_campaign(finished, tmp_path, capsys, case):
    edit, needle = CAMPAIGN_CASES[case]
    out = _campaign_copy(finished, tmp_path)
    damaged = edit_json(out, edit)
    with pytest.raises(CheckpointError, match=needle):
        load_campaign(out)

    line = one_line_error(run_cli("evaluate", finished, *EVALUATE, "--out", out), "ber.json")
    assert needle in line
    assert out.read_text() == damaged  # not rewritten from the bad data
    assert not out.with_suffix(".csv").exists()

    # compare in process (the same command; saves a torch start-up per case)
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(out), str(finished), "--out", str(tmp_path / "cmp.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qmargin: error: ") and needle in err
    assert not (tmp_path / "cmp.png").exists()


def test_evaluate_and_compare_accept_the_undamaged_campaign(finished, tmp_path):
    out = _campaign_copy(finished, tmp_path)
    proc = run_cli("evaluate", finished, *EVALUATE, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.with_suffix(".csv").is_file()
    proc = run_cli("compare", out, finished, "--out", tmp_path / "cmp.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cmp.png").is_file()


def test_a_partial_campaign_resumes(finished, tmp_path):
    """A valid partial file (fewer accuracies, status partial) is resumed to the same result."""
    out = _campaign_copy(finished, tmp_path)

    def partial(data):
        data["status"] = "partial"
        del data["results"][1]["accuracies"][1:]
        accs = data["results"][1]["accuracies"]
        data["results"][1].update(mean=accs[0], std=0.0, min=accs[0], max=accs[0])

    edit_json(out, partial)
    proc = run_cli("evaluate", finished, *EVALUATE, "--out", out)
    assert proc.returncode == 0, proc.stderr
    done, ref = json.loads(out.read_text()), json.loads((finished / "ber.json").read_text())
    assert done["results"] == ref["results"] and done["status"] == "complete"


# -- trainer_state.json: resume -------------------------------------------------------------------


def _drop(key: str) -> Callable[[Any], None]:
    def edit(data):
        del data[key]

    return edit


STATE_CASES: dict[str, Callable[[Any], Any]] = {
    "string epoch": setter("epoch", value="1"),
    "float epoch": setter("epoch", value=1.0),
    "epoch beyond the run": setter("epoch", value=5),
    "string global step": setter("global_step", value="x"),
    "NaN learning rate": setter("optimizer", "param_groups", 0, "lr", value=math.nan),
    "negative learning rate": setter("optimizer", "param_groups", 0, "lr", value=-1e-3),
    "NaN initial lr": setter("optimizer", "param_groups", 0, "initial_lr", value=math.nan),
    "NaN beta": setter("optimizer", "param_groups", 0, "betas", 0, value=math.nan),
    "NaN scheduler base lr": setter("scheduler", "base_lrs", 0, value=math.nan),
    "scheduler epoch edited": setter("scheduler", "last_epoch", value=7),
    "history emptied": setter("history", value=[]),
    "history accuracy 7.0": setter("history", 0, "test_acc", value=7.0),
    "history NaN loss": setter("history", 0, "train_loss", value=math.nan),
    "optimizer missing": _drop("optimizer"),
    "numpy RNG position a string": setter("rng", "numpy", "pos", value="x"),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_train_refuses_to_resume_from_a_damaged_trainer_state(unfinished, tmp_path, case):
    run = _copy(unfinished, tmp_path / "run")
    damaged = edit_json(run / STATE_FILE, STATE_CASES[case])
    one_line_error(run_cli("train", "--out", run, *CLI_TRAIN), STATE_FILE)
    assert not (run / METRICS_FILE).exists() and not (run / MODEL_FILE).exists()
    assert (run / STATE_FILE).read_text() == damaged and (run / CHECKPOINT_FILE).is_file()


# -- config.json and metrics.json of a finished run: evaluate, train (stored result) --------------------


CONFIG_CASES: dict[str, Callable[[Any], Any]] = {
    "string input size": setter("input_shape", 0, value="64"),
    "fractional input size": setter("input_shape", 0, value=64.5),
    "string class count": setter("num_classes", value="10"),
    "one class": setter("num_classes", value=1),
    "negative train size": setter("num_train", value=-1),
    "NaN learning rate": setter("config", "lr", value=math.nan),
    "string epochs": setter("config", "epochs", value="2"),
}

METRICS_CASES: dict[str, Callable[[Any], Any]] = {
    "test accuracy 7.0": setter("test_acc", value=7.0),
    "string test accuracy": setter("test_acc", value="0.9"),
    "NaN train loss": setter("train_loss", value=math.nan),
    "history shortened": setter("history", value=[]),
    "string epochs": setter("epochs", value="2"),
    "negative training time": setter("train_time_s", value=-3.0),
    "global steps disagree": setter("global_steps", value=10**6),
    "not an object": lambda data: [data],
}


@pytest.mark.parametrize(
    "file, case",
    [(CONFIG_FILE, c) for c in sorted(CONFIG_CASES)] + [(METRICS_FILE, c) for c in sorted(METRICS_CASES)],
)
def test_a_damaged_finished_run_is_refused(finished, tmp_path, file, case):
    run = _copy(finished, tmp_path / "run")
    (run / "ber.json").unlink()
    edit_json(run / file, (CONFIG_CASES if file == CONFIG_FILE else METRICS_CASES)[case])
    with pytest.raises(CheckpointError):
        load_run(run)
    one_line_error(run_cli("evaluate", run, *EVALUATE), file)
    assert not (run / "ber.json").exists() and not (run / "ber.csv").exists()
    if case in ("test accuracy 7.0", "history shortened"):  # `train` returns the stored result: refused
        one_line_error(run_cli("train", "--out", run, *CLI_TRAIN), file)
