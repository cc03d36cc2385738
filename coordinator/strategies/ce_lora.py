"""CE-LoRA personalized aggregation over tri-lora C matrices (docs/aggregation.md has the formula).

Agent i's next C is sum_j w_ij C_j with w_ij = softmax_j(-d_ij / tau) over all agents of the round
(i included) and d_ij = lam * d_data(i, j) + (1 - lam) * d_param(i, j). A sample-weighted global C
serves agents that did not take part yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedclip.coordinator.strategies.aggregate import (
    PairwiseInputs,
    WeightedMean,
    flatten,
    personalized_average,
    sample_weights,
    unflatten,
)
from fedclip.coordinator.strategies.base import AggregateResult, Strategy, Update
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR


class CeLora(Strategy):
    name = "ce-lora"
    personalized = True

    @property
    def stats(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("histogram", "gaussian") if self.options.lam > 0 else ()

    def aggregate(self, round_id: int, updates: Sequence[Update]) -> AggregateResult:
        if not updates:
            raise ValueError("ce-lora: no updates to aggregate")
        names = sorted(updates[0].tensors)
        values = np.stack([flatten(u.tensors, names) for u in updates])
        deltas = values.copy()
        for i, u in enumerate(updates):  # row by row: no second N x P stack of the starting points
            deltas[i] -= flatten(u.base, names)
        hist, mean, var = self._stats(updates)
        inp = PairwiseInputs(hist, mean, var, deltas, copy_deltas=False)
        del deltas  # normalized in place into the inputs
        personal = personalized_average(inp, values, self.options.lam, self.options.tau)

        weights = sample_weights([u.num_samples for u in updates])
        acc = WeightedMean()
        for u, w in zip(updates, weights, strict=True):
            acc.add(u.tensors, w)
        like = updates[0].tensors
        per_agent = {u.agent: unflatten(personal[i], like, names) for i, u in enumerate(updates)}
        return AggregateResult(acc.result(), per_agent, {"updates": float(len(updates))})

    def _stats(self, updates: Sequence[Update]) -> tuple[np.ndarray, list, list]:
        if self.options.lam == 0:  # parameter distance only: no statistics needed
            n = len(updates)
            return np.ones((n, 1)), [np.zeros((1, 1))] * n, [np.zeros((1, 1))] * n
        hist = np.stack([np.asarray(u.stats[STAT_LABEL_HIST], np.float64) for u in updates])
        # Lists, not stacks: PairwiseInputs copies them once, into its own float32 buffer.
        return hist, [u.stats[STAT_MEAN] for u in updates], [u.stats[STAT_VAR] for u in updates]
