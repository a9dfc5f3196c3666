"""Safe outputs, the one implementation every layer uses: atomic writes, output checks, run locks.

Atomic writes. Every writer goes through :func:`atomic_path`: the content is written to a temporary
file beside the destination (same directory, so the rename stays on one file system), which
``os.replace`` moves into place only once writing succeeded. If writing raises (disk full, a failed
checksum, Ctrl-C) the temporary file is deleted and the destination is left as it was. An
``OSError`` of the write names the destination, not the temporary file.

Outputs. :func:`check_output` is the one place that decides whether a path may be written: an empty
or blank path, a path that exists and is not a regular file (a device such as ``/dev/full``, a FIFO,
a socket, a directory), a path below a regular file, a dangling symbolic link, and a path that is
one of the command's inputs (same file after symbolic links, hard links included) raise
:class:`OutputError`. A symbolic link to a regular file is followed: the file it
points to is replaced atomically and the link stays (like a shell's ``>``). :func:`atomic_path`
applies the same test to its destination, so no writer replaces a device or a directory;
:func:`check_outputs` also refuses two outputs of one command that are the same file.

Locks. :func:`lock_directory` (``DIR/.qmargin.lock``) and :func:`lock_output`
(``PARENT/.NAME.qmargin.lock``) hold an exclusive ``fcntl.flock`` for as long as a run writes; a
second process gets :class:`BusyError` naming the holder's PID. The kernel releases
the lock when its holder dies, so a stale lock file never blocks (its PID is informative only). The
lock file is removed on release. Locks are per process and re-entrant (an experiment that locks its
output directory may call a function that locks it again). :func:`holds_lock` is the decorator form.

Imports nothing of qmargin, so any package may import it (docs/architecture.md).

* :func:`atomic_path` - context manager yielding the temporary path, for writers that want a path
  (``Figure.savefig``).
* :func:`atomic_open` - context manager yielding an open file (text or binary), for streamed writes.
* :func:`write_text_atomic`, :func:`write_bytes_atomic`, :func:`copy_file_atomic`,
  :func:`write_json_atomic`, :func:`write_safetensors_atomic` - one-call forms.
* :func:`check_output`, :func:`check_outputs` - refuse outputs that would destroy something.
* :func:`lock_directory`, :func:`lock_output`, :func:`holds_lock` - one writer per run directory.
* :func:`sigint_deferred` - a group of writes that must land together (a training checkpoint's
  tensors and its state) is not cut in two by Ctrl-C: the interrupt is delivered after the group.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import itertools
import json
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

__all__ = [
    "sigint_deferred",
    "atomic_path",
    "atomic_open",
    "write_text_atomic",
    "write_bytes_atomic",
    "copy_file_atomic",
    "write_json_atomic",
    "write_safetensors_atomic",
    "check_output",
    "check_outputs",
    "lock_directory",
    "lock_output",
    "holds_lock",
    "LOCK_NAME",
    "OutputError",
    "BusyError",
]

LOCK_NAME = ".qmargin.lock"
"""The lock file of a run directory (:func:`lock_directory`); it holds the holder's PID."""

_counter = itertools.count()


class OutputError(OSError):
    """An output cannot be written safely: an empty path, a path that exists and is not a regular
    file (a device, a FIFO, a directory), one below a regular file, or one of the command's inputs.
    An ``OSError`` (``errno`` None; ``str(err)`` is one line): the CLI reports it like any failed
    write, as one line and exit status 2."""


class BusyError(OSError):
    """A run directory or output is locked by another process (``str(err)`` names its PID)."""


def _temporary_name(path: Path, suffix: str) -> Path:
    # Hidden, beside the destination, unique per process and call (threads may write concurrently).
    return path.with_name(f".{path.name}.{os.getpid()}.{next(_counter)}{suffix}")


# -- output checks ------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _as_path(path: str | os.PathLike[str], what: str) -> Path:
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise OutputError(f"{what}: empty path")
    return Path(text)


def _check_parents(p: Path) -> None:
    """The nearest existing ancestor of ``p`` must be a directory (it is created below it)."""
    for parent in p.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise OutputError(f"{p}: {parent} is not a directory")
            return


def _file_target(p: Path) -> Path:
    """Where a write to ``p`` lands: ``p`` itself, or the regular file a symbolic link names."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    except NotADirectoryError:
        raise OutputError(f"{p}: a parent is not a directory") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(p)
        except OSError:
            raise OutputError(f"{p} is a symbolic link to nothing; refusing to write through it") from None
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{p} is a symbolic link to {_kind(st.st_mode)}; refusing to replace it")
        return Path(os.path.realpath(p))
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{p} exists and is {_kind(st.st_mode)}; refusing to replace it with a file")
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(
    path: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    kind: str = "file",
    what: str = "output",
) -> Path:
    """Refuse an output that would destroy something; return it as a ``Path``.

    ``kind="file"``: the path must be absent, a regular file, or a symbolic link to a regular file.
    ``kind="dir"``: absent or a directory. Either way it must not be empty or blank, no ancestor may be
    a regular file, and it must not be one of ``inputs`` (compared with ``os.path.samefile``, so
    symbolic and hard links count; ``None`` entries are skipped). Raises
    :class:`OutputError` (one line, naming ``what``).
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = _as_path(path, what)
    _check_parents(p)
    if kind == "file":
        _file_target(p)
    elif os.path.lexists(p) and not p.is_dir():
        raise OutputError(f"{p} exists and is not a directory")
    for item in inputs:
        if item is None or not os.fspath(item):
            continue
        src = Path(item)
        if os.path.lexists(src) and _same_file(p, src):
            raise OutputError(f"{what} {p} is also an input of this command ({src}); write it elsewhere")
    return p


def check_outputs(
    outputs: Mapping[str, str | os.PathLike[str]],
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> dict[str, Path]:
    """:func:`check_output` for every named output of one command, and no two of them the same file.

    ``outputs`` maps a description (``"result JSON"``, ``"CSV"``) to a path.
    """
    inputs = list(inputs)
    checked = {name: check_output(p, inputs=inputs, what=name) for name, p in outputs.items()}
    names = list(checked)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if os.path.realpath(checked[a]) == os.path.realpath(checked[b]):
                raise OutputError(
                    f"{checked[a]}: the {a} and the {b} would be the same file; choose another name"
                )
    return checked


# -- atomic writes ------------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp", mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit ``os.replace`` it onto ``path``.

    The caller writes the temporary file (it does not exist yet). If the ``with`` block raises, or
    the replace fails, the temporary file is removed and the exception propagates. ``suffix`` ends
    the temporary name (e.g. ``".part"`` for downloads); ``mkdir`` creates the parent directory.
    A destination that exists and is not a regular file raises :class:`OutputError` before anything
    is written; a symbolic link to a regular file is written through (its target is replaced).
    """
    path = _as_path(path, "output")
    _check_parents(path)
    target = _file_target(path)
    if mkdir:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target, suffix)
    try:
        yield tmp
        _file_target(target)  # still a regular file (or absent) at the moment it is replaced
        os.replace(tmp, target)
    except OSError as err:
        if err.errno is None or err.filename not in (None, str(tmp)):
            raise
        # name the destination, not the hidden temporary file (same errno, so the same subclass)
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        # After a successful replace the name is gone; after any failure this removes the leftover.
        with suppress(OSError):
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


def write_safetensors_atomic(
    path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write torch tensors as a safetensors file atomically; returns ``path``.

    The file is serialized in memory (``safetensors.torch.save``) and written with Python's file I/O:
    a full disk or a read-only file system is an ``OSError`` naming ``path`` (``safetensors``' own
    writer reports it as an opaque ``SafetensorError``), and no temporary file is left.
    """
    from safetensors.torch import save  # lazy: torch

    data = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    return write_bytes_atomic(path, data)


def write_json_atomic(path: str | Path, data: Any, *, fsync: bool = True) -> Path:
    """Write ``data`` as JSON (2-space indent, sorted keys, NaN allowed, final newline) atomically,
    by default also flushed to disk (``fsync``); returns ``path``. The format of the run files."""
    with atomic_open(path, "w", fsync=fsync) as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")
    return Path(path)


# -- locks --------------------------------------------------------------------------------------

P = ParamSpec("P")
R = TypeVar("R")

_held: dict[str, int] = {}
"""Lock files this process holds (real path -> nesting depth): locks are re-entrant per process."""
_held_guard = threading.Lock()

_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdigit() else "PID unknown"


@contextmanager
def _flock(lock_file: Path, subject: Path, noun: str, shared: bool) -> Iterator[None]:
    key = os.path.realpath(lock_file)
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if not (shared and err.errno in _NOT_WRITABLE):
                raise
            fd = -1  # a read-only run: nobody can write into it either, so readers need no lock
        if fd < 0:
            yield
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BusyError(
                f"{subject} is in use by another qmargin process ({holder}, lock file {lock_file}); "
                f"wait for it to finish or use another {noun}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # A releasing holder unlinks the file: make sure the locked file is the one at that name.
        try:
            here, there = os.fstat(fd), os.stat(lock_file)
            if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    with _held_guard:
        _held[key] = 1
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the PID is informative only
        yield
    finally:
        with _held_guard:
            del _held[key]
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # shared: unlink only as the last holder
            here = os.fstat(fd)
            there = os.stat(lock_file)
            if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(lock_file)
        except OSError:
            pass
        finally:
            os.close(fd)


@contextmanager
def lock_directory(
    directory: str | os.PathLike[str], *, shared: bool = False, create: bool = True
) -> Iterator[Path]:
    """Hold the lock of a run directory (``DIR/.qmargin.lock``) for the ``with`` block; yield the path.

    The directory is checked (:func:`check_output` with ``kind="dir"``) and created (``create``).
    ``shared``: a reader's lock (several readers, no writer); in a directory where the lock file
    cannot be created (read-only) a reader proceeds without it. A conflicting holder in another
    process raises :class:`BusyError` naming its PID.
    """
    d = check_output(directory, kind="dir", what="directory")
    if create and not shared:
        d.mkdir(parents=True, exist_ok=True)
    if not d.is_dir():
        yield d  # a reader of a missing directory: its own error message follows
        return
    with _flock(d / LOCK_NAME, d, "directory", shared):
        yield d


@contextmanager
def lock_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of an output file (``PARENT/.NAME.qmargin.lock``) for the ``with``
    block; yield the checked path (:func:`check_output`). The parent directory is created."""
    p = check_output(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with _flock(p.parent / f".{p.name}{LOCK_NAME}", p, "output", False):
        yield p


def holds_lock(
    param: str, *, kind: str = "dir", shared: bool = False, also_check: Mapping[str, str] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: call the function holding the lock of its argument ``param`` (a directory with
    ``kind="dir"``, ``shared`` for a reader; an output file with ``kind="file"``); ``None`` takes
    no lock. ``also_check`` maps other output parameters to their kind (``{"results_dir": "dir"}``):
    they are checked (:func:`check_output`) before the lock is taken and anything is created."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)
        if param not in signature.parameters:
            raise TypeError(f"{fn.__name__} has no parameter {param!r}")

        @functools.wraps(fn)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = signature.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            target = bound.arguments.get(param)
            for other, other_kind in (also_check or {}).items():
                if bound.arguments.get(other) is not None:
                    check_output(bound.arguments[other], kind=other_kind, what=other)
            if target is None:
                return fn(*args, **kwargs)
            with lock_directory(target, shared=shared) if kind == "dir" else lock_output(target):
                return fn(*args, **kwargs)

        return locked

    return decorate


# -- interrupts ---------------------------------------------------------------------------------


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) for the body; one that arrived meanwhile is raised right after it.

    For a group of atomic writes that only make sense together (``checkpoint.safetensors`` and
    ``trainer_state.json`` carry one epoch token): each file is atomic on its own, and this keeps an
    interrupt from landing between them. Outside the main thread (where signal handlers cannot be
    set), or when SIGINT is not handled by Python's default handler, the body runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
