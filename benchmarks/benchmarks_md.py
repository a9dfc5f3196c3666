"""Replace one ``## Section`` of BENCHMARKS.md in place (atomically), keeping every other section."""

from __future__ import annotations

from pathlib import Path

from qmargin.files import write_text_atomic


def write_section(text: str, path: Path, section: str) -> None:
    """Put ``text`` (which starts with the heading ``section``) in place of that section of ``path``."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == section), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    write_text_atomic(path, new)


def machine_description() -> str:
    """CPU model (:func:`qmargin.report.provenance.cpu_model`), logical CPUs, torch version and threads."""
    import os

    import torch

    from qmargin.report.provenance import cpu_model

    threads = torch.get_num_threads()
    return f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {threads} thread(s)"
