"""Data specs: the test data a user names on the command line, as a stream of ``(inputs, targets)`` batches.

A spec is one of

* ``NAME``: a registered dataset (``digits``, ``mnist5k``, ...; its test split, normalised as the
  registry documents);
* ``npz:FILE``: a NumPy ``.npz`` with arrays ``x`` (``N x ...``, numeric; passed to the model as
  ``float32``, values unchanged) and ``y`` (``N`` integer class labels ``>= 0``). Members stored
  uncompressed (``numpy.savez``) are memory-mapped, so only the batch being evaluated is read;
  compressed members (``savez_compressed``) are decompressed once;
* ``folder:DIR``: images in the ImageFolder layout (:mod:`qmargin.data.folder`), decoded per batch;
* ``pkg.module:function`` or ``path/to/file.py:function``: a function of the user's called without
  arguments, returning a ``torch.utils.data.Dataset`` (batched here), a ``DataLoader`` (used as it
  is) or a pair ``(x, y)`` of tensors / arrays.

:func:`open_data` returns a :class:`DataSource` whose ``loader`` is re-iterable and yields
``(inputs, targets)`` batches in a fixed order; every batch is checked as it streams by (a pair of
tensors with one target per input, integer labels ``>= 0``, finite floating inputs), so a bad sample
raises a one-line :class:`qmargin.errors.DataError` naming the spec and the batch instead of a
traceback from the model. Nothing here reads a whole folder or memory-mapped array into memory.

:func:`load_object` is the one importer of a user's code named ``pkg.module:name`` or
``file.py:name`` (data functions here, model factories in :mod:`qmargin.experiments.external`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import struct
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

from qmargin.data.folder import ImageFolder, ImageOptions
from qmargin.data.loading import load_dataset
from qmargin.data.registry import available_datasets
from qmargin.errors import DataError, UserError

__all__ = [
    "DataSource",
    "ImageOptions",
    "ArrayDataset",
    "open_data",
    "load_object",
    "read_npz",
    "spec_forms",
    "DEFAULT_BATCH_SIZE",
]

DEFAULT_BATCH_SIZE = 256


def spec_forms() -> str:
    """The accepted data spec forms, for error messages and help texts."""
    names = ", ".join(available_datasets())
    return f"a dataset name ({names}), npz:FILE, folder:DIR, pkg.module:function or path/to/file.py:function"


def _one_line(e: BaseException, limit: int = 160) -> str:
    line = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
    text = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the user's code ------------------------------------------------------------------------------


@contextmanager
def _on_sys_path(folder: str) -> Iterator[None]:
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def load_object(spec: str, *, what: str, error: type[UserError] = DataError) -> Any:
    """The object named by ``pkg.module:name`` or ``path/to/file.py:name`` (``name`` may be dotted).

    A ``.py`` file is imported as a module of its own (its directory on ``sys.path`` while it is
    imported, so it may import its neighbours); a dotted module is imported with the current directory
    on ``sys.path``. A spec without ``:``, a missing file or module, an exception raised while importing
    (any, including ``SystemExit``) or a missing attribute raise ``error`` in one line naming ``what``,
    the spec and the exception's first line.
    """
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise error(f"{what} {spec!r}: expected pkg.module:name or path/to/file.py:name")
    try:
        if module_part.endswith(".py"):
            path = Path(module_part).expanduser()
            if not path.is_file():
                raise error(f"{what} {spec!r}: {path} does not exist or is not a file")
            resolved = path.resolve()
            digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
            name = f"qmargin_user_{resolved.stem}_{digest}"
            module_spec = importlib.util.spec_from_file_location(name, resolved)
            if module_spec is None or module_spec.loader is None:
                raise error(f"{what} {spec!r}: cannot import {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look their module up here
            try:
                with _on_sys_path(str(resolved.parent)):
                    module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            with _on_sys_path(str(Path.cwd())):
                module = importlib.import_module(module_part)
    except UserError:
        raise
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as e:
        raise error(f"{what} {spec!r}: import failed: {_one_line(e)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {spec!r}: {module_part} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


# -- npz ------------------------------------------------------------------------------------------


def _npz_member(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """Array ``name`` of an open ``.npz``: memory-mapped when stored uncompressed, else read."""
    info = zf.getinfo(f"{name}.npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with path.open("rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) == 30 and local[:4] == b"PK\x03\x04":
                n_name, n_extra = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + n_name + n_extra)
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                offset = f.tell()
                if not dtype.hasobject:
                    if int(np.prod(shape)) == 0:
                        return np.empty(shape, dtype=dtype)
                    return np.memmap(
                        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
                    )
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a ``.npz`` test set, validated (module docstring); ``x`` memory-mapped if it can be."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz:{path}: the file does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n.removesuffix(".npy") for n in zf.namelist()]
            missing = [k for k in ("x", "y") if k not in members]
            if missing:
                raise DataError(
                    f"npz:{path}: needs arrays 'x' (inputs) and 'y' (labels); missing {missing}, "
                    f"found {sorted(members)[:6]}"
                )
            x = _npz_member(path, zf, "x")
            y = _npz_member(path, zf, "y")
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"npz:{path}: not a readable .npz file ({_one_line(e)})") from None
    if x.dtype.kind not in "fiu":
        raise DataError(f"npz:{path}: x must be a numeric array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"npz:{path}: x must have shape (N, ...) with at least 2 dims, got {x.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"npz:{path}: y must hold integer class labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"npz:{path}: y must have shape (N,), got {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"npz:{path}: x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise DataError(f"npz:{path}: the test set is empty")
    y = np.asarray(y).astype(np.int64)
    if int(y.min()) < 0:
        raise DataError(f"npz:{path}: labels must be >= 0, found {int(y.min())}")
    return x, y


class ArrayDataset(torch.utils.data.Dataset):
    """Map-style dataset over arrays ``x`` (any numeric dtype, read as ``float32``) and labels ``y``.

    ``ds[i]`` is one sample; ``ds[[i, ..., j]]`` one batch, read as a slice when the indices are
    consecutive (memory-mapped arrays then read only that batch).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int | list[int]) -> tuple[Tensor, Tensor]:
        if isinstance(index, int):
            return torch.from_numpy(np.array(self.x[index], dtype=np.float32)), torch.tensor(
                int(self.y[index])
            )
        idx = list(index)
        consecutive = all(b == a + 1 for a, b in zip(idx, idx[1:], strict=False))
        sel: slice | list[int] = slice(idx[0], idx[-1] + 1) if idx and consecutive else idx
        xb = np.array(self.x[sel], dtype=np.float32)
        return torch.from_numpy(xb), torch.from_numpy(np.array(self.y[sel], dtype=np.int64))


def _batched(dataset: torch.utils.data.Dataset, batch_size: int) -> DataLoader:
    """Batches of consecutive indices, each fetched with one ``dataset[[i, ..., j]]``."""
    sampler = BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=None, sampler=sampler)


# -- the source -----------------------------------------------------------------------------------


class CheckedBatches:
    """Re-iterable view of ``batches`` that checks every batch as it streams by (module docstring)."""

    def __init__(self, batches: Any, where: str, num_classes: int | None = None) -> None:
        self.batches = batches
        self.where = where
        self.num_classes = num_classes
        """When set (the model's number of outputs), a label ``>= num_classes`` is a ``DataError``."""

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        it = iter(self.batches)
        k = 0
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError:
                raise
            except Exception as e:  # the user's Dataset / DataLoader failed
                raise DataError(f"{self.where}: reading batch {k} failed: {_one_line(e)}") from None
            yield self._check(batch, k)
            k += 1

    def _check(self, batch: Any, k: int) -> tuple[Tensor, Tensor]:
        where = f"{self.where}: batch {k}"
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            raise DataError(f"{where} is a {type(batch).__name__}, expected a pair (inputs, targets)")
        x, y = batch
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise DataError(
                f"{where}: inputs and targets must be tensors, got {type(x).__name__}, {type(y).__name__}"
            )
        if x.dim() < 1 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"{where}: expected inputs (B, ...) and targets (B,), got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise DataError(f"{where}: targets must be integer class labels, got {y.dtype}")
        if y.numel() and int(y.min()) < 0:
            raise DataError(f"{where}: labels must be >= 0, found {int(y.min())}")
        if self.num_classes is not None and y.numel() and int(y.max()) >= self.num_classes:
            raise DataError(
                f"{where}: label {int(y.max())} is out of range for a model with {self.num_classes} outputs"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise DataError(f"{where}: inputs hold NaN or inf")
        return x, y.long()


@dataclass
class DataSource:
    """A data spec opened for streaming.

    Attributes:
        spec: the spec as given.
        kind: ``"registry"``, ``"npz"``, ``"folder"`` or ``"python"``.
        loader: re-iterable ``(inputs, targets)`` batches, checked as they stream (fixed order).
        num_samples: number of samples when known (``None`` for iterable-style user data).
        num_classes: the number of classes when the source knows it (registry, folder), else ``None``.
        dataset: the map-style dataset behind ``loader`` when there is one.
        describe: JSON-ready description (kind, path, shapes, classes, image options).
    """

    spec: str
    kind: str
    loader: CheckedBatches
    num_samples: int | None
    num_classes: int | None
    dataset: torch.utils.data.Dataset | None = None
    describe: dict[str, Any] = field(default_factory=dict)


def open_data(
    spec: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image: ImageOptions | None = None,
    data_dir: str | Path | None = None,
) -> DataSource:
    """Open a data spec (module docstring) as a :class:`DataSource` of ``batch_size`` batches.

    ``image`` options apply to ``folder:`` specs only (anything else with non-default options is a
    :class:`DataError`); ``data_dir`` to registry datasets read from files. A DataLoader returned by a
    user's function keeps its own batch size.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
    spec = spec.strip()
    image = image or ImageOptions()
    kind, _, rest = spec.partition(":")
    if kind != "folder" and not image.is_default:
        raise DataError(
            f"image options (resize, crop, mean/std, grayscale) apply to folder:DIR data, not {spec!r}"
        )
    if kind == "npz" and rest:
        x, y = read_npz(rest)
        ds: torch.utils.data.Dataset = ArrayDataset(x, y)
        return DataSource(
            spec,
            "npz",
            CheckedBatches(_batched(ds, batch_size), spec),
            int(y.shape[0]),
            None,
            ds,
            {
                "kind": "npz",
                "path": str(Path(rest).resolve()),
                "x_shape": list(x.shape),
                "x_dtype": str(x.dtype),
                "memory_mapped": isinstance(x, np.memmap),
            },
        )
    if kind == "folder" and rest:
        folder = ImageFolder(rest, image)
        return DataSource(
            spec,
            "folder",
            CheckedBatches(_batched(folder, batch_size), spec),
            len(folder),
            len(folder.classes),
            folder,
            {
                "kind": "folder",
                "path": str(Path(rest).resolve()),
                "classes": list(folder.classes),
                "image": image.to_dict(),
            },
        )
    if ":" not in spec:
        if spec not in available_datasets():
            raise DataError(f"unknown data spec {spec!r}; give {spec_forms()}")
        data = load_dataset(spec, data_dir=data_dir)
        tds = torch.utils.data.TensorDataset(data.x_test, data.y_test)
        return DataSource(
            spec,
            "registry",
            CheckedBatches(DataLoader(tds, batch_size=batch_size, shuffle=False), spec),
            data.num_test,
            data.info.num_classes,
            tds,
            {"kind": "registry", "name": spec, "split": "test"},
        )
    module_part, _, attr = spec.rpartition(":")
    if not (module_part.endswith(".py") or _dotted(module_part)) or not _dotted(attr):
        raise DataError(f"unknown data spec {spec!r}; give {spec_forms()}")
    return _python_source(spec, batch_size)


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _python_source(spec: str, batch_size: int) -> DataSource:
    fn = load_object(spec, what="data function", error=DataError)
    if not callable(fn):
        raise DataError(f"data function {spec!r} is a {type(fn).__name__}, not a function")
    try:
        obj = fn()
    except UserError:
        raise
    except Exception as e:
        raise DataError(f"data function {spec!r} raised {_one_line(e)}") from None
    describe: dict[str, Any] = {"kind": "python", "function": spec}
    if isinstance(obj, tuple) and len(obj) == 2 and not isinstance(obj[0], torch.utils.data.Dataset):
        try:
            x = torch.as_tensor(np.asarray(obj[0]) if not isinstance(obj[0], Tensor) else obj[0])
            y = torch.as_tensor(np.asarray(obj[1]) if not isinstance(obj[1], Tensor) else obj[1])
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(
                f"data function {spec!r} returned a pair that is not (x, y) arrays: {_one_line(e)}"
            ) from None
        if x.dim() < 1 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"data function {spec!r}: x must be (N, ...) and y (N,), got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        obj = torch.utils.data.TensorDataset(x.float() if not x.is_floating_point() else x, y)
    dataset: torch.utils.data.Dataset | None = None
    n: int | None = None
    if isinstance(obj, DataLoader):
        loader: Any = obj
        dataset = obj.dataset
    elif isinstance(obj, IterableDataset):
        loader = DataLoader(obj, batch_size=batch_size)
        dataset = obj
    elif isinstance(obj, torch.utils.data.Dataset):
        if not hasattr(obj, "__len__"):
            raise DataError(f"data function {spec!r} returned a Dataset without __len__")
        loader = DataLoader(obj, batch_size=batch_size, shuffle=False)
        dataset = obj
    else:
        raise DataError(
            f"data function {spec!r} returned a {type(obj).__name__}; expected a torch Dataset, a DataLoader "
            "or a pair (x, y)"
        )
    if dataset is not None and not isinstance(dataset, IterableDataset):
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            n = None
    describe["num_samples"] = n
    return DataSource(spec, "python", CheckedBatches(loader, spec), n, None, dataset, describe)
