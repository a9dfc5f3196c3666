"""Imagenette (fast.ai's 10-class ImageNet subset) from its ImageFolder directory, read with Pillow.

Layout: ``<data_dir>/imagenette2-160/{train,val}/<wnid>/*.JPEG`` (the 160-pixel release; also
``imagenette2-320``, ``imagenette2``, or ``train/`` and ``val/`` directly in ``<data_dir>``). The ten
class directories must be the Imagenette WordNet ids (:data:`IMAGENETTE_WNIDS`, label = sorted order).
Every image goes through :func:`qmargin.data.folder.load_image` with ``resize = 72`` (shorter side),
``crop = 64`` (centre): 3x64x64 pixels in ``[0, 1]``, normalised later with ImageNet's mean and std.
64 pixels keep a ResNet-18 trainable on CPUs; the whole set (13,394 images) then takes 0.66 GB as
float32. The official split is used: ``train`` (9,469) for training, ``val`` (3,925) as the test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qmargin.data.folder import ImageOptions, load_image, scan_image_folder
from qmargin.data.registry import DatasetInfo, MissingDataError, RawSplits
from qmargin.errors import DataError

__all__ = ["IMAGENETTE_INFO", "IMAGENETTE_WNIDS", "IMAGENETTE_OPTIONS", "load_imagenette_raw"]

IMAGENETTE_WNIDS = (
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888605",
)
IMAGENETTE_OPTIONS = ImageOptions(resize=72, crop=64)
_RELEASES = ("imagenette2-160", "imagenette2-320", "imagenette2")

IMAGENETTE_INFO = DatasetInfo(
    name="imagenette",
    input_shape=(3, 64, 64),
    num_classes=10,
    classes=(
        "tench",
        "English springer",
        "cassette player",
        "chain saw",
        "church",
        "French horn",
        "garbage truck",
        "gas pump",
        "golf ball",
        "parachute",
    ),  # fmt: skip
    normalization=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    source="Imagenette (fast.ai, imagenette2-160.tgz), JPEGs read with Pillow",
    description="10 ImageNet classes, resized (shorter side 72) and centre-cropped to 64x64",
    split="official: train (9,469) / val (3,925) as the test set",
    num_train=9469,
    num_test=3925,
    layout="imagenette2-160/{train,val}/<wnid>/*.JPEG (or train/ and val/ in the data directory)",
)


def _root(data_dir: Path) -> Path:
    for sub in _RELEASES:
        if (data_dir / sub).is_dir():
            return data_dir / sub
    return data_dir


def _split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    classes, samples = scan_image_folder(root / split)
    if tuple(classes) != IMAGENETTE_WNIDS:
        raise DataError(
            f"imagenette: {root / split} has class directories {classes[:3]}...; expected the ten "
            f"Imagenette ids {IMAGENETTE_WNIDS[0]}..{IMAGENETTE_WNIDS[-1]}"
        )
    c, h, w = IMAGENETTE_INFO.input_shape
    x = np.empty((len(samples), c, h, w), dtype=np.float32)
    for i, (path, _) in enumerate(samples):
        x[i] = load_image(path, IMAGENETTE_OPTIONS).numpy()
    return x, np.asarray([label for _, label in samples], dtype=np.int64)


def load_imagenette_raw(data_dir: Path) -> RawSplits:
    """``imagenette`` from ``data_dir`` (module docstring); both splits decoded into memory."""
    root = _root(data_dir)
    present = [s for s in ("train", "val") if (root / s).is_dir()]
    if len(present) < 2:
        shown = root / _RELEASES[0] if root == data_dir and not present else root
        missing = [f"{shown / s}/" for s in ("train", "val") if s not in present]
        raise MissingDataError(
            f"imagenette: missing {', '.join(missing)}; unpack imagenette2-160.tgz (fast.ai) into "
            f"{data_dir} (layout: {IMAGENETTE_INFO.layout})",
            partial=bool(present),
        )
    return RawSplits(*_split(root, "train"), *_split(root, "val"))
