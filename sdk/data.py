"""Datasets in the layouts people have, streamed in batches so no dataset is ever held in RAM.

Layouts (`Dataset.open(path, labels=...)`):
- a folder with one sub-folder per label (`<root>/<label>/<image>`); folder names are the bundle's
  labels, with `/` written as `_` (`label_folder_name`); a folder that names no label is an error,
  a label without a folder is fine (a device rarely sees every class);
- a CSV file with a header `path,label` or `path,caption`;
- a JSONL file of `{"path": ..., "label": ...}` or `{"path": ..., "caption": ...}` lines.
Relative paths in CSV/JSONL are relative to the file's folder.

The held-out split hashes each sample's relative path, so a file stays on its side when files are
added or removed. Unreadable images are skipped and counted (`Dataset.skipped`), never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedclip.sdk.errors import DataError
from fedclip.sdk.preprocess import ImageTransform, load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def label_folder_name(label: str) -> str:
    """The folder that holds a label's images: the label with path separators replaced."""
    return label.replace("/", "_").replace("\\", "_")


@dataclass(frozen=True)
class Sample:
    path: Path
    key: str  # path relative to the dataset root (posix): the split and cache key
    label: int = -1  # index into the task labels; -1 for contrastive samples
    caption: str = ""


@dataclass
class Batch:
    images: np.ndarray  # float32 [B, 3, S, S]
    labels: np.ndarray  # int64 [B]; -1 where unlabeled
    captions: list[str]
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class Dataset:
    samples: tuple[Sample, ...]
    labels: tuple[str, ...]
    kind: str  # "classify" or "contrastive"
    source: str
    # Shared between the splits of one dataset, so a corrupt file is counted once.
    skipped: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, labels: Sequence[str] = (), kind: str = "classify") -> Dataset:
        """Open an image folder, CSV or JSONL dataset; labels must belong to `labels` (classify)."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: dataset not found")
        labels = tuple(labels)
        if kind == "classify" and not labels:
            raise DataError(f"{path}: a classify dataset needs the bundle's labels")
        if path.is_dir():
            if kind != "classify":
                raise DataError(f"{path}: a contrastive dataset must be a CSV or JSONL of path,caption")
            samples = _image_folder(path, labels)
        elif path.suffix.lower() == ".csv":
            samples = _rows(path, _csv_rows(path), labels, kind)
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            samples = _rows(path, _jsonl_rows(path), labels, kind)
        else:
            raise DataError(f"{path}: not a dataset (expected an image folder, a .csv or a .jsonl file)")
        if not samples:
            raise DataError(f"{path}: no images found")
        return cls(tuple(samples), labels, kind, str(path))

    # ---- views -----------------------------------------------------------------------------------
    def split(self, holdout: float) -> tuple[Dataset, Dataset]:
        """(train, held_out): a sample is held out iff the hash of its key falls below `holdout`.

        With few samples the hashes may put none aside (16 images at 0.2: 1 device in 36), and a
        device could not score anything; then the sample of the lowest hash is held out (while
        `holdout > 0` and two samples or more), until a new sample's hash puts one aside."""
        if not 0.0 <= holdout < 1.0:
            raise DataError(f"holdout must be in [0, 1), got {holdout}")
        hashes = [_unit_hash(s.key) for s in self.samples]
        held = {i for i, h in enumerate(hashes) if h < holdout}
        if not held and holdout > 0 and len(hashes) >= 2:
            held = {int(np.argmin(hashes))}
        train = [s for i, s in enumerate(self.samples) if i not in held]
        return self._with(train, "train"), self._with([self.samples[i] for i in sorted(held)], "held-out")

    def _with(self, samples: Sequence[Sample], part: str) -> Dataset:
        return Dataset(tuple(samples), self.labels, self.kind, f"{self.source} ({part})", self.skipped)

    def label_counts(self) -> np.ndarray:
        counts = np.zeros(len(self.labels), dtype=np.int64)
        for s in self.samples:
            if s.label >= 0:
                counts[s.label] += 1
        return counts

    # ---- streaming -------------------------------------------------------------------------------
    def order(self, shuffle: bool = False, seed: int = 0) -> np.ndarray:
        idx = np.arange(len(self.samples))
        if shuffle:
            np.random.default_rng(seed).shuffle(idx)
        return idx

    def iter_images(
        self, transform: ImageTransform, indices: Sequence[int] | np.ndarray | None = None
    ) -> Iterator:
        """Yield (sample, pixels) one at a time, skipping (and counting) unreadable images."""
        for i in range(len(self.samples)) if indices is None else indices:
            sample = self.samples[int(i)]
            try:
                pixels = transform(load_image(sample.path))
            except DataError as e:
                if sample.key not in self.skipped:
                    self.skipped.add(sample.key)
                    log.warning("skipped: %s", e)
                continue
            yield sample, pixels

    def batches(
        self,
        transform: ImageTransform,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Stream batches; memory holds one batch of pixels, whatever the dataset's size."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        buf: list[tuple[Sample, np.ndarray]] = []
        for item in self.iter_images(transform, self.order(shuffle, seed)):
            buf.append(item)
            if len(buf) == batch_size:
                yield _make_batch(buf)
                buf = []
        if buf and not drop_last:
            yield _make_batch(buf)


def _make_batch(items: list[tuple[Sample, np.ndarray]]) -> Batch:
    samples = [s for s, _ in items]
    return Batch(
        images=np.stack([p for _, p in items]),
        labels=np.array([s.label for s in samples], dtype=np.int64),
        captions=[s.caption for s in samples],
        samples=samples,
    )


def _unit_hash(key: str) -> float:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _image_folder(root: Path, labels: tuple[str, ...]) -> list[Sample]:
    by_folder = {label_folder_name(lab): i for i, lab in enumerate(labels)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: expected one sub-folder per label, found none")
    unknown = [p.name for p in folders if p.name not in by_folder]
    if unknown:
        raise DataError(
            f"{root}: folder {unknown[0]!r} is not a label of this bundle "
            f"(labels: {', '.join(sorted(by_folder))})"
        )
    samples = []
    for folder in folders:
        label = by_folder[folder.name]
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(p, p.relative_to(root).as_posix(), label=label))
    return samples


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty CSV (expected a header path,label or path,caption)")
            yield from enumerate(reader, start=2)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV ({e})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{line}: not valid JSON") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line}: expected an object with path and label or caption")
                yield line, row
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read JSONL ({e})") from None


def _rows(path: Path, rows: Iterator[tuple[int, dict]], labels: tuple[str, ...], kind: str) -> list[Sample]:
    index = {lab: i for i, lab in enumerate(labels)}
    column = "label" if kind == "classify" else "caption"
    base = path.parent
    samples = []
    for line, row in rows:
        where = f"{path}:{line}"
        rel, value = row.get("path"), row.get(column)
        if not isinstance(rel, str) or not rel.strip():
            raise DataError(f"{where}: missing 'path'")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: missing {column!r} (a {kind} dataset needs path,{column})")
        p = Path(rel)
        p = p if p.is_absolute() else base / p
        if kind == "classify":
            if value not in index:
                raise DataError(f"{where}: label {value!r} is not a label of this bundle")
            samples.append(Sample(p, rel, label=index[value]))
        else:
            samples.append(Sample(p, rel, caption=value))
    return samples
