"""Which agents train in a round: K of the eligible ones, by fairness and per-group quotas.

The fleet index (`coordinator.fleet.Fleet`) says who is eligible (right bundle, online, heard from
recently enough, not suspended for missed tasks); this module picks among them:

- `all` (or K = 0, or K >= eligible): every eligible agent.
- `random`: K at random, seeded by (seed, round). Without groups this is the strategy's own
  `select`, unchanged, so a strategy that overrides it keeps doing so.
- `fair`: the K that took part least recently (the last round each had a task, or reported one in
  its status; never = first), ties broken at random with the (seed, round) generator. Over rounds of
  a steady fleet this is a round robin: selection counts never differ by more than one.

With `group_by`, K is first shared among the agents' selection groups, `proportional` to their
eligible agents (largest remainders) or `equal` (water-filling: a group with fewer agents than its
share gives the rest to the others), then filled in each group by the rule above.

Cost per round: O(n log n) in the eligible agents n (one sort), nothing per message.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.fleet import Fleet
from fedclip.coordinator.strategies.base import Strategy


def quotas(sizes: dict[str, int], k: int, rule: str, rng: np.random.Generator) -> dict[str, int]:
    """K shared among groups of the given sizes (k <= total); each share <= its group's size."""
    groups = sorted(g for g, n in sizes.items() if n > 0)
    total = sum(sizes[g] for g in groups)
    k = min(k, total)
    if rule == "proportional":
        exact = {g: k * sizes[g] / total for g in groups}
        share = {g: int(exact[g]) for g in groups}
        # largest remainders first; equal remainders in an order drawn for this round
        order = sorted(groups, key=lambda g: (-(exact[g] - share[g]), rng.random()))
        for g in order[: k - sum(share.values())]:
            share[g] += 1
        return share
    share = dict.fromkeys(groups, 0)
    left, open_ = k, list(groups)
    while left and open_:
        each = max(1, left // len(open_))
        for g in rng.permutation(open_).tolist():  # who gets the odd ones: drawn per round
            give = min(each, sizes[g] - share[g], left)
            share[g] += give
            left -= give
        open_ = [g for g in open_ if share[g] < sizes[g]]
    return share


def choose(
    ids: Sequence[str],
    last: Sequence[int],
    groups: Sequence[str] | None,
    turn: Sequence[int] | None = None,
    *,
    k: int,
    round_id: int,
    seed: int,
    mode: str,
    quota: str = "proportional",
) -> list[str]:
    """The selected ids, first choice first. `last[i]`: the last round `ids[i]` took part in (-1:
    never); `turn[i]`: its place in that round's order (so agents of one round queue up again in the
    order they were served: a round robin, not a fresh draw each time); `groups[i]`: its selection
    group (None: no groups)."""
    n = len(ids)
    if mode == "all" or k == 0 or k >= n:
        return sorted(ids)
    rng = np.random.default_rng([seed, round_id])
    tiebreak = rng.random(n)
    if mode == "fair":
        keys = (
            tiebreak,
            np.asarray(turn if turn is not None else np.zeros(n), np.int64),
            np.asarray(last, np.int64),
        )
        order = np.lexsort(keys)  # by last round, then turn, then the draw
    else:
        order = np.argsort(tiebreak)
    if groups is None:
        return [ids[i] for i in order[:k].tolist()]
    names = sorted(set(groups))  # (np.unique over strings is ten times slower at 100,000)
    code = {g: j for j, g in enumerate(names)}
    gidx = np.fromiter((code[g] for g in groups), dtype=np.int64, count=n)
    counts = np.bincount(gidx, minlength=len(names))
    share = quotas(dict(zip(names, counts.tolist(), strict=True)), k, quota, rng)
    # the round's order, grouped (stable: each group's agents stay best first)
    by_group = order[np.argsort(gidx[order], kind="stable")]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    picked = np.zeros(n, dtype=bool)
    for j, g in enumerate(names):
        picked[by_group[starts[j] : starts[j] + share.get(g, 0)]] = True
    return [ids[i] for i in order[picked[order]].tolist()]


class Selector:
    """Picks a round's agents from the fleet index by the coordinator's selection settings."""

    def __init__(self, cfg: CoordConfig, strategy: Strategy, fleet: Fleet):
        self.cfg, self.strategy, self.fleet = cfg, strategy, fleet

    def select(self, round_id: int, candidates: list[str]) -> list[str]:
        cfg = self.cfg
        if cfg.selection != "fair" and not cfg.group_by:
            return self.strategy.select(round_id, candidates)  # today's rule, and a strategy's own
        last, turn, groups = self.fleet.participation(candidates)
        return choose(
            candidates,
            last,
            groups if cfg.group_by else None,
            turn,
            k=cfg.clients_per_round,
            round_id=round_id,
            seed=cfg.seed,
            mode=cfg.selection,
            quota=cfg.group_quota,
        )
