"""Crash-safe file writes: the one implementation every module uses.

A file is written to a temp file next to its target, fsynced, moved over the target with
`os.replace` and the folder fsynced, so a reader or a `kill -9` at any moment sees the old or the new
file, never half of one. Temp files are named `.<name>.*.tmp`, so a sweep can find what a crash left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable; best effort (some filesystems refuse fsync on a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Replace `path` with `data` atomically. The file is created 0600 (mkstemp), so a secret is
    never readable by others even for a moment; `mode` sets the final permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_produce(path: str | Path, produce: Callable[[Path], object]) -> Path:
    """Like `atomic_write` for a file (or folder) that a library writes itself, e.g. an ORT
    checkpoint: `produce(tmp_path)` writes it, then it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    remove(tmp)
    try:
        produce(tmp)
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync_dir(path.parent)
    return path


def remove(path: str | Path) -> None:
    """Delete a file or folder if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
