"""qmargin.files: the one atomic-write helper; a failed write leaves the old file and no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmargin.files import (
    atomic_open,
    atomic_path,
    copy_file_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_and_replaces(tmp_path: Path):
    out = tmp_path / "new" / "dir" / "a.txt"
    assert write_text_atomic(out, "x\r\ny\n") == out  # parent directories created
    assert out.read_bytes() == b"x\r\ny\n"  # newlines untranslated
    write_text_atomic(out, "second")
    assert out.read_text() == "second"
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    copy_file_atomic(tmp_path / "b.bin", tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    write_json_atomic(tmp_path / "d.json", {"b": 1, "a": float("nan")})
    assert (tmp_path / "d.json").read_text() == '{\n  "a": NaN,\n  "b": 1\n}\n'
    assert _names(tmp_path) == ["b.bin", "c.bin", "d.json", "new"]
    assert _names(out.parent) == ["a.txt"]


class _WriteFailedError(Exception):
    pass


class _Unserializable:
    pass


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path: Path):
    out = tmp_path / "r.json"
    write_text_atomic(out, "old")
    # the write itself fails half-way: text that cannot be encoded, an object JSON cannot hold
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(out, "half written \udcff")
    with pytest.raises(TypeError):
        write_json_atomic(out, {"a": 1, "z": _Unserializable()})
    # a caller's own writer raising inside the block (a failed checksum, Ctrl-C)
    with pytest.raises(_WriteFailedError), atomic_open(out, "wb", suffix=".part") as f:
        f.write(b"partial")
        raise _WriteFailedError
    with pytest.raises(_WriteFailedError), atomic_path(out) as tmp:
        tmp.write_text("partial")
        raise _WriteFailedError
    assert out.read_text() == "old"
    assert _names(tmp_path) == ["r.json"]


def test_failed_replace_removes_temporary(tmp_path: Path):
    target = tmp_path / "is_a_dir"
    (target / "child").mkdir(parents=True)  # os.replace of a file onto a non-empty directory fails
    with pytest.raises(OSError):
        write_text_atomic(target, "x")
    assert _names(tmp_path) == ["is_a_dir"]
    assert _names(target) == ["child"]


def test_atomic_open_rejects_read_and_append(tmp_path: Path):
    for mode in ("r", "a", "w+"):
        with pytest.raises(ValueError), atomic_open(tmp_path / "x", mode):
            pass
    assert _names(tmp_path) == []


def test_checkpoint_json_is_the_helper():
    from qmargin.training.checkpoint import atomic_write_json

    assert atomic_write_json is write_json_atomic
