"""File-system errors: one line on stderr and exit status 2, no temporary file left, old files intact.

Real file systems: a full tmpfs (``mount -t tmpfs -o size=64k``, then filled), a read-only tmpfs, an
immutable directory (``chattr +i``: refused even to root), a parent that is a regular file, a missing
parent (created). Mounting needs root (CI runs as root); a test skips with the reason where a mount
or chattr is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from qmargin.files import (
    atomic_path,
    write_bytes_atomic,
    write_json_atomic,
    write_safetensors_atomic,
    write_text_atomic,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
BIG = 300_000  # bytes: more than a 64 KiB tmpfs holds


def _mount(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def full_mount(path: Path, *, keep: dict[str, bytes] | None = None) -> Iterator[Path]:
    """A 64 KiB tmpfs holding ``keep`` (name -> bytes), then filled to the last byte."""
    _mount(path, "size=64k")
    try:
        for name, data in (keep or {}).items():
            (path / name).write_bytes(data)
        fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            for size in (4096, 512, 1):  # to the last byte
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as err:
                        assert err.errno == errno.ENOSPC
                        break
        finally:
            os.close(fd)
        yield path
    finally:
        _umount(path)


@contextmanager
def read_only_mount(path: Path, *, keep: dict[str, bytes] | None = None) -> Iterator[Path]:
    """A tmpfs holding ``keep``, remounted read-only."""
    _mount(path, "size=1m")
    try:
        for name, data in (keep or {}).items():
            (path / name).write_bytes(data)
        proc = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
        yield path
    finally:
        _umount(path)


@contextmanager
def immutable_dir(path: Path) -> Iterator[Path]:
    """A directory nobody may add files to, root included (``chattr +i``)."""
    path.mkdir(parents=True)
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"chattr +i refused here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


# -- the library writers ------------------------------------------------------------------------------


def _text(p: Path) -> None:
    write_text_atomic(p, "x" * BIG)


def _json(p: Path) -> None:
    write_json_atomic(p, {"a": "x" * BIG})


def _bytes(p: Path) -> None:
    write_bytes_atomic(p, b"x" * BIG)


def _safetensors(p: Path) -> None:
    write_safetensors_atomic(p, {"w": torch.zeros(BIG // 4)})


def _save_tensors(p: Path) -> None:
    from qmargin.training.checkpoint import save_tensors

    save_tensors(p, {"w": torch.zeros(BIG // 4)})


def _integer_state(p: Path) -> None:
    from qmargin.quant.convert import IntegerState

    IntegerState({"w": torch.zeros(BIG // 4)}).save(p)


def _atomic_path(p: Path) -> None:
    with atomic_path(p) as tmp:
        tmp.write_bytes(b"x" * BIG)


WRITERS: list[tuple[str, Callable[[Path], None]]] = [
    ("write_text_atomic", _text),
    ("write_json_atomic", _json),
    ("write_bytes_atomic", _bytes),
    ("write_safetensors_atomic", _safetensors),
    ("checkpoint.save_tensors", _save_tensors),
    ("IntegerState.save", _integer_state),
    ("atomic_path", _atomic_path),
]

FILESYSTEMS = [
    ("full disk", full_mount, errno.ENOSPC),
    ("read-only", read_only_mount, errno.EROFS),
]


@pytest.mark.parametrize("fs_name, mount, code", FILESYSTEMS, ids=[f[0] for f in FILESYSTEMS])
@pytest.mark.parametrize("name, writer", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_failed_write_names_the_file_and_leaves_nothing_behind(
    tmp_path, fs_name, mount, code, name, writer
):
    with mount(tmp_path / "mnt", keep={"old.bin": b"old content"}) as mnt:
        before = sorted(p.name for p in mnt.iterdir())
        for target in (mnt / "old.bin", mnt / "new.bin"):
            with pytest.raises(OSError) as err:
                writer(target)
            assert err.value.errno == code
            assert str(err.value.filename) == str(target)  # the destination, not the temporary name
            assert sorted(p.name for p in mnt.iterdir()) == before  # no temporary file left
            assert (mnt / "old.bin").read_bytes() == b"old content"


def test_an_immutable_directory_is_an_os_error_naming_the_file(tmp_path):
    with immutable_dir(tmp_path / "locked") as d:
        for name, writer in WRITERS:
            with pytest.raises(OSError) as err:
                writer(d / "x.bin")
            assert err.value.errno in (errno.EPERM, errno.EACCES), name
            assert str(err.value.filename) == str(d / "x.bin")
        assert list(d.iterdir()) == []


# -- the commands -------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, "-m", "qmargin", *args], capture_output=True, text=True, timeout=300, env=env
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qmargin: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny digits run with its campaign (ber.json)."""
    from qmargin.experiments.evaluate import evaluate_run
    from qmargin.experiments.runs import TrainConfig, load_dataset, train_run

    run = tmp_path_factory.mktemp("fs") / "run"
    cfg = TrainConfig(
        dataset="digits", model="mlp", bits=4, epochs=1, device="cpu", model_kwargs={"hidden": [16, 16]}
    )
    train_run(cfg, dataset=load_dataset("digits"), out_dir=run)
    evaluate_run(run, bers=[0.0, 0.01], repeats=2, base_seed=100, out_path=run / "ber.json", device="cpu")
    return run


def _hidden_or_temporary(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or "tmp" in p.name)


EVAL = ["--ber", "0,0.01", "--repeats", "2", "--device", "cpu", "--quiet"]
TRAIN = ["--epochs", "1", "--bits", "4", "--hidden", "16", "--quiet", "--device", "cpu"]

CASES = [
    # (id, where: "full" | "ro", argv with {m} the mount point and {run} the trained run, needle)
    ("train-full", "full", ["train", "--out", "{m}/run", *TRAIN], "No space left on device"),
    ("train-ro", "ro", ["train", "--out", "{m}/run", *TRAIN], "Read-only file system"),
    ("evaluate-full", "full", ["evaluate", "{run}", "--out", "{m}/r.json", *EVAL], "No space left on device"),
    ("evaluate-ro", "ro", ["evaluate", "{run}", "--out", "{m}/r.json", *EVAL], "Read-only file system"),
    ("compare-full", "full", ["compare", "{run}", "--out", "{m}/c.png"], "No space left on device"),
    ("compare-ro", "ro", ["compare", "{run}", "--out", "{m}/c.png"], "Read-only file system"),
    ("reproduce-ro", "ro", ["reproduce", "mcel", "--out", "{m}/repro"], "Read-only file system"),
]


@pytest.mark.parametrize("where, argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_commands_report_full_and_read_only_file_systems_in_one_line(tmp_path, trained, where, argv, needle):
    mount = full_mount if where == "full" else read_only_mount
    with mount(tmp_path / "mnt") as m:
        before = sorted(p.name for p in m.iterdir())
        args = [a.replace("{m}", str(m)).replace("{run}", str(trained)) for a in argv]
        line = _one_line_error(_cli(*args), needle)
        assert ".tmp" not in line  # names the destination
        assert _hidden_or_temporary(m) == []  # no temporary file, no lock file
        if where == "ro":
            assert sorted(p.name for p in m.iterdir()) == before
    assert _hidden_or_temporary(trained) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--out", "{file}/run", *TRAIN],
        ["evaluate", "{run}", "--out", "{file}/r.json", *EVAL],
        ["compare", "{run}", "--out", "{file}/c.png"],
        ["certify", "{run}", "--out", "{file}/c.json"],
        ["reproduce", "mcel", "--out", "{file}/deeper/repro"],
    ],
    ids=["train", "evaluate", "compare", "certify", "reproduce"],
)
def test_a_parent_that_is_a_file_is_one_line(tmp_path, trained, argv):
    f = tmp_path / "afile"
    f.write_text("keep")
    args = [a.replace("{file}", str(f)).replace("{run}", str(trained)) for a in argv]
    _one_line_error(_cli(*args), str(f), "is not a directory")
    assert f.read_text() == "keep"


def test_an_immutable_output_directory_is_one_line(tmp_path, trained):
    with immutable_dir(tmp_path / "locked") as d:
        line = _one_line_error(_cli("evaluate", str(trained), "--out", str(d / "r.json"), *EVAL))
        assert "Operation not permitted" in line or "Permission denied" in line
        _one_line_error(_cli("train", "--out", str(d / "run"), *TRAIN), "Operation not permitted")
        assert list(d.iterdir()) == []


def test_missing_parent_directories_are_created(tmp_path, trained):
    out = tmp_path / "new" / "deeper" / "r.json"
    proc = _cli("evaluate", str(trained), "--out", str(out), *EVAL)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["status"] == "complete"
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.csv", "r.json", "r.png"]
    png = tmp_path / "other" / "dir" / "c.png"
    proc = _cli("compare", str(trained), "--out", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
