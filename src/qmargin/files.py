"""Atomic file writes, the one implementation every layer uses: a reader never sees a half-written file.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file beside the
destination (same directory, so the rename stays on one file system), which ``os.replace`` moves
into place only once writing succeeded. If writing raises (disk full, a failed checksum, Ctrl-C) the
temporary file is deleted and the destination is left as it was.

Imports nothing of qmargin, so any package may import it (docs/architecture.md).

* :func:`atomic_path` - context manager yielding the temporary path, for writers that want a path
  (``safetensors.torch.save_file``, ``Figure.savefig``).
* :func:`atomic_open` - context manager yielding an open file (text or binary), for streamed writes.
* :func:`write_text_atomic`, :func:`write_bytes_atomic`, :func:`copy_file_atomic`,
  :func:`write_json_atomic` - one-call forms.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path",
    "atomic_open",
    "write_text_atomic",
    "write_bytes_atomic",
    "copy_file_atomic",
    "write_json_atomic",
]

_counter = itertools.count()


def _temporary_name(path: Path, suffix: str) -> Path:
    # Hidden, beside the destination, unique per process and call (threads may write concurrently).
    return path.with_name(f".{path.name}.{os.getpid()}.{next(_counter)}{suffix}")


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp", mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit ``os.replace`` it onto ``path``.

    The caller writes the temporary file (it does not exist yet). If the ``with`` block raises, or
    the replace fails, the temporary file is removed and the exception propagates. ``suffix`` ends
    the temporary name (e.g. ``".part"`` for downloads); ``mkdir`` creates the parent directory.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        # After a successful replace the name is gone; after any failure this removes the leftover.
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(
    path: str | Path,
    mode: str = "w",
    *,
    fsync: bool = False,
    suffix: str = ".tmp",
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing (``mode`` ``"w"`` or ``"wb"``); on normal exit
    flush it (``fsync``: also to disk), close it and ``os.replace`` it onto ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', got {mode!r}")
    binary = mode == "wb"
    with (
        atomic_path(path, suffix=suffix) as tmp,
        open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else newline) as f,
    ):
        yield f
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8, newlines untranslated) to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "w", fsync=fsync, newline="") as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def copy_file_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy the bytes of ``src`` to ``dst`` atomically; returns ``dst``."""
    return write_bytes_atomic(dst, Path(src).read_bytes())


def write_json_atomic(path: str | Path, data: Any, *, fsync: bool = True) -> Path:
    """Write ``data`` as JSON (2-space indent, sorted keys, NaN allowed, final newline) atomically,
    by default also flushed to disk (``fsync``); returns ``path``. The format of the run files."""
    with atomic_open(path, "w", fsync=fsync) as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")
    return Path(path)
