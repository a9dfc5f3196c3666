"""CIFAR-10 from the official *binary* version (no pickle).

Each ``.bin`` file is a sequence of fixed 3,073-byte records: 1 label byte (0..9), then 3,072 pixel
bytes, the 32x32 red plane, then green, then blue, each row-major. So a record reshapes directly to
``3 x 32 x 32`` (C, H, W). Files: ``data_batch_1.bin`` .. ``data_batch_5.bin`` (train, 10,000 records
each) and ``test_batch.bin`` (test, 10,000), looked up in ``<data_dir>/cifar-10-batches-bin/`` then
directly in ``<data_dir>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qmargin.data.registry import DatasetInfo, RawSplits, missing_files_error
from qmargin.errors import DataError

__all__ = [
    "CIFAR_RECORD_BYTES",
    "CIFAR_FOLDER",
    "CIFAR_TRAIN_FILES",
    "CIFAR_TEST_FILE",
    "CIFAR10_INFO",
    "read_cifar_binary",
    "load_cifar10_raw",
]

CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"

CIFAR10_INFO = DatasetInfo(
    name="cifar10",
    input_shape=(3, 32, 32),
    num_classes=10,
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    # Per-channel mean and (population) std of the 50,000 training images in [0, 1].
    normalization=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    source="CIFAR-10 binary version (Krizhevsky 2009), cifar-10-binary.tar.gz",
    description="60,000 32x32 colour images in 10 classes, pixels / 255",
    split="official: 50,000 train (data_batch_1..5) / 10,000 test (test_batch)",
    num_train=50000,
    num_test=10000,
    layout=(
        f"{CIFAR_FOLDER}/{{{','.join(CIFAR_TRAIN_FILES)},{CIFAR_TEST_FILE}}} "
        "(or the same files directly in the data directory)"
    ),
)


def read_cifar_binary(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch file.

    Returns:
        ``(images, labels)``: uint8 ``N x 3 x 32 x 32`` and uint8 ``N``.

    Raises:
        DataError: unreadable, empty, size not a multiple of 3,073 bytes, or a label above 9; the message
            names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data or len(data) % CIFAR_RECORD_BYTES:
        raise DataError(
            f"{path}: {len(data)} bytes is not a positive multiple of the {CIFAR_RECORD_BYTES}-byte "
            "CIFAR-10 record (truncated, or not the binary version)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0]
    if int(labels.max()) >= 10:
        bad = int(np.flatnonzero(labels >= 10)[0])
        raise DataError(f"{path}: record {bad} has label {int(labels[bad])}, expected 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _find(data_dir: Path, name: str) -> Path | None:
    for candidate in (data_dir / CIFAR_FOLDER / name, data_dir / name):
        if candidate.is_file():
            return candidate
    return None


def _to_raw(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    x = images.astype(np.float32)
    x /= 255.0
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return x, y


def load_cifar10_raw(data_dir: Path) -> RawSplits:
    """``cifar10`` from ``data_dir``: pixels ``/ 255`` as float32 ``N x 3 x 32 x 32``, int64 labels."""
    names = (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)
    found = {name: _find(data_dir, name) for name in names}
    paths = {name: p for name, p in found.items() if p is not None}
    missing = [name for name in names if name not in paths]
    if missing:
        raise missing_files_error(CIFAR10_INFO, data_dir, missing, expected=len(names))
    x_train, y_train = _to_raw([read_cifar_binary(paths[n]) for n in CIFAR_TRAIN_FILES])
    x_test, y_test = _to_raw([read_cifar_binary(paths[CIFAR_TEST_FILE])])
    return RawSplits(x_train, y_train, x_test, y_test)
