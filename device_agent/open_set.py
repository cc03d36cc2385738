"""The open-set gate: whether a device's label prior applies to an image (issue 13, scarce fleets).

A balanced-softmax adapter's inference adds the device's label prior back (`sdk.label_prior`). On a
device that has seen one or two labels, that prior all but rules out every other label, so an
image of a label it has never seen is called one of its own. The gate asks, per image, whether
the image looks like the device's own training images. It fits one Gaussian per own label to their
unit image embeddings under the served adapter, with one diagonal variance pooled over those labels
(a scarce device holds 16-32 images a label, too few for a variance each). An image whose nearest
own-label Gaussian is further than the `quantile` of the training images' own distances is taken
as a label the device has not seen. The `Classifier` then scores that image without the prior, by
the fleet's global adapter when a rollout delivered one beside the device's personalized adapter
(`rollout start --fallback`), else by the bundle's own model, which keeps what the base knows of
every label.

Why those two: every device has the bundle's own model, and in the four scarce fleets of
`benchmarks/results/fmnist_open_set.md` it meets the all-class target at q = 0.05, at 2 points of
own accuracy under training alone on a base with room (personal tuning at mu 6 paid 11 for it).
The fleet's global adapter does 0.6-2 points better there, for one more adapter on the device.
The gate's math is numpy; `gate_for` embeds the images with the Predictor it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedclip.sdk.data import Dataset
from fedclip.sdk.errors import DataError

if TYPE_CHECKING:
    from fedclip.sdk.manifest import Manifest

log = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.05
_VAR_FLOOR = 1e-4  # unit embeddings: per-dimension variances are ~1/D; keeps a constant axis finite


@dataclass(frozen=True)
class OpenSet:
    """What a `Classifier` fits its gate from: the device's labelled training images (a folder, CSV
    or JSONL, as `fedclip-agent train --data`) and the share of them the gate may send away."""

    data: Path
    quantile: float = DEFAULT_QUANTILE

    def __post_init__(self) -> None:
        q = self.quantile
        if not (isinstance(q, (int, float)) and np.isfinite(q) and 0.0 < q < 0.5):
            raise DataError(f"open-set quantile must be in (0, 0.5), got {q!r}")
        object.__setattr__(self, "data", Path(self.data))

    def own_images(self, manifest: Manifest) -> Dataset:
        """The device's labelled images, read against `manifest`'s labels (the prior's)."""
        if manifest.task.kind != "classify":
            raise DataError("open_set needs a classify bundle (its labels are the prior's)")
        return Dataset.open(self.data, labels=manifest.task.labels)


@dataclass(frozen=True)
class Gate:
    """Own-label means [K, D], the pooled diagonal variance [D] and the threshold on `nearness`."""

    labels: tuple[int, ...]  # the device's own labels (indices into the bundle's labels)
    means: np.ndarray
    var: np.ndarray
    threshold: float

    def nearness(self, embeds: np.ndarray) -> np.ndarray:
        """Minus the squared Mahalanobis distance of each unit embedding to its nearest own label."""
        e = _unit(embeds, self.means.shape[1])
        # |e - m|^2_s expanded: [B, K] without a [B, K, D] temporary (a bundle may have 1,000 labels)
        w = self.means / self.var
        d = (e * e / self.var).sum(1)[:, None] - 2.0 * e @ w.T + (self.means * w).sum(1)[None, :]
        return -d.min(axis=1)

    def keeps(self, embeds: np.ndarray) -> np.ndarray:
        """bool [B]: True where the image looks like the device's own (its prior applies)."""
        return self.nearness(embeds) >= self.threshold

    def route(
        self, with_prior: np.ndarray, embeds: np.ndarray, sent_away: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[np.ndarray, int]:
        """(`with_prior` [B, L] where the gate keeps an image, `sent_away(rows)` for the rows it does
        not: their logits without the prior; how many it sent away)."""
        away = ~self.keeps(embeds)
        if not away.any():
            return with_prior, 0
        out = np.array(with_prior, dtype=np.float32)
        out[away] = sent_away(away)
        return out, int(away.sum())


def fit_gate(embeds: np.ndarray, labels: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> Gate:
    """The gate of a device whose training images have these embeddings [N, D] and labels [N]."""
    OpenSet(Path("."), quantile)  # one place checks the quantile
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"open-set labels must be integers [N], got {labels.dtype} {list(labels.shape)}")
    if len(labels) < 2:
        raise DataError(f"the open-set gate needs at least 2 training images, got {len(labels)}")
    e = _unit(embeds, None)
    if len(e) != len(labels):
        raise DataError(f"open-set: {len(e)} embeddings for {len(labels)} labels")
    own = np.unique(labels)
    means = np.stack([e[labels == k].mean(axis=0) for k in own])
    var = (e - means[np.searchsorted(own, labels)]).var(axis=0) + _VAR_FLOOR
    gate = Gate(tuple(int(k) for k in own), means, var, 0.0)
    threshold = float(np.quantile(gate.nearness(e), quantile))
    return Gate(gate.labels, means, var, threshold)


def gate_for(predictor: Any, images: Dataset, quantile: float, batch_size: int, where: str) -> Gate:
    """The gate of the adapter `predictor` serves with (a `Predictor`): the device's own labelled
    `images` embedded under it, one pass."""
    embeds, labels = [], []
    for b in images.batches(predictor.transform, batch_size):
        embeds.append(predictor.image_outputs(b.images)[1])
        labels.append(b.labels)
    if not embeds:
        raise DataError(f"{images.source}: no readable images for the open-set gate")
    gate = fit_gate(np.concatenate(embeds), np.concatenate(labels), quantile)
    log.info("open-set gate for %s: own labels %s, q %g", where, list(gate.labels), quantile)
    return gate


def _unit(embeds: np.ndarray, dim: int | None) -> np.ndarray:
    e = np.asarray(embeds, dtype=np.float64)
    if e.ndim != 2 or (dim is not None and e.shape[1] != dim) or not len(e):
        want = "[N, D]" if dim is None else f"[N, {dim}]"
        raise DataError(f"open-set: embeddings must be {want}, got {list(e.shape)}")
    if not np.all(np.isfinite(e)):
        raise DataError("open-set: embeddings are not finite")
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


__all__ = ["DEFAULT_QUANTILE", "Gate", "OpenSet", "fit_gate", "gate_for"]
