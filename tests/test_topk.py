"""ce-lora over the k nearest agents against the all-pairs computation and a brute-force top-k."""

from __future__ import annotations

import numpy as np
import pytest

from fedclip.coordinator import strategies
from fedclip.coordinator.strategies import StrategyOptions, Update
from fedclip.coordinator.strategies.aggregate import (
    PairwiseInputs,
    data_distance_block,
    param_distance_block,
    personalized_average,
)
from fedclip.coordinator.strategies.neighbours import personalized_topk
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR


def _fleet(n, labels=4, dim=6, p=12, groups=0, seed=0):
    """Statistics and updates of n agents; with groups > 0 they come from that many clusters."""
    rng = np.random.default_rng(seed)
    g = max(groups, 1)
    centre_mu = rng.standard_normal((g, labels, dim))
    centre_dc = rng.standard_normal((g, p))
    centre_h = rng.uniform(0, 1, (g, labels)) ** 3
    who = rng.integers(0, g, n)
    spread = 0.3 if groups else 1.0
    mu = (centre_mu[who] + spread * rng.standard_normal((n, labels, dim))).astype(np.float32)
    var = rng.uniform(0.5, 2.0, (n, labels, dim)).astype(np.float32)
    hist = np.round(50 * (centre_h[who] + 0.1 * rng.uniform(0, 1, (n, labels)))).astype(np.float64)
    base = rng.standard_normal(p).astype(np.float32)
    deltas = (centre_dc[who] + spread * rng.standard_normal((n, p))).astype(np.float32)
    vals = base + deltas
    return hist, mu, var, deltas, vals


def _brute_topk(inp, vals, lam, tau, k):
    """All N x N distances, each row's k smallest (ties to the lower index), softmax, weighted sum."""
    d = np.zeros((inp.n, inp.n))
    if lam > 0:
        d += lam * data_distance_block(inp, slice(None))
    if lam < 1:
        d += (1 - lam) * param_distance_block(inp, slice(None))
    np.fill_diagonal(d, 0.0)
    out = np.empty(vals.shape)
    for i in range(inp.n):
        nearest = np.argsort(d[i], kind="stable")[:k]
        w = np.exp(-d[i, nearest] / tau)
        out[i] = (w / w.sum()) @ vals[nearest].astype(np.float64)
    return out


# (n, lam, tau, labels, dim, seed): a seeded table of shapes and mixing weights.
CASES = [
    (1, 0.5, 0.1, 3, 4, 0),
    (2, 0.5, 0.1, 3, 4, 1),
    (9, 0.5, 0.1, 4, 6, 2),
    (17, 1.0, 0.05, 2, 8, 3),
    (17, 0.0, 1.0, 5, 3, 4),
    (31, 0.3, 10.0, 4, 6, 5),
    (40, 0.7, 0.02, 6, 5, 6),
]


@pytest.mark.parametrize("n,lam,tau,labels,dim,seed", CASES)
def test_k_at_least_n_equals_all_pairs(n, lam, tau, labels, dim, seed):
    hist, mu, var, deltas, vals = _fleet(n, labels, dim, seed=seed)
    inp = PairwiseInputs(hist, mu, var, deltas)
    expect = personalized_average(inp, vals, lam, tau)
    for k in (n, n + 5):
        got = personalized_topk(inp, vals, lam, tau, k)
        np.testing.assert_allclose(got, expect, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("n,lam,tau,labels,dim,seed", CASES)
def test_k_below_n_equals_brute_force_top_k(n, lam, tau, labels, dim, seed):
    hist, mu, var, deltas, vals = _fleet(n, labels, dim, seed=seed)
    inp = PairwiseInputs(hist, mu, var, deltas)
    for k in sorted({1, 2, max(1, n // 3), max(1, n - 1)}):
        # probe every cluster: the candidate search is exhaustive, so only the top-k step is tested
        got = personalized_topk(inp, vals, lam, tau, k, block_rows=7, probe=10**9)
        np.testing.assert_allclose(got, _brute_topk(inp, vals, lam, tau, k), rtol=2e-5, atol=2e-6)
    if n > 1:  # k = 1: everyone keeps its own C (d_ii = 0 is the smallest)
        np.testing.assert_allclose(personalized_topk(inp, vals, lam, tau, 1), vals, rtol=1e-6)


def test_clustered_search_finds_the_true_neighbours():
    # 2,000 agents, k = 8: 62 clusters of the sketch, 4 probed each: not every pair is a candidate.
    n, k, lam, tau = 2000, 8, 0.5, 0.1
    hist, mu, var, deltas, vals = _fleet(n, labels=5, dim=16, p=24, groups=40, seed=11)
    inp = PairwiseInputs(hist, mu, var, deltas)
    blocks = []
    got = personalized_topk(inp, vals, lam, tau, k, on_block=blocks.append)
    assert sum(blocks) == n
    expect = _brute_topk(inp, vals, lam, tau, k)
    same = np.isclose(got, expect, rtol=1e-4, atol=1e-5).all(axis=1)
    assert same.mean() >= 0.95, f"only {same.mean():.3f} of the agents got their exact top-k result"


def test_compact_inputs_stay_close():
    hist, mu, var, deltas, vals = _fleet(50, 4, 32, p=64, seed=12)
    full = personalized_topk(PairwiseInputs(hist, mu, var, deltas), vals, 0.5, 0.1, 10)
    half = personalized_topk(PairwiseInputs(hist, mu, var, deltas, compact=True), vals, 0.5, 0.1, 10)
    np.testing.assert_allclose(half, full, rtol=0, atol=2e-3 * np.abs(vals).max())


def _updates(n, seed):
    hist, mu, var, deltas, vals = _fleet(n, 3, 4, p=8, seed=seed)
    base = {"c": (vals[0] - deltas[0]).reshape(2, 4)}
    return [
        Update(
            f"a{i}",
            int(hist[i].sum()),
            {"c": vals[i].reshape(2, 4)},
            base,
            {STAT_LABEL_HIST: hist[i].astype(np.float32), STAT_MEAN: mu[i], STAT_VAR: var[i]},
        )
        for i in range(n)
    ]


def test_strategy_option_neighbours():
    ups = _updates(12, seed=13)
    every = strategies.create("ce-lora", StrategyOptions(neighbours=0)).aggregate(1, ups)
    wide = strategies.create("ce-lora", StrategyOptions(neighbours=12)).aggregate(1, ups)
    near = strategies.create("ce-lora", StrategyOptions(neighbours=3)).aggregate(1, ups)
    for u in ups:
        np.testing.assert_allclose(wide.per_agent[u.agent]["c"], every.per_agent[u.agent]["c"], rtol=1e-6)
    assert any(
        not np.allclose(near.per_agent[u.agent]["c"], every.per_agent[u.agent]["c"], rtol=1e-3) for u in ups
    )
    with pytest.raises(ConfigError, match="neighbours"):
        StrategyOptions(neighbours=-1)


def test_mix_gathers_at_most_its_budget_per_block_and_gives_the_same_result(monkeypatch):
    """At LoRA's widths 64 rows x k neighbours x P floats was gigabytes in one gather; the block now
    shrinks to GATHER_BYTES (one row at the least) and every row's sum is what it was."""
    import tracemalloc

    from fedclip.coordinator.strategies import neighbours

    rng = np.random.default_rng(0)
    n, k, p = 48, 8, 4000
    values = rng.standard_normal((n, p)).astype(np.float32)
    idx = rng.integers(0, n, (n, k))
    w = rng.uniform(0, 1, (n, k))

    def peak_of_mix() -> tuple[np.ndarray, int]:
        tracemalloc.start()
        try:
            out = neighbours.mix(values, idx, w)
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole, whole_peak = peak_of_mix()  # the default budget fits all 48 rows in one block
    one_row = k * p * values.itemsize
    monkeypatch.setattr(neighbours, "GATHER_BYTES", 2 * one_row)
    blocked, blocked_peak = peak_of_mix()
    assert np.array_equal(blocked, whole)
    out_bytes = n * p * 4
    assert whole_peak > out_bytes + n * one_row  # the old way: every row's gather at once
    assert blocked_peak < out_bytes + 6 * one_row  # two rows' gather (and einsum's own) at a time
    monkeypatch.setattr(neighbours, "GATHER_BYTES", 1)  # under one row: still one row per block
    assert np.array_equal(neighbours.mix(values, idx, w), whole)
