"""The local training and evaluation loops over a batch source: epochs, step limits, stop requests,
divergence checks and the metrics each loop returns."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedclip.device_agent.batches import BatchSource, Trainer, batch_source
from fedclip.device_agent.progress import progress_bar
from fedclip.sdk.data import Dataset
from fedclip.sdk.errors import DataError

if TYPE_CHECKING:
    from fedclip.device_agent.classifier import Classifier


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
    skip: int = 0,
) -> dict[str, float]:
    """Train `epochs` (or `max_steps`); returns loss_first/last/mean, steps, samples, seconds, skipped.

    `skip`: the first `skip` batches of the first epoch were trained before (a paused run resumes;
    the trainer's checkpoint holds what they did): the same batches follow in the same order."""
    if epochs < 1:
        raise DataError(f"epochs must be >= 1, got {epochs}")
    source = (
        dataset
        if isinstance(dataset, BatchSource)
        else batch_source(trainer, dataset, cache_dir=cache_dir, progress=progress)
    )
    trainer.set_lr(lr)
    total = max(source.num_batches(batch_size) * epochs - skip, 0)
    if max_steps is not None:
        total = min(total, max_steps)
    losses: list[float] = []
    samples = 0
    start = time.monotonic()
    stopped = False
    with progress_bar(progress, "training", total) as advance:
        for epoch in range(epochs):
            left_out = skip if epoch == 0 else 0
            for inputs, n in source.batches(batch_size, shuffle=True, seed=seed + epoch, skip=left_out):
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
    logit_bias: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean loss and (classify) accuracy; argmax runs in numpy (ORT CPU has no int64 ArgMax).

    `logit_bias` [labels]: added to the logits before the argmax, as the device's inference adds
    its label prior to a balanced-softmax adapter's (`sdk.label_prior.inference_bias`)."""
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
                logits = out["logits"] if logit_bias is None else out["logits"] + logit_bias
                correct += int((np.argmax(logits, axis=1) == inputs["labels"]).sum())
            n_total += n
            advance(1)
    if n_total == 0:
        raise DataError(f"{source.dataset.source}: no readable images to evaluate on")
    metrics = {"loss": loss_sum / n_total, "num_samples": float(n_total)}
    if trainer.manifest.task.kind == "classify":
        metrics["accuracy"] = correct / n_total
    return metrics


def classifier_hits(clf: Classifier, dataset: Dataset) -> tuple[int, int]:
    """(right, scored): `clf.predict`'s top label against `dataset`'s, its batch size at a time: the
    accuracy the device's applications get (`eval --open-set`, benchmarks/fmnist_open_set_real.py)."""
    hits = n = 0
    for b in dataset.batches(clf.transform, clf.batch_size):
        hits += int((clf.predict(b.images).logits.argmax(axis=1) == b.labels).sum())
        n += len(b.labels)
    return hits, n
