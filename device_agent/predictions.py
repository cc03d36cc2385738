"""What the `Classifier` answers: one call's `Predictions`, and `SwapStats`, how it has followed
the agent's adapters (for monitoring). Kept apart so the classifier module holds the serving."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Predictions:
    """One call's answer: logits over `labels`, made by adapter `adapter_version` (None: bundle's own)."""

    labels: tuple[str, ...]
    logits: np.ndarray  # float32 [B, len(labels)]
    adapter_version: str | None

    @property
    def probs(self) -> np.ndarray:
        z = self.logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        """Per image, the k best (label, probability), best first."""
        probs = self.probs
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]


@dataclass(frozen=True)
class SwapStats:
    """How the classifier followed the agent: for monitoring (`serve-inference`'s /metrics)."""

    version: str | None  # serving now (None: the bundle's own)
    swaps: int  # switches to another adapter since the start
    load_failures: int  # changes the watcher could not load (the current adapter kept serving)
    last_swap: float | None  # Unix time of the last switch
    open_set_sent_away: int = 0  # images the open-set gate scored with the fallback
    open_set_fallback: str | None = None  # what they go to now (None: the bundle's own model)
