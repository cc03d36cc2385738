"""FedAvg over LoRA tensors (FLoRA-style): sample-weighted mean of every exchanged tensor."""

from __future__ import annotations

from collections.abc import Sequence

from fedclip.coordinator.strategies.aggregate import WeightedMean, sample_weights
from fedclip.coordinator.strategies.base import AggregateResult, Strategy, Update


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(self, round_id: int, updates: Sequence[Update]) -> AggregateResult:
        if not updates:
            raise ValueError("fedavg: no updates to aggregate")
        weights = sample_weights([u.num_samples for u in updates])
        acc = WeightedMean()
        for u, w in zip(updates, weights, strict=True):
            acc.add(u.tensors, w)  # streams: each update's tensors are read once, then dropped
        return AggregateResult(acc.result(), metrics={"updates": float(len(updates))})
