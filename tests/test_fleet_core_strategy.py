"""fleet-core and fleet-lora: their math against direct numpy computations (docs/aggregation.md)."""

from __future__ import annotations

import numpy as np
import pytest
from test_strategies import SHAPES, _direct_ce_lora, _updates

from fedclip.coordinator import strategies
from fedclip.coordinator.strategies import StrategyOptions, Update
from fedclip.coordinator.strategies.fleet_core import FleetCore
from fedclip.coordinator.strategies.fleet_lora import FleetLora
from fedclip.coordinator.strategies.fleet_mix import blend_with_fleet, newcomer_weights
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR


def _flat(tensors, names):
    return np.concatenate([np.ravel(tensors[k]) for k in names])


@pytest.mark.parametrize("g", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("lam,tau", [(1.0, 0.1), (0.5, 0.05)])
def test_fleet_core_is_ce_lora_blended_with_the_sample_weighted_mean(g, lam, tau):
    ups = _updates(7, seed=3)
    res = FleetCore(StrategyOptions(lam=lam, tau=tau), fleet_weight=g).aggregate(1, ups)
    neigh, names = _direct_ce_lora(ups, lam, tau)
    w = np.array([u.num_samples for u in ups], dtype=np.float64)
    fleet = (w[:, None] * np.stack([_flat(u.tensors, names) for u in ups])).sum(0) / w.sum()
    for i, u in enumerate(ups):
        got = _flat(res.per_agent[u.agent], names)
        np.testing.assert_allclose(got, (1 - g) * neigh[i] + g * fleet, rtol=1e-5, atol=1e-6)
        assert all(res.per_agent[u.agent][k].shape == s for k, s in SHAPES.items())
    np.testing.assert_allclose(_flat(res.global_tensors, names), fleet, rtol=1e-5, atol=1e-6)


def test_fleet_core_is_registered_and_personalized():
    s = strategies.create("fleet-core")
    assert s.personalized and s.fleet_weight == 0.2
    assert set(s.stats) == {"histogram", "gaussian"}
    with pytest.raises(ValueError, match="fleet_weight"):
        FleetCore(fleet_weight=1.5)


def test_blend_with_fleet_direct_and_checks():
    rng = np.random.default_rng(0)
    p, f = rng.standard_normal((4, 6)), rng.standard_normal(6)
    np.testing.assert_allclose(blend_with_fleet(p, f, 0.25), 0.75 * p + 0.25 * f)
    with pytest.raises(ValueError, match="shapes"):
        blend_with_fleet(p, f[:5], 0.5)
    with pytest.raises(ValueError, match="fleet_weight"):
        blend_with_fleet(p, f, -0.1)


def _stats(rng, n, labels=4, dim=3):
    hist = rng.integers(1, 20, (n, labels)).astype(np.float64)
    mean = rng.standard_normal((n, labels, dim))
    var = rng.uniform(0.2, 1.5, (n, labels, dim))
    return hist, mean, var


def test_newcomer_weights_match_the_direct_data_distance():
    rng = np.random.default_rng(1)
    hist, mean, var = _stats(rng, 6)
    tau = 0.2
    w = newcomer_weights(hist, mean, var, tau)
    # Direct: d_data of docs/aggregation.md between the last agent and each of the others.
    p = hist / hist.sum(1, keepdims=True)
    scale = 2 * (hist * var.mean(2)).sum() / hist.sum()
    n, dim = len(hist), mean.shape[2]
    d = []
    for j in range(n - 1):
        a = np.sqrt(p[-1] * p[j])
        w2 = ((mean[-1] - mean[j]) ** 2 + (np.sqrt(var[-1]) - np.sqrt(var[j])) ** 2).sum(1)
        e = (a * (1 - np.exp(-w2 / (dim * scale)))).sum() / a.sum()
        d.append(((1 - a.sum()) + e) / 2)
    expect = np.exp(-np.array(d) / tau)
    np.testing.assert_allclose(w, expect / expect.sum(), rtol=1e-5)


def test_newcomer_goes_to_the_agents_with_its_data():
    rng = np.random.default_rng(2)
    hist, mean, var = _stats(rng, 5)
    hist[-1], mean[-1], var[-1] = hist[2], mean[2] + 0.01, var[2]  # the newcomer looks like agent 2
    w = newcomer_weights(hist, mean, var, 0.05)
    assert w.argmax() == 2 and w[2] > 0.9 and abs(w.sum() - 1) < 1e-9
    with pytest.raises(ValueError, match="at least one"):
        newcomer_weights(hist[:1], mean[:1], var[:1], 0.1)
    with pytest.raises(ValueError, match="tau"):
        newcomer_weights(hist, mean, var, 0.0)


def test_fleet_core_needs_statistics_like_ce_lora():
    ups = _updates(3, stats=False)
    with pytest.raises(KeyError):
        FleetCore().aggregate(1, ups)
    ok = FleetCore(StrategyOptions(lam=0.0)).aggregate(1, ups)  # parameter distance only
    assert set(ok.per_agent) == {u.agent for u in ups}


# ---- fleet-lora: the same mixing over a plain LoRA adapter's A and B ------------------------------
LORA_SHAPES = {"q.lora_A": (2, 5), "q.lora_B": (5, 2), "v.lora_A": (2, 5), "v.lora_B": (5, 2)}


def _lora_updates(stats, seed=0):
    """One LoRA update (A and B of two modules) per row of `stats` (hist, mean, var)."""
    rng = np.random.default_rng(seed)
    hist, mean, var = stats
    base = {k: np.zeros(s, np.float32) for k, s in LORA_SHAPES.items()}
    return [
        Update(
            f"a{i}",
            int(rng.integers(1, 50)),
            {k: rng.standard_normal(s).astype(np.float32) for k, s in LORA_SHAPES.items()},
            base,
            {
                STAT_LABEL_HIST: hist[i].astype(np.float32),
                STAT_MEAN: mean[i].astype(np.float32),
                STAT_VAR: var[i].astype(np.float32),
            },  # fmt: skip
        )
        for i in range(len(hist))
    ]


def test_fleet_lora_is_registered_with_no_fleet_share_by_default():
    s = strategies.create("fleet-lora", StrategyOptions(lam=1.0))
    assert isinstance(s, FleetLora) and s.personalized and s.fleet_weight == 0.0
    assert set(s.stats) == {"histogram", "gaussian"}
    with pytest.raises(ValueError, match="fleet_weight"):
        FleetLora(fleet_weight=-0.5)


def _direct_d_data(hist, mean, var):
    """[N, N] d_data of docs/aggregation.md, pair by pair (d_ii = 0)."""
    p = hist / hist.sum(1, keepdims=True)
    var = np.stack(var)
    scale = 2 * (hist * var.mean(2)).sum() / hist.sum()
    n, dim = len(hist), mean[0].shape[1]
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                a = np.sqrt(p[i] * p[j])
                w2 = ((mean[i] - mean[j]) ** 2 + (np.sqrt(var[i]) - np.sqrt(var[j])) ** 2).sum(1)
                e = (a * (1 - np.exp(-w2 / (dim * scale)))).sum() / a.sum()
                d[i, j] = ((1 - a.sum()) + e) / 2
    return d


@pytest.mark.parametrize("g", [0.0, 0.25])
def test_fleet_lora_mixes_every_factor_by_the_data_distance(g):
    rng = np.random.default_rng(4)
    ups = _lora_updates(_stats(rng, 6), seed=5)
    tau = 0.1
    res = FleetLora(StrategyOptions(lam=1.0, tau=tau), fleet_weight=g).aggregate(1, ups)
    names = sorted(LORA_SHAPES)
    x = np.stack([_flat(u.tensors, names) for u in ups]).astype(np.float64)
    hist = np.stack([u.stats[STAT_LABEL_HIST] for u in ups]).astype(np.float64)
    d = _direct_d_data(hist, [u.stats[STAT_MEAN] for u in ups], [u.stats[STAT_VAR] for u in ups])
    w = np.exp(-d / tau)
    w /= w.sum(1, keepdims=True)
    n_s = np.array([u.num_samples for u in ups], dtype=np.float64)
    fleet = (n_s[:, None] * x).sum(0) / n_s.sum()
    for i, u in enumerate(ups):
        expect = (1 - g) * (w[i] @ x) + g * fleet
        np.testing.assert_allclose(_flat(res.per_agent[u.agent], names), expect, rtol=1e-4, atol=1e-5)
        assert all(res.per_agent[u.agent][k].shape == sh for k, sh in LORA_SHAPES.items())
    np.testing.assert_allclose(_flat(res.global_tensors, names), fleet, rtol=1e-5, atol=1e-6)


def test_fleet_lora_pools_each_camera_group_and_keeps_groups_apart():
    # Two groups of three agents: within a group the same statistics (camera and label mix), between
    # groups disjoint labels. Each agent's adapter becomes its own group's plain mean.
    rng = np.random.default_rng(6)
    hist, mean, var = _stats(rng, 2)
    hist[0, 2:] = 0
    hist[1, :2] = 0
    group = [0, 0, 0, 1, 1, 1]
    stats = (hist[group], mean[group], var[group])
    ups = _lora_updates(stats, seed=7)
    res = FleetLora(StrategyOptions(lam=1.0, tau=0.01)).aggregate(1, ups)
    names = sorted(LORA_SHAPES)
    for i, u in enumerate(ups):
        mates = [j for j in range(6) if group[j] == group[i]]
        expect = np.mean([_flat(ups[j].tensors, names) for j in mates], axis=0)
        np.testing.assert_allclose(_flat(res.per_agent[u.agent], names), expect, rtol=1e-4, atol=1e-5)
