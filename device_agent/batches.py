"""Graph input batches for a trainer's bundle from a dataset: decoded pixels or cached embeddings,
plus labels or tokenized captions, one batch at a time."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fedclip.device_agent.embed_cache import EmbeddingCache, default_cache_dir
from fedclip.device_agent.predictor import Predictor
from fedclip.device_agent.step_backend import StepTrainer
from fedclip.device_agent.trainer import OrtTrainer
from fedclip.sdk.data import Dataset
from fedclip.sdk.errors import DataError
from fedclip.sdk.manifest import LABEL_BIAS, Manifest
from fedclip.sdk.preprocess import ImageTransform

# Either backend (see step_backend.make_trainer): both have the same public interface.
Trainer = OrtTrainer | StepTrainer


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
        self.cache = cache  # image embeddings, for bundles that train from them
        self._rows: np.ndarray | None = None  # each sample's row in the cache (-1: unreadable)
        if manifest.train_input == "image_embeds":
            if cache is None:
                raise DataError("this bundle trains from image embeddings: an embedding cache is needed")
            self._rows = cache.rows_for(dataset, progress=progress)
        # Offsets added to the logits inside the loss [labels] (balanced softmax, `sdk.label_prior`);
        # None: zeros (the trainers' default). Fed only to graphs that take `label_bias` (format 2).
        self.label_bias: np.ndarray | None = None
        self._takes_bias = manifest.takes_label_bias
        self._tokenizer = None
        if manifest.task.kind == "contrastive":
            from fedclip.sdk.tokenizer import Tokenizer

            spec = manifest.tokenizer
            if spec is None:
                raise DataError("contrastive bundle has no tokenizer in its manifest")
            self._tokenizer = Tokenizer.from_file(bundle_dir / spec.file, spec.context_length)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.dataset) / batch_size)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, skip: int = 0
    ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Yield (inputs, batch size) with `inputs` keyed by graph input name; the first `skip`
        batches of this order are left out (a paused run resumes where it stood)."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        rows, cache = self._rows, self.cache
        if rows is None or cache is None:
            # Read and dropped: which images are unreadable, and so where a batch starts, is only
            # known by reading them.
            batches = self.dataset.batches(self.transform, batch_size, shuffle=shuffle, seed=seed)
            for b in itertools.islice(batches, skip, None):
                yield self._inputs(b.images, b.labels, b.captions), len(b)
            return
        order = [i for i in self.dataset.order(shuffle, seed) if rows[i] >= 0]
        for start in range(skip * batch_size, len(order), batch_size):
            idx = order[start : start + batch_size]
            samples = [self.dataset.samples[i] for i in idx]
            embeds = cache.read(rows[idx])
            labels = np.array([s.label for s in samples], dtype=np.int64)
            yield self._inputs(embeds, labels, [s.caption for s in samples]), len(idx)

    def _inputs(self, x: np.ndarray, labels: np.ndarray, captions: Sequence[str]) -> dict[str, np.ndarray]:
        inputs: dict[str, np.ndarray] = {self.manifest.train_input: x}
        if self._tokenizer is not None:
            inputs["text"] = self._tokenizer(list(captions))
        else:
            inputs["labels"] = labels
            if self._takes_bias and self.label_bias is not None:  # else the trainer feeds zeros
                shape = (len(labels), len(self.label_bias))
                inputs[LABEL_BIAS] = np.ascontiguousarray(np.broadcast_to(self.label_bias, shape))
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
