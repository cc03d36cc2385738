"""Robust FedAvg: coordinate-wise trimmed mean (drops the most extreme values of every coordinate).

Unweighted by design: sample counts are self-reported, and weighting by them would let one agent
that claims a huge count dominate again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedclip.coordinator.strategies.aggregate import trimmed_mean_array
from fedclip.coordinator.strategies.base import AggregateResult, Strategy, Update


class TrimmedMean(Strategy):
    name = "trimmed-mean"

    def aggregate(self, round_id: int, updates: Sequence[Update]) -> AggregateResult:
        if not updates:
            raise ValueError("trimmed-mean: no updates to aggregate")
        out = {}
        for name in sorted(updates[0].tensors):  # one tensor at a time bounds peak memory
            stack = np.stack([np.asarray(u.tensors[name]) for u in updates])
            out[name] = trimmed_mean_array(stack, self.options.trim_fraction).astype(stack.dtype)
        return AggregateResult(out, metrics={"updates": float(len(updates))})
