"""Selection at scale: the fleet index (who is eligible, kept up to date message by message) and the
choice of K among them (fairness, seeded ties, per-group quotas). Pure logic: the round loop's use
of them runs in test_server_unit.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedclip.coordinator.fleet import AgentInfo, Fleet
from fedclip.coordinator.selection import choose, quotas

B = "b" * 64


def _info(
    agent: str, online: bool = True, bundle: str = B, groups: tuple[str, ...] = (), last_round: int = -1
):
    return AgentInfo(id=agent, online=online, groups=groups, bundle_id=bundle, last_round=last_round)


def test_all_or_k_at_least_n_selects_every_candidate():
    ids = ["c", "a", "b"]
    for mode, k in (("all", 2), ("fair", 0), ("random", 3), ("fair", 5)):
        assert sorted(choose(ids, [-1, -1, -1], None, k=k, round_id=1, seed=0, mode=mode)) == ["a", "b", "c"]


def test_fair_takes_the_least_recently_selected_and_breaks_ties_by_the_seeded_round():
    ids = [f"a{i}" for i in range(6)]
    last = [5, -1, 3, -1, 5, 2]
    got = choose(ids, last, None, k=3, round_id=7, seed=0, mode="fair")
    assert sorted(got[:2]) == ["a1", "a3"] and got[2] == "a5"  # never selected first, then round 2
    # a tie (two never-selected agents for one seat) is drawn with the (seed, round) generator
    picks = {
        tuple(choose(ids, last, None, k=1, round_id=r, seed=s, mode="fair")) for r in range(8) for s in (0, 1)
    }
    assert picks == {("a1",), ("a3",)}
    assert choose(ids, last, None, k=1, round_id=3, seed=1, mode="fair") == choose(
        ids, last, None, k=1, round_id=3, seed=1, mode="fair"
    )


def test_quotas_proportional_by_largest_remainder_and_equal_by_water_filling():
    rng = np.random.default_rng(0)
    assert quotas({"a": 60, "b": 30, "c": 10}, 10, "proportional", rng) == {"a": 6, "b": 3, "c": 1}
    assert quotas({"a": 50, "b": 50}, 3, "proportional", rng) in ({"a": 2, "b": 1}, {"a": 1, "b": 2})
    assert quotas({"a": 100, "b": 2, "c": 50}, 30, "equal", rng) == {"a": 14, "b": 2, "c": 14}
    assert quotas({"a": 1, "b": 1}, 5, "equal", rng) == {"a": 1, "b": 1}  # K above the fleet: all
    assert quotas({"a": 0, "b": 4}, 2, "equal", rng) == {"b": 2}


def test_groups_get_their_quota_and_the_fairest_agents_inside_each():
    ids = ["s1-a", "s1-b", "s1-c", "s1-d", "s2-a", "s2-b"]
    last = [4, -1, 2, 4, 3, -1]
    groups = ["s1", "s1", "s1", "s1", "s2", "s2"]
    got = choose(ids, last, groups, k=2, round_id=1, seed=0, mode="fair", quota="equal")
    assert sorted(got) == ["s1-b", "s2-b"]
    got = choose(ids, last, groups, k=3, round_id=1, seed=0, mode="fair", quota="proportional")
    assert sorted(got) == ["s1-b", "s1-c", "s2-b"]  # 4:2 of 3 = 2 and 1


# ---- the fleet index --------------------------------------------------------------------------
def test_eligible_is_online_on_the_bundle_and_a_forgotten_or_offline_agent_leaves():
    fleet = Fleet()
    fleet.on_status("a", _info("a"), now=0)
    fleet.on_status("b", _info("b", online=False), now=0)
    fleet.on_status("c", _info("c", bundle="f" * 64), now=0)
    assert fleet.eligible(B) == ["a"] and fleet.eligible_count(B) == 1 and fleet.online_count() == 2
    fleet.on_status("b", _info("b"), now=1)
    fleet.on_status("a", None)
    assert fleet.eligible(B) == ["b"] and fleet.online_count() == 2
    fleet.on_status("c", _info("c"), now=2)  # switched bundle
    assert fleet.eligible(B) == ["b", "c"] and fleet.eligible("f" * 64) == []


def test_an_agent_not_heard_from_within_max_status_age_waits_until_it_speaks():
    fleet = Fleet(max_status_age=10)
    for i, agent in enumerate("abc"):
        fleet.on_status(agent, _info(agent), now=float(i))
    assert fleet.eligible(B, now=10.5) == ["b", "c"]  # a was heard at 0
    fleet.heard("a", now=11)  # an update from it
    assert fleet.eligible(B, now=11.5) == ["a", "c"]  # b (heard at 1) is out now
    assert fleet.eligible_count(B, now=100) == 0


def test_an_agent_that_missed_max_missed_tasks_waits_until_it_is_heard_from():
    fleet = Fleet(max_missed=2)
    for agent in "ab":
        fleet.on_status(agent, _info(agent), now=0)
    fleet.tasked(1, ["a", "b"])
    fleet.round_closed(["a"])
    assert fleet.eligible(B) == ["a", "b"]  # one miss: still in
    fleet.tasked(2, ["a", "b"])
    fleet.round_closed(["a"])
    assert fleet.eligible(B) == ["b"]  # the straggler rests
    fleet.on_status("a", _info("a"), now=5)  # it reconnected (or finished and said so)
    assert fleet.eligible(B) == ["a", "b"]
    assert fleet.participation(["a", "b"]) == ([2, 2], [0, 1], ["", ""])


def test_participation_takes_the_status_last_round_and_the_group_by_prefix():
    fleet = Fleet(group_by="site-")
    fleet.on_status("a", _info("a", groups=("jetson", "site-3"), last_round=9), now=0)
    fleet.on_status("b", _info("b", groups=("jetson",)), now=0)
    fleet.tasked(4, ["a", "b"])
    assert fleet.participation(["a", "b"]) == ([9, 4], [0, 1], ["site-3", ""])
    fleet.tasked(5, ["c"])  # a resumed round, recorded before c's status arrives
    fleet.on_status("c", _info("c", groups=("site-1",)), now=1)
    assert fleet.participation(["c"]) == ([5], [0], ["site-1"])


# ---- properties ---------------------------------------------------------------------------------
_events = st.lists(
    st.tuples(
        st.sampled_from(["status", "offline", "forget", "other", "heard", "close", "tick"]),
        st.integers(0, 7),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_events, st.sampled_from([0.0, 5.0]), st.sampled_from([0, 1, 2]))
def test_the_index_agrees_with_a_scan_of_every_agent_after_any_sequence_of_events(events, age, missed):
    """The incremental index gives what a full scan of the rules gives, whatever happened."""
    fleet = Fleet(max_status_age=age, max_missed=missed)
    now, rnd = 0.0, 0
    state: dict[str, dict] = {}  # the model: agent -> online, bundle, heard, misses

    def scan() -> list[str]:
        return sorted(
            a
            for a, s in state.items()
            if s["online"]
            and s["bundle"] == B
            and (not age or s["heard"] >= now - age)
            and (not missed or s["misses"] < missed)
        )

    for kind, i in events:
        agent = f"a{i}"
        if kind == "tick":
            now += 2.0
        elif kind in ("status", "offline", "other"):
            fleet.on_status(
                agent, _info(agent, online=kind != "offline", bundle="o" * 64 if kind == "other" else B), now
            )
            state[agent] = {
                "online": kind != "offline",
                "bundle": "o" * 64 if kind == "other" else B,
                "heard": now,
                "misses": 0,
            }
        elif kind == "forget":
            fleet.on_status(agent, None)
            state.pop(agent, None)
        elif kind == "heard":
            fleet.heard(agent, now)
            if agent in state:
                state[agent].update(heard=now, misses=0)
        else:  # a round with everyone eligible closes; the even ones did not answer
            rnd += 1
            chosen = fleet.eligible(B, now)
            fleet.tasked(rnd, chosen)
            silent = [a for a in chosen if int(a[1:]) % 2 == 0]
            fleet.round_closed(silent)
            for a in silent:
                state[a]["misses"] += 1
        assert fleet.eligible(B, now) == scan()
        assert fleet.eligible_count(B, now) == len(scan())
        assert fleet.online_count() == sum(s["online"] for s in state.values())


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 40),
    rounds=st.integers(1, 12),
    seed=st.integers(0, 3),
    groups=st.sampled_from([0, 1, 3]),
    quota=st.sampled_from(["proportional", "equal"]),
)
def test_fair_selection_picks_k_eligible_agents_and_takes_turns(n, k, rounds, seed, groups, quota):
    """Every round: min(K, N) distinct eligible agents. Over rounds (a steady fleet): selection counts
    differ by at most one, within each group when there are groups."""
    fleet = Fleet(group_by="g" if groups else "")
    ids = [f"a{i:02d}" for i in range(n)]
    for i, a in enumerate(ids):
        fleet.on_status(a, _info(a, groups=(f"g{i % groups}",) if groups else ()), now=0)
    count: Counter[str] = Counter()
    for r in range(1, rounds + 1):
        pool = fleet.eligible(B, now=0)
        last, turn, grp = fleet.participation(pool)
        got = choose(
            pool, last, grp if groups else None, turn, k=k, round_id=r, seed=seed, mode="fair", quota=quota
        )
        assert len(got) == len(set(got)) == min(k, n) and set(got) <= set(pool)
        fleet.tasked(r, got)
        count.update(got)
        for g in range(max(groups, 1)):
            members = [a for i, a in enumerate(ids) if not groups or i % groups == g]
            seen = [count[a] for a in members] or [0]
            assert max(seen) - min(seen) <= 1, (r, g, dict(count))


def test_k_of_100000_by_group_is_correct_at_scale():
    n, k = 100_000, 1_000
    rng = np.random.default_rng(1)
    ids = [f"a{i:06d}" for i in range(n)]
    last = rng.integers(-1, 50, n).tolist()
    groups = [f"site-{i % 7}" for i in range(n)]
    got = choose(ids, last, groups, k=k, round_id=3, seed=0, mode="fair", quota="equal")
    per = Counter(groups[int(a[1:])] for a in got)
    assert len(got) == k and sorted(per.values()) == [142] + [143] * 6  # 1,000 over 7 sites
    assert {last[int(a[1:])] for a in got} == {-1}  # ~280 never-selected per site: those first


@pytest.mark.parametrize("mode", ["fair", "random"])
def test_the_same_seed_and_round_give_the_same_choice(mode):
    ids = [f"a{i}" for i in range(50)]
    last = [i % 5 for i in range(50)]
    one = choose(ids, last, None, k=10, round_id=4, seed=2, mode=mode)
    assert one == choose(list(ids), list(last), None, k=10, round_id=4, seed=2, mode=mode)
    assert one != choose(ids, last, None, k=10, round_id=5, seed=2, mode=mode)
