"""The dataset registry: `DatasetInfo`, `Dataset`, `load_dataset` and friends (design.md §6).

A registered dataset is a `DatasetInfo` (what it is, without loading anything) plus a *loader*, a
function ``loader(data_dir) -> RawSplits`` that returns pixels scaled to ``[0, 1]``. The registry then
applies the documented normalisation

    x_norm[:, c] = (x[:, c] - mean[c]) / std[c]        (x in [0, 1], c = channel)

and hands back torch tensors (`qmargin.data.loading.load_dataset`). The registry knows nothing of
downloads: `qmargin.data.download` reads it, `qmargin.data.loading` uses both (no import circle).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from qmargin.errors import DataError

__all__ = [
    "DatasetInfo",
    "Dataset",
    "RawSplits",
    "Loader",
    "register_dataset",
    "unregister_dataset",
    "available_datasets",
    "dataset_info",
    "dataset_entry",
    "default_data_dir",
    "normalize",
    "missing_files_error",
    "MissingDataError",
    "SYSTEM_DATA_DIRS",
    "SystemLocation",
    "data_dir_candidates",
]

DATA_ENV = "QMARGIN_DATA"
"""Environment variable naming the default data directory."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, known without loading it.

    Attributes:
        name: registry name (``"mnist5k"``, ``"cifar10"``, ...).
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of labels; labels are ``0 .. num_classes - 1``.
        classes: human-readable class names (index = label), if known.
        normalization: ``(mean, std)``, one float per channel, applied to pixels in ``[0, 1]``.
        source: where the pixels come from (package function or official files).
        description: one line for listings.
        split: how train and test are formed.
        num_train: number of training images (nominal for user-supplied files).
        num_test: number of test images (nominal for user-supplied files).
        layout: for datasets read from a directory: which files go where, relative to the data
            directory; ``None`` for datasets that ship inside a Python package.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    source: str
    description: str = ""
    split: str = ""
    classes: tuple[str, ...] | None = None
    num_train: int | None = None
    num_test: int | None = None
    layout: str | None = None

    def __post_init__(self) -> None:
        mean, std = self.normalization
        channels = self.input_shape[0]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"{self.name}: normalization needs one mean and std per channel ({channels})")
        if any(s <= 0 for s in std):
            raise ValueError(f"{self.name}: normalization std must be positive, got {std}")
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")

    @property
    def needs_files(self) -> bool:
        """True when the data is read from a directory (not shipped inside a Python package)."""
        return self.layout is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        mean, std = self.normalization
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "classes": None if self.classes is None else list(self.classes),
            "normalization": {"mean": list(mean), "std": list(std)},
            "source": self.source,
            "description": self.description,
            "split": self.split,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "layout": self.layout,
        }


@dataclass
class Dataset:
    """A loaded dataset: normalised float32 images ``N x C x H x W`` and int64 labels ``N``."""

    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    info: DatasetInfo

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.info.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, classes={self.info.num_classes})"
        )


class RawSplits(NamedTuple):
    """What a loader returns: x float32 ``N x C x H x W`` in ``[0, 1]`` (not normalised), y int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


Loader = Callable[[Path], RawSplits]
"""``loader(data_dir) -> RawSplits``; datasets shipped in packages ignore ``data_dir``."""

_REGISTRY: dict[str, tuple[DatasetInfo, Loader]] = {}


def register_dataset(info: DatasetInfo, loader: Loader, *, overwrite: bool = False) -> None:
    """Add a dataset to the registry under ``info.name``.

    Raises:
        ValueError: the name is taken and ``overwrite`` is false.
    """
    if info.name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {info.name!r} is already registered")
    _REGISTRY[info.name] = (info, loader)


def unregister_dataset(name: str) -> None:
    """Remove a dataset from the registry (no error when it is not there)."""
    _REGISTRY.pop(name, None)


def available_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def dataset_entry(name: str) -> tuple[DatasetInfo, Loader]:
    """``(info, loader)`` of a registered dataset; an unknown name raises `DataError` listing the known."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_datasets())
        raise DataError(f"unknown dataset {name!r}; known datasets: {known}") from None


def dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` of a registered dataset, without loading it.

    Raises:
        DataError: unknown name (the message lists the known ones).
    """
    return dataset_entry(name)[0]


class SystemLocation(NamedTuple):
    """A directory where a system package installs a dataset's files: the package's name and the
    command that installs it."""

    path: str
    package: str
    install: str


SYSTEM_DATA_DIRS: dict[str, tuple[SystemLocation, ...]] = {
    "fashion-mnist": (
        SystemLocation(
            "/usr/share/datasets/fashion-mnist",
            "Debian package dataset-fashion-mnist",
            "apt-get install dataset-fashion-mnist",
        ),
    ),
}
"""Where system packages put a dataset's files (read in place, looked at after ``--data-dir`` and
``$QMARGIN_DATA`` / the cache). One line adds another packaged dataset."""


def data_dir_candidates(name: str, data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The directories ``load_dataset`` looks in for ``name``'s files, in order, with the rule that
    names each: ``--data-dir`` (when given), then ``$QMARGIN_DATA`` (when set) or the cache
    ``~/.cache/qmargin/data``, then the system locations of :data:`SYSTEM_DATA_DIRS`."""
    out: list[tuple[str, Path]] = []
    if data_dir is not None:
        out.append(("--data-dir", Path(data_dir).expanduser()))
    out.append(("$QMARGIN_DATA" if os.environ.get(DATA_ENV) else "cache", default_data_dir()))
    out += [(f"system: {loc.package}", Path(loc.path)) for loc in SYSTEM_DATA_DIRS.get(name, ())]
    seen: set[Path] = set()
    unique = []
    for rule, path in out:
        if path not in seen:
            seen.add(path)
            unique.append((rule, path))
    return unique


def default_data_dir() -> Path:
    """``$QMARGIN_DATA`` if set, else ``~/.cache/qmargin/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qmargin" / "data"


def normalize(x: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """``(x[:, c] - mean[c]) / std[c]`` in place on a float32 ``N x C x H x W`` array; returns it."""
    mean, std = info.normalization
    x -= np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return x


class MissingDataError(DataError):
    """A dataset's files are absent from a directory (``partial``: some of them are there)."""

    def __init__(self, message: str, *, partial: bool) -> None:
        super().__init__(message)
        self.partial = partial


def missing_files_error(
    info: DatasetInfo, data_dir: Path, missing: list[str], *, expected: int | None = None
) -> MissingDataError:
    """The `DataError` for absent files: says where to put them and how to download them.
    ``expected``: how many files the dataset has (``len(missing) < expected``: a partial set)."""
    if data_dir.exists() and not data_dir.is_dir():
        where = f"data directory {data_dir} is not a directory"
    elif not data_dir.is_dir():
        where = f"data directory {data_dir} does not exist"
    else:
        where = f"missing in {data_dir}: {', '.join(missing)}"
    return MissingDataError(
        f"{info.name}: {where}; put the files in {data_dir} (layout: {info.layout}), "
        f"or download them with --download (download=True)",
        partial=expected is not None and len(missing) < expected,
    )
