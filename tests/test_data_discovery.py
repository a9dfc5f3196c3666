"""Where datasets are found (issue 9): ``--data-dir``, then ``$QMARGIN_DATA`` or the cache, then the
system locations (Debian's ``dataset-fashion-mnist``), read in place; ``qmargin datasets`` says where."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest

import qmargin.data.registry as registry
from qmargin.data import data_dir_candidates, load_dataset, locate_dataset
from qmargin.data.registry import SystemLocation
from qmargin.errors import DataError
from test_data import fake_mnist_arrays, write_fake_idx_set


@pytest.fixture()
def system_dir(tmp_path, monkeypatch):
    """A fake system location for fashion-mnist (four IDX files, gzip, flat as Debian installs them)."""
    root = tmp_path / "usr-share-datasets" / "fashion-mnist"
    write_fake_idx_set(root, fake_mnist_arrays(seed=3), gz=True)
    loc = SystemLocation(str(root), "test package", "apt-get install test-package")
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", {"fashion-mnist": (loc,)})
    monkeypatch.setenv("QMARGIN_DATA", str(tmp_path / "empty-cache"))
    return root


def test_candidates_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("QMARGIN_DATA", raising=False)
    loc = SystemLocation("/sys/x", "pkg", "apt-get install pkg")
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", {"fashion-mnist": (loc,)})
    got = data_dir_candidates("fashion-mnist", tmp_path)
    assert [rule for rule, _ in got] == ["--data-dir", "cache", "system: pkg"]
    assert got[0][1] == tmp_path and got[2][1] == Path("/sys/x")
    monkeypatch.setenv("QMARGIN_DATA", str(tmp_path))
    rules = [rule for rule, _ in data_dir_candidates("fashion-mnist", tmp_path)]
    assert rules == ["--data-dir", "system: pkg"]  # $QMARGIN_DATA is the same directory: once
    assert [rule for rule, _ in data_dir_candidates("mnist")] == ["$QMARGIN_DATA"]


def test_found_in_the_system_location_and_read_in_place(system_dir, tmp_path):
    before = sorted(p.name for p in system_dir.iterdir())
    data = load_dataset("fashion-mnist", data_dir=tmp_path / "nothing-here")
    assert data.num_train == len(fake_mnist_arrays(seed=3)["train_labels"])
    assert sorted(p.name for p in system_dir.iterdir()) == before  # nothing copied or written there
    assert not (tmp_path / "empty-cache").exists()
    loc = locate_dataset("fashion-mnist", tmp_path / "nothing-here")
    assert loc["found"] and loc["path"] == str(system_dir) and loc["rule"] == "system: test package"


def test_the_users_directory_wins_and_a_partial_set_is_an_error(system_dir, tmp_path):
    mine = tmp_path / "mine"
    paths = write_fake_idx_set(mine / "FashionMNIST" / "raw", fake_mnist_arrays(seed=9), gz=False)
    ours = load_dataset("fashion-mnist", data_dir=mine)
    theirs = load_dataset("fashion-mnist", data_dir=tmp_path / "nothing-here")
    assert not (ours.x_train.shape == theirs.x_train.shape and bool((ours.x_train == theirs.x_train).all()))
    assert locate_dataset("fashion-mnist", mine)["rule"] == "--data-dir"
    paths["test_labels"].unlink()  # some files there: the user's set is broken, no silent fallback
    with pytest.raises(DataError, match="missing in .*t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", data_dir=mine)
    loc = locate_dataset("fashion-mnist", mine)
    assert not loc["found"] and "t10k-labels" in loc["error"]


def test_nowhere_names_every_place_and_the_package(tmp_path, monkeypatch):
    loc = SystemLocation(str(tmp_path / "absent"), "test package", "apt-get install test-package")
    monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", {"fashion-mnist": (loc,)})
    monkeypatch.setenv("QMARGIN_DATA", str(tmp_path / "cache"))
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion-mnist", data_dir=tmp_path / "d")
    msg = str(excinfo.value)
    assert "\n" not in msg and "--download" in msg and "apt-get install test-package" in msg
    for place in ("d (--data-dir)", "cache ($QMARGIN_DATA)", "absent (system: test package)"):
        assert place in msg, msg


def test_datasets_command_says_where(system_dir, tmp_path, capsys):
    from qmargin.cli import main

    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "fashion-mnist" in line and "│" in line)
    assert "system: test" in out and str(system_dir)[:20] in out.replace("\n", "")
    assert "inside its Python package" in out and "mnist5k" in out
    assert "cifar10: " in out and "--download" in out  # absent: how to get it
    assert row


# -- the real files (CI installs Debian's dataset-fashion-mnist) --------------------------------

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
SHA256 = {  # of the decompressed contents of Debian's dataset-fashion-mnist (measured 2026-12-04)
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
}


@pytest.mark.system_data
@pytest.mark.skipif(
    not DEBIAN.is_dir() and not os.environ.get("QMARGIN_CI"),
    reason="Debian's dataset-fashion-mnist is not installed (CI installs it and sets QMARGIN_CI)",
)
def test_real_fashion_mnist_from_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("QMARGIN_DATA", str(tmp_path / "empty"))
    for name, digest in SHA256.items():
        assert hashlib.sha256(gzip.decompress((DEBIAN / name).read_bytes())).hexdigest() == digest, name
    data = load_dataset("fashion-mnist")  # not told where
    assert (data.num_train, data.num_test) == (60000, 10000)
    assert data.y_train.bincount().tolist() == [6000] * 10 and data.y_test.bincount().tolist() == [1000] * 10
    raw = load_dataset("fashion-mnist", normalize=False)
    assert abs(float(raw.x_train.mean()) - 0.2860) < 1e-3  # the documented normalisation mean
    assert locate_dataset("fashion-mnist")["rule"] == "system: Debian package dataset-fashion-mnist"
