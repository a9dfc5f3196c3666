"""Hardening, class 6: flag values the library used to reject with a plain exception (or not at all).

Every option of every command is found by walking the click command tree of ``qmargin.cli.app`` (a
new command or option is covered without a line here) and must carry a checked type of
``qmargin.cli.options`` (or be a path or a boolean flag). Each option is fed the invalid values of its
type (``nan``, ``inf``, ``-1``, ``0``, below / above its range, ``10**30``, ``abc``, ``1.5`` for an
integer, empty, blank, unknown devices and choices): exit status 2, exactly one line on stderr naming
the flag, no traceback, nothing written. The library refuses the same values with a ``ConfigError``
where they enter it (the root causes), and the issue's examples run as real processes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import torch
import typer

from qmargin.cli import main
from qmargin.cli import options as opt
from qmargin.cli.app import MCEL_PRESETS, MONDEQ_PRESETS, OPTIMIZER, QUANT, SCHEDULE, app
from qmargin.cli.errors import run_guarded
from qmargin.errors import ConfigError, UserError

# -- the command tree ---------------------------------------------------------------------------


def _commands(
    cmd: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield path, cmd
        return
    for name, sub in subs.items():
        yield from _commands(sub, (*path, name))


ROOT = typer.main.get_command(app)
COMMANDS = dict(_commands(ROOT))
PARAMS = [(path, param) for path, cmd in COMMANDS.items() for param in cmd.params if param.name != "help"]


def _pid(path: tuple[str, ...], param: click.Parameter) -> str:
    return " ".join(path) + " " + (param.opts[0] if isinstance(param, click.Option) else param.name or "?")


def _declared(param: click.Parameter) -> bool:
    if isinstance(param.type, opt.QmarginType | click.Path):
        return True
    return (
        isinstance(param, click.Option)
        and param.is_flag
        and isinstance(param.type, click.types.BoolParamType)
    )


def test_every_option_of_every_command_has_a_checked_type():
    assert len(COMMANDS) >= 9 and len(PARAMS) >= 60  # the walk found the tree
    undeclared = [_pid(path, p) for path, p in PARAMS if not _declared(p)]
    assert not undeclared, (
        "options without a checked type (use click_type=... from qmargin.cli.options): "
        + ", ".join(undeclared)
    )


def test_integer_options_have_an_upper_bound_and_reals_refuse_nan():
    for path, p in PARAMS:
        t = p.type
        if isinstance(t, opt.Integer):
            assert t.hi < 10**19, _pid(path, p)
        for bad in ("nan", "abc", "", " "):
            if isinstance(t, opt.Real | opt.Integer | opt.Reals | opt.Integers | opt.Device | opt.Choice):
                with pytest.raises(click.BadParameter):
                    t.convert(bad, p, None)


def test_defaults_are_valid_values():
    for _, p in PARAMS:
        if isinstance(p.type, opt.QmarginType) and p.default is not None:
            p.type.convert(p.default, p, None)  # raises if a default is outside its own type


def test_declared_choices_are_the_librarys():
    from qmargin.experiments import mcel, mondeq
    from qmargin.faults.functional import SEED_RANGE
    from qmargin.training.config import DEVICES, OPTIMIZERS, QUANT_MODES, SCHEDULES

    assert QUANT.choices == QUANT_MODES
    assert OPTIMIZER.choices == OPTIMIZERS
    assert SCHEDULE.choices == SCHEDULES
    assert set(MCEL_PRESETS) == {*mcel.PRESETS, "full"}
    assert set(MONDEQ_PRESETS) == set(mondeq.PRESETS)
    assert SEED_RANGE == (0, opt.SEED_LIMIT)
    for d in DEVICES:
        if d != "cuda" or torch.cuda.is_available():
            assert opt.TRAIN_DEVICE.convert(d, None, None) == d


# -- every option x its invalid values, in process -----------------------------------------------

GENERIC_BAD = ["nan", "inf", "-inf", "-1", "0", "1e400", str(10**30), "abc", "", " "]


def _refuses(t: click.ParamType, value: str) -> bool:
    try:
        t.convert(value, None, None)
    except click.BadParameter:
        return True
    return False


def _bad_values(param: click.Parameter) -> list[str]:
    t = param.type
    if not isinstance(t, opt.QmarginType):
        return []
    values = dict.fromkeys([*t.invalid_examples(), *GENERIC_BAD])
    return [v for v in values if _refuses(t, v)]


CASES = [
    pytest.param(path, p.name, value, id=f"{_pid(path, p)}={value!r}")
    for path, p in PARAMS
    if isinstance(p, click.Option)
    for value in _bad_values(p)
]


def test_every_typed_option_gets_invalid_values():
    covered = {(path, name) for path, name, _ in (c.values for c in CASES)}
    missing = [
        _pid(path, p)
        for path, p in PARAMS
        if isinstance(p, click.Option)
        and isinstance(p.type, opt.QmarginType)
        and (path, p.name) not in covered
    ]
    assert not missing, missing
    invalid = {v for *_, v in (c.values for c in CASES)}
    assert {"nan", "inf", "-1", "0", str(10**30), "abc", ""} <= invalid


def _required_args(cmd: click.Command, where: Path) -> list[str]:
    """Values for the required parameters, so the only error is the one under test."""
    args: list[str] = []
    for p in cmd.params:
        if not p.required:
            continue
        value = str(where / f"given-{p.name}")
        args += [value] if isinstance(p, click.Argument) else [p.opts[0], value]
    return args


def run_main(argv: list[str]) -> int:
    """``qmargin.cli.main`` in process; its exit status (a user error exits through ``SystemExit``)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("qmargin: error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cwd")


@pytest.mark.parametrize("path, name, value", CASES)
def test_an_invalid_value_is_one_line_exit_2_and_writes_nothing(
    path, name, value, workdir, monkeypatch, capsys
):
    """Through ``run_guarded`` (what ``qmargin.cli.main`` runs) on the tree built once, in ``workdir``."""
    monkeypatch.chdir(workdir)
    cmd = COMMANDS[path]
    param = next(p for p in cmd.params if p.name == name)
    flag = param.opts[0]
    before = _snapshot(workdir)
    try:
        code = run_guarded(ROOT, [*path, *_required_args(cmd, workdir), flag, value])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    _one_line(err, flag)
    assert _snapshot(workdir) == before


# -- values only the command or the library can judge -----------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A finished MLP run with a campaign, a MonDEQ run and 2020 / 2026-format ``.pt`` state dicts."""
    from qmargin.experiments.evaluate import evaluate_run
    from qmargin.experiments.runs import TrainConfig, hidden_kwargs, load_dataset
    from qmargin.training import train

    root = tmp_path_factory.mktemp("flags")
    data = load_dataset("digits")
    mlp = TrainConfig(
        dataset="digits", model="mlp", bits=4, epochs=1, device="cpu", model_kwargs=hidden_kwargs("mlp", 16)
    )
    train(mlp, dataset=data, out_dir=root / "run")
    evaluate_run(
        root / "run",
        bers=[0.0, 0.01],
        repeats=2,
        base_seed=100,
        out_path=root / "run" / "ber.json",
        device="cpu",
    )
    mdq = mlp.replace(model="mondeq", model_kwargs={"n": 8})
    train(mdq, dataset=data, out_dir=root / "mondeq")
    g = torch.Generator().manual_seed(0)
    n, d, r, c = 7, 64, 4, 10
    p = "mon.linear_module."
    torch.save(
        {
            f"{p}U.weight": torch.randn(n, d, generator=g),
            f"{p}U.bias": torch.randn(n, generator=g),
            f"{p}A.weight": torch.randn(r, n, generator=g),
            f"{p}B.weight": torch.randn(n, n, generator=g),
            "Wout.weight": torch.randn(c, n, generator=g),
            "Wout.bias": torch.randn(c, generator=g),
        },
        root / "ref2020.pt",
    )
    torch.save(
        {
            "mon.core.A": torch.randn(r, n, generator=g),
            "mon.core.S": torch.randn(n, n, generator=g),
            "mon.core.m_raw": torch.tensor(-0.7),
            "mon.core.U": torch.randn(n, d, generator=g),
            "mon.core.b": torch.randn(n, generator=g),
            "classifier.weight": torch.randn(c, n, generator=g),
            "classifier.bias": torch.randn(c, generator=g),
        },
        root / "comp2026.pt",
    )
    return {
        "run": root / "run",
        "mondeq": root / "mondeq",
        "pt2020": root / "ref2020.pt",
        "pt2026": root / "comp2026.pt",
        "root": root,
    }


def _run_cli(*args: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qmargin", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


HUGE_SEED = str(2**63)
# (argv with {run} / {mondeq} / {pt2020} / {pt2026} / {out}, text the line must hold)
PROCESS_CASES = {
    "certify --m nan": (["certify", "{pt2020}", "--m", "nan"], "--m"),
    "certify --m -1": (["certify", "{pt2020}", "--m", "-1"], "--m"),
    "certify --m 0": (["certify", "{pt2020}", "--m", "0"], "--m"),
    "certify --m inf": (["certify", "{pt2020}", "--m", "inf"], "--m"),
    "certify --m on a run": (["certify", "{mondeq}", "--m", "2", "--out", "{out}"], "stores its m"),
    "certify --m on a 2026 file": (["certify", "{pt2026}", "--m", "2", "--out", "{out}"], "stores its m"),
    "train mondeq --hidden 0": (
        ["train", "--out", "{out}", "--model", "mondeq", "--hidden", "0"],
        "--hidden",
    ),
    "evaluate --device foo": (["evaluate", "{run}", "--device", "foo", "--out", "{out}"], "--device"),
    "evaluate --seed 2**63": (["evaluate", "{run}", "--seed", HUGE_SEED, "--out", "{out}"], "--seed"),
    "evaluate --seed 2**63-1 --repeats 2": (
        ["evaluate", "{run}", "--seed", str(2**63 - 1), "--repeats", "2", "--out", "{out}"],
        "2**63",
    ),
    "evaluate --repeats 1000000000": (
        ["evaluate", "{run}", "--repeats", "1000000000", "--out", "{out}"],
        "--repeats",
    ),
    "certify --ber --seed 2**63-1 --patterns 2": (
        [
            "certify",
            "{mondeq}",
            "--ber",
            "0.01",
            "--seed",
            str(2**63 - 1),
            "--patterns",
            "2",
            "--out",
            "{out}",
        ],
        "--patterns",
    ),
    "train --seed 2**64": (["train", "--out", "{out}", "--seed", str(2**64)], "--seed"),
    "train --lr nan": (["train", "--out", "{out}", "--lr", "nan"], "--lr"),
    "train --dataset unknown": (["train", "--out", "{out}", "--dataset", "nosuch"], "nosuch"),
    "train --model unknown": (["train", "--out", "{out}", "--model", "nosuch"], "nosuch"),
    "train --loss unknown": (["train", "--out", "{out}", "--loss", "nosuch"], "nosuch"),
    "train resnet20 --hidden 8": (
        ["train", "--out", "{out}", "--model", "resnet20", "--hidden", "8"],
        "hidden",
    ),
}


IN_PROCESS = {
    "certify --m on a run",
    "certify --m on a 2026 file",
    "train --dataset unknown",
    "train --model unknown",
    "train --loss unknown",
    "train resnet20 --hidden 8",
    "certify --ber --seed 2**63-1 --patterns 2",
}
"""Cases judged after torch is loaded run in process (a process each would cost seconds); the issue's
examples run as real processes."""


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_issue_examples_exit_2_with_one_line_and_write_nothing(case, files, tmp_path, capsys):
    argv, needle = PROCESS_CASES[case]
    names = {**{k: str(v) for k, v in files.items()}, "out": str(tmp_path / "out")}
    args = [a.format(**names) for a in argv]
    before = {k: _snapshot(files[k]) for k in ("run", "mondeq")}
    if case in IN_PROCESS:
        code, err = run_main(args), capsys.readouterr().err
    else:
        proc = _run_cli(*args)
        code, err = proc.returncode, proc.stderr
    assert code == 2, (code, err)
    _one_line(err, needle)
    assert not (tmp_path / "out").exists()
    assert {k: _snapshot(files[k]) for k in ("run", "mondeq")} == before


# -- compare: a result whose ber is not a number (refused by validate_campaign) ----------------------


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: d["results"][1].__setitem__("ber", "abc"), id="results ber a string"),
        pytest.param(lambda d: d["results"][1].__setitem__("ber", None), id="results ber null"),
        pytest.param(lambda d: d["results"][1].__setitem__("ber", math.nan), id="results ber NaN"),
        pytest.param(lambda d: d.__setitem__("bers", [0.0, "0.01"]), id="grid ber a string"),
        pytest.param(lambda d: d.__setitem__("bers", [0.0, math.inf]), id="grid ber inf"),
    ],
)
def test_compare_refuses_a_result_whose_ber_is_not_a_number(edit, files, tmp_path, monkeypatch, capsys):
    from qmargin.experiments.campaign import load_campaign

    data = json.loads((files["run"] / "ber.json").read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data, allow_nan=True))
    with pytest.raises(UserError):  # refused where it is loaded (validate_campaign)
        load_campaign(bad)
    monkeypatch.chdir(tmp_path)
    code = run_main(["compare", str(files["run"]), str(bad), "--out", str(tmp_path / "c.png")])
    assert code == 2
    _one_line(capsys.readouterr().err, "bad.json")
    assert not (tmp_path / "c.png").exists()


# -- the library refuses the same values (root causes) ---------------------------------------------


def _library_cases(files: dict[str, Path]) -> dict[str, Any]:
    from qmargin.deq import MonotoneLinear, certify_under_bit_errors
    from qmargin.experiments.certify import certify_checkpoint
    from qmargin.experiments.evaluate import evaluate_run
    from qmargin.experiments.runs import TrainConfig, hidden_kwargs
    from qmargin.models import build_model
    from qmargin.quant import QuantSpec, quantize
    from qmargin.training import resolve_device

    def bit_errors(seed: int, patterns: int) -> Any:
        W = -torch.eye(4, dtype=torch.float64)
        spec = QuantSpec(4)
        codes, scale, zp = quantize(W, spec)
        return lambda: certify_under_bit_errors(W, codes, scale, zp, spec, 0.01, patterns, seed)

    cases: dict[str, Any] = {}
    for m in (math.nan, math.inf, -1.0, 0.0):
        cases[f"MonotoneLinear m={m}"] = lambda m=m: MonotoneLinear(4, 3, m=m)
        cases[f"certify .pt m={m}"] = lambda m=m: certify_checkpoint(files["pt2020"], bits=[4], m=m)
    cases["certify run with m"] = lambda: certify_checkpoint(files["mondeq"], bits=[4], m=1.0)
    cases["certify 2026 .pt with m"] = lambda: certify_checkpoint(files["pt2026"], bits=[4], m=1.0)
    for n in (0, -3, 2.5):
        cases[f"mondeq n={n}"] = lambda n=n: build_model(
            "mondeq", input_shape=(1, 8, 8), num_classes=10, spec=None, n=n
        )
    cases["mlp hidden 0"] = lambda: build_model(
        "mlp", input_shape=(1, 8, 8), num_classes=10, spec=None, hidden=[0, 4]
    )
    cases["hidden_kwargs 0"] = lambda: hidden_kwargs("mondeq", 0)
    for d in ("foo", "gpu", "cuda:x", "cpu:0", "mps"):
        cases[f"resolve_device {d}"] = lambda d=d: resolve_device(d)
    if not torch.cuda.is_available():
        cases["resolve_device cuda:0 without a GPU"] = lambda: resolve_device("cuda:0")
    for s in (2**63, -1, True, 1.0):
        cases[f"TrainConfig seed={s!r}"] = lambda s=s: TrainConfig(dataset="digits", model="mlp", seed=s)
    cases["bit-error certificate seed 2**63-1, 2 patterns"] = bit_errors(2**63 - 1, 2)
    cases["bit-error certificate seed 2**63"] = bit_errors(2**63, 1)
    cases["evaluate_run device foo"] = lambda: evaluate_run(
        files["run"], bers=[0.0], repeats=1, base_seed=0, out_path=files["root"] / "lib.json", device="foo"
    )
    return cases


LIBRARY_CASES = [
    "MonotoneLinear m=nan",
    "MonotoneLinear m=inf",
    "MonotoneLinear m=-1.0",
    "MonotoneLinear m=0.0",
    "certify .pt m=nan",
    "certify .pt m=inf",
    "certify .pt m=-1.0",
    "certify .pt m=0.0",
    "certify run with m",
    "certify 2026 .pt with m",
    "mondeq n=0",
    "mondeq n=-3",
    "mondeq n=2.5",
    "mlp hidden 0",
    "hidden_kwargs 0",
    "resolve_device foo",
    "resolve_device gpu",
    "resolve_device cuda:x",
    "resolve_device cpu:0",
    "resolve_device mps",
    "TrainConfig seed=9223372036854775808",
    "TrainConfig seed=-1",
    "TrainConfig seed=True",
    "TrainConfig seed=1.0",
    "bit-error certificate seed 2**63-1, 2 patterns",
    "bit-error certificate seed 2**63",
    "evaluate_run device foo",
]


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_the_library_refuses_the_same_values_with_a_config_error(case, files):
    call = _library_cases(files)[case]
    with pytest.raises(ConfigError) as info:
        call()
    assert "\n" not in str(info.value)
    assert not (files["root"] / "lib.json").exists()


def test_the_library_case_table_is_complete(files):
    assert set(_library_cases(files)) - {"resolve_device cuda:0 without a GPU"} == set(LIBRARY_CASES)
