"""Turning user mistakes into one line on stderr and exit status 2.

User errors (:class:`qmargin.errors.UserError`), usage errors, and every ``OSError`` (a read-only file
system, a full disk, permission denied, a parent that is a file, an output that
:func:`qmargin.files.check_output` refuses, a run directory another process holds) become
``qmargin: error: <one line>`` and exit status 2. A blank path given to any path option or
argument (``--out ""``) is a usage error, for every command (:func:`refuse_blank_paths`). Flag values
are checked while they are parsed (``qmargin.cli.options``). Ctrl-C is one line and exit status 130
(``qmargin.cli.interrupts``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from qmargin.cli.interrupts import EXIT_INTERRUPTED, InterruptError, catch_interrupts, set_command_line
from qmargin.errors import UserError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """Print ``qmargin: error: <message>`` as one line and exit with status 2."""
    first = " ".join(str(message).split())
    print(f"qmargin: error: {first}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def os_error_line(err: OSError) -> str:
    """One line for a failed file operation: ``PATH: reason`` (``PATH -> OTHER: reason`` for a rename)."""
    if err.errno is None or not err.strerror:
        return str(err) or type(err).__name__
    where = ""
    if err.filename is not None:
        where = str(err.filename)
        if err.filename2 is not None:
            where += f" -> {err.filename2}"
        where += ": "
    return f"{where}{err.strerror}"


def _blank_path_refusing(convert: Callable[..., Any]) -> Callable[..., Any]:
    def refuse_blank(value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            raise click.BadParameter("an empty path is not a path", ctx=ctx, param=param)
        return convert(value, param, ctx)

    refuse_blank.qmargin_refuses_blank = True  # type: ignore[attr-defined]
    return refuse_blank


def refuse_blank_paths(command: click.Command) -> click.Command:
    """Make every path parameter of ``command`` and its subcommands refuse an empty or blank value.

    ``pathlib.Path("")`` is ``"."``: without this, ``train --out ""`` would train into the current
    directory. Applied once to the whole command tree, so new commands are covered without a line.
    """
    for param in command.params:
        if isinstance(param.type, click.Path) and not getattr(
            param.type.convert, "qmargin_refuses_blank", False
        ):
            param.type.convert = _blank_path_refusing(param.type.convert)  # type: ignore[method-assign]
    for sub in getattr(command, "commands", {}).values():
        refuse_blank_paths(sub)
    return command


def run_guarded(command: click.Command, argv: list[str] | None) -> int:
    """Run a click command so that usage and user errors are one line and exit 2."""
    refuse_blank_paths(command)
    catch_interrupts(command)
    set_command_line(argv)
    try:
        rv = command.main(args=argv, prog_name="qmargin", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else str(e))
        return EXIT_USER_ERROR
    except click.UsageError as e:
        cmd = f" {e.ctx.command_path.split(' ', 1)[1]}" if e.ctx and " " in e.ctx.command_path else ""
        fail(f"{e.format_message()} (see 'qmargin{cmd} --help')")
    except UserError as e:
        fail(str(e))
    except OSError as e:  # read-only or full file system, permission denied, a refused output, a lock
        fail(os_error_line(e))
    except InterruptError as e:  # Ctrl-C in a command: what was saved and how to continue
        print(f"qmargin: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C while the flags are parsed
        print("qmargin: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except click.ClickException as e:
        fail(e.format_message())
    return rv if isinstance(rv, int) else 0
