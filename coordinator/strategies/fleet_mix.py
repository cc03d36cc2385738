"""Math of the fleet-core strategy: neighbour weights from data statistics, blended with the fleet.

Pure numpy, no I/O. The distances are CE-LoRA's (`aggregate.data_distance_block`,
`aggregate.personalized_average`); what is new here is
- the blend of each agent's neighbourhood average with the fleet average:
  `x_i' = (1 - g) * sum_j w_ij x_j + g * xbar` (`blend_with_fleet`), which keeps every label the
  fleet has seen in every agent's adapter (all-class accuracy) while the neighbourhood part carries
  what agents with the same camera and labels learned;
- the adapter a new agent gets on joining, from its statistics alone (`newcomer_weights`): softmax
  of `-d_data / tau` against the agents that already have adapters, before it has trained at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedclip.coordinator.strategies.aggregate import PairwiseInputs, data_distance_block, softmax_rows


def blend_with_fleet(personal: np.ndarray, fleet: np.ndarray, fleet_weight: float) -> np.ndarray:
    """(1 - g) * personal[i] + g * fleet for every row i; `fleet` is one flat vector."""
    if not 0.0 <= fleet_weight <= 1.0:
        raise ValueError(f"fleet_weight must be in [0, 1], got {fleet_weight}")
    personal = np.asarray(personal, dtype=np.float64)
    fleet = np.asarray(fleet, dtype=np.float64)
    if personal.ndim != 2 or fleet.shape != personal.shape[1:]:
        raise ValueError(f"shapes do not fit: personal {personal.shape}, fleet {fleet.shape}")
    return (1.0 - fleet_weight) * personal + fleet_weight * fleet[None, :]


def newcomer_weights(
    hist: np.ndarray,  # [N + 1, L]: the fleet's agents first, the newcomer last
    mean: Sequence[np.ndarray] | np.ndarray,  # (N + 1) x [L, D]
    var: Sequence[np.ndarray] | np.ndarray,
    tau: float,
) -> np.ndarray:
    """Weights [N] over the fleet's agents for the last row's agent, from the data distance alone.

    The newcomer is left out of its own softmax: it has no adapter yet, so all the weight goes to
    the agents whose data looks most like its own.
    """
    return newcomers_weights(hist, mean, var, tau, members=len(hist) - 1)[0]


def newcomers_weights(
    hist: np.ndarray,  # [N + M, L]: the N fleet agents first, then the M newcomers
    mean: Sequence[np.ndarray] | np.ndarray,  # (N + M) x [L, D]
    var: Sequence[np.ndarray] | np.ndarray,
    tau: float,
    members: int,
    compact: bool = False,
) -> np.ndarray:
    """Weights [M, N]: row m over the N fleet agents for newcomer m (`newcomer_weights`, for M at
    once: the statistics are held once, the distances are an M x N block)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 2 or not 1 <= members < hist.shape[0]:
        raise ValueError("need the statistics of at least one fleet agent and one newcomer")
    n = hist.shape[0]
    inp = PairwiseInputs(hist, mean, var, np.zeros((n, 1)), compact=compact)
    d = data_distance_block(inp, slice(members, n), slice(0, members))
    return softmax_rows(-d / tau)
