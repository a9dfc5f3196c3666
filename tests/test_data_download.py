"""qmargin.data downloads against a local HTTP server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import (
    IDX_NAMES,
    cifar_bytes,
    fake_cifar_arrays,
    fake_mnist_arrays,
    regular,
    symlink,
    tar_gz,
    write_fake_idx_set,
)
from qmargin.data import (
    DOWNLOADS,
    DatasetInfo,
    RawSplits,
    RemoteSource,
    download_dataset,
    load_dataset,
    read_idx_images,
    read_idx_labels,
    register_dataset,
    unregister_dataset,
)
from qmargin.data.download import ChecksumError, extract_members, fetch_file
from qmargin.errors import DataError


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.delenv("QMARGIN_DATA_URL", raising=False)


class _Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    (root / "files").mkdir(parents=True)
    srv = _Server(root)
    yield srv
    srv.close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _serve_fake_mnist(server: _Server, seed: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays = fake_mnist_arrays(seed=seed)
    paths = write_fake_idx_set(server.root / "files", arrays, gz=True)
    return arrays, {p.name: _md5(p) for p in paths.values()}


def _closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- IDX datasets


@pytest.mark.parametrize("via_env", [False, True])
def test_download_mnist_checksum_pass(server, tmp_path, monkeypatch, via_env):
    arrays, md5s = _serve_fake_mnist(server, seed=1)
    monkeypatch.setitem(DOWNLOADS, "mnist", dataclasses.replace(DOWNLOADS["mnist"], files=md5s))
    data_dir = tmp_path / "data"
    if via_env:
        monkeypatch.setenv("QMARGIN_DATA_URL", server.url)
    base_url = None if via_env else server.url
    ds = load_dataset("mnist", data_dir=data_dir, download=True, base_url=base_url, normalize=False)
    assert _leftovers(data_dir) == sorted(f"{n}.gz" for n in IDX_NAMES.values())
    assert all((data_dir / "MNIST" / "raw" / name).is_file() for name in md5s)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["test_labels"])
    np.testing.assert_allclose(ds.x_train.numpy()[:, 0] * 255, arrays["train_images"], atol=1e-4)
    assert sorted(server.requests) == sorted(f"/files/{name}" for name in md5s)

    # files present: a second download=True fetches nothing
    again = load_dataset("mnist", data_dir=data_dir, download=True, base_url=base_url, normalize=False)
    assert len(server.requests) == 4 and torch.equal(again.x_test, ds.x_test)


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path, monkeypatch):
    _, md5s = _serve_fake_mnist(server, seed=2)
    bad = dict(md5s)
    bad["t10k-images-idx3-ubyte.gz"] = "0" * 32
    monkeypatch.setitem(
        DOWNLOADS, "fashion-mnist", dataclasses.replace(DOWNLOADS["fashion-mnist"], files=bad)
    )
    data_dir = tmp_path / "data"
    with pytest.raises(ChecksumError) as excinfo:
        load_dataset("fashion-mnist", data_dir=data_dir, download=True, base_url=server.url)
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, DataError) and "\n" not in msg
    assert "checksum mismatch" in msg and "t10k-images-idx3-ubyte.gz" in msg and "0" * 32 in msg
    assert md5s["t10k-images-idx3-ubyte.gz"] in msg
    assert "t10k-images-idx3-ubyte.gz" not in _leftovers(data_dir)
    assert not any(name.endswith(".part") for name in _leftovers(data_dir))


def test_fetch_file_mismatch_deletes_temp_file(server, tmp_path):
    (server.root / "files" / "blob.bin").write_bytes(b"abc" * 1000)
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(ChecksumError):
        fetch_file(server.url + "blob.bin", dest, "f" * 32)
    assert _leftovers(tmp_path / "out") == []
    good = hashlib.md5(b"abc" * 1000).hexdigest()
    calls: list[tuple[str, int, int | None]] = []
    assert (
        fetch_file(server.url + "blob.bin", dest, good.upper(), progress=lambda *c: calls.append(c)) == dest
    )
    assert calls[-1] == ("blob.bin", 3000, 3000)
    assert dest.read_bytes() == b"abc" * 1000 and _leftovers(tmp_path / "out") == ["blob.bin"]


def test_unreachable_server_is_a_data_error(tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", data_dir=data_dir, download=True, base_url=_closed_port_url(), normalize=False)
    msg = str(excinfo.value)
    assert "\n" not in msg and "could not download" in msg and "offline?" in msg
    assert str(data_dir) in msg and "MNIST/raw" in msg
    assert _leftovers(data_dir) == []


def test_http_404_is_a_data_error(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download_dataset("mnist", tmp_path / "data", base_url=server.url)


def test_timeout_is_a_data_error(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the connection in the kernel, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        with pytest.raises(DataError, match="timed out"):
            download_dataset("mnist", tmp_path / "data", base_url=url, timeout=0.3)


def test_packaged_dataset_needs_no_download(tmp_path):
    with pytest.raises(DataError, match="not downloadable"):
        download_dataset("digits", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        download_dataset("nope", tmp_path)
    assert load_dataset("digits", download=True, data_dir=tmp_path).num_test > 0


# --------------------------------------------------------------------------- a fake registered dataset


@pytest.fixture
def fake_dataset(monkeypatch):
    """A registered 1x5x5 dataset with its own download table entry (added and removed by the test)."""
    name = "fake-idx"

    def loader(data_dir: Path) -> RawSplits:
        folder = data_dir / "FAKE"
        parts = []
        for split in ("train", "t10k"):
            images = read_idx_images(folder / f"{split}-images-idx3-ubyte.gz", rows=5, cols=5)
            labels = read_idx_labels(folder / f"{split}-labels-idx1-ubyte.gz", num_classes=10)
            parts += [images[:, None].astype(np.float32) / 255, labels.astype(np.int64)]
        return RawSplits(*parts)

    info = DatasetInfo(name, (1, 5, 5), 10, ((0.5,), (0.25,)), source="test", layout="FAKE/*.gz")
    register_dataset(info, loader)
    yield name
    unregister_dataset(name)


def test_fake_registered_dataset_downloads_and_loads(server, tmp_path, monkeypatch, fake_dataset):
    arrays = fake_mnist_arrays(seed=3, size=5)
    paths = write_fake_idx_set(server.root / "files", arrays, gz=True)
    source = RemoteSource(
        mirrors=(server.url,), files={p.name: _md5(p) for p in paths.values()}, subdir="FAKE"
    )
    monkeypatch.setitem(DOWNLOADS, fake_dataset, source)
    written = download_dataset(fake_dataset, tmp_path / "data")
    assert sorted(p.name for p in written) == sorted(source.files)
    ds = load_dataset(fake_dataset, data_dir=tmp_path / "data")
    np.testing.assert_allclose(ds.x_test.numpy()[:, 0], (arrays["test_images"] / 255 - 0.5) / 0.25, rtol=1e-5)


def test_mirrors_are_tried_in_order(server, tmp_path, monkeypatch, fake_dataset):
    arrays = fake_mnist_arrays(seed=4, size=5)
    paths = write_fake_idx_set(server.root / "files", arrays, gz=True)
    source = RemoteSource(
        mirrors=(_closed_port_url(), server.url),
        files={p.name: _md5(p) for p in paths.values()},
        subdir="FAKE",
    )
    monkeypatch.setitem(DOWNLOADS, fake_dataset, source)
    assert len(download_dataset(fake_dataset, tmp_path / "data")) == 4


def test_remote_source_rejects_unsafe_paths():
    with pytest.raises(ValueError, match="unsafe"):
        RemoteSource(mirrors=("http://x/",), files={"../a.gz": "0" * 32})
    with pytest.raises(ValueError, match="unsafe"):
        RemoteSource(mirrors=("http://x/",), files={"a.tgz": "0" * 32}, extract={"a": "/etc/a"})


# --------------------------------------------------------------------------- CIFAR-10 archive


def _cifar_archive(evil: bool) -> tuple[bytes, dict]:
    arrays = fake_cifar_arrays(seed=5)
    members = []
    if evil:
        members += [
            (regular("../escape.bin"), b"x"),
            (regular("/tmp/qmargin-abs-escape.bin"), b"x"),
            (symlink("cifar-10-batches-bin/batches.meta.txt", "/etc/passwd"), None),
        ]
    for name, (images, labels) in arrays.items():
        members.append((regular(f"cifar-10-batches-bin/{name}"), cifar_bytes(images, labels)))
    members.append((regular("cifar-10-batches-bin/batches.meta.txt"), b"airplane\n"))
    members.append((regular("cifar-10-batches-bin/readme.html"), b"<html/>"))
    return tar_gz(members), arrays


@pytest.mark.parametrize("evil", [False, True])
def test_download_cifar10_archive(server, tmp_path, monkeypatch, evil):
    blob, arrays = _cifar_archive(evil)
    (server.root / "files" / "cifar-10-binary.tar.gz").write_bytes(blob)
    md5 = hashlib.md5(blob).hexdigest()
    monkeypatch.setitem(
        DOWNLOADS, "cifar10", dataclasses.replace(DOWNLOADS["cifar10"], files={"cifar-10-binary.tar.gz": md5})
    )
    data_dir = tmp_path / "sub" / "data"
    ds = load_dataset("cifar10", data_dir=data_dir, download=True, base_url=server.url, normalize=False)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["test_batch.bin"][1])
    np.testing.assert_allclose(ds.x_test.numpy() * 255, arrays["test_batch.bin"][0], atol=1e-4)
    folder = data_dir / "cifar-10-batches-bin"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*arrays, "batches.meta.txt"])
    assert not (folder / "batches.meta.txt").is_symlink()
    assert (folder / "batches.meta.txt").read_bytes() == b"airplane\n"
    assert not (data_dir / "escape.bin").exists() and not (tmp_path / "sub" / "escape.bin").exists()
    assert not Path("/tmp/qmargin-abs-escape.bin").exists()
    # extracted files present: nothing is fetched again
    n = len(server.requests)
    download_dataset("cifar10", data_dir, base_url=server.url)
    assert len(server.requests) == n == 1


def test_cifar_archive_reused_when_checksum_matches(server, tmp_path, monkeypatch):
    blob, _ = _cifar_archive(evil=False)
    md5 = hashlib.md5(blob).hexdigest()
    monkeypatch.setitem(
        DOWNLOADS, "cifar10", dataclasses.replace(DOWNLOADS["cifar10"], files={"cifar-10-binary.tar.gz": md5})
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cifar-10-binary.tar.gz").write_bytes(blob)
    written = download_dataset("cifar10", data_dir, base_url=_closed_port_url())
    assert len(written) == 7 and server.requests == []


def test_archive_with_required_member_only_as_symlink_is_rejected(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(
        tar_gz([(symlink("d/test_batch.bin", "/etc/passwd"), None), (regular("d/data_batch_1.bin"), b"123")])
    )
    with pytest.raises(DataError) as excinfo:
        extract_members(
            archive, {"d/test_batch.bin": "out/test.bin", "d/data_batch_1.bin": "out/1.bin"}, tmp_path
        )
    assert str(archive) in str(excinfo.value) and "d/test_batch.bin" in str(excinfo.value)
    assert not (tmp_path / "out" / "test.bin").exists()


def test_truncated_archive_is_a_data_error(tmp_path):
    blob, _ = _cifar_archive(evil=False)
    archive = tmp_path / "c.tar.gz"
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        extract_members(archive, {"cifar-10-batches-bin/test_batch.bin": "x.bin"}, tmp_path / "out")
