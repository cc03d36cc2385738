"""The on-disk cache of frozen image-encoder embeddings, for bundles that train only the text tower.

Memory stays bounded whatever the dataset's size: embeddings are appended to one file and read back
through a memory map, keyed by bundle and image content so a changed file is embedded again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from fedclip.device_agent.predictor import Predictor
from fedclip.device_agent.progress import progress_bar
from fedclip.sdk.data import Dataset, Sample
from fedclip.sdk.errors import DataError
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.hashing import sha256_file
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.preprocess import load_image


def default_cache_dir() -> Path:
    env = os.environ.get("FEDCLIP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fedclip" / "embeddings"


class EmbeddingCache:
    """Image embeddings of the frozen image encoder, on disk, keyed by bundle and file content.

    Layout: `<root>/<bundle_id>/embeds.f32` (rows of D float32, append-only) and `index.json`
    (content sha256 -> row; -1 for an unreadable image; plus (size, mtime) -> sha256 per path, so an
    unchanged file is not re-hashed). A changed file has a new hash and is embedded again; another
    bundle has its own folder. Rows are read through a memory map.
    """

    def __init__(self, root: str | Path, predictor: Predictor) -> None:
        self.manifest: Manifest = predictor.manifest
        self.predictor = predictor
        self.dir = Path(root) / self.manifest.bundle_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._data = self.dir / "embeds.f32"
        self._index_path = self.dir / "index.json"
        # Under the lock: loading may discard a stale data file, which must not race a writer.
        with self._locked():
            self._load_index()

    def _load_index(self) -> None:
        try:
            index = json.loads(self._index_path.read_text())
            dim, rows, stats = int(index["dim"]), dict(index["rows"]), dict(index["stats"])
        except (OSError, ValueError, KeyError, TypeError):
            dim, rows, stats = 0, {}, {}
        n = max(rows.values(), default=-1) + 1
        size = self._data.stat().st_size if self._data.exists() else 0
        if dim and size < n * dim * 4:  # data lost behind the index: start over
            dim, rows, stats = 0, {}, {}
        if not rows:
            self._data.unlink(missing_ok=True)
        self.dim, self.rows, self.stats = dim, rows, stats

    def _save_index(self) -> None:
        body = json.dumps({"dim": self.dim, "rows": self.rows, "stats": self.stats})
        atomic_write(self._index_path, body.encode())

    def _content_hash(self, sample: Sample) -> str | None:
        try:
            st = sample.path.stat()
        except OSError:
            return None
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        known = self.stats.get(str(sample.path))
        if known and known[0] == stamp:
            return known[1]
        digest = sha256_file(sample.path)
        self.stats[str(sample.path)] = [stamp, digest]
        return digest

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time: agents or CLI runs may share a cache folder."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            yield
            return
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def rows_for(self, dataset: Dataset, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Row of each sample in the cache (-1: unreadable), embedding what is missing first."""
        with self._locked():
            self._load_index()  # another process may have added rows since
            hashes = [self._content_hash(s) for s in dataset.samples]
            # One image per content: duplicates are embedded once.
            first: dict[str, int] = {}
            for i, h in enumerate(hashes):
                if h is not None and h not in self.rows:
                    first.setdefault(h, i)
            todo = sorted(first.values())
            if todo:
                self._embed(dataset, todo, hashes, batch_size, progress)
            self._save_index()
        out = np.full(len(hashes), -1, dtype=np.int64)
        for i, h in enumerate(hashes):
            row = self.rows.get(h, -1) if h is not None else -1
            out[i] = row
            if row < 0:
                dataset.skipped.add(dataset.samples[i].key)
        return out

    def _embed(
        self, dataset: Dataset, todo: list[int], hashes: list[str | None], batch_size: int, progress: bool
    ) -> None:
        transform = self.predictor.transform
        # Rows a crash wrote after the last saved index are dropped, so row numbers match offsets.
        n_rows = max(self.rows.values(), default=-1) + 1
        if self._data.exists():
            os.truncate(self._data, n_rows * self.dim * 4)
        with (
            open(self._data, "ab") as f,
            progress_bar(progress, "caching image embeddings", len(todo)) as advance,
        ):
            for k, start in enumerate(range(0, len(todo), batch_size)):
                chunk = todo[start : start + batch_size]
                pixels, keys = [], []
                for i in chunk:
                    try:
                        pixels.append(transform(load_image(dataset.samples[i].path)))
                        keys.append(hashes[i])
                    except DataError:
                        self.rows[hashes[i]] = -1
                if pixels:
                    emb = np.ascontiguousarray(
                        self.predictor.embed_images(np.stack(pixels)), dtype=np.float32
                    )
                    self.dim = self.dim or emb.shape[1]
                    f.write(emb.tobytes())
                    for key in keys:
                        self.rows[key] = n_rows
                        n_rows += 1
                advance(len(chunk))
                if k % 32 == 31:  # a long first pass survives an interruption
                    self._sync(f)
            self._sync(f)

    def _sync(self, f: IO[bytes]) -> None:
        f.flush()
        os.fsync(f.fileno())
        self._save_index()

    def read(self, rows: np.ndarray) -> np.ndarray:
        n = max(self.rows.values(), default=-1) + 1
        if n == 0:
            return np.zeros((len(rows), self.dim), dtype=np.float32)
        data = np.memmap(self._data, dtype=np.float32, mode="r", shape=(n, self.dim))
        return np.array(data[np.asarray(rows)], dtype=np.float32)
