"""One writer per run directory and per output: fcntl.flock locks held for the whole run.

Real concurrent processes: a holder process takes a lock (through the library, or a real ``qmargin
train`` held at its first checkpoint), a second process is refused with one line, exit status 2 and
the holder's PID, and the first one finishes correctly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qmargin.files import LOCK_NAME, BusyError, lock_directory, lock_output

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qmargin", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=cwd,
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qmargin: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"holder exited early ({proc.returncode}): {out} {err}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


class Holder:
    """A second process holding a lock until told to let go (``release``)."""

    def __init__(self, tmp: Path, kind: str, target: Path, shared: bool = False) -> None:
        self.ready = tmp / f"ready-{os.getpid()}-{id(self)}"
        self.go = tmp / f"go-{os.getpid()}-{id(self)}"
        call = f"lock_output({str(target)!r})"
        if kind == "dir":
            call = f"lock_directory({str(target)!r}, shared={shared})"
        code = textwrap.dedent(
            f"""
            import pathlib, time
            from qmargin.files import lock_directory, lock_output
            with {call}:
                pathlib.Path({str(self.ready)!r}).write_text("x")
                while not pathlib.Path({str(self.go)!r}).exists():
                    time.sleep(0.02)
            """
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _wait_for(self.ready, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        self.go.write_text("x")
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.release()


# -- the library --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "holder_kind, holder_shared, mine, refused",
    [
        ("dir", False, lambda d: lock_directory(d), True),
        ("dir", False, lambda d: lock_directory(d, shared=True), True),
        ("dir", True, lambda d: lock_directory(d), True),
        ("dir", True, lambda d: lock_directory(d, shared=True), False),  # readers share
        ("file", False, lambda d: lock_output(d / "r.json"), True),
    ],
    ids=["excl-excl", "excl-shared", "shared-excl", "shared-shared", "output-output"],
)
def test_a_second_process_is_refused_with_the_holders_pid(
    tmp_path, holder_kind, holder_shared, mine, refused
):
    run = tmp_path / "run"
    run.mkdir()
    target = run if holder_kind == "dir" else run / "r.json"
    with Holder(tmp_path, holder_kind, target, shared=holder_shared) as holder:
        if refused:
            with pytest.raises(BusyError) as err, mine(run):
                pass
            msg = str(err.value)
            assert f"PID {holder.pid}" in msg and str(target) in msg and "\n" not in msg
        else:
            with mine(run):
                pass
        holder.release()
    with mine(run):  # free again once the holder let go
        pass
    assert sorted(p.name for p in run.iterdir()) == []  # the lock files are removed on release


def test_a_dead_holders_lock_file_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "from qmargin.files import lock_directory\n"
            f"with lock_directory({str(run)!r}):\n    os._exit(0)\n",
        ],  # dies holding it: no cleanup
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 0
    stale = run / LOCK_NAME
    assert stale.exists() and stale.read_text().strip().isdigit()  # left behind by the dead process
    stale.write_text("999999999\n")  # any PID: the content is informative only
    with lock_directory(run):
        assert stale.read_text().strip() == str(os.getpid())
    assert not stale.exists()


def test_locks_are_reentrant_within_a_process(tmp_path):
    with lock_directory(tmp_path / "d") as d, lock_directory(d), lock_directory(d, shared=True):
        assert (d / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / "d" / LOCK_NAME).exists()


def test_a_reader_of_a_read_only_run_needs_no_lock_file(tmp_path):
    from test_hardening_fs import read_only_mount  # the mount helper of the file-system tests

    with read_only_mount(tmp_path / "ro") as ro, lock_directory(ro, shared=True):
        assert not (ro / LOCK_NAME).exists()


# -- the commands -------------------------------------------------------------------------------------


TRAIN = ["train", "--epochs", "3", "--bits", "4", "--hidden", "16", "--quiet", "--device", "cpu"]


def _held_train(out: Path, gate: Path, seed: int) -> subprocess.Popen:
    """A real ``qmargin train`` that waits at its first checkpoint until ``gate`` exists."""
    code = textwrap.dedent(
        f"""
        import pathlib, sys, time
        import qmargin.training.trainer as trainer
        original = trainer.save_checkpoint
        def held(*args, **kwargs):
            while not pathlib.Path({str(gate)!r}).exists():
                time.sleep(0.02)
            return original(*args, **kwargs)
        trainer.save_checkpoint = held
        from qmargin.cli import main
        main({[*TRAIN, "--seed", str(seed), "--out", str(out)]!r})
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_two_trainings_into_one_directory(tmp_path):
    """The red team's case: the second is refused (exit 2, the first's PID), the first finishes and
    the directory's config and weights are the first's."""
    out, gate = tmp_path / "run", tmp_path / "gate"
    first = _held_train(out, gate, seed=0)
    try:
        _wait_for(out / "config.json", first)  # the first holds the lock and has started
        second = _cli(*TRAIN, "--seed", "1", "--out", str(out))
        _one_line_error(second, str(out), f"PID {first.pid}", "in use by another qmargin process")
    finally:
        gate.write_text("go")
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 0
    assert (out / "metrics.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()
    again = _cli(*TRAIN, "--seed", "0", "--out", str(out))  # free again: the finished run is reused
    assert again.returncode == 0 and "already trained" in again.stdout


@pytest.mark.parametrize(
    "argv, locked",
    [
        (["train", "--out", "{run}", "--epochs", "1"], "{run}"),
        (["evaluate", "{run}", "--out", "{tmp}/elsewhere.json"], "{run}"),
        (["evaluate", "{other}", "--out", "{tmp}/r.json"], "{tmp}/r.json"),
        (["certify", "{x}", "--out", "{tmp}/r.json"], "{tmp}/r.json"),
        (["reproduce", "mcel", "--out", "{run}"], "{run}"),
        (["reproduce", "mcel-ablation", "--out", "{run}"], "{run}"),
        (["reproduce", "mondeq", "--out", "{run}"], "{run}"),
        (["demo", "--out", "{run}", "--epochs", "1"], "{run}"),
        (["merge", "{x}", "--out", "{tmp}/r.json"], "{tmp}/r.json"),
    ],
    ids=[
        "train",
        "evaluate-run",
        "evaluate-out",
        "certify-out",
        "mcel",
        "ablation",
        "mondeq",
        "demo",
        "merge-out",
    ],  # fmt: skip
)
def test_every_command_refuses_a_locked_directory_or_output(tmp_path, argv, locked):
    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    x = tmp_path / "x.pt"
    x.write_bytes(b"weights")
    subst = {"{run}": run, "{other}": other, "{x}": x, "{tmp}": tmp_path}

    def fill(text: str) -> str:
        for k, v in subst.items():
            text = text.replace(k, str(v))
        return text

    target = Path(fill(locked))
    kind = "dir" if target.is_dir() else "file"
    with Holder(tmp_path, kind, target) as holder:
        proc = _cli(*[fill(a) for a in argv])
        _one_line_error(proc, f"PID {holder.pid}", str(target))
    assert sorted(p.name for p in run.iterdir()) == []  # the refused command wrote nothing
