"""fleet-core: tri-LoRA cores over frozen shared A, B, mixed by data similarity and with the fleet.

Agent i's next C is `(1 - g) * sum_j w_ij C_j + g * Cbar` (docs/aggregation.md, "fleet-core"):
`w_ij` are CE-LoRA's neighbour weights (`aggregate.personalized_average`, `lam`, `tau`), `Cbar` the
sample-weighted mean of all cores and `g` (`fleet_weight`) how much of the fleet every agent keeps.
Meant for bundles exported with `--init frozen-seed`: A and B come from the bundle's seed and never
train, so every agent's update `B C A` is linear in its C and mixing cores mixes weight updates
exactly (with personal A and B, as in CE-LoRA, C_j means something else in agent i's basis).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedclip.coordinator.strategies.aggregate import flatten, unflatten
from fedclip.coordinator.strategies.base import AggregateResult, StrategyOptions, Update
from fedclip.coordinator.strategies.ce_lora import CeLora
from fedclip.coordinator.strategies.fleet_mix import blend_with_fleet


class FleetCore(CeLora):
    name = "fleet-core"
    personalized = True

    def __init__(self, options: StrategyOptions | None = None, fleet_weight: float = 0.2) -> None:
        super().__init__(options)
        if not 0.0 <= fleet_weight <= 1.0:
            raise ValueError(f"fleet_weight must be in [0, 1], got {fleet_weight}")
        self.fleet_weight = fleet_weight

    def aggregate(self, round_id: int, updates: Sequence[Update]) -> AggregateResult:
        res = super().aggregate(round_id, updates)  # neighbour average per agent, sample-weighted mean
        names = sorted(res.global_tensors)
        fleet = flatten(res.global_tensors, names)
        agents = sorted(res.per_agent)
        personal = np.stack([flatten(res.per_agent[a], names) for a in agents])
        mixed = blend_with_fleet(personal, fleet, self.fleet_weight)
        like = res.global_tensors
        per_agent = {a: unflatten(mixed[i], like, names) for i, a in enumerate(agents)}
        return AggregateResult(res.global_tensors, per_agent, res.metrics)
