"""fleet-lora: each agent's whole LoRA adapter becomes the data-similarity average of its neighbours'.

fleet-core's math (`fleet_core.FleetCore`: CE-LoRA's neighbour weights `w_ij` from the data
statistics, blended with the fleet mean by `fleet_weight`) over every exchanged tensor of a plain
LoRA bundle, A and B, instead of tri-LoRA cores over a frozen basis:

    x_i' = (1 - g) * sum_j w_ij x_j + g * xbar,    x = (A, B) of every adapted module

What differs is what travels and the default `g`: the full factors carry everything an agent
learned (a frozen basis holds only r x r of it), so agents with the same camera and label mix pool
it, like FedAvg within their neighbourhood; and the fleet mean is left out by default (`g = 0`),
because in a fleet of several cameras it drags an agent toward the others' shift
(docs/aggregation.md, "fleet-lora", has the evidence). It costs FedAvg-LoRA's bytes per round.
"""

from __future__ import annotations

from fedclip.coordinator.strategies.base import StrategyOptions
from fedclip.coordinator.strategies.fleet_core import FleetCore


class FleetLora(FleetCore):
    name = "fleet-lora"

    def __init__(self, options: StrategyOptions | None = None, fleet_weight: float = 0.0) -> None:
        super().__init__(options, fleet_weight)
