"""Imagenette from an ImageFolder directory (issue 9): layout, classes, pixels, errors, training."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qmargin.data import load_dataset, locate_dataset
from qmargin.data.imagenette import IMAGENETTE_WNIDS
from qmargin.data.registry import MissingDataError
from qmargin.errors import DataError
from qmargin.training import TrainConfig, train


def _folder(root, per_class=(2, 1), wnids=IMAGENETTE_WNIDS, release="imagenette2-160"):
    base = root / release if release else root
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for label, wnid in enumerate(wnids):
            d = base / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                # a 100 x 80 image whose colour encodes the class: the model can learn it
                a = np.full((80, 100, 3), 20 * label, dtype=np.uint8)
                a += rng.integers(0, 10, size=a.shape, dtype=np.uint8)
                Image.fromarray(a).save(d / f"{wnid}_{i}.JPEG", format="JPEG", quality=95)
    return root


def test_loads_the_release_layout_resized_and_cropped(tmp_path):
    root = _folder(tmp_path)
    ds = load_dataset("imagenette", data_dir=root, normalize=False)
    assert tuple(ds.x_train.shape) == (20, 3, 64, 64) and tuple(ds.x_test.shape) == (10, 3, 64, 64)
    assert ds.y_train.tolist() == [k for k in range(10) for _ in range(2)]
    # class k's pixels are about 20 k / 255 (JPEG and the noise move them by a few levels)
    means = ds.x_train.mean(dim=(1, 2, 3)).numpy() * 255
    assert np.allclose(means, [20 * k + 4.5 for k in range(10) for _ in range(2)], atol=3)
    found = locate_dataset("imagenette", root)
    assert found["found"] and found["rule"] == "--data-dir"


def test_train_and_val_directly_in_the_data_dir(tmp_path):
    ds = load_dataset("imagenette", data_dir=_folder(tmp_path, release=None))
    assert ds.x_test.shape[0] == 10


def test_missing_partial_and_wrong_classes_are_one_line_errors(tmp_path):
    with pytest.raises(MissingDataError) as info:
        load_dataset("imagenette", data_dir=tmp_path / "nothing")
    assert "imagenette2-160" in str(info.value) and "\n" not in str(info.value)
    root = _folder(tmp_path / "a")
    import shutil

    shutil.rmtree(root / "imagenette2-160" / "val")
    with pytest.raises(MissingDataError) as info:
        load_dataset("imagenette", data_dir=root)
    assert info.value.partial and "val" in str(info.value)
    other = _folder(tmp_path / "b", wnids=tuple(f"c{i}" for i in range(10)))
    with pytest.raises(DataError, match="Imagenette ids"):
        load_dataset("imagenette", data_dir=other)


def test_a_resnet18_trains_on_it(tmp_path):
    root = _folder(tmp_path, per_class=(3, 1))
    cfg = TrainConfig(dataset="imagenette", model="resnet18", bits=4, epochs=1, batch_size=10, seed=0,
                      data_dir=str(root))  # fmt: skip
    res = train(cfg, out_dir=tmp_path / "run")
    assert res.history[-1]["steps"] == 3 and 0.0 <= res.test_acc <= 1.0
