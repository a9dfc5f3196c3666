"""Data specs (qmargin.data.specs, qmargin.data.folder): npz, ImageFolder, user functions, registry names."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from qmargin.data.specs import ImageOptions, load_object, open_data, read_npz
from qmargin.errors import ConfigError, DataError


def _batches(source):
    xs, ys = zip(*list(source.loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# -- npz ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_the_arrays_in_order(tmp_path, compressed):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 2, 3)).astype(np.float64)
    y = rng.integers(0, 5, 23).astype(np.uint8)
    path = tmp_path / "t.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=y)
    src = open_data(f"npz:{path}", batch_size=5)
    assert src.num_samples == 23 and src.kind == "npz"
    assert src.describe["memory_mapped"] is (not compressed)  # savez members are memory-mapped
    sizes = [len(yb) for _, yb in src.loader]
    assert sizes == [5, 5, 5, 5, 3]
    xb, yb = _batches(src)
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    np.testing.assert_array_equal(xb.numpy(), x.astype(np.float32))
    np.testing.assert_array_equal(yb.numpy(), y)
    assert _batches(src)[1].tolist() == y.tolist()  # re-iterable, same order


def test_npz_memory_map_reads_fortran_and_version_2_headers(tmp_path):
    x = np.asfortranarray(np.arange(24, dtype=np.int16).reshape(6, 4))
    path = tmp_path / "f.npz"
    np.savez(path, x=x, y=np.arange(6))
    mx, my = read_npz(path)
    assert isinstance(mx, np.memmap)
    np.testing.assert_array_equal(np.asarray(mx), x)


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"x": np.zeros((3, 2))}, "'y'"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, 1.0, 2.0])}, "integer class labels"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 2])}, "labels must be >= 0"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, 1])}, "3 samples but y has 2"),
        ({"x": np.zeros(3), "y": np.array([0, 1, 2])}, "at least 2 dims"),
        ({"x": np.array([["a"], ["b"]]), "y": np.array([0, 1])}, "numeric"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, dtype=int)}, "empty"),
        ({"x": np.zeros((2, 2)), "y": np.zeros((2, 1), dtype=int)}, "shape (N,)"),
    ],
    ids=["no-y", "float-y", "negative", "lengths", "1-d-x", "strings", "empty", "2-d-y"],
)
def test_npz_validation_is_one_line(tmp_path, arrays, needle):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        open_data(f"npz:{path}")
    _one_line(err, str(path), needle)


def test_npz_refuses_object_arrays_and_garbage(tmp_path):
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError) as err:
        open_data(f"npz:{obj}")
    _one_line(err, str(obj))
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataError) as err:
        open_data(f"npz:{garbage}")
    _one_line(err, str(garbage), "not a readable .npz")
    with pytest.raises(DataError) as err:
        open_data(f"npz:{tmp_path / 'missing.npz'}")
    _one_line(err, "does not exist")


def test_npz_non_finite_inputs_are_named_by_batch(tmp_path):
    x = np.zeros((6, 2), dtype=np.float32)
    x[4, 1] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=np.zeros(6, dtype=int))
    src = open_data(f"npz:{path}", batch_size=2)
    with pytest.raises(DataError) as err:
        _batches(src)
    _one_line(err, "batch 2", "NaN")


# -- ImageFolder ----------------------------------------------------------------------------------


def _png(path, h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def _direct(path, resize, crop, mean, std):
    """The documented pipeline written out: shorter side to `resize`, central crop, /255, normalise."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    size = (resize, resize * h // w) if w <= h else (resize * w // h, resize)
    im = im.resize(size, Image.Resampling.BILINEAR)
    w, h = im.size
    top, left = round((h - crop) / 2), round((w - crop) / 2)
    a = np.asarray(im, dtype=np.float64)[top : top + crop, left : left + crop] / 255.0
    a = (a - np.asarray(mean)) / np.asarray(std)
    return a.transpose(2, 0, 1)


def test_folder_reads_sorted_classes_with_resize_crop_normalise(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "dog" / "b.png", 20, 30, 1)
    _png(root / "dog" / "a.png", 31, 17, 2)
    _png(root / "cat" / "sub" / "x.png", 25, 25, 3)
    (root / "cat" / "notes.txt").write_text("not an image")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    opts = ImageOptions(resize=16, crop=12, mean=mean, std=std)
    src = open_data(f"folder:{root}", batch_size=2, image=opts)
    assert src.num_classes == 2 and src.describe["classes"] == ["cat", "dog"]
    x, y = _batches(src)
    assert y.tolist() == [0, 1, 1]
    assert x.shape == (3, 3, 12, 12) and x.dtype == torch.float32
    for i, p in enumerate([root / "cat" / "sub" / "x.png", root / "dog" / "a.png", root / "dog" / "b.png"]):
        np.testing.assert_allclose(x[i].numpy(), _direct(p, 16, 12, mean, std), rtol=0, atol=1e-5)


def test_folder_grayscale_and_no_options(tmp_path):
    root = tmp_path / "g"
    _png(root / "a" / "0.png", 8, 8, 0)
    _png(root / "b" / "0.png", 8, 8, 1, mode="L")
    x, y = _batches(open_data(f"folder:{root}", image=ImageOptions(grayscale=True)))
    assert x.shape == (2, 1, 8, 8)
    want = np.asarray(Image.open(root / "b" / "0.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(x[1, 0].numpy(), want, atol=1e-7)
    x, _ = _batches(open_data(f"folder:{root}"))
    assert x.shape == (2, 3, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_folder_errors_name_the_file(tmp_path):
    root = tmp_path / "bad"
    _png(root / "a" / "0.png", 8, 8, 0)
    (root / "b").mkdir()
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError) as err:
        _batches(open_data(f"folder:{root}"))
    _one_line(err, "broken.png", "not a readable image")

    sizes = tmp_path / "sizes"
    _png(sizes / "a" / "0.png", 8, 8, 0)
    _png(sizes / "a" / "1.png", 9, 8, 1)
    with pytest.raises(DataError) as err:
        _batches(open_data(f"folder:{sizes}"))
    _one_line(err, "0.png", "1.png", "differ in size")
    with pytest.raises(DataError) as err:
        _batches(open_data(f"folder:{sizes}", image=ImageOptions(crop=9)))
    _one_line(err, "0.png", "smaller than the crop")

    with pytest.raises(DataError) as err:
        open_data(f"folder:{tmp_path / 'nowhere'}")
    _one_line(err, "does not exist")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        open_data(f"folder:{tmp_path / 'empty'}")
    _one_line(err, "no images")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"resize": 0}, "resize"),
        ({"mean": (0.5,)}, "together"),
        ({"mean": (0.5, 0.5), "std": (1.0, 1.0)}, "1 or 3"),
        ({"mean": (0.5,), "std": (0.0,)}, "positive"),
    ],
)
def test_image_options_are_checked(kwargs, needle):
    with pytest.raises(DataError, match=needle):
        ImageOptions(**kwargs)


# -- the user's functions, registry names, unknown specs --------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


DATA_PY = """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    X = torch.arange(14, dtype=torch.float32).reshape(7, 2)
    Y = torch.tensor([0, 1, 2, 0, 1, 2, 0])

    def dataset():
        return TensorDataset(X, Y)

    def loader():
        return DataLoader(TensorDataset(X, Y), batch_size=3)

    def arrays():
        return X.numpy(), Y.numpy()

    def broken():
        raise RuntimeError("no data today")

    def wrong():
        return 42

    def float_labels():
        return DataLoader(TensorDataset(X, Y.float()), batch_size=4)
"""


@pytest.mark.parametrize("fn, batch_sizes", [("dataset", [4, 3]), ("loader", [3, 3, 1]), ("arrays", [4, 3])])
def test_python_function_specs(tmp_path, fn, batch_sizes):
    path = _write(tmp_path / "mydata.py", DATA_PY)
    src = open_data(f"{path}:{fn}", batch_size=4)
    assert src.kind == "python" and src.num_samples == 7
    assert [len(y) for _, y in src.loader] == batch_sizes
    x, y = _batches(src)
    assert x.tolist() == torch.arange(14.0).reshape(7, 2).tolist() and y.tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_dotted_module_spec_from_the_current_directory(tmp_path, monkeypatch):
    _write(tmp_path / "userpkg_specs_test" / "__init__.py", "")
    _write(tmp_path / "userpkg_specs_test" / "data.py", DATA_PY)
    monkeypatch.chdir(tmp_path)
    src = open_data("userpkg_specs_test.data:dataset", batch_size=7)
    assert [len(y) for _, y in src.loader] == [7]


@pytest.mark.parametrize(
    "fn, needle",
    [
        ("broken", "RuntimeError: no data today"),
        ("wrong", "returned a int"),
        ("float_labels", "integer class labels"),
        ("missing", "no attribute 'missing'"),
    ],
)
def test_python_function_errors(tmp_path, fn, needle):
    path = _write(tmp_path / "mydata.py", DATA_PY)
    with pytest.raises(DataError) as err:
        _batches(open_data(f"{path}:{fn}"))
    _one_line(err, needle)


def test_load_object_import_failures_are_one_line(tmp_path):
    bad = _write(tmp_path / "bad.py", "import not_a_module_anywhere\n")
    with pytest.raises(ConfigError) as err:
        load_object(f"{bad}:f", what="model factory", error=ConfigError)
    _one_line(err, "model factory", "ModuleNotFoundError", "not_a_module_anywhere")
    syntax = _write(tmp_path / "syntax.py", "def f(:\n")
    with pytest.raises(DataError) as err:
        load_object(f"{syntax}:f", what="data function")
    _one_line(err, "SyntaxError")
    exits = _write(tmp_path / "exits.py", "raise SystemExit(3)\n")
    with pytest.raises(DataError) as err:
        load_object(f"{exits}:f", what="data function")
    _one_line(err, "SystemExit")
    with pytest.raises(DataError) as err:
        load_object("no_such_package_xyz.mod:f", what="data function")
    _one_line(err, "no_such_package_xyz")
    with pytest.raises(DataError, match="pkg.module:name"):
        load_object("justaname", what="data function")


def test_registry_name_and_unknown_specs(tmp_path):
    src = open_data("digits", batch_size=100)
    assert src.num_samples == 359 and src.num_classes == 10
    assert [len(y) for _, y in src.loader] == [100, 100, 100, 59]
    for spec in ("imagenet", "npz:", "csv file.csv", "a/b:c"):
        with pytest.raises(DataError) as err:
            open_data(spec)
        _one_line(err, "unknown data spec", "npz:FILE", "folder:DIR", "pkg.module:function", "digits")
    np.savez(tmp_path / "t.npz", x=np.zeros((2, 2)), y=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="apply to folder:DIR"):
        open_data(f"npz:{tmp_path / 't.npz'}", image=ImageOptions(resize=8))
