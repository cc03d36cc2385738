"""Content-addressed blobs: `<root>/<sha[:2]>/<sha>`, written crash-safe, read whole or by tensor.

Callers name blobs by their sha256 only; where a blob lives on disk stays in here. Writing the same
bytes twice is free. Blobs holding safetensors (updates, adapters) can be read tensor by tensor, so
aggregation never holds every update in RAM at once (`BlobTensors`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open

from fedclip.coordinator.store.db import StoreError
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.hashing import sha256_bytes


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
