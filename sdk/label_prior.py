"""Balanced-softmax training and the device's label prior (docs/aggregation.md, "balanced softmax").

An agent that holds two of ten labels and trains plain cross-entropy learns mostly its label mix:
the shared adapter then forgets the other labels (all-class accuracy falls), and averaging adapters
averages label mixes. With `loss: balanced-softmax` each agent trains on

    CE(logits + log pi_i, y)        pi_i = (h_i + TRAIN_PSEUDO) / sum(h_i + TRAIN_PSEUDO)

(h_i: its label histogram), so the adapter learns p(image | label), the part agents share, and the
label mix stays on the device. At inference the device adds its own prior back,
`w * log((h_i + INFER_PSEUDO) / sum)`, with `w` (the prior weight, default 1) its own choice: 1 for
the best accuracy on what it usually sees, 0 for the best on labels it has not trained on.

Why two pseudo-counts: training with a small one (0.1) gives a label the agent never saw a large
negative offset, so its images do not push that label's logit down; inference with a larger one
(1, Laplace) keeps such a label reachable when it does show up. Measured in
`benchmarks/results/fmnist_ceiling.md`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

import numpy as np

from fedclip.sdk.errors import AdapterError
from fedclip.sdk.manifest import LABEL_BIAS, Manifest

if TYPE_CHECKING:  # only its type: messages and adapters import this module, not image decoding
    from fedclip.sdk.data import Dataset

LOSSES = ("ce", "balanced-softmax")
# The coordinator's default loss (not a task's: `resolve` turns it into one of LOSSES at start).
AUTO: Final = "auto"
TRAIN_PSEUDO, INFER_PSEUDO = 0.1, 1.0
MAX_COUNT = 1e12  # far beyond any device's images; bounds what a metadata field may claim


def resolve(loss: str, manifest: Manifest) -> str:
    """The loss a fleet's tasks ask for: `auto` is balanced softmax where the bundle's training graphs
    take `label_bias` (classify, manifest format 2), plain CE elsewhere; any other loss as given.

    Why balanced softmax by default: under label skew FedAvg's global adapter trained with plain CE
    stays at zero-shot on a balanced test set (-1.1 and -0.9 points after 20 rounds through the real
    coordinator, two bases), with balanced softmax it gains +10.2 and +3.9 on the same fleets
    (benchmarks/results/fmnist_global_real.md); the personalized strategies keep own accuracy within
    about 2 points and keep more of the labels a device has not trained on (docs/aggregation.md)."""
    if loss != AUTO:
        return loss
    return "balanced-softmax" if manifest.takes_label_bias else "ce"


def unsupported(loss: str, manifest: Manifest, where: str) -> str | None:
    """Why `manifest`'s bundle cannot train `loss` (None: it can), for the coordinator's start, an
    agent's task check and `fedclip-agent train` to say in one line. Only classify training graphs
    take `label_bias` (manifest format 2)."""
    if loss == "ce" or manifest.takes_label_bias:
        return None
    return (
        f"{loss} needs a classify bundle whose training graphs take label_bias (manifest format 2; "
        f"re-export it); {where} is format {manifest.format_version}, {manifest.task.kind}"
    )


def training_prior(dataset: Dataset) -> tuple[tuple[float, ...], np.ndarray]:
    """(a training set's label histogram, the log prior its batches carry as `label_bias`)."""
    counts = tuple(float(c) for c in dataset.label_counts())
    return counts, log_prior(counts, TRAIN_PSEUDO)


def log_prior(counts: Sequence[float] | np.ndarray, pseudo: float) -> np.ndarray:
    """`log((h + pseudo) / sum(h + pseudo))` as float32 [L]."""
    h = np.asarray(counts, dtype=np.float64) + pseudo
    return np.log(h / h.sum()).astype(np.float32)


def encode(counts: Sequence[float] | np.ndarray) -> str:
    """The adapter-metadata form of a histogram: a JSON list of numbers."""
    return json.dumps([float(c) if c != int(c) else int(c) for c in np.asarray(counts, dtype=np.float64)])


def decode(text: str, where: str) -> tuple[float, ...]:
    """A histogram from adapter metadata; AdapterError with one line when it is not one."""
    try:
        raw = json.loads(text)
    except ValueError:
        raise AdapterError(f"{where}: metadata field 'label_prior' is not JSON") from None
    if not isinstance(raw, list) or not raw or len(raw) > 100_000:
        raise AdapterError(f"{where}: metadata field 'label_prior' must be a non-empty list of counts")
    out = []
    for c in raw:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise AdapterError(f"{where}: metadata field 'label_prior' holds a non-number")
        if not 0 <= c <= MAX_COUNT:
            raise AdapterError(f"{where}: metadata field 'label_prior' holds a count outside [0, 1e12]")
        out.append(float(c))
    return tuple(out)


def inference_bias(counts: Sequence[float], n_labels: int, weight: float, where: str) -> np.ndarray | None:
    """What a device adds to its logits over the bundle's labels: `weight * log prior` (None: nothing)."""
    if not counts or weight == 0:
        return None
    if len(counts) != n_labels:
        raise AdapterError(f"{where}: label prior has {len(counts)} counts, the bundle has {n_labels} labels")
    return (weight * log_prior(counts, INFER_PSEUDO)).astype(np.float32)


def with_zero_bias(
    inputs: Mapping[str, np.ndarray], names: Sequence[str], n_labels: int
) -> Mapping[str, np.ndarray]:
    """`inputs` plus zeros for a `label_bias` the graph takes and the caller left out: callers that
    know nothing of balanced softmax feed a format-2 bundle as they fed format 1 (plain CE)."""
    if LABEL_BIAS not in names or LABEL_BIAS in inputs or "labels" not in inputs:
        return inputs
    n = len(inputs["labels"])
    return {**inputs, LABEL_BIAS: np.zeros((n, n_labels), np.float32)}
