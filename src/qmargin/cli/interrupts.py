"""Ctrl-C (SIGINT): one line saying what was saved and the command that continues, exit status 130.

Click turns a ``KeyboardInterrupt`` into ``Abort`` (a blank line, and nothing about the work), so
:func:`catch_interrupts` wraps the callback of every command of the tree (new commands included)
and turns the interrupt into :class:`InterruptError`, whose message
:func:`qmargin.cli.errors.run_guarded` prints as the one line::

    qmargin: interrupted: epoch 3 of 10 saved in runs/x; continue with: qmargin train --out runs/x ...
    qmargin: interrupted: 37 of 130 patterns saved in r.json; continue with: qmargin evaluate runs/x ...

What was saved is read from the files the command writes (:data:`DESCRIBERS`, by command path; a
command without one says that nothing was written, and one that cannot resume says "run again with");
the command to continue is the command line as given (``--force`` / ``--overwrite`` dropped: they would
discard what was saved). Writes are atomic (``qmargin.files``) and a training checkpoint's two files
are written with SIGINT held back (``qmargin.files.sigint_deferred``), so an interrupt, even a second
one, never leaves a half-written file to resume from.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

__all__ = ["EXIT_INTERRUPTED", "InterruptError", "catch_interrupts", "DESCRIBERS", "continue_command"]

EXIT_INTERRUPTED = 130
_DISCARDING_FLAGS = ("--force", "--overwrite")


class InterruptError(Exception):
    """Ctrl-C during a command; ``str(err)`` is the one line to print (without the ``qmargin:`` prefix)."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def describe_train(params: Mapping[str, Any]) -> str:
    """``epoch E of N saved in OUT`` from ``trainer_state.json`` (or that the run finished / nothing)."""
    out = Path(params["out"])
    total = _count(params.get("epochs"))
    of = f" of {total}" if total is not None else ""
    if (out / "metrics.json").is_file() and not (out / "trainer_state.json").is_file():
        return f"training finished, saved in {out}"
    state = _read_json(out / "trainer_state.json")
    epoch = _count(state.get("epoch")) if isinstance(state, dict) else None
    if epoch is None:
        return f"no epoch finished yet, nothing saved in {out}"
    return f"epoch {epoch}{of} saved in {out}"


def describe_evaluate(params: Mapping[str, Any]) -> str:
    """``K of N patterns saved in OUT`` from the partial campaign JSON."""
    out = Path(params["out"]) if params.get("out") else Path(params["run"]) / "ber.json"
    bers, repeats = params.get("ber") or (), _count(params.get("repeats"))
    total = len(bers) * repeats if repeats is not None else None
    shard = params.get("shard")
    if total is not None and isinstance(shard, tuple | list) and len(shard) == 2:
        total = sum(1 for cell in range(total) if cell % int(shard[1]) == int(shard[0]) - 1)  # its cells
    data = _read_json(out)
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        return f"no pattern finished yet, nothing saved in {out}"
    done = sum(
        len(r["accuracies"]) for r in results if isinstance(r, dict) and isinstance(r.get("accuracies"), list)
    )
    of = f" of {total}" if total is not None else ""
    return f"{done}{of} patterns saved in {out}"


def describe_certify(params: Mapping[str, Any]) -> str:
    return "nothing written (certificates are written when all are computed)"


def describe_output_dir(params: Mapping[str, Any]) -> str:
    out = params.get("out")
    if not out:
        return "nothing kept (no --out: the work went to a temporary directory)"
    return f"finished runs and results are kept in {out}"


DESCRIBERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "train": describe_train,
    "evaluate": describe_evaluate,
    "certify": describe_certify,
    "demo": describe_output_dir,
    "reproduce mcel": describe_output_dir,
    "reproduce mcel-ablation": describe_output_dir,
    "reproduce mondeq": describe_output_dir,
}
"""Command path -> ``describe(params) -> what was saved``; other commands save nothing."""

RESUMABLE = {"train", "evaluate", "reproduce mcel", "reproduce mcel-ablation", "reproduce mondeq"}
"""Commands whose rerun continues from what was saved (the others start again)."""

_argv: list[str] | None = None


def set_command_line(argv: list[str] | None) -> None:
    """Remember the arguments the command was started with (for the line to continue)."""
    global _argv
    _argv = list(argv) if argv is not None else None


def command_line() -> str:
    """``qmargin ARGS`` exactly as given (a report's provenance)."""
    args = _argv if _argv is not None else sys.argv[1:]
    return shlex.join(["qmargin", *args])


def continue_command() -> str:
    """``qmargin ARGS`` as given, without the flags that would discard what was saved."""
    args = _argv if _argv is not None else sys.argv[1:]
    return shlex.join(["qmargin", *(a for a in args if a not in _DISCARDING_FLAGS)])


def _line(path: str, params: Mapping[str, Any]) -> str:
    describe = DESCRIBERS.get(path)
    try:
        saved = describe(params) if describe else "nothing was written"
    except Exception:  # noqa: BLE001 - the line must come out whatever the files hold
        saved = "finished work is saved"
    resumable = path in RESUMABLE or (path == "demo" and bool(params.get("out")))
    verb = "continue with" if resumable else "run again with"
    return f"interrupted: {saved}; {verb}: {continue_command()}"


def catch_interrupts(command: click.Command, path: str = "") -> click.Command:
    """Wrap the callback of ``command`` and of its subcommands: Ctrl-C becomes :class:`InterruptError`."""
    callback = command.callback
    if callback is not None and not getattr(callback, "qmargin_catches_interrupts", False):

        @functools.wraps(callback)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except KeyboardInterrupt:
                raise InterruptError(_line(path, kwargs)) from None

        guarded.qmargin_catches_interrupts = True  # type: ignore[attr-defined]
        command.callback = guarded
    for name, sub in getattr(command, "commands", {}).items():
        catch_interrupts(sub, f"{path} {name}".strip())
    return command
