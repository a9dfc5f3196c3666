"""Atomic file writes for experiment results: a reader never sees a half-written file."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_text_atomic", "copy_file_atomic"]


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def copy_file_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary file and ``os.replace``."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.write_bytes(Path(src).read_bytes())
    os.replace(tmp, dst)
