"""fleet-core: tri-LoRA cores over frozen shared A, B, mixed by data similarity and with the fleet.

Agent i's next C is `(1 - g) * sum_j w_ij C_j + g * Cbar` (docs/aggregation.md, "fleet-core"):
`w_ij` are CE-LoRA's neighbour weights (`aggregate.personalized_average`, `lam`, `tau`), `Cbar` the
sample-weighted mean of all cores and `g` (`fleet_weight`) how much of the fleet every agent keeps.
Meant for bundles exported with `--init frozen-seed`: A and B come from the bundle's seed and never
train, so every agent's update `B C A` is linear in its C and mixing cores mixes weight updates
exactly (with personal A and B, as in CE-LoRA, C_j means something else in agent i's basis).

Newcomers (docs/aggregation.md, "Newcomers"): an update equal to the adapter its task started from
(a statistics-only task, `configure_round`) learned nothing, so it is mixed for, not from: its agent
gets `sum_j v_j x_j'` over the round's other agents' new adapters, `v = softmax(-d_data / tau)` of its
statistics against theirs (`fleet_mix.newcomers_weights`), and it counts in no one else's average.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedclip.coordinator.strategies.aggregate import flatten, unflatten
from fedclip.coordinator.strategies.base import AggregateResult, StrategyOptions, Update
from fedclip.coordinator.strategies.ce_lora import CeLora
from fedclip.coordinator.strategies.fleet_mix import blend_with_fleet, newcomers_weights
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR


class FleetCore(CeLora):
    name = "fleet-core"
    personalized = True
    shared_global = True  # A and B are the bundle's frozen seed on every device: the mean core is a model

    def __init__(self, options: StrategyOptions | None = None, fleet_weight: float = 0.2) -> None:
        super().__init__(options)
        if not 0.0 <= fleet_weight <= 1.0:
            raise ValueError(f"fleet_weight must be in [0, 1], got {fleet_weight}")
        self.fleet_weight = fleet_weight

    @property
    def mixes_newcomers(self) -> bool:
        return self.options.lam > 0  # a newcomer is placed by its data statistics alone

    def aggregate(self, round_id: int, updates: Sequence[Update]) -> AggregateResult:
        fresh = [self.mixes_newcomers and _untrained(u) and _has_stats(u) for u in updates]
        learned = [u for u, f in zip(updates, fresh, strict=True) if not f]
        newcomers = [u for u, f in zip(updates, fresh, strict=True) if f]
        if not learned or not newcomers:  # nothing to mix from, or no one to mix for
            return self._blended(round_id, updates)
        res = self._blended(round_id, learned)
        per_agent = dict(res.per_agent)
        per_agent.update(self._for_newcomers(learned, newcomers, res))
        metrics = {**res.metrics, "newcomers": float(len(newcomers))}
        return AggregateResult(res.global_tensors, per_agent, metrics)

    def _blended(self, round_id: int, updates: Sequence[Update]) -> AggregateResult:
        res = super().aggregate(round_id, updates)  # neighbour average per agent, sample-weighted mean
        if self.fleet_weight == 0.0:  # fleet-lora's default: the neighbour average as it is
            return res
        names = sorted(res.global_tensors)
        fleet = flatten(res.global_tensors, names)
        like = res.global_tensors
        # One agent at a time: an N x P float64 stack of LoRA-sized adapters was 4 GB at 1,000 agents.
        per_agent = {
            a: unflatten(
                blend_with_fleet(flatten(t, names)[None, :], fleet, self.fleet_weight)[0], like, names
            )
            for a, t in res.per_agent.items()
        }
        return AggregateResult(res.global_tensors, per_agent, res.metrics)

    def _for_newcomers(
        self, learned: Sequence[Update], newcomers: Sequence[Update], res: AggregateResult
    ) -> dict[str, dict[str, np.ndarray]]:
        both = [*learned, *newcomers]
        hist = np.stack([np.asarray(u.stats[STAT_LABEL_HIST], np.float64) for u in both])
        w = newcomers_weights(
            hist,
            [u.stats[STAT_MEAN] for u in both],
            [u.stats[STAT_VAR] for u in both],
            self.options.tau,
            members=len(learned),
            compact=len(learned) > max(self.options.neighbours, 1),  # float16 at fleet scale
        )
        names = sorted(res.global_tensors)
        like = res.global_tensors
        out = np.zeros((len(newcomers), sum(np.size(like[n]) for n in names)))  # [M, P]
        for j, u in enumerate(learned):  # one member's adapter at a time: never all N stacked
            out += np.outer(w[:, j], flatten(res.per_agent[u.agent], names))
        return {u.agent: unflatten(out[m], like, names) for m, u in enumerate(newcomers)}


def _untrained(u: Update) -> bool:
    """The update is exactly the adapter its task started from (a statistics-only task's)."""
    return all(np.array_equal(np.asarray(v), np.asarray(u.base[n])) for n, v in u.tensors.items())


def _has_stats(u: Update) -> bool:
    return all(k in u.stats for k in (STAT_LABEL_HIST, STAT_MEAN, STAT_VAR))
