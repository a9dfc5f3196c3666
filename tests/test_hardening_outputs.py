"""Outputs that would destroy something are refused, in one place (qmargin.files.check_output).

Every case uses real files: a FIFO, a directory, the character device /dev/full, symbolic and hard
links. The library writers, the CLI commands and the trainer's --force are each checked on a table.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import typer

from qmargin.cli import main
from qmargin.cli.app import app
from qmargin.files import (
    OutputError,
    atomic_path,
    check_output,
    check_outputs,
    write_bytes_atomic,
    write_json_atomic,
    write_safetensors_atomic,
    write_text_atomic,
)

DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(
    not (DEV_FULL.exists() and stat.S_ISCHR(os.stat(DEV_FULL).st_mode)), reason="no /dev/full"
)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- the targets ----------------------------------------------------------------------------------


def _fifo(tmp: Path) -> Path:
    p = tmp / "fifo"
    os.mkfifo(p)
    return p


def _directory(tmp: Path) -> Path:
    p = tmp / "dir.json"
    (p / "child").mkdir(parents=True)
    return p


def _empty_directory(tmp: Path) -> Path:
    p = tmp / "empty.json"
    p.mkdir()
    return p


def _link_to_dev_full(tmp: Path) -> Path:
    p = tmp / "link-to-device.json"
    p.symlink_to(DEV_FULL)
    return p


def _link_to_directory(tmp: Path) -> Path:
    (tmp / "target-dir").mkdir()
    p = tmp / "link-to-dir.json"
    p.symlink_to(tmp / "target-dir")
    return p


def _dangling_link(tmp: Path) -> Path:
    p = tmp / "dangling.json"
    p.symlink_to(tmp / "nothing-here")
    return p


def _below_a_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("keep")
    return tmp / "afile" / "out.json"


def _dev_full(tmp: Path) -> Path:
    return DEV_FULL


REFUSED: list[tuple[str, Callable[[Path], Path], str]] = [
    ("fifo", _fifo, "a FIFO"),
    ("directory", _directory, "a directory"),
    ("empty directory", _empty_directory, "a directory"),
    ("/dev/full", _dev_full, "a character device"),
    ("symlink to /dev/full", _link_to_dev_full, "symbolic link to a character device"),
    ("symlink to a directory", _link_to_directory, "symbolic link to a directory"),
    ("dangling symlink", _dangling_link, "symbolic link to nothing"),
    ("below a regular file", _below_a_file, "is not a directory"),
]
REFUSED_IDS = [case[0] for case in REFUSED]


def _snapshot(p: Path) -> tuple:
    """What must not change: the kind of file (lstat) and, for regular files, the bytes."""
    if not os.path.lexists(p):
        return ("absent",)
    st = os.lstat(p)
    return (stat.S_IFMT(st.st_mode), st.st_ino, p.read_bytes() if stat.S_ISREG(st.st_mode) else None)


@pytest.mark.parametrize("name, make, needle", REFUSED, ids=REFUSED_IDS)
def test_check_output_refuses_what_is_not_a_regular_file(tmp_path, name, make, needle):
    if "dev/full" in name and not DEV_FULL.exists():
        pytest.skip("no /dev/full")
    target = make(tmp_path)
    with pytest.raises(OutputError, match=needle):
        check_output(target)


def _write_text(p: Path) -> None:
    write_text_atomic(p, "new")


def _write_json(p: Path) -> None:
    write_json_atomic(p, {"a": 1})


def _write_bytes(p: Path) -> None:
    write_bytes_atomic(p, b"\x00new")


def _write_safetensors(p: Path) -> None:
    write_safetensors_atomic(p, {"w": torch.zeros(3)})


def _atomic_path(p: Path) -> None:
    with atomic_path(p) as tmp:
        tmp.write_text("new")


def _save_tensors(p: Path) -> None:
    from qmargin.training.checkpoint import save_tensors

    save_tensors(p, {"w": torch.ones(2)})


def _integer_state(p: Path) -> None:
    from qmargin.quant.convert import IntegerState

    IntegerState({"w": torch.ones(2)}).save(p)


def _png(p: Path) -> None:
    import matplotlib.figure

    from qmargin.report.plots import save_png

    save_png(matplotlib.figure.Figure(), p, dpi=10)


WRITERS = [
    ("write_text_atomic", _write_text),
    ("write_json_atomic", _write_json),
    ("write_bytes_atomic", _write_bytes),
    ("write_safetensors_atomic", _write_safetensors),
    ("atomic_path", _atomic_path),
    ("checkpoint.save_tensors", _save_tensors),
    ("IntegerState.save", _integer_state),
    ("report.save_png", _png),
]


@pytest.mark.parametrize("writer_name, writer", WRITERS, ids=[w[0] for w in WRITERS])
@pytest.mark.parametrize("name, make, needle", REFUSED, ids=REFUSED_IDS)
def test_every_writer_leaves_devices_fifos_and_directories_alone(
    tmp_path, writer_name, writer, name, make, needle
):
    if "dev/full" in name and not DEV_FULL.exists():
        pytest.skip("no /dev/full")
    target = make(tmp_path)
    before = _snapshot(target)
    listing = _names(tmp_path)
    with pytest.raises(OutputError, match=needle):
        writer(target)
    assert _snapshot(target) == before
    assert _names(tmp_path) == listing  # no temporary file left


@pytest.mark.parametrize("writer_name, writer", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_symlink_to_a_regular_file_is_written_through(tmp_path, writer_name, writer):
    """Decision (docs/reliability.md): like a shell's ``>``, the link stays and its target is
    replaced atomically."""
    real = tmp_path / "real" / "result.bin"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    writer(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() != b"old"
    assert _names(tmp_path) == ["link.bin", "real"] and _names(real.parent) == ["result.bin"]


# -- outputs that are inputs ------------------------------------------------------------------------


def _same(tmp: Path, src: Path) -> Path:
    return src


def _relative_spelling(tmp: Path, src: Path) -> Path:
    return tmp / "sub" / ".." / src.name


def _symlink(tmp: Path, src: Path) -> Path:
    p = tmp / "alias.pt"
    p.symlink_to(src)
    return p


def _hard_link(tmp: Path, src: Path) -> Path:
    p = tmp / "hard.pt"
    os.link(src, p)
    return p


ALIASES = [
    ("same path", _same),
    ("dot-dot spelling", _relative_spelling),
    ("symlink", _symlink),
    ("hard link", _hard_link),
]


@pytest.mark.parametrize("name, alias", ALIASES, ids=[a[0] for a in ALIASES])
def test_an_output_that_is_an_input_is_refused(tmp_path, name, alias):
    (tmp_path / "sub").mkdir()
    src = tmp_path / "x.pt"
    src.write_bytes(b"weights")
    with pytest.raises(OutputError, match="is also an input"):
        check_output(alias(tmp_path, src), inputs=[tmp_path / "other.pt", src])
    assert check_output(tmp_path / "y.json", inputs=[src]) == tmp_path / "y.json"


@pytest.mark.parametrize("name, alias", ALIASES, ids=[a[0] for a in ALIASES])
def test_certify_out_equal_to_its_checkpoint_is_refused(tmp_path, capsys, name, alias):
    (tmp_path / "sub").mkdir()
    src = tmp_path / "x.pt"
    src.write_bytes(b"weights")
    out = alias(tmp_path, src)
    with pytest.raises(SystemExit) as exc:
        main(["certify", str(src), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is also an input" in err
    assert src.read_bytes() == b"weights"


@pytest.mark.parametrize(
    "outputs, needle",
    [
        ({"result JSON": "r.csv", "CSV": "r.csv"}, "the result JSON and the CSV"),
        ({"result JSON": "r.png", "CSV": "r.csv", "plot": "r.png"}, "the result JSON and the plot"),
        ({"a": "x/../r.json", "b": "r.json"}, "the a and the b"),
    ],
)
def test_derived_outputs_may_not_collide(tmp_path, outputs, needle):
    with pytest.raises(OutputError, match=needle):
        check_outputs({k: tmp_path / v for k, v in outputs.items()})


def test_blank_paths_are_refused_by_the_library(tmp_path):
    for blank in ("", "   ", "\t"):
        with pytest.raises(OutputError, match="empty path"):
            check_output(blank)
        with pytest.raises(OutputError, match="empty path"):
            write_text_atomic(blank, "x")


# -- the CLI ----------------------------------------------------------------------------------------


def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qmargin: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _fake_run(tmp: Path) -> Path:
    """A run directory's files (refusals happen before anything is loaded)."""
    run = tmp / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors", "integer.safetensors", "metrics.json"):
        (run / name).write_bytes(b"original " + name.encode())
    return run


@pytest.mark.parametrize(
    "out, needle",
    [
        ("r.csv", "the result JSON (--out) and the CSV would be the same file"),
        ("r.png", "the result JSON (--out) and the plot would be the same file"),
        ("run/model.safetensors", "is also an input"),
        ("run/config.json", "is also an input"),
        ("run/metrics.json", "is also an input"),
        ("run/integer.safetensors", "is also an input"),
        ("adir", "a directory"),
        ("afile/r.json", "is not a directory"),
    ],
)
def test_evaluate_refuses_outputs_before_it_runs(tmp_path, capsys, out, needle):
    run = _fake_run(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    line = _cli_error(capsys, ["evaluate", str(run), "--out", str(tmp_path / out), "--device", "cpu"])
    assert needle in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_evaluate_without_plot_accepts_a_png_name_but_not_a_csv_name(tmp_path, capsys):
    run = _fake_run(tmp_path)
    line = _cli_error(capsys, ["evaluate", str(run), "--out", str(tmp_path / "r.csv"), "--no-plot"])
    assert "same file" in line
    # r.png without --plot collides with nothing: the next error is the fake run itself
    line = _cli_error(capsys, ["evaluate", str(run), "--out", str(tmp_path / "r.png"), "--no-plot"])
    assert "same file" not in line


@needs_dev_full
@pytest.mark.parametrize(
    "argv",
    [
        ["certify", "{x}", "--out", "/dev/full"],
        ["certify", "{x}", "--out", "{link}"],
        ["evaluate", "{run}", "--out", "/dev/full"],
        ["compare", "{x}", "--out", "/dev/full"],
        ["train", "--out", "/dev/full", "--epochs", "1"],
        ["train", "--out", "{fifo}", "--epochs", "1"],
        ["reproduce", "mcel", "--out", "{fifo}"],
        ["reproduce", "mondeq", "--out", "/dev/full"],
        ["reproduce", "mcel-ablation", "--out", "{x}"],
        ["reproduce", "mcel", "--out", "{tmp}/ok", "--results-dir", "{x}"],
        ["demo", "--out", "/dev/full", "--epochs", "1"],
    ],
)
def test_no_command_replaces_a_device_fifo_or_file_with_its_output(tmp_path, capsys, argv):
    run = _fake_run(tmp_path)
    x = tmp_path / "x.pt"
    x.write_bytes(b"weights")
    fifo = _fifo(tmp_path)
    link = _link_to_dev_full(tmp_path)
    subst = {"{x}": x, "{run}": run, "{fifo}": fifo, "{link}": link, "{tmp}": tmp_path}
    args = list(argv)
    for key, value in subst.items():
        args = [a.replace(key, str(value)) for a in args]
    before = [_snapshot(p) for p in (DEV_FULL, fifo, link, x)]
    _cli_error(capsys, args)
    assert [_snapshot(p) for p in (DEV_FULL, fifo, link, x)] == before
    assert not (tmp_path / "ok").exists()  # refused before any work


def _path_params() -> list[tuple[list[str], str, bool]]:
    """(command path, parameter name, is an option) of every path parameter of the CLI."""
    import click

    found = []

    def walk(cmd: click.Command, prefix: list[str]) -> None:
        for p in cmd.params:
            if isinstance(p.type, click.Path):
                found.append((prefix, p.opts[0], isinstance(p, click.Option)))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return found


PATH_PARAMS = _path_params()


def test_the_table_covers_the_path_options():
    names = {(" ".join(c), n) for c, n, _ in PATH_PARAMS}
    assert ("train", "--out") in names and ("evaluate", "--out") in names and ("certify", "--out") in names
    assert ("reproduce mcel", "--results-dir") in names and len(names) >= 12


@pytest.mark.parametrize("blank", ["", "  "])
@pytest.mark.parametrize(
    "command, param, is_option", PATH_PARAMS, ids=[f"{' '.join(c)} {n}" for c, n, _ in PATH_PARAMS]
)
def test_every_path_parameter_refuses_a_blank_value(
    tmp_path, capsys, monkeypatch, command, param, is_option, blank
):
    monkeypatch.chdir(tmp_path)
    argv = list(command)
    if is_option:
        argv += ["--out", "somewhere"] if command == ["train"] and param != "--out" else []
        positional = {"evaluate": ["run"], "certify": ["x.pt"], "compare": ["a"]}
        argv += positional.get(command[0], []) + [param, blank]
    else:
        argv += [blank]
    line = _cli_error(capsys, argv)
    assert "empty path" in line
    assert _names(tmp_path) == []  # nothing was written into the current directory


# -- train --force and the results of the old weights -----------------------------------------------


def test_force_removes_the_results_of_the_old_weights(tmp_path):
    from qmargin.experiments.runs import TrainConfig, load_dataset, train_run
    from qmargin.training.checkpoint import DERIVED_FILES

    data = load_dataset("digits")
    cfg = TrainConfig(
        dataset="digits", model="mlp", bits=4, epochs=1, device="cpu", model_kwargs={"hidden": [16, 16]}
    )
    run = tmp_path / "run"
    train_run(cfg, dataset=data, out_dir=run)
    for name in DERIVED_FILES:
        (run / name).write_text("results of seed 0")
    (run / "notes.txt").write_text("mine")
    again = train_run(cfg, dataset=data, out_dir=run)  # same config: reused, results kept
    assert again.skipped and all((run / n).exists() for n in DERIVED_FILES)
    train_run(cfg.replace(seed=1), dataset=data, out_dir=run, force=True)
    assert not any((run / n).exists() for n in DERIVED_FILES)
    assert (run / "notes.txt").read_text() == "mine"  # not a result of the run: kept
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 1
    assert not any(p.name.startswith(".") for p in run.iterdir())  # lock and temporaries gone


def test_results_are_never_shown_for_other_weights(tmp_path, capsys):
    """A result under any name records the weights it was computed from; after a retraining,
    ``compare`` refuses it (the default ``ber.json`` is removed by ``--force`` outright)."""
    from qmargin.experiments.evaluate import evaluate_run
    from qmargin.experiments.runs import TrainConfig, load_dataset, train_run

    data = load_dataset("digits")
    cfg = TrainConfig(
        dataset="digits", model="mlp", bits=4, epochs=1, device="cpu", model_kwargs={"hidden": [16, 16]}
    )
    run = tmp_path / "run"
    train_run(cfg, dataset=data, out_dir=run)
    for name in ("ber.json", "custom.json"):
        result = evaluate_run(
            run, bers=[0.0, 0.05], repeats=2, base_seed=100, out_path=run / name, device="cpu"
        )
        assert result["weights"]["file"] == str((run / "model.safetensors").resolve())
    main(["compare", str(run), str(run / "custom.json"), "--out", str(tmp_path / "c.png")])  # fine
    capsys.readouterr()
    train_run(cfg.replace(seed=1), dataset=data, out_dir=run, force=True)
    assert not (run / "ber.json").exists() and (run / "custom.json").exists()
    line = _cli_error(capsys, ["compare", str(run / "custom.json"), "--out", str(tmp_path / "d.png")])
    assert "belong to other weights" in line and "custom.json" in line
    assert not (tmp_path / "d.png").exists()
    line = _cli_error(capsys, ["compare", str(run), "--out", str(tmp_path / "d.png")])
    assert "no campaign results" in line
