"""Local training, evaluation and data statistics over a streamed dataset.

Memory stays bounded whatever the dataset's size: images are decoded one batch at a time, image
embeddings for text-tower-only bundles live in an on-disk cache read through a memory map, and
statistics are running sums.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fedclip.device_agent.predictor import Predictor
from fedclip.device_agent.step_backend import StepTrainer
from fedclip.device_agent.task import STAT_KINDS
from fedclip.device_agent.trainer import OrtTrainer
from fedclip.sdk.data import Dataset, Sample
from fedclip.sdk.errors import DataError
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.hashing import sha256_file
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.preprocess import ImageTransform, load_image
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR

# Either backend (see step_backend.make_trainer): both have the same public interface.
Trainer = OrtTrainer | StepTrainer


def default_cache_dir() -> Path:
    env = os.environ.get("FEDCLIP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fedclip" / "embeddings"


# ---- progress ----------------------------------------------------------------------------------
@contextmanager
def progress_bar(enabled: bool, description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1, **fields)`; a no-op when disabled (quiet runs, tests, the fleet loop)."""
    if not enabled:
        yield lambda n=1, **_: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    # stderr: stdout stays clean for `--json` output
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: Any) -> None:
            info = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, info=info)

        yield advance


# ---- embedding cache -----------------------------------------------------------------------------
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
            todo = [i for i, h in enumerate(hashes) if h is not None and h not in self.rows]
            # One image per content: duplicates are embedded once.
            seen: set[str] = set()
            todo = [i for i in todo if not (hashes[i] in seen or seen.add(hashes[i]))]
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
        self, dataset: Dataset, todo: list[int], hashes: list, batch_size: int, progress: bool
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

    def _sync(self, f) -> None:
        f.flush()
        os.fsync(f.fileno())
        self._save_index()

    def read(self, rows: np.ndarray) -> np.ndarray:
        n = max(self.rows.values(), default=-1) + 1
        if n == 0:
            return np.zeros((len(rows), self.dim), dtype=np.float32)
        data = np.memmap(self._data, dtype=np.float32, mode="r", shape=(n, self.dim))
        return np.array(data[np.asarray(rows)], dtype=np.float32)


# ---- batches ---------------------------------------------------------------------------------------
class BatchSource:
    """Graph input dicts for a trainer's bundle from a dataset: pixels, cached embeddings, tokens."""

    def __init__(
        self,
        manifest: Manifest,
        bundle_dir: Path,
        dataset: Dataset,
        *,
        cache: EmbeddingCache | None = None,
        progress: bool = False,
    ) -> None:
        if manifest.task.kind != dataset.kind:
            raise DataError(
                f"{dataset.source}: a {dataset.kind} dataset cannot train a {manifest.task.kind} bundle"
            )
        if dataset.kind == "classify" and tuple(dataset.labels) != tuple(manifest.task.labels):
            raise DataError(f"{dataset.source}: dataset labels differ from the bundle's labels")
        self.manifest = manifest
        self.dataset = dataset
        self.transform = ImageTransform(manifest.preprocess)
        self._rows = None
        if manifest.train_input == "image_embeds":
            if cache is None:
                raise DataError("this bundle trains from image embeddings: an embedding cache is needed")
            self._cache = cache
            self._rows = cache.rows_for(dataset, progress=progress)
        self._tokenizer = None
        if manifest.task.kind == "contrastive":
            from fedclip.sdk.tokenizer import Tokenizer

            spec = manifest.tokenizer
            if spec is None:
                raise DataError("contrastive bundle has no tokenizer in its manifest")
            self._tokenizer = Tokenizer.from_file(bundle_dir / spec.file, spec.context_length)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.dataset) / batch_size)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[dict, int]]:
        """Yield (inputs, batch size) with `inputs` keyed by graph input name."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if self._rows is None:
            for b in self.dataset.batches(self.transform, batch_size, shuffle=shuffle, seed=seed):
                yield self._inputs(b.images, b.labels, b.captions), len(b)
            return
        order = [i for i in self.dataset.order(shuffle, seed) if self._rows[i] >= 0]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            samples = [self.dataset.samples[i] for i in idx]
            embeds = self._cache.read(self._rows[idx])
            labels = np.array([s.label for s in samples], dtype=np.int64)
            yield self._inputs(embeds, labels, [s.caption for s in samples]), len(idx)

    def _inputs(self, x: np.ndarray, labels: np.ndarray, captions: Sequence[str]) -> dict[str, np.ndarray]:
        inputs = {self.manifest.train_input: x}
        if self._tokenizer is not None:
            inputs["text"] = self._tokenizer(list(captions))
        else:
            inputs["labels"] = labels
        return inputs


def batch_source(
    trainer: Trainer, dataset: Dataset, *, cache_dir: str | Path | None = None, progress: bool = False
) -> BatchSource:
    """The batch source for `trainer`'s bundle; builds the embedding cache when the bundle needs one."""
    cache = None
    if trainer.manifest.train_input == "image_embeds":
        encoder = Predictor(
            trainer.bundle_dir, manifest=trainer.manifest, device=trainer.device, threads=trainer.threads
        )
        cache = EmbeddingCache(cache_dir or default_cache_dir(), encoder)
    return BatchSource(trainer.manifest, trainer.bundle_dir, dataset, cache=cache, progress=progress)


# ---- train / evaluate ------------------------------------------------------------------------------
def train_local(
    trainer: Trainer,
    dataset: Dataset | BatchSource,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_steps: int | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Train `epochs` (or `max_steps`); returns loss_first/last/mean, steps, samples, seconds, skipped."""
    if epochs < 1:
        raise DataError(f"epochs must be >= 1, got {epochs}")
    source = (
        dataset
        if isinstance(dataset, BatchSource)
        else batch_source(trainer, dataset, cache_dir=cache_dir, progress=progress)
    )
    trainer.set_lr(lr)
    total = source.num_batches(batch_size) * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    losses: list[float] = []
    samples = 0
    start = time.monotonic()
    stopped = False
    with progress_bar(progress, "training", total) as advance:
        for epoch in range(epochs):
            for inputs, n in source.batches(batch_size, shuffle=True, seed=seed + epoch):
                if (max_steps is not None and len(losses) >= max_steps) or (should_stop and should_stop()):
                    stopped = True
                    break
                loss = trainer.train_step(inputs)
                if not math.isfinite(loss):
                    raise DataError(
                        f"training diverged (loss {loss} at step {len(losses) + 1}); lower the learning rate"
                    )
                losses.append(loss)
                samples += n
                advance(1, loss=loss)
                if on_step is not None:
                    on_step(len(losses), loss)
            if stopped:
                break
    if not losses:
        raise DataError(f"{source.dataset.source}: no readable images to train on")
    return {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_mean": float(np.mean(losses)),
        "steps": float(len(losses)),
        "samples": float(samples),
        "seconds": time.monotonic() - start,
        "skipped": float(len(source.dataset.skipped)),
    }


def evaluate(
    trainer: Trainer,
    dataset: Dataset | BatchSource,
    *,
    batch_size: int = 64,
    progress: bool = False,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Mean loss and (classify) accuracy; argmax runs in numpy (ORT CPU has no int64 ArgMax)."""
    source = (
        dataset
        if isinstance(dataset, BatchSource)
        else batch_source(trainer, dataset, cache_dir=cache_dir, progress=progress)
    )
    loss_sum, correct, n_total = 0.0, 0, 0
    with progress_bar(progress, "evaluating", source.num_batches(batch_size)) as advance:
        for inputs, n in source.batches(batch_size):
            out = trainer.eval_step(inputs)
            loss_sum += float(out["loss"]) * n
            if "logits" in out and "labels" in inputs:
                correct += int((np.argmax(out["logits"], axis=1) == inputs["labels"]).sum())
            n_total += n
            advance(1)
    if n_total == 0:
        raise DataError(f"{source.dataset.source}: no readable images to evaluate on")
    metrics = {"loss": loss_sum / n_total, "num_samples": float(n_total)}
    if trainer.manifest.task.kind == "classify":
        metrics["accuracy"] = correct / n_total
    return metrics


# ---- statistics --------------------------------------------------------------------------------------
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
        sums = sq = None
        for b in _progress_batches(dataset, predictor.transform, batch_size, progress):
            emb = predictor.embed_images(b.images).astype(np.float64)
            if sums is None:
                sums = np.zeros((n_labels, emb.shape[1]))
                sq = np.zeros((n_labels, emb.shape[1]))
            np.add.at(sums, b.labels, emb)
            np.add.at(sq, b.labels, emb * emb)
            np.add.at(counts, b.labels, 1.0)
        if sums is None:
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


def _progress_batches(dataset: Dataset, transform: ImageTransform, batch_size: int, progress: bool):
    with progress_bar(progress, "statistics", math.ceil(len(dataset) / batch_size)) as advance:
        for b in dataset.batches(transform, batch_size):
            yield b
            advance(1)
