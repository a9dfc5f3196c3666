"""`load_dataset`: a registered dataset as normalised torch tensors, downloading its files on request.

Sits above `qmargin.data.registry` (what the datasets are) and `qmargin.data.download` (fetching
official files), which both import only the registry side: ``registry <- download <- loading``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmargin.data import registry
from qmargin.data.download import DOWNLOADS, download_dataset
from qmargin.data.registry import (
    Dataset,
    DatasetInfo,
    Loader,
    MissingDataError,
    RawSplits,
    data_dir_candidates,
    dataset_entry,
    default_data_dir,
    normalize,
)
from qmargin.errors import DataError

__all__ = ["load_dataset", "locate_dataset"]


def _check_part(info: DatasetInfo, part: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != info.input_shape:
        raise DataError(
            f"{info.name}: {part} images have shape {tuple(x.shape)}, expected N x {info.input_shape}"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{info.name}: {x.shape[0]} {part} images but labels of shape {tuple(y.shape)}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= info.num_classes):
        raise DataError(f"{info.name}: {part} labels outside 0..{info.num_classes - 1}")


def _to_tensors(
    info: DatasetInfo, x: np.ndarray, y: np.ndarray, do_normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not x.flags.writeable:
        x = x.copy()
    if do_normalize:
        normalize(x, info)
    y = np.ascontiguousarray(y, dtype=np.int64)
    if not y.flags.writeable:
        y = y.copy()
    return torch.from_numpy(x), torch.from_numpy(y)


def _load_found(name: str, data_dir: str | Path | None, loader: Loader) -> RawSplits:
    """``loader`` on the first of :func:`data_dir_candidates` that holds the files. A directory with
    only some of them is an error (not skipped: the user put files there); when none holds any, the
    error of the first directory, naming every place looked at and how to get the files."""
    first: MissingDataError | None = None
    looked = []
    for rule, path in data_dir_candidates(name, data_dir):
        try:
            return loader(path)
        except MissingDataError as err:
            if err.partial:
                raise
            first = first or err
            looked.append(f"{path} ({rule})")
    assert first is not None
    hints = [f"looked in {', '.join(looked)}"]
    hints += [f"or install the files with: {loc.install}" for loc in registry.SYSTEM_DATA_DIRS.get(name, ())]
    raise MissingDataError(f"{first}; {'; '.join(hints)}", partial=False)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    base_url: str | None = None,
    normalize: bool = True,
) -> Dataset:
    """Load a registered dataset as torch tensors.

    Args:
        name: a name from `available_datasets` (``digits``, ``mnist5k``, ``mnist``, ``fashion-mnist``,
            ``cifar10``).
        data_dir: directory holding file-based datasets. Without ``download``, the files are looked
            for in ``data_dir``, then ``$QMARGIN_DATA`` or ``~/.cache/qmargin/data``, then the system
            locations of `SYSTEM_DATA_DIRS` (Debian's ``/usr/share/datasets/fashion-mnist``), and read
            in place (`data_dir_candidates`). ``download`` puts them in ``data_dir`` (default
            ``$QMARGIN_DATA`` or the cache). Ignored by ``digits`` and ``mnist5k``.
        download: fetch missing official files first (checksum-verified, see `qmargin.data.download`).
        base_url: mirror directory URL to download from instead of the official ones (also
            ``$QMARGIN_DATA_URL``).
        normalize: apply ``(x - mean) / std`` per channel (``info.normalization``); when false, pixels
            stay in ``[0, 1]``.

    Returns:
        `Dataset` with x float32 ``N x C x H x W`` and y int64 ``N``.

    Raises:
        DataError: unknown name, missing/corrupt files, failed download or checksum.
    """
    info, loader = dataset_entry(name)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if download and name in DOWNLOADS:
        download_dataset(name, root, base_url=base_url)
    raw = loader(root) if (download or not info.needs_files) else _load_found(name, data_dir, loader)
    _check_part(info, "train", raw.x_train, raw.y_train)
    _check_part(info, "test", raw.x_test, raw.y_test)
    x_train, y_train = _to_tensors(info, raw.x_train, raw.y_train, normalize)
    x_test, y_test = _to_tensors(info, raw.x_test, raw.y_test, normalize)
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, info=info)


def locate_dataset(name: str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Where ``load_dataset(name, data_dir=...)`` would read ``name`` from, without loading it for
    good: ``{"name", "found": bool, "path", "rule", "error"}`` (``rule``: ``--data-dir``,
    ``$QMARGIN_DATA``, ``cache``, ``system (...)`` or ``package`` for datasets shipped inside a
    Python package; ``error``: the one-line reason when not found, which says how to get the files).
    The files are read and checked as a load would (strict parsing), so "found" means loadable."""
    info, loader = dataset_entry(name)
    if not info.needs_files:
        return {"name": name, "found": True, "path": None, "rule": "package", "error": None}
    for rule, path in data_dir_candidates(name, data_dir):
        try:
            loader(path)
        except MissingDataError as err:
            if err.partial:
                return {"name": name, "found": False, "path": str(path), "rule": rule, "error": str(err)}
            continue
        except DataError as err:
            return {"name": name, "found": False, "path": str(path), "rule": rule, "error": str(err)}
        return {"name": name, "found": True, "path": str(path), "rule": rule, "error": None}
    try:
        _load_found(name, data_dir, loader)
    except DataError as err:
        return {"name": name, "found": False, "path": None, "rule": None, "error": str(err)}
    raise AssertionError("unreachable: no candidate held the files")
