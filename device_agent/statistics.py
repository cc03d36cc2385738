"""A device's data statistics: per-label counts, embedding means and variances (running sums, so
memory stays bounded), the digest that names the data they came from, and their wire encoding."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence

import numpy as np

from fedclip.device_agent.batches import Trainer
from fedclip.device_agent.predictor import Predictor
from fedclip.device_agent.progress import progress_bar
from fedclip.sdk.data import Batch, Dataset
from fedclip.sdk.errors import DataError
from fedclip.sdk.messages import STAT_KINDS
from fedclip.sdk.preprocess import ImageTransform
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR


def data_statistics(
    model: Predictor | Trainer,
    dataset: Dataset,
    kinds: Sequence[str] = STAT_KINDS,
    noise_std: float = 0.0,
    seed: int = 0,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Per-label counts [L] and per-label mean / diagonal variance [L, D] of image embeddings.

    `noise_std` > 0 adds Gaussian noise to every statistic before it leaves the device.
    """
    unknown = [k for k in kinds if k not in STAT_KINDS]
    if unknown:
        raise DataError(f"unknown statistic {unknown[0]!r} (choose from {', '.join(STAT_KINDS)})")
    if noise_std < 0:
        raise DataError(f"noise_std must be >= 0, got {noise_std}")
    if dataset.kind != "classify":
        raise DataError("data statistics need a labelled (classify) dataset")
    n_labels = len(dataset.labels)
    counts = np.zeros(n_labels, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    if "gaussian" in kinds:
        predictor = model if isinstance(model, Predictor) else _predictor_of(model)
        sums: np.ndarray | None = None
        sq: np.ndarray | None = None
        for b in _progress_batches(dataset, predictor.transform, batch_size, progress):
            emb = predictor.embed_images(b.images).astype(np.float64)
            if sums is None or sq is None:
                sums = np.zeros((n_labels, emb.shape[1]))
                sq = np.zeros((n_labels, emb.shape[1]))
            np.add.at(sums, b.labels, emb)
            np.add.at(sq, b.labels, emb * emb)
            np.add.at(counts, b.labels, 1.0)
        if sums is None or sq is None:
            raise DataError(f"{dataset.source}: no readable images for statistics")
        denom = np.maximum(counts, 1.0)[:, None]
        mean = sums / denom
        var = np.maximum(sq / denom - mean * mean, 0.0)
        out[STAT_MEAN], out[STAT_VAR] = mean, var
    else:
        counts = dataset.label_counts().astype(np.float64)
        for s in dataset.samples:
            if s.key in dataset.skipped:
                counts[s.label] -= 1
    if "histogram" in kinds:
        out[STAT_LABEL_HIST] = counts
    if noise_std > 0:
        rng = np.random.default_rng(seed)
        for name in list(out):
            noisy = out[name] + rng.normal(0.0, noise_std, size=out[name].shape)
            out[name] = noisy if name == STAT_MEAN else np.maximum(noisy, 0.0)
    return {name: np.ascontiguousarray(arr, dtype=np.float32) for name, arr in out.items()}


def data_digest(dataset: Dataset, kinds: Sequence[str], noise_std: float) -> str:
    """sha256 naming what `data_statistics` would be computed from, without decoding an image.

    Over the sorted (key, file size, label) of the readable samples, the statistic kinds and the
    noise level: adding, removing, relabelling or rewriting a file (or asking for other statistics)
    gives a new digest, so the coordinator knows its stored statistics are stale. A file rewritten
    with the same size is the one change it misses; hashing every file's content each round would
    cost more than the statistics it saves.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"kinds": sorted(set(kinds)), "noise_std": float(noise_std)}).encode())
    rows = []
    for s in dataset.samples:
        if s.key in dataset.skipped:
            continue
        try:
            size = s.path.stat().st_size
        except OSError:
            continue
        rows.append((s.key, size, s.label))
    for key, size, label in sorted(rows):
        h.update(f"\n{key}\t{size}\t{label}".encode())
    return h.hexdigest()


_F16_MAX = float(np.finfo(np.float16).max)


def wire_statistics(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`stats` as they travel: per-label means and variances in float16 (half the bytes), the label
    histogram in float32 (counts above 2048 are not exact in float16).

    Embedding statistics are small numbers (unit-norm embeddings: |mean| <= 1, variances around
    1/D); float16 keeps ~3 significant digits there, far below the spread the data distance measures,
    and variances below 6e-8 round to 0, which the distance treats as "no spread" anyway. A variance
    stays >= 0 through the cast (clamped in case). A tensor with values beyond float16's range (an
    unnormalized embedding) stays float32 rather than overflowing to inf.
    """
    out = dict(stats)
    for name in (STAT_MEAN, STAT_VAR):
        arr = stats.get(name)
        if arr is None or not np.all(np.abs(arr) <= _F16_MAX):
            continue
        half = np.asarray(arr).astype(np.float16)
        out[name] = np.maximum(half, np.float16(0)) if name == STAT_VAR else half
    return out


def _predictor_of(trainer: Trainer) -> Predictor:
    return Predictor(
        trainer.bundle_dir,
        adapter=trainer.get_tensors("trainable"),
        manifest=trainer.manifest,
        device=trainer.device,
        threads=trainer.threads,
    )


def _progress_batches(
    dataset: Dataset, transform: ImageTransform, batch_size: int, progress: bool
) -> Iterator[Batch]:
    with progress_bar(progress, "statistics", math.ceil(len(dataset) / batch_size)) as advance:
        for b in dataset.batches(transform, batch_size):
            yield b
            advance(1)
