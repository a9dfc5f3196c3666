"""Checksummed downloads of the official dataset files.

`DOWNLOADS` maps a dataset name to a `RemoteSource`: mirror directory URLs, the files to fetch with
their MD5 (as torchvision lists them), and where they go under the data directory. Each file is
streamed into a temporary file beside its destination and renamed into place only after its MD5
matches; on a mismatch the temporary file is deleted and `DataError` is raised. Network failures
(no route, refused connection, HTTP error, timeout) also raise `DataError`, telling the user where to
put the files by hand.

Mirrors: ``base_url`` (argument) beats ``$QMARGIN_DATA_URL`` beats the official mirrors; a mirror is
the URL of a directory that holds the dataset's files under their official names.

Archives (CIFAR-10) are unpacked by reading only the listed regular-file members and writing each one
ourselves to a fixed path under the data directory (tmp + rename): member names never choose an output
path, so links, devices and ``../`` names cannot escape the directory.

The table is plain data: tests (or users with a private mirror) may add or replace entries.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from qmargin.data.registry import dataset_info, default_data_dir
from qmargin.errors import DataError
from qmargin.files import atomic_open

__all__ = [
    "DATA_URL_ENV",
    "DEFAULT_TIMEOUT",
    "RemoteSource",
    "ChecksumError",
    "DOWNLOADS",
    "ProgressFn",
    "md5_file",
    "fetch_file",
    "extract_members",
    "download_dataset",
]

DATA_URL_ENV = "QMARGIN_DATA_URL"
DEFAULT_TIMEOUT = 30.0
_CHUNK = 1 << 20

ProgressFn = Callable[[str, int, "int | None"], None]
"""``progress(file_name, bytes_done, bytes_total_or_None)``, called while a file downloads."""


def _safe_relative(path: str) -> bool:
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts


@dataclass(frozen=True)
class RemoteSource:
    """Where a dataset's official files live and what they must hash to.

    Attributes:
        mirrors: directory URLs tried in order; file URL = ``mirror.rstrip('/') + '/' + file_name``.
        files: remote file name -> MD5 hex digest.
        subdir: folder under the data directory that receives the downloaded files.
        extract: for an archive (one file in ``files``), member name -> destination relative to the data
            directory (every listed member must be a regular file in it); ``None`` for plain files.
    """

    mirrors: tuple[str, ...]
    files: dict[str, str]
    subdir: str = ""
    extract: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.extract is not None and len(self.files) != 1:
            raise ValueError("a RemoteSource with extract= must list exactly one archive in files")
        names = list(self.files) + ([self.subdir] if self.subdir else [])
        names += list((self.extract or {}).values())
        for name in names:
            if not _safe_relative(name):
                raise ValueError(f"unsafe relative path in RemoteSource: {name!r}")


_IDX = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

DOWNLOADS: dict[str, RemoteSource] = {
    "mnist": RemoteSource(
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files={
            f"{_IDX[0]}.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            f"{_IDX[1]}.gz": "d53e105ee54ea40749a09fcc592d170f",
            f"{_IDX[2]}.gz": "9fb629c4189551a2d022fa330f9573f3",
            f"{_IDX[3]}.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        subdir="MNIST/raw",
    ),
    "fashion-mnist": RemoteSource(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files={
            f"{_IDX[0]}.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            f"{_IDX[1]}.gz": "25c81989df183df01b3e8a0aad5dffbe",
            f"{_IDX[2]}.gz": "bef4ecab320f06d8554ea6380940ec79",
            f"{_IDX[3]}.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        subdir="FashionMNIST/raw",
    ),
    "cifar10": RemoteSource(
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
        extract={
            f"cifar-10-batches-bin/{name}": f"cifar-10-batches-bin/{name}"
            for name in (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin", "batches.meta.txt")
        },
    ),
}
"""Dataset name -> `RemoteSource`. MD5 digests as torchvision lists them."""


def md5_file(path: str | Path) -> str:
    """MD5 hex digest of a file (streamed)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _DigestError(Exception):
    def __init__(self, got: str) -> None:
        super().__init__(got)
        self.got = got


class ChecksumError(DataError):
    """A downloaded file's MD5 differs from the table; the file was deleted."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {_one_line(exc.reason)}"
    if isinstance(exc, urllib.error.URLError):
        return _one_line(exc.reason)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return _one_line(exc) or type(exc).__name__


def _write_atomic(
    src: IO[bytes],
    dest: Path,
    md5: str | None = None,
    progress: ProgressFn | None = None,
    total: int | None = None,
) -> None:
    """Stream ``src`` into ``dest`` via a temporary file; rename only if the MD5 (when given) matches."""
    h = hashlib.md5(usedforsecurity=False)
    done = 0
    # A digest mismatch raises inside the block: the temporary file is deleted, dest is untouched.
    with atomic_open(dest, "wb", suffix=".part") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(dest.name, done, total)
        if md5 is not None and h.hexdigest() != md5.lower():
            raise _DigestError(h.hexdigest())


def fetch_file(
    url: str,
    dest: str | Path,
    md5: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    progress: ProgressFn | None = None,
) -> Path:
    """Download ``url`` to ``dest`` if and only if its MD5 is ``md5``.

    Raises:
        DataError: checksum mismatch (the partial file is deleted) or any network failure.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {dest.parent}: {exc.strerror or exc}") from None
    if not os.access(dest.parent, os.W_OK):
        raise DataError(f"cannot write to {dest.parent} (permission denied)")
    request = urllib.request.Request(url, headers={"User-Agent": "qmargin"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _write_atomic(response, dest, md5, progress, total)
    except _DigestError as exc:
        raise ChecksumError(
            f"checksum mismatch for {url}: md5 {exc.got}, expected {md5}; the download was deleted"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DataError(f"could not download {url}: {_reason(exc)}") from None
    return dest


def extract_members(archive: str | Path, members: dict[str, str], data_dir: str | Path) -> list[Path]:
    """Unpack the listed regular-file members of a tar archive to fixed paths under ``data_dir``.

    Other members (and any link, device or directory, whatever its name) are ignored; each output is
    written via a temporary file and renamed into place.

    Raises:
        DataError: corrupt archive, or a listed member missing or not a regular file.
    """
    archive, data_dir = Path(archive), Path(data_dir)
    written: dict[str, Path] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                target = members.get(name)
                if target is None or not member.isreg() or name in written:
                    continue
                if not _safe_relative(target):
                    raise ValueError(f"unsafe extraction target {target!r}")
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isreg() members always have data
                    continue
                with src:
                    _write_atomic(src, data_dir / target)
                written[name] = data_dir / target
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{archive}: corrupt or truncated archive ({_reason(exc)})") from None
    missing = sorted(set(members) - set(written))
    if missing:
        raise DataError(f"{archive}: no regular file named {', '.join(missing)} in the archive")
    return list(written.values())


def _plain_present(data_dir: Path, source: RemoteSource, name: str) -> bool:
    stem = name.removesuffix(".gz")
    bases = (data_dir / source.subdir, data_dir) if source.subdir else (data_dir,)
    return any((base / n).is_file() for base in bases for n in (name, stem))


def _extracted_present(data_dir: Path, source: RemoteSource) -> bool:
    targets = (source.extract or {}).values()
    return all((data_dir / t).is_file() or (data_dir / PurePosixPath(t).name).is_file() for t in targets)


def _mirrors(source: RemoteSource, base_url: str | None) -> tuple[str, ...]:
    if base_url:
        return (base_url,)
    env = os.environ.get(DATA_URL_ENV)
    if env:
        return (env,)
    return source.mirrors


def _fetch_from_mirrors(
    mirrors: tuple[str, ...],
    name: str,
    dest: Path,
    md5: str,
    *,
    timeout: float,
    progress: ProgressFn | None,
    hint: str,
) -> None:
    errors: list[DataError] = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{name}"
        try:
            fetch_file(url, dest, md5, timeout=timeout, progress=progress)
            return
        except DataError as exc:
            errors.append(exc)
    mismatches = [e for e in errors if isinstance(e, ChecksumError)]
    if mismatches:
        raise mismatches[-1]
    raise DataError(f"{errors[-1]} (offline?); {hint}")


def download_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Fetch the official files of ``name`` into ``data_dir`` unless they are already there.

    Plain files are present when found raw or gzipped in ``data_dir/subdir`` or ``data_dir``; archives
    count as present when all their extracted files exist, and a previously downloaded archive is reused
    if its MD5 matches.

    Returns:
        The paths written (empty when everything was present).

    Raises:
        DataError: the dataset is not downloadable, the directory cannot be created, a download fails
            or a checksum does not match.
    """
    source = DOWNLOADS.get(name)
    if source is None:
        dataset_info(name)  # unknown name -> DataError listing the known ones
        raise DataError(f"{name} is not downloadable (it ships with its Python package)")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    try:
        layout = dataset_info(name).layout
    except DataError:
        layout = None
    hint = f"put the files in {root} (layout: {layout or source.subdir or 'as downloaded'})"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory {root}: {exc.strerror or exc}") from None
    mirrors = _mirrors(source, base_url)
    written: list[Path] = []
    for file_name, md5 in source.files.items():
        dest = root / source.subdir / file_name
        if source.extract is None:
            if _plain_present(root, source, file_name):
                continue
            _fetch_from_mirrors(mirrors, file_name, dest, md5, timeout=timeout, progress=progress, hint=hint)
            written.append(dest)
        else:
            if _extracted_present(root, source):
                continue
            if not (dest.is_file() and md5_file(dest) == md5.lower()):
                _fetch_from_mirrors(
                    mirrors, file_name, dest, md5, timeout=timeout, progress=progress, hint=hint
                )
                written.append(dest)
            written += extract_members(dest, source.extract, root)
    return written
