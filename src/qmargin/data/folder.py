"""Images in the ImageFolder layout, read one by one with Pillow (no torchvision).

Layout: ``root/<class>/<any/depth>/<image>``; the classes are the sub-directories of ``root`` in
sorted order (label ``k`` = the ``k``-th name), the images of a class are found recursively and
sorted by path; files whose suffix is not an image suffix (:data:`IMAGE_SUFFIXES`) are skipped.

Every image goes through the same steps (:class:`ImageOptions`), in this order:

1. decode with Pillow and convert to ``RGB`` (or ``L`` with ``grayscale``);
2. ``resize = s``: scale so that the shorter side is ``s`` (bilinear); the longer side becomes
   ``int(s * long / short)``;
3. ``crop = c``: the central ``c x c`` window, top-left corner ``(round((H - c) / 2), round((W - c) / 2))``;
4. pixels to ``float32`` in ``[0, 1]`` (``p / 255``), ``C x H x W``;
5. ``mean``/``std``: ``x[c] = (x[c] - mean[c]) / std[c]`` (one value for every channel, or one per
   channel).

Steps 2, 3 and 5 follow torchvision's ``Resize(int)``, ``CenterCrop`` and ``Normalize``. Nothing is
held in memory beyond the images of the batch being read; a file that is not a readable image raises a
one-line :class:`qmargin.errors.DataError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qmargin.errors import DataError

__all__ = ["ImageOptions", "ImageFolder", "IMAGE_SUFFIXES", "scan_image_folder", "load_image"]

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File suffixes read as images (case-insensitive); other files in a class directory are skipped."""


@dataclass(frozen=True)
class ImageOptions:
    """How each image of a folder is turned into a tensor (module docstring, steps 1-5)."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grayscale: bool = False

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise DataError(f"image {name} must be a positive number of pixels, got {v!r}")
        if (self.mean is None) != (self.std is None):
            raise DataError("give the image mean and std together (one value, or one per channel)")
        if self.mean is not None and self.std is not None:
            channels = 1 if self.grayscale else 3
            for name, values in (("mean", self.mean), ("std", self.std)):
                if len(values) not in (1, channels) or not all(math.isfinite(v) for v in values):
                    raise DataError(
                        f"image {name} needs 1 or {channels} finite values for "
                        f"{'grayscale' if self.grayscale else 'RGB'} images, got {list(values)}"
                    )
            if any(s <= 0 for s in self.std):
                raise DataError(f"image std must be positive, got {list(self.std)}")

    @property
    def is_default(self) -> bool:
        return self == ImageOptions()

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "mode": "L" if self.grayscale else "RGB",
        }


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(classes, [(image path, label), ...])`` of an ImageFolder directory (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class sub-directories (layout: {root}/<class>/<image>)")
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        samples.extend((p, label) for p in files)
    if not samples:
        raise DataError(f"image folder {root} has no images ({', '.join(IMAGE_SUFFIXES)}) in {classes}")
    return classes, samples


def load_image(path: str | Path, options: ImageOptions) -> Tensor:
    """One image as a ``float32`` ``C x H x W`` tensor (module docstring, steps 1-5)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            img = im.convert("L" if options.grayscale else "RGB")
    except Exception as e:  # UnidentifiedImageError, truncated data, decompression bombs, ...
        reason = next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {reason[:120]})") from None
    if options.resize is not None:
        w, h = img.size
        s = options.resize
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BILINEAR)
    if options.crop is not None:
        w, h = img.size
        c = options.crop
        if c > w or c > h:
            raise DataError(f"{path}: image is {w}x{h} pixels (after resize), smaller than the crop {c}x{c}")
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        img = img.crop((left, top, left + c, top + c))
    a = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    if options.mean is not None and options.std is not None:
        mean = np.asarray(options.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(options.std, dtype=np.float32).reshape(-1, 1, 1)
        a = (a - mean) / std
    return torch.from_numpy(np.ascontiguousarray(a))


class ImageFolder(torch.utils.data.Dataset):
    """Map-style dataset over an ImageFolder directory: ``ds[i] -> (image, label)``.

    ``ds[[i, j, ...]]`` returns one stacked batch ``(images [B, C, H, W], labels [B])``; images of
    different sizes in one batch raise a :class:`DataError` naming two of them (use ``resize`` /
    ``crop``).
    """

    def __init__(self, root: str | Path, options: ImageOptions | None = None) -> None:
        self.root = Path(root)
        self.options = options or ImageOptions()
        self.classes, self.samples = scan_image_folder(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | Sequence[int]) -> tuple[Tensor, Tensor]:
        if isinstance(index, int):
            path, label = self.samples[index]
            return load_image(path, self.options), torch.tensor(label, dtype=torch.long)
        picked = [self.samples[i] for i in index]
        images = [load_image(p, self.options) for p, _ in picked]
        first = images[0].shape
        for (p, _), img in zip(picked, images, strict=True):
            if img.shape != first:
                raise DataError(
                    f"images differ in size: {picked[0][0]} is {tuple(first)}, {p} is {tuple(img.shape)} "
                    "(C x H x W); give a resize and a crop"
                )
        return torch.stack(images), torch.tensor([lbl for _, lbl in picked], dtype=torch.long)
