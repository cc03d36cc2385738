"""CE-LoRA personalized aggregation over tri-lora C matrices (docs/aggregation.md has the formula).

Agent i's next C is sum_j w_ij C_j with w_ij = softmax_j(-d_ij / tau) over agent i's k nearest agents
of the round by d (i included; `neighbours`, default 32; 0 or k >= N: all agents) and
d_ij = lam * d_data(i, j) + (1 - lam) * d_param(i, j). A sample-weighted global C serves agents that
did not take part yet.
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
from fedclip.coordinator.strategies.neighbours import mix, nearest
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR


class _Deltas(Sequence):
    """Row i: agent i's trained C minus the C its task started from, computed on access."""

    def __init__(self, values: np.ndarray, updates: Sequence[Update], names: list[str]):
        self.values, self.updates, self.names = values, updates, names

    def __len__(self) -> int:
        return len(self.updates)

    def __getitem__(self, i):
        return self.values[i] - flatten(self.updates[i].base, self.names)


class _Column(Sequence):
    """Statistic `name` of update i, read on access (lazy stats stay lazy)."""

    def __init__(self, updates: Sequence[Update], name: str):
        self.updates, self.name = updates, name

    def __len__(self) -> int:
        return len(self.updates)

    def __getitem__(self, i):
        return self.updates[i].stats[self.name]


class CeLora(Strategy):
    name = "ce-lora"
    personalized = True
    shared_global = False  # cores in each device's own basis (A, B): their mean is no fleet model

    @property
    def stats(self) -> tuple[str, ...]:  # type: ignore[override]  # a property over the base class attribute
        return ("histogram", "gaussian") if self.options.lam > 0 else ()

    def aggregate(self, round_id: int, updates: Sequence[Update]) -> AggregateResult:
        if not updates:
            raise ValueError("ce-lora: no updates to aggregate")
        names = sorted(updates[0].tensors)
        n, k = len(updates), self.options.neighbours
        all_pairs = k == 0 or k >= n
        values = np.empty((n, sum(np.size(updates[0].tensors[m]) for m in names)), np.float32)
        for i, u in enumerate(updates):  # row by row: no float64 stack of all updates
            values[i] = flatten(u.tensors, names)
        hist, mean, var = self._stats(updates)
        # At fleet scale the statistics are most of the memory: float16 there (as they travel).
        inp = PairwiseInputs(hist, mean, var, _Deltas(values, updates, names), compact=not all_pairs)
        opts = self.options
        if all_pairs:
            personal = personalized_average(inp, values, opts.lam, opts.tau)
        else:
            idx, w = nearest(inp, opts.lam, opts.tau, k, seed=opts.seed)
            del inp  # the statistics go before the N x P output comes: peak memory is one of them
            personal = mix(values, idx, w)

        weights = sample_weights([u.num_samples for u in updates])
        acc = WeightedMean()
        for u, w in zip(updates, weights, strict=True):
            acc.add(u.tensors, w)
        like = updates[0].tensors
        per_agent = {u.agent: unflatten(personal[i], like, names) for i, u in enumerate(updates)}
        return AggregateResult(acc.result(), per_agent, {"updates": float(n)})

    def _stats(self, updates: Sequence[Update]) -> tuple[np.ndarray, Sequence, Sequence]:
        if self.options.lam == 0:  # parameter distance only: no statistics needed
            n = len(updates)
            return np.ones((n, 1)), [np.zeros((1, 1))] * n, [np.zeros((1, 1))] * n
        hist = np.stack([np.asarray(u.stats[STAT_LABEL_HIST], np.float64) for u in updates])
        # Read on access, not stacked: PairwiseInputs copies them once, into its own buffer.
        return hist, _Column(updates, STAT_MEAN), _Column(updates, STAT_VAR)
