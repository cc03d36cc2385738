"""Strategies and their math, each checked against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pytest

from fedclip.coordinator import strategies
from fedclip.coordinator.strategies import StrategyOptions, Update
from fedclip.coordinator.strategies.aggregate import (
    PairwiseInputs,
    clip_delta,
    delta_norm,
    personalized_average,
    trimmed_mean_array,
    weighted_average,
)
from fedclip.coordinator.strategies.base import AdapterRef
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR

SHAPES = {"a.lora_A": (2, 5), "a.lora_B": (5, 2), "b.lora_C": (2, 2)}


def _tensors(rng, scale=1.0):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _updates(n, seed=0, samples=None, stats=True, labels=3, dim=4):
    rng = np.random.default_rng(seed)
    base = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    out = []
    for i in range(n):
        st = {}
        if stats:
            st = {
                STAT_LABEL_HIST: rng.integers(0, 20, labels).astype(np.float32),
                STAT_MEAN: rng.standard_normal((labels, dim)).astype(np.float32),
                STAT_VAR: rng.uniform(0.1, 2.0, (labels, dim)).astype(np.float32),
            }
        ns = int(samples[i]) if samples is not None else int(rng.integers(1, 100))
        out.append(Update(f"a{i}", ns, _tensors(rng), base, st, {"loss": 1.0}))
    return out


def test_registry_has_builtins_and_refuses_duplicates():
    assert {"fedavg", "trimmed-mean", "ce-lora"} <= set(strategies.names())
    with pytest.raises(ValueError, match="already registered"):
        strategies.register("fedavg", strategies.get("fedavg"))
    with pytest.raises(ConfigError, match="unknown strategy"):
        strategies.get("nope")


@pytest.mark.parametrize("name", strategies.names())
def test_every_registered_strategy_aggregates_one_round(name):
    ups = _updates(4)
    res = strategies.create(name).aggregate(1, ups)
    assert set(res.global_tensors) == set(SHAPES)
    for k, s in SHAPES.items():
        assert res.global_tensors[k].shape == s
        assert np.all(np.isfinite(res.global_tensors[k]))


def test_fedavg_equals_np_average_with_sample_weights():
    ups = _updates(7, samples=[1, 5, 9, 0, 3, 100, 2])
    res = strategies.create("fedavg").aggregate(1, ups)
    w = [u.num_samples for u in ups]
    for k in SHAPES:
        expect = np.average(np.stack([u.tensors[k] for u in ups]), axis=0, weights=w)
        np.testing.assert_allclose(res.global_tensors[k], expect, rtol=1e-5, atol=1e-6)


def test_fedavg_zero_samples_falls_back_to_equal_weights():
    ups = _updates(3, samples=[0, 0, 0])
    res = strategies.create("fedavg").aggregate(1, ups)
    for k in SHAPES:
        np.testing.assert_allclose(
            res.global_tensors[k], np.mean([u.tensors[k] for u in ups], axis=0), rtol=1e-5
        )


def test_weighted_average_single_and_identical():
    rng = np.random.default_rng(1)
    t = _tensors(rng)
    one = weighted_average([t], [3])
    for k in t:
        np.testing.assert_allclose(one[k], t[k], rtol=1e-6)
    same = weighted_average([t, t, t], [1, 2, 3])
    for k in t:
        np.testing.assert_allclose(same[k], t[k], rtol=1e-6)


def test_trimmed_mean_drops_outliers():
    rng = np.random.default_rng(2)
    good = [{"x": rng.normal(1.0, 0.01, (3, 3)).astype(np.float32)} for _ in range(8)]
    bad = [{"x": np.full((3, 3), 1e6, np.float32)}, {"x": np.full((3, 3), -1e6, np.float32)}]
    ups = [Update(f"a{i}", 10, t, {"x": np.zeros((3, 3), np.float32)}) for i, t in enumerate(good + bad)]
    res = strategies.create("trimmed-mean", StrategyOptions(trim_fraction=0.1)).aggregate(1, ups)
    np.testing.assert_allclose(res.global_tensors["x"], 1.0, atol=0.05)
    plain = strategies.create("fedavg").aggregate(1, ups).global_tensors["x"]
    assert not np.allclose(plain, res.global_tensors["x"], atol=0.05)  # fedavg does not resist them


def test_trimmed_mean_array_matches_sort_definition():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((11, 4, 5))
    k = int(np.floor(0.2 * 11))
    expect = np.sort(x, axis=0)[k : 11 - k].mean(axis=0)
    np.testing.assert_allclose(trimmed_mean_array(x, 0.2), expect, rtol=1e-12)
    np.testing.assert_allclose(trimmed_mean_array(x, 0.0), x.mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError):
        trimmed_mean_array(x, 0.5)


def test_clip_delta_bounds_the_norm():
    rng = np.random.default_rng(4)
    base, t = _tensors(rng), _tensors(rng, scale=10)
    clipped = clip_delta(t, base, 1.0)
    assert delta_norm(clipped, base) == pytest.approx(1.0, rel=1e-4)
    small = clip_delta(base, base, 1.0)
    assert delta_norm(small, base) == 0.0


# ---- ce-lora against a direct N x N computation --------------------------------------------------
def _direct_ce_lora(ups, lam, tau):
    """The formula of docs/aggregation.md written out plainly, N x N x L x D at once."""
    names = sorted(ups[0].tensors)
    vals = np.stack([np.concatenate([np.ravel(u.tensors[k]) for k in names]) for u in ups]).astype(np.float64)
    base = np.stack([np.concatenate([np.ravel(u.base[k]) for k in names]) for u in ups]).astype(np.float64)
    delta = vals - base
    hist = np.stack([u.stats[STAT_LABEL_HIST] for u in ups]).astype(np.float64)
    mu = np.stack([u.stats[STAT_MEAN] for u in ups]).astype(np.float64)
    var = np.stack([u.stats[STAT_VAR] for u in ups]).astype(np.float64)
    n, nl, dim = mu.shape
    p = hist / hist.sum(axis=1, keepdims=True)
    scale = 2 * (hist * var.mean(axis=2)).sum() / hist.sum()
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            a = np.sqrt(p[i] * p[j])
            h = 1 - a.sum()
            w2 = ((mu[i] - mu[j]) ** 2 + (np.sqrt(var[i]) - np.sqrt(var[j])) ** 2).sum(axis=1)
            g = 1 - np.exp(-w2 / (dim * scale))
            e = (a * g).sum() / a.sum() if a.sum() > 1e-12 else 1.0
            d_data = (h + e) / 2
            ni, nj = np.linalg.norm(delta[i]), np.linalg.norm(delta[j])
            cos = delta[i] @ delta[j] / (ni * nj) if ni > 0 and nj > 0 else 0.0
            d_param = (1 - cos) / 2
            d[i, j] = lam * d_data + (1 - lam) * d_param
    w = np.exp(-d / tau)
    w /= w.sum(axis=1, keepdims=True)
    return w @ vals, names


@pytest.mark.parametrize("lam,tau", [(0.5, 0.1), (1.0, 0.05), (0.0, 1.0), (0.3, 10.0)])
def test_ce_lora_matches_direct_formula(lam, tau):
    ups = _updates(9, seed=5)
    res = strategies.create("ce-lora", StrategyOptions(lam=lam, tau=tau)).aggregate(1, ups)
    expect, names = _direct_ce_lora(ups, lam, tau)
    for i, u in enumerate(ups):
        got = np.concatenate([np.ravel(res.per_agent[u.agent][k]) for k in names])
        np.testing.assert_allclose(got, expect[i], rtol=1e-5, atol=1e-6)
    # the global C is the sample-weighted mean
    w = [u.num_samples for u in ups]
    for k in SHAPES:
        np.testing.assert_allclose(
            res.global_tensors[k],
            np.average([u.tensors[k] for u in ups], axis=0, weights=w),
            rtol=1e-5,
            atol=1e-6,
        )


def test_blockwise_equals_single_block():
    ups = _updates(23, seed=6, labels=4, dim=6)
    names = sorted(SHAPES)
    vals = np.stack([np.concatenate([np.ravel(u.tensors[k]) for k in names]) for u in ups]).astype(np.float64)
    hist = np.stack([u.stats[STAT_LABEL_HIST] for u in ups])
    mu = np.stack([u.stats[STAT_MEAN] for u in ups])
    var = np.stack([u.stats[STAT_VAR] for u in ups])
    inp = PairwiseInputs(hist, mu, var, vals)
    blocks = []
    small = personalized_average(inp, vals, 0.4, 0.2, block_elements=1, on_block=blocks.append)
    whole = personalized_average(inp, vals, 0.4, 0.2, block_elements=10**9)
    assert len(blocks) == 23  # one row at a time
    # the distance matmuls run in float32, and BLAS rounds differently for different block shapes
    np.testing.assert_allclose(small, whole, rtol=1e-6, atol=1e-7)


def test_ce_lora_edge_cases():
    # one agent: its personalized C is its own
    ups = _updates(1, seed=7)
    res = strategies.create("ce-lora").aggregate(1, ups)
    for k in SHAPES:
        np.testing.assert_allclose(res.per_agent["a0"][k], ups[0].tensors[k], rtol=1e-6)
    # identical updates and statistics: everyone gets the same C back
    same = [Update(f"a{i}", 5, ups[0].tensors, ups[0].base, ups[0].stats) for i in range(4)]
    res = strategies.create("ce-lora").aggregate(1, same)
    for a in res.per_agent.values():
        for k in SHAPES:
            np.testing.assert_allclose(a[k], ups[0].tensors[k], rtol=1e-5)
    # zero samples everywhere and zero updates: finite, equal weights
    zero = _updates(3, seed=8, samples=[0, 0, 0])
    zero = [
        Update(u.agent, 0, u.base, u.base, {**u.stats, STAT_LABEL_HIST: np.zeros(3, np.float32)})
        for u in zero
    ]
    res = strategies.create("ce-lora").aggregate(1, zero)
    for a in res.per_agent.values():
        for k in SHAPES:
            assert np.all(np.isfinite(a[k]))


def test_ce_lora_prefers_similar_agents():
    rng = np.random.default_rng(9)
    base = {"c": np.eye(2, dtype=np.float32)}
    dirs = [np.array([[1, 0], [0, 0]]), np.array([[1, 0.1], [0, 0]]), np.array([[0, 0], [0, -1]])]
    hist = [np.array([10, 0], np.float32), np.array([9, 1], np.float32), np.array([0, 10], np.float32)]
    mus = [np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)) * 3]
    ups = [
        Update(
            f"a{i}",
            10,
            {"c": (base["c"] + dirs[i]).astype(np.float32)},
            base,
            {
                STAT_LABEL_HIST: hist[i],
                STAT_MEAN: mus[i].astype(np.float32),
                STAT_VAR: np.ones((2, 3), np.float32),
            },
        )
        for i in range(3)
    ]
    del rng
    res = strategies.create("ce-lora", StrategyOptions(lam=0.5, tau=0.05)).aggregate(1, ups)
    c0 = res.per_agent["a0"]["c"]
    # a0 and a1 are alike: a0's C stays near the mean of theirs, far from a2's
    assert np.abs(c0 - (ups[0].tensors["c"] + ups[1].tensors["c"]) / 2).max() < 0.05


def test_selection_is_seeded_and_bounded():
    s = strategies.create("fedavg", StrategyOptions(clients_per_round=3, seed=1))
    pool = [f"a{i}" for i in range(10)]
    assert s.select(4, pool) == s.select(4, list(reversed(pool)))
    assert len(s.select(4, pool)) == 3
    assert (
        strategies.create("fedavg", StrategyOptions(selection="all", clients_per_round=3)).select(4, pool)
        == pool
    )


def test_configure_round_uses_personal_adapter_for_ce_lora():
    g = AdapterRef("g1", {"c": np.eye(2, dtype=np.float32)})
    p = AdapterRef("p1", {"c": np.zeros((2, 2), np.float32)})

    class Book:
        def global_adapter(self):
            return g

        def agent_adapter(self, agent):
            return p if agent == "x" else None

    plans = strategies.create("ce-lora").configure_round(1, ["x", "y"], Book())
    assert plans["x"].start.version == "p1" and plans["y"].start.version == "g1"
    assert plans["x"].stats == ("histogram", "gaussian")
    plans = strategies.create("fedavg").configure_round(1, ["x"], Book())
    assert plans["x"].start.version == "g1" and plans["x"].stats == ()
