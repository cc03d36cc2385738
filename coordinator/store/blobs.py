"""Content-addressed blobs: `<root>/<sha[:2]>/<sha>`, written crash-safe, read whole or by tensor.

Callers name blobs by their sha256 only; where a blob lives on disk stays in here. Writing the same
bytes twice is free. Blobs holding safetensors (updates, adapters) can be read tensor by tensor, so
aggregation never holds every update in RAM at once (`BlobTensors`).

`put_many` stores a batch (group commit of updates) with the same guarantees as one `put` each: every
file is written to a temp file and fsynced before it is renamed into place, and every folder holding a
new name is fsynced after the renames. Only the waiting is shared: the fsyncs are issued together from
a few threads, so the filesystem's journal commits them in a handful of flushes instead of one
flush per call in a row (docs/scale.md, "Intake": ~0.1 ms per blob instead of ~4 ms here).
`put_all` does the same for a round's task blobs and personalized adapters, batch by batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from fedclip.coordinator.store.db import StoreError
from fedclip.sdk.fsutil import atomic_write, fsync_dir
from fedclip.sdk.hashing import sha256_bytes

# Threads that only wait in fsync(2) for `put_many`: enough for the journal to see a batch's fsyncs
# together; they touch no Python state of the caller, which waits for all of them.
_FSYNC_THREADS = 16
_pool: ThreadPoolExecutor | None = None


def _each(fn: Callable[[Any], object], items: Sequence[Any]) -> None:
    """`fn(item)` for every item, spread over the fsync threads so the calls wait together; returns
    when all are done, raises the first error."""
    global _pool
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="blob-fsync")
    groups = [items[i::_FSYNC_THREADS] for i in range(min(_FSYNC_THREADS, len(items)))]
    for future in [_pool.submit(lambda g: [fn(x) for x in g], g) for g in groups]:
        future.result()


class Blobs:
    """The blob folder of one state dir."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def put(self, data: bytes) -> str:
        sha = sha256_bytes(data)
        path = self._path(sha)
        if path.is_file() and path.stat().st_size == len(data):
            return sha
        atomic_write(path, data)
        return sha

    def put_many(self, blobs: Sequence[bytes]) -> list[str]:
        """Store every blob durably (see the module docstring); their shas, in order. Returns only
        when all are on disk; on an error none of the new names exists half-written."""
        shas = [sha256_bytes(data) for data in blobs]
        new: dict[str, bytes] = {}
        for sha, data in zip(shas, blobs, strict=True):
            if sha not in new and self.size(sha) != len(data):
                new[sha] = data
        if new:
            _write_durably({self._path(sha): data for sha, data in new.items()}, self.root)
        return shas

    def put_all(self, blobs: Iterable[bytes], batch: int = 256) -> list[str]:
        """`put_many` over `blobs` in batches of `batch`, taking them lazily, so a generator of a
        round's 10,000 task or adapter blobs is never all in memory at once; their shas, in order."""
        shas: list[str] = []
        chunk: list[bytes] = []
        for data in blobs:
            chunk.append(data)
            if len(chunk) >= batch:
                shas += self.put_many(chunk)
                chunk = []
        return shas + (self.put_many(chunk) if chunk else [])

    def get(self, sha: str) -> bytes:
        try:
            return self._path(sha).read_bytes()
        except OSError as e:
            raise StoreError(f"blob {sha[:12]} is missing from {self.root} ({e.strerror or e})") from None

    def has(self, sha: str) -> bool:
        return self._path(sha).is_file()

    def size(self, sha: str) -> int | None:
        """The blob's size in bytes; None when it is missing."""
        try:
            return self._path(sha).stat().st_size
        except OSError:
            return None

    def read_tensors(self, sha: str, wanted: Iterable[str]) -> dict[str, np.ndarray]:
        """The tensors of a safetensors blob whose names are in `wanted` (the ones it has)."""
        wanted = set(wanted)
        with safe_open(str(self._path(sha)), framework="np") as f:
            return {n: f.get_tensor(n) for n in f.keys() if n in wanted}  # noqa: SIM118 (no __iter__)

    def tensors(self, sha: str, names: tuple[str, ...]) -> BlobTensors:
        """The tensors `names` of a safetensors blob, read from disk on access."""
        return BlobTensors(self._path(sha), names)


class BlobTensors(Mapping):
    """Named tensors of a stored safetensors file, read from disk on access (never all in RAM)."""

    def __init__(self, path: Path, names: tuple[str, ...]):
        self.path, self.names = path, names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="np") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def items(self):  # a list, one open per update instead of one per tensor
        with safe_open(str(self.path), framework="np") as f:
            return [(n, f.get_tensor(n)) for n in self.names]


def _write_durably(files: dict[Path, bytes], root: Path) -> None:
    """`fsutil.atomic_write` of many files at once: temp files written, all fsynced, renamed, and the
    folders (and `root`, for a folder made here) fsynced, each step for all files before the next.
    Temp files are `.<name>.<pid>.tmp`, the pattern `atomic_write`'s sweep knows."""
    dirs = {path.parent for path in files}
    made = {d for d in dirs if not d.is_dir()}
    for d in made:
        d.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    opened: list[tuple[int, str, Path]] = []
    done = False
    try:
        for path, data in files.items():
            tmp = f"{path.parent}/.{path.name}.{pid}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            opened.append((fd, tmp, path))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        _each(os.fsync, [fd for fd, _, _ in opened])
        for _, tmp, path in opened:
            os.replace(tmp, path)
        done = True
    finally:
        for fd, tmp, _ in opened:
            os.close(fd)
            if not done:  # what was not renamed yet is removed; a renamed blob is complete
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    _each(fsync_dir, sorted(dirs | ({root} if made else set())))
