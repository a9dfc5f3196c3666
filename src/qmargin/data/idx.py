"""MNIST and Fashion-MNIST from IDX files, in torchvision's layout (strict parsing).

IDX format (big-endian): a 4-byte magic ``0x0000 TT DD`` with type ``TT = 0x08`` (unsigned byte) and
``DD`` dimensions, then ``DD`` int32 sizes, then ``prod(sizes)`` data bytes, nothing more. Images are
``0x00000803`` (N x 28 x 28), labels ``0x00000801`` (N). Files may be gzip-compressed (``.gz``).

Files are looked up as ``<data_dir>/<Folder>/raw/<name>`` then ``<data_dir>/<name>``, raw before ``.gz``,
with ``<Folder>`` = ``MNIST`` or ``FashionMNIST``.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from qmargin.data.registry import DatasetInfo, RawSplits, missing_files_error
from qmargin.errors import DataError

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IDX_FILES",
    "MNIST_INFO",
    "FASHION_MNIST_INFO",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "find_file",
    "load_mnist_raw",
    "load_fashion_mnist_raw",
    "load_idx_dataset",
]

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Base names (without ``.gz``) of the four IDX files of MNIST and Fashion-MNIST."""

_GZIP_MAGIC = b"\x1f\x8b"


def _layout(folder: str) -> str:
    names = ",".join(IDX_FILES.values())
    return f"{folder}/raw/{{{names}}}[.gz] (or the same files directly in the data directory)"


MNIST_INFO = DatasetInfo(
    name="mnist",
    input_shape=(1, 28, 28),
    num_classes=10,
    classes=tuple(str(i) for i in range(10)),
    normalization=((0.1307,), (0.3081,)),  # mean/std of the 60,000 training images in [0, 1]
    source="MNIST IDX files (LeCun, Cortes, Burges), torchvision layout",
    description="70,000 28x28 handwritten digits, pixels / 255",
    split="official: 60,000 train / 10,000 test",
    num_train=60000,
    num_test=10000,
    layout=_layout("MNIST"),
)

FASHION_MNIST_INFO = DatasetInfo(
    name="fashion-mnist",
    input_shape=(1, 28, 28),
    num_classes=10,
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    normalization=((0.2860,), (0.3530,)),  # mean/std of the 60,000 training images in [0, 1]
    source="Fashion-MNIST IDX files (Zalando Research), torchvision layout",
    description="70,000 28x28 greyscale clothing images, pixels / 255",
    split="official: 60,000 train / 10,000 test",
    num_train=60000,
    num_test=10000,
    layout=_layout("FashionMNIST"),
)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix == ".gz" or data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: not a valid gzip file (truncated or corrupt: {exc})") from None
    return data


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one unsigned-byte IDX file (raw or gzip) and check it strictly.

    Checks: the magic number equals ``magic``; the header is complete; the file holds exactly
    ``4 + 4 * ndim + prod(dims)`` bytes (after decompression).

    Returns:
        uint8 array of shape ``dims`` (read-only view of the file bytes).

    Raises:
        DataError: unreadable, bad gzip, wrong magic, truncated or trailing bytes; names the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path}: wrong IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) < expected:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, dims {list(dims)} need {expected})")
    if len(data) > expected:
        raise DataError(f"{path}: {len(data) - expected} trailing bytes after IDX data {list(dims)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str | Path, *, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """IDX image file (magic ``0x00000803``) as uint8 ``N x rows x cols``; optional size check."""
    images = read_idx(path, IDX_IMAGES_MAGIC)
    if (rows is not None and images.shape[1] != rows) or (cols is not None and images.shape[2] != cols):
        raise DataError(f"{path}: images are {images.shape[1]}x{images.shape[2]}, expected {rows}x{cols}")
    return images


def read_idx_labels(path: str | Path, *, num_classes: int | None = None) -> np.ndarray:
    """IDX label file (magic ``0x00000801``) as uint8 ``N``; with ``num_classes``, labels must be below it."""
    labels = read_idx(path, IDX_LABELS_MAGIC)
    if num_classes is not None and labels.size and int(labels.max()) >= num_classes:
        raise DataError(f"{path}: label {int(labels.max())} out of range 0..{num_classes - 1}")
    return labels


def find_file(data_dir: Path, folder: str, name: str) -> Path | None:
    """First existing candidate among ``data_dir/folder/name[.gz]`` and ``data_dir/name[.gz]``."""
    for base in (data_dir / folder, data_dir):
        for candidate in (base / name, base / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_idx_dataset(info: DatasetInfo, folder: str, data_dir: Path) -> RawSplits:
    """Read the four IDX files of ``info`` from ``data_dir`` (layout in the module doc).

    Returns:
        `RawSplits` with pixels ``/ 255`` as float32 ``N x 1 x 28 x 28`` and int64 labels.
    """
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for key, name in IDX_FILES.items():
        found = find_file(data_dir, f"{folder}/raw", name)
        if found is None:
            missing.append(name)
        else:
            paths[key] = found
    if missing:
        raise missing_files_error(info, data_dir, missing, expected=len(IDX_FILES))
    _, rows, cols = info.input_shape
    parts: list[np.ndarray] = []
    for split in ("train", "test"):
        images = read_idx_images(paths[f"{split}_images"], rows=rows, cols=cols)
        labels = read_idx_labels(paths[f"{split}_labels"], num_classes=info.num_classes)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{paths[f'{split}_images']}: {images.shape[0]} images but "
                f"{paths[f'{split}_labels']} has {labels.shape[0]} labels"
            )
        x = images.astype(np.float32)[:, None]
        x /= 255.0
        parts += [x, labels.astype(np.int64)]
    return RawSplits(*parts)


def load_mnist_raw(data_dir: Path) -> RawSplits:
    """``mnist`` from ``data_dir`` (layout ``MNIST/raw/...``)."""
    return load_idx_dataset(MNIST_INFO, "MNIST", data_dir)


def load_fashion_mnist_raw(data_dir: Path) -> RawSplits:
    """``fashion-mnist`` from ``data_dir`` (layout ``FashionMNIST/raw/...``)."""
    return load_idx_dataset(FASHION_MNIST_INFO, "FashionMNIST", data_dir)
