"""Where a report comes from: qmargin's version, the command, the date, the machine, the inputs.

:func:`machine_description` is the one description of the machine qmargin writes (the HTML report's
provenance; ``benchmarks/`` use :func:`cpu_model` for BENCHMARKS.md). Nothing here imports torch:
its version is read from the installed package's metadata.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import qmargin

__all__ = ["cpu_model", "machine_description", "provenance"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` ``model name``, else :func:`platform.processor`, else
    the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_description() -> str:
    """``"<CPU model>, <n> CPUs, Linux-6.1-x86_64, Python 3.11.2, torch 2.13.0"``."""
    parts = [cpu_model(), f"{os.cpu_count() or '?'} CPUs", platform.platform(terse=True)]
    parts.append(f"Python {platform.python_version()}")
    torch_version = _version("torch")
    if torch_version:
        parts.append(f"torch {torch_version}")
    return ", ".join(parts)


def provenance(
    *,
    command: str,
    inputs: Iterable[Mapping[str, Any]] = (),
    date: _dt.datetime | None = None,
) -> dict[str, Any]:
    """The provenance block of a report (a plain dict): ``qmargin_version``, ``command``, ``date``
    (UTC, ISO 8601, seconds), ``machine`` (:func:`machine_description`) and ``inputs`` (each
    ``{"path", "sha256", "bytes"}`` of a file the report was made from)."""
    when = (date or _dt.datetime.now(_dt.timezone.utc)).astimezone(_dt.timezone.utc)
    return {
        "qmargin_version": qmargin.__version__,
        "command": command,
        "date": when.isoformat(timespec="seconds"),
        "machine": machine_description(),
        "inputs": [dict(i) for i in inputs],
    }
