"""Turning user mistakes into one line on stderr and exit status 2."""

from __future__ import annotations

import sys

import click

from qmargin.errors import UserError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """Print ``qmargin: error: <message>`` as one line and exit with status 2."""
    first = " ".join(str(message).split())
    print(f"qmargin: error: {first}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def run_guarded(command: click.Command, argv: list[str] | None) -> int:
    """Run a click command so that usage and user errors are one line and exit 2."""
    try:
        rv = command.main(args=argv, prog_name="qmargin", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else str(e))
        return EXIT_USER_ERROR
    except click.UsageError as e:
        cmd = f" {e.ctx.command_path.split(' ', 1)[1]}" if e.ctx and " " in e.ctx.command_path else ""
        fail(f"{e.format_message()} (see 'qmargin{cmd} --help')")
    except (UserError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        fail(str(e))
    except click.exceptions.Abort:
        print("qmargin: interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(
            "qmargin: interrupted (finished work is saved; rerun the same command to resume)", file=sys.stderr
        )
        return 130
    except click.ClickException as e:
        fail(e.format_message())
    return rv if isinstance(rv, int) else 0
