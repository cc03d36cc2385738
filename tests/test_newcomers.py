"""Newcomers under fleet-core and fleet-lora (docs/aggregation.md, "Newcomers"): a statistics-only
first task, and the adapter the round gives it from the agents whose data looks like its own."""

from __future__ import annotations

import numpy as np
import pytest
from test_fleet_core_strategy import LORA_SHAPES, _direct_d_data, _flat, _lora_updates, _stats

from fedclip.coordinator.strategies import StrategyOptions, Update
from fedclip.coordinator.strategies.base import AdapterRef
from fedclip.coordinator.strategies.ce_lora import CeLora
from fedclip.coordinator.strategies.fedavg import FedAvg
from fedclip.coordinator.strategies.fleet_core import FleetCore
from fedclip.coordinator.strategies.fleet_lora import FleetLora
from fedclip.coordinator.strategies.fleet_mix import newcomer_weights, newcomers_weights
from fedclip.sdk.errors import WireError
from fedclip.sdk.messages import Hyperparameters

NAMES = sorted(LORA_SHAPES)


def _fresh(u: Update) -> Update:
    """`u`'s agent and statistics, sent back unchanged from its start (a statistics-only task)."""
    return Update(u.agent, u.num_samples, dict(u.base), u.base, u.stats)


def _round(members: int, newcomers: int, seed: int = 0) -> tuple[list[Update], list[Update]]:
    ups = _lora_updates(_stats(np.random.default_rng(seed), members + newcomers), seed=seed + 1)
    return ups[:members], [_fresh(u) for u in ups[members:]]


def test_newcomers_weights_are_the_data_distance_softmax_over_the_members():
    hist, mean, var = _stats(np.random.default_rng(3), 7)
    tau, n = 0.2, 5
    w = newcomers_weights(hist, mean, var, tau, members=n)
    d = _direct_d_data(hist, list(mean), list(var))[n:, :n]  # statistics of all 7 rows set the scale
    expect = np.exp(-d / tau)
    np.testing.assert_allclose(w, expect / expect.sum(1, keepdims=True), rtol=1e-5)
    assert w.shape == (2, 5)
    np.testing.assert_allclose(newcomer_weights(hist[:6], mean[:6], var[:6], tau), newcomers_weights(
        hist[:6], mean[:6], var[:6], tau, members=5
    )[0])  # fmt: skip
    for bad in (0, 7):
        with pytest.raises(ValueError, match="at least one"):
            newcomers_weights(hist, mean, var, tau, members=bad)


@pytest.mark.parametrize("g", [0.0, 0.25])
def test_a_newcomer_gets_the_members_new_adapters_weighted_by_its_statistics(g):
    members, newcomers = _round(5, 2)
    opts = StrategyOptions(lam=1.0, tau=0.1)
    res = FleetLora(opts, fleet_weight=g).aggregate(1, [*members, *newcomers])
    alone = FleetLora(opts, fleet_weight=g).aggregate(1, members)
    # The members' adapters and the global are what they would be without the newcomers.
    np.testing.assert_array_equal(_flat(res.global_tensors, NAMES), _flat(alone.global_tensors, NAMES))
    for u in members:
        np.testing.assert_array_equal(
            _flat(res.per_agent[u.agent], NAMES), _flat(alone.per_agent[u.agent], NAMES)
        )
    # Each newcomer: sum_j v_j x_j' over the members' new adapters, v from its statistics.
    both = [*members, *newcomers]
    hist = np.stack([np.asarray(u.stats["stats/label_hist"], np.float64) for u in both])
    d = _direct_d_data(hist, [u.stats["stats/mean"] for u in both], [u.stats["stats/var"] for u in both])
    v = np.exp(-d[5:, :5] / 0.1)
    v /= v.sum(1, keepdims=True)
    x = np.stack([_flat(alone.per_agent[u.agent], NAMES) for u in members]).astype(np.float64)
    for m, u in enumerate(newcomers):
        got = res.per_agent[u.agent]
        np.testing.assert_allclose(_flat(got, NAMES), v[m] @ x, rtol=1e-4, atol=1e-6)
        assert all(got[k].shape == s and got[k].dtype == np.float32 for k, s in LORA_SHAPES.items())
    assert res.metrics["newcomers"] == 2.0


def test_a_newcomer_goes_to_the_members_with_its_data():
    members, newcomers = _round(4, 1, seed=5)
    twin = members[2]
    newcomers = [Update("new", 10, dict(twin.base), twin.base, dict(twin.stats))]
    res = FleetLora(StrategyOptions(lam=1.0, tau=0.01)).aggregate(1, [*members, *newcomers])
    got, mate = _flat(res.per_agent["new"], NAMES), _flat(res.per_agent[twin.agent], NAMES)
    others = [_flat(res.per_agent[u.agent], NAMES) for u in members if u is not twin]
    assert np.linalg.norm(got - mate) < 0.05 * min(np.linalg.norm(got - o) for o in others)


def test_without_members_or_without_newcomers_every_update_counts_as_before():
    members, newcomers = _round(3, 3, seed=7)
    opts = StrategyOptions(lam=1.0, tau=0.1)
    only_new = FleetLora(opts).aggregate(1, newcomers)  # a fleet's first round: nothing to mix from
    assert "newcomers" not in only_new.metrics and set(only_new.per_agent) == {u.agent for u in newcomers}
    for u in newcomers:  # everyone's start was the same global: the mix of unchanged adapters is it
        np.testing.assert_allclose(_flat(only_new.per_agent[u.agent], NAMES), _flat(u.base, NAMES), atol=1e-7)
    assert "newcomers" not in FleetLora(opts).aggregate(1, members).metrics


def test_without_the_data_distance_no_one_is_a_newcomer():
    """lam = 0 sends no statistics: a newcomer cannot be placed, so it is an ordinary update."""
    members, newcomers = _round(3, 1, seed=9)
    s = FleetLora(StrategyOptions(lam=0.0))
    assert not s.mixes_newcomers
    res = s.aggregate(1, [*members, *newcomers])
    assert "newcomers" not in res.metrics and len(res.per_agent) == 4


class _Book:
    def __init__(self, personal: dict[str, str]):
        self.personal = personal

    def global_adapter(self) -> AdapterRef:
        return AdapterRef("g-r3", {})

    def agent_adapter(self, agent: str) -> AdapterRef | None:
        v = self.personal.get(agent)
        return AdapterRef(v, {}) if v else None


def test_a_newcomer_is_asked_for_statistics_only_while_members_train():
    book = _Book({"a": "a-a-r3", "b": "a-b-r3"})
    plans = FleetLora(StrategyOptions(lam=1.0)).configure_round(4, ["a", "b", "new"], book)
    assert [(p.agent, p.start.version, p.train) for p in plans.values()] == [
        ("a", "a-a-r3", True), ("b", "a-b-r3", True), ("new", "g-r3", False)
    ]  # fmt: skip
    assert plans["new"].stats == ("histogram", "gaussian")
    # Everyone trains: no member in the round (a fleet's first), no statistics, other strategies.
    assert all(p.train for p in FleetCore().configure_round(4, ["new", "newer"], book).values())
    assert all(
        p.train for p in FleetLora(StrategyOptions(lam=0.0)).configure_round(4, ["a", "new"], book).values()
    )
    for other in (CeLora(), FedAvg()):
        assert all(p.train for p in other.configure_round(4, ["a", "new"], book).values())


def test_statistics_only_is_epochs_zero_on_the_wire():
    hp = Hyperparameters(epochs=0)
    assert Hyperparameters.parse(hp.to_body(), "task") == hp
    for hostile in (-1, 10**30, True, 0.0, float("nan"), "0", None):  # the bound, then wrong types
        with pytest.raises(WireError, match=r"'epochs' must be an integer in \[0, "):
            Hyperparameters.parse({**hp.to_body(), "epochs": hostile}, "task")
