"""`fedclip.sdk.fsutil`: the one crash-safe write every module uses. Real files, no mocks."""

from __future__ import annotations

import stat

import pytest

from fedclip.sdk.fsutil import atomic_produce, atomic_write, remove


def _temp_files(folder):
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def test_atomic_write_replaces_whole_file_and_sets_mode(tmp_path):
    path = tmp_path / "deep" / "er" / "f.bin"
    assert atomic_write(path, b"old") == path  # parent folders are made
    atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # never readable by others by default
    atomic_write(path, b"public", mode=0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _temp_files(tmp_path) == []


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"

    def half_then_crash(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_produce(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert _temp_files(tmp_path) == []


def test_atomic_produce_file_and_folder(tmp_path):
    path = atomic_produce(tmp_path / "ckpt", lambda tmp: tmp.write_bytes(b"weights"))
    assert path.read_bytes() == b"weights"

    def folder(tmp):
        tmp.mkdir()
        (tmp / "a").write_bytes(b"1")

    out = atomic_produce(tmp_path / "dir-ckpt", folder)
    assert (out / "a").read_bytes() == b"1"
    remove(out)
    remove(out)  # already gone: no error
    remove(path)
    assert not out.exists() and not path.exists()
