"""The ``qmargin`` command-line interface (typer). Nothing imports this package."""

from __future__ import annotations

import sys

import typer

from qmargin.cli.app import app
from qmargin.cli.errors import run_guarded

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmargin`` console script."""
    code = run_guarded(typer.main.get_command(app), argv if argv is not None else sys.argv[1:])
    if argv is None:
        raise SystemExit(code)
    return code
