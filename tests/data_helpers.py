"""Writers of tiny fake dataset files for the data tests (IDX, CIFAR-10 binary, tar archives)."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array (magic 0x0800 | ndim unless given)."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_file(path: Path, data: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def fake_mnist_arrays(seed: int, n_train: int = 12, n_test: int = 6, size: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_fake_idx_set(folder: Path, arrays: dict[str, np.ndarray], gz: bool) -> dict[str, Path]:
    """The four IDX files of ``arrays`` in ``folder`` (``.gz`` when ``gz``); returns key -> path."""
    return {key: write_file(folder / IDX_NAMES[key], idx_bytes(arrays[key]), gz) for key in IDX_NAMES}


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: label byte then 3,072 pixel bytes (C, H, W order)."""
    images = np.asarray(images, dtype=np.uint8).reshape(len(labels), -1)
    records = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], images], axis=1)
    return records.tobytes()


def fake_cifar_arrays(
    seed: int, per_batch: int = 2, n_test: int = 3
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    out = {}
    for name in names:
        n = n_test if name == "test_batch.bin" else per_batch
        out[name] = (
            rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8),
        )
    return out


def write_fake_cifar(folder: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    for name, (images, labels) in arrays.items():
        write_file(folder / name, cifar_bytes(images, labels))


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A .tar.gz holding the given members (data is None for links and directories)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def regular(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE
    return info


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info
