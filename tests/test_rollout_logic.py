"""Rollout decisions, targets, canaries and the database, without a broker (fast)."""

from __future__ import annotations

import pytest

from fedclip.coordinator.fleet import AgentInfo
from fedclip.coordinator.rollout import RolloutManager
from fedclip.coordinator.rollout_policy import RolloutParams, Target, decide, parse_canary, select_canary
from fedclip.coordinator.rollout_sources import DictSource
from fedclip.coordinator.rollout_store import Ack, RolloutError, RolloutStore
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.signing import generate_key
from fedclip.sdk.wire import Envelope, MsgType, Topics, encode


def _fleet() -> dict[str, AgentInfo]:
    return {
        "a": AgentInfo("a", True, ("site1", "jetson")),
        "b": AgentInfo("b", True, ("site1",)),
        "c": AgentInfo("c", False, ("site1",)),
        "d": AgentInfo("d", True, ("site2",)),
    }


def test_targets():
    fleet = _fleet()
    assert Target.parse("all").resolve(fleet) == ["a", "b", "c", "d"]
    assert Target.parse("group:site1").resolve(fleet) == ["a", "b", "c"]
    assert Target.parse("group:jetson").resolve(fleet) == ["a"]
    assert Target.parse("agents:d,zz").resolve(fleet) == ["d", "zz"]  # unknown agents get it when they come
    assert str(Target.parse("agents: a , b")) == "agents:a,b"
    for bad in ("", "everyone", "group:", "group:a,b", "agents:a/b", "group:#"):
        with pytest.raises(ConfigError, match="--to"):
            Target.parse(bad)


def test_canary_selection_prefers_online_and_is_deterministic():
    fleet = _fleet()
    assert parse_canary("10%") == ("fraction", 0.1)
    assert parse_canary("3") == ("count", 3.0)
    for bad in ("x", "-1", "150%", "1.5"):
        with pytest.raises(ConfigError, match="--canary"):
            parse_canary(bad)
    targets = ["a", "b", "c", "d"]
    one = select_canary(targets, fleet, "10%", salt="1")
    assert len(one) == 1 and one[0] != "c"  # at least one, and an online one
    assert select_canary(targets, fleet, "10%", salt="1") == one
    assert "c" not in select_canary(targets, fleet, "3", salt="x")
    assert select_canary(targets, fleet, "0", salt="x") == []
    assert select_canary(targets, fleet, "100%", salt="x") == targets
    # different rollouts spread the canary load over the fleet
    many = {f"a{i}": AgentInfo(f"a{i}") for i in range(50)}
    picks = {select_canary(sorted(many), many, "1", salt=str(s))[0] for s in range(20)}
    assert len(picks) > 5


def _ack(agent, cur, new, status="installed"):
    return Ack(agent, status, "v", new_accuracy=new, current_accuracy=cur)


def test_decide():
    expected = ["a", "b", "c", "d"]
    ok = decide(
        [_ack("a", 0.5, 0.51), _ack("b", 0.5, 0.495), _ack("c", 0.6, 0.6), _ack("d", 0.5, 0.5)],
        expected,
        1.0,
        0.9,
    )
    assert ok.promote and ok.acked == 4 and abs(ok.mean_regression - (-0.125)) < 1e-9
    worse = decide([_ack(x, 0.6, 0.5) for x in expected], expected, 1.0, 0.9)
    assert not worse.promote and "regression 10.00 points exceeds --max-regression 1" in worse.reason
    few = decide([_ack("a", 0.5, 0.5), _ack("b", 0.5, 0.5, status="rejected")], expected, 1.0, 0.5)
    assert not few.promote and "only 1 of 4" in few.reason and "rejected by b" in few.reason
    assert decide([_ack("a", 0.5, 0.5), _ack("b", 0.5, 0.5)], expected, 1.0, 0.5).promote
    # acks from agents outside the stage do not count
    assert not decide([_ack("x", 0.5, 0.5)] * 4, expected, 1.0, 0.5).promote
    # a bigger tolerance lets the same regression through
    assert decide([_ack(x, 0.6, 0.5) for x in expected], expected, 11.0, 0.9).promote


def test_store_records_and_upserts(tmp_path):
    store = RolloutStore(tmp_path / "r.sqlite")
    rid = store.create("v1", "all", "10%", 1.0, 0.9, 60, ["p"], ["a", "b"])
    store.add_stage(rid, "canary", ["a"], 1e12)
    store.record_ack(rid, "canary", _ack("a", 0.5, 0.6))
    store.record_ack(rid, "canary", Ack("a", "rolled_back", "v0", reason="operator"))
    (ack,) = store.acks(rid)
    assert ack.status == "rolled_back" and ack.new_accuracy == 0.6 and ack.reason == "operator"
    store.pin("p", "v0")
    assert store.pins() == {"p": "v0"}
    assert store.unpin("p") and not store.unpin("p")
    row = store.get(rid)
    assert row.skipped == ("p",) and row.targets == ("a", "b") and [r.id for r in store.active()] == [rid]
    store.close()
    again = RolloutStore(tmp_path / "r.sqlite")  # persisted
    assert again.acks(rid)[0].status == "rolled_back" and again.events(rid)


class _Recorder:
    """Stands in for the MQTT session where only what is published matters (no broker here)."""

    def __init__(self):
        self.published: list[tuple[str, bytes, bool]] = []

    def publish(self, topic, payload, qos=1, retain=False, timeout=30):
        self.published.append((topic, payload, retain))

    def subscribe(self, topic, qos=1):
        pass


def _manager(tmp_path):
    import numpy as np

    from fedclip.sdk.adapters import AdapterMeta

    src = DictSource({"v1": ({"x.lora_A": np.ones((2, 2), np.float32)}, AdapterMeta("b" * 64, "v1"))})
    return RolloutManager(_Recorder(), Topics("f"), RolloutStore(tmp_path / "r.sqlite"), generate_key(), src)


def _ack_msg(agent, body, sender=None):
    env = Envelope(MsgType.ACK, "f", sender or agent, body=body)
    return Incoming(f"fedclip/f/agents/{agent}/ack", encode(env), False)


def test_acks_are_validated_and_decisions_follow(tmp_path):
    m = _manager(tmp_path)
    fleet = {x: AgentInfo(x) for x in "abcd"}
    rid = m.start(RolloutParams("v1", Target.parse("all"), canary="1", stage_timeout=60), fleet)
    (canary,) = m.store.stages(rid)[0].agents
    assert [t for t, _, retain in m.transport.published if retain] == [f"fedclip/f/agents/{canary}/adapter"]
    other = next(x for x in "abcd" if x != canary)
    metrics = {"new": {"accuracy": 0.8, "loss": 0.5, "num_samples": 10}, "current": {"accuracy": 0.7}}
    junk = [
        Incoming(f"fedclip/f/agents/{canary}/ack", b"\x00garbage", False),
        _ack_msg(canary, {"rollout": rid, "status": "installed"}, sender=other),  # spoofed sender
        _ack_msg(canary, {"rollout": rid, "status": "great"}),
        _ack_msg(other, {"rollout": rid, "status": "installed"}),  # not in the canary stage
        _ack_msg(canary, {"rollout": 999, "status": "installed"}),
    ]
    for msg in junk:
        assert m.handle(msg)
    assert m.store.acks(rid) == []
    assert not m.handle(Incoming("fedclip/f/agents/a/status", b"{}", True))

    m.tick()
    assert m.store.get(rid).state == "canary"  # still waiting for the canary
    m.handle(_ack_msg(canary, {"rollout": rid, "status": "installed", "version": "v1", "metrics": metrics}))
    m.tick()
    assert m.store.get(rid).state == "promoted"
    rest = m.store.stages(rid)[1]
    assert sorted(rest.agents) == sorted(set("abcd") - {canary})
    for x in rest.agents:
        m.handle(_ack_msg(x, {"rollout": rid, "status": "installed", "version": "v1", "metrics": metrics}))
    m.tick()
    row = m.store.get(rid)
    assert row.state == "complete" and "4 of" not in row.reason and "3 of 3" in row.reason


def test_timeout_without_acks_rolls_back_and_says_why(tmp_path):
    m = _manager(tmp_path)
    fleet = {x: AgentInfo(x) for x in "abcd"}
    rid = m.start(RolloutParams("v1", Target.parse("all"), canary="2", stage_timeout=60), fleet)
    m.tick(now=1e12)  # past the deadline, nobody answered
    row = m.store.get(rid)
    assert row.state == "rolled_back" and "only 0 of 2" in row.reason
    commands = [t for t, _, _ in m.transport.published if t.endswith("/command")]
    assert sorted(commands) == sorted(f"fedclip/f/agents/{a}/command" for a in m.store.stages(rid)[0].agents)
    with pytest.raises(RolloutError, match="already rolled back"):
        m.rollback(rid)


def test_start_refuses_unknown_versions_and_empty_targets(tmp_path):
    m = _manager(tmp_path)
    fleet = {"a": AgentInfo("a")}
    with pytest.raises(RolloutError, match="unknown"):
        m.start(RolloutParams("v2", Target.parse("all")), fleet)
    with pytest.raises(RolloutError, match="no agent"):
        m.start(RolloutParams("v1", Target.parse("group:nope")), fleet)
    m.store.pin("a", "v0")
    with pytest.raises(RolloutError, match="1 pinned"):
        m.start(RolloutParams("v1", Target.parse("all")), fleet)
    assert m.transport.published == [] and m.store.rollouts() == []
    with pytest.raises(ConfigError):
        RolloutParams("v1", Target.parse("all"), min_acks=2)


def test_a_canary_that_covers_every_target_still_gates(tmp_path):
    m = _manager(tmp_path)
    rid = m.start(
        RolloutParams("v1", Target.parse("all"), canary="10%", stage_timeout=60), {"a": AgentInfo("a")}
    )
    assert [s.name for s in m.store.stages(rid)] == ["canary"]
    m.handle(_ack_msg("a", {"rollout": rid, "status": "installed", "version": "v1"}))
    m.tick()
    row = m.store.get(rid)
    assert row.state == "complete" and [s.state for s in m.store.stages(rid)] == ["passed"]


def test_personalized_versions_roll_out_per_agent(tmp_path):
    """A global version of a round that personalized (ce-lora) sends each agent its own version."""
    import numpy as np

    from fedclip.coordinator.registry import Registry, agent_version
    from fedclip.coordinator.rollout_sources import RegistrySource
    from fedclip.coordinator.store import Store, VersionRow
    from fedclip.sdk.adapters import AdapterMeta, adapter_bytes

    store = Store(tmp_path / "coord")
    try:

        def add(version: str, scope: str, agent: str, value: float) -> None:
            tensors = {"x.lora_C": np.full((2, 2), value, np.float32)}
            blob = store.blobs.put(
                adapter_bytes(tensors, AdapterMeta("b" * 64, version, round=1, agent=agent))
            )
            store.add_version(VersionRow(version, "", 1, "ce_lora", scope, agent, blob, {}, 0.0))

        add("g-r1", "global", "", 0.0)
        add(agent_version("alice", 1), "agent", "alice", 1.0)
        source = RegistrySource(Registry(store, bundle_id="b" * 64))
        t_alice, m_alice = source.load_for("g-r1", "alice")
        t_bob, m_bob = source.load_for("g-r1", "bob")  # no own version: the global one
        assert m_alice.version == "a-alice-r1" and t_alice["x.lora_C"][0, 0] == 1.0
        assert m_bob.version == "g-r1" and t_bob["x.lora_C"][0, 0] == 0.0
        # --fallback: the global one beside alice's own; bob has the global one and needs none
        fb = source.fallback_for("g-r1", "alice")
        assert fb is not None and fb[1].version == "g-r1" and fb[0]["x.lora_C"][0, 0] == 0.0
        assert source.fallback_for("g-r1", "bob") is None

        m = RolloutManager(
            _Recorder(), Topics("f"), RolloutStore(tmp_path / "r.sqlite"), generate_key(), source
        )
        rid = m.start(
            RolloutParams("g-r1", Target.parse("all"), canary="0"),
            {"alice": AgentInfo("alice"), "bob": AgentInfo("bob")},
        )
        from fedclip.sdk.wire import decode

        sent = {t.split("/")[3]: decode(p, fleet="f").envelope.body for t, p, _ in m.transport.published}
        assert sent["alice"]["version"] == "a-alice-r1" and sent["bob"]["version"] == "g-r1"
        assert sent["alice"]["rollout_version"] == "g-r1" and sent["alice"]["rollout"] == rid
    finally:
        store.close()


def test_two_processes_driving_one_rollout_decide_each_stage_once(tmp_path):
    """`serve` and `rollout start --wait` share the database: a stage is decided by whoever is first,
    and a manager without the adapter (a rollout started from a file) never promotes it."""
    m = _manager(tmp_path)
    other = RolloutManager(
        _Recorder(), Topics("f"), RolloutStore(tmp_path / "r.sqlite"), generate_key(), DictSource()
    )
    fleet = {x: AgentInfo(x) for x in "abc"}
    rid = m.start(RolloutParams("v1", Target.parse("all"), canary="1", stage_timeout=60), fleet)
    (canary,) = m.store.stages(rid)[0].agents
    m.handle(_ack_msg(canary, {"rollout": rid, "status": "installed", "version": "v1"}))
    other.tick()  # the stage is due, but `other` cannot load v1: it leaves the promotion to `m`
    assert m.store.get(rid).state == "canary" and other.transport.published == []
    m.tick()
    sent = len(m.transport.published)
    assert m.store.get(rid).state == "promoted"
    # a decision taken from a stale view loses the compare-and-set and publishes nothing
    assert not other.store.finish_stage(rid, "canary", "failed", "late", None)
    for x in set("abc") - {canary}:
        other.handle(_ack_msg(x, {"rollout": rid, "status": "installed", "version": "v1"}))
    other.tick()  # the rest stage needs no adapter: `other` completes it
    m.tick()
    assert m.store.get(rid).state == "complete" and len(m.transport.published) == sent
    events = [text for _, text in m.store.events(rid)]
    assert sum("canary passed" in t for t in events) == 1, events
    assert sum(t.startswith("rest: sent") for t in events) == 1, events
