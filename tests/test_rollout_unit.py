"""Rollout stages without a broker: the pure policy (`rollout_policy.next_step`) over records, and
`RolloutManager` over the in-memory transport, with agents answering on their ack topics.

The same stages with real agents over mosquitto are in test_rollout.py (integration).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedclip.coordinator.fleet import AgentInfo
from fedclip.coordinator.rollout import RolloutManager
from fedclip.coordinator.rollout_policy import RolloutParams, Target, next_step
from fedclip.coordinator.rollout_sources import DictSource
from fedclip.coordinator.rollout_store import (
    CANARY,
    COMPLETE,
    REST,
    ROLLED_BACK,
    RUNNING_CANARY,
    Ack,
    RolloutRow,
    RolloutStore,
    StageRow,
)
from fedclip.sdk.adapters import AdapterMeta
from fedclip.sdk.signing import generate_key, verify_message
from fedclip.sdk.transport import MemoryBroker
from fedclip.sdk.wire import Envelope, MsgType, Topics, decode, encode

FLEET = "r1"
TOPICS = Topics(FLEET)


# ---- the pure policy -----------------------------------------------------------------------------
def _row(targets=("a", "b", "c", "d"), max_regression=1.0, min_acks=0.5) -> RolloutRow:
    return RolloutRow(
        1, "v1", "all", "1", max_regression, min_acks, 60.0, RUNNING_CANARY, "", 0.0, 0.0, (), tuple(targets)
    )


def _stage(name=CANARY, agents=("a", "b"), state="running", deadline=100.0) -> StageRow:
    return StageRow(1, name, tuple(agents), state, 0.0, deadline, None, None, "")


def _ack(agent, status="installed", cur=0.5, new=0.5) -> Ack:
    return Ack(agent, status, "v1", new_accuracy=new, current_accuracy=cur)


def test_a_stage_waits_until_every_agent_answered_or_its_deadline():
    row = _row()
    assert next_step(row, None, [], {}, 0.0).action == "wait"
    assert next_step(row, _stage(state="passed"), [], {}, 0.0).action == "wait"
    assert next_step(row, _stage(), [_ack("a")], {}, 99.0).action == "wait"
    assert next_step(row, _stage(), [_ack("a")], {}, 100.0).action == "promote"  # deadline: 1 of 2 is 50%
    answered = [_ack("a"), _ack("b", "rejected")]  # every agent answered: decided before the deadline
    assert next_step(row, _stage(), answered, {}, 1.0).action == "promote"
    refused = next_step(_row(min_acks=0.9), _stage(), answered, {}, 1.0)
    assert refused.action == "rollback" and "rejected by b" in refused.decision.reason


def test_a_passing_canary_promotes_to_every_other_target_but_pinned_ones():
    step = next_step(_row(), _stage(), [_ack("a"), _ack("b")], {"d": "v0"}, 1.0)
    assert step.action == "promote" and step.rest == ("c",) and step.decision.acked == 2
    alone = next_step(_row(targets=("a", "b")), _stage(), [_ack("a"), _ack("b")], {}, 1.0)
    assert alone.action == "promote" and alone.rest == ()


def test_a_regressing_canary_rolls_back_and_says_why():
    step = next_step(_row(), _stage(), [_ack("a", cur=0.8, new=0.5), _ack("b", cur=0.8, new=0.6)], {}, 1.0)
    assert step.action == "rollback"
    assert "mean accuracy regression 25.00 points exceeds --max-regression 1" in step.decision.reason
    silent = next_step(_row(), _stage(), [], {}, 100.0)
    assert silent.action == "rollback" and "only 0 of 2" in silent.decision.reason


def test_the_rest_stage_completes_without_gating_and_counts_pending_agents():
    step = next_step(_row(), _stage(REST, ("c", "d")), [_ack("c")], {}, 100.0)
    assert step.action == "complete"
    assert step.summary == "1 of 2 acknowledged, 1 pending (retained for when they reconnect)"


# ---- the manager over the in-memory transport ----------------------------------------------------
@pytest.fixture
def world(tmp_path):
    broker = MemoryBroker()
    key = generate_key()
    tensors = {"x.lora_A": np.ones((2, 2), np.float32)}
    source = DictSource({"v1": (tensors, AdapterMeta("b" * 64, "v1"))})
    store = RolloutStore(tmp_path / "rollout.sqlite")
    manager = RolloutManager(broker.client(), TOPICS, store, key, source, on_event=lambda rid, text: None)
    manager.subscribe()
    manager.transport.connect()
    agents = {x: broker.client() for x in "abcd"}
    for agent_id, client in agents.items():
        client.subscribe(TOPICS.adapter(agent_id))
        client.subscribe(TOPICS.agent(agent_id, "command"))
        client.connect()
    yield broker, manager, agents, key
    store.close()


def _answer(world, agent_id: str, *, cur: float, new: float) -> int:
    """`agent_id` reads the adapter pushed to it (it must be there, signed) and acks it."""
    broker, manager, agents, key = world
    incoming = agents[agent_id].get(5.0)
    assert incoming is not None and incoming.topic == TOPICS.adapter(agent_id)
    push = decode(incoming.payload, fleet=FLEET, expect=MsgType.ADAPTER)
    verify_message(key.public_key(), push, "adapter push")
    body = {
        "rollout": push.envelope.body["rollout"],
        "status": "installed",
        "version": push.envelope.body["version"],
        "metrics": {"new": {"accuracy": new, "num_samples": 10}, "current": {"accuracy": cur}},
    }
    agents[agent_id].publish(
        TOPICS.agent(agent_id, "ack"), encode(Envelope(MsgType.ACK, FLEET, agent_id, body=body))
    )
    return body["rollout"]


def test_a_good_canary_is_promoted_and_the_rollout_completes(world):
    broker, manager, agents, _ = world
    fleet = {x: AgentInfo(x) for x in agents}
    rid = manager.start(RolloutParams("v1", Target.parse("all"), canary="1", stage_timeout=60), fleet)
    (canary,) = manager.store.stages(rid)[0].agents
    assert [a for a in agents if broker.retained(TOPICS.adapter(a))] == [canary]
    _answer(world, canary, cur=0.5, new=0.6)
    assert manager.handle(manager.transport.get(5.0))  # the canary's ack
    manager.tick()  # every canary agent answered: promote and send the rest
    assert [s.name for s in manager.store.stages(rid)] == [CANARY, REST]
    for agent_id in sorted(set(agents) - {canary}):
        _answer(world, agent_id, cur=0.5, new=0.5)
    row = manager.wait(rid, timeout=30)
    assert row.state == COMPLETE and row.reason == "3 of 3 acknowledged"
    assert all(broker.retained(TOPICS.adapter(a)) for a in agents)
    assert [a.status for a in manager.store.acks(rid)] == ["installed"] * 4


def test_a_regressing_canary_is_rolled_back_by_a_signed_retained_command(world):
    broker, manager, agents, key = world
    fleet = {x: AgentInfo(x) for x in agents}
    rid = manager.start(RolloutParams("v1", Target.parse("all"), canary="2", stage_timeout=60), fleet)
    canary = manager.store.stages(rid)[0].agents
    for agent_id in canary:
        _answer(world, agent_id, cur=0.9, new=0.5)
    row = manager.wait(rid, timeout=30)
    assert row.state == ROLLED_BACK and "regression 40.00 points exceeds" in row.reason
    for agent_id in agents:  # the rollback reaches the canary agents only; the rest got nothing
        command = broker.retained(TOPICS.agent(agent_id, "command"))
        if agent_id in canary:
            msg = decode(command, fleet=FLEET, expect=MsgType.COMMAND)
            verify_message(key.public_key(), msg, "rollback")
            assert msg.envelope.body["command"] == "rollback" and msg.envelope.body["rollout"] == rid
        else:
            assert command is None and broker.retained(TOPICS.adapter(agent_id)) is None


def test_a_rollout_database_from_before_fallback_gets_its_column(tmp_path):
    import sqlite3

    path = tmp_path / "rollout.sqlite"
    old = sqlite3.connect(path)  # the table as the previous version made it, with one rollout
    old.execute(
        "CREATE TABLE rollouts(id INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL,"
        " target TEXT NOT NULL, canary TEXT NOT NULL, max_regression REAL NOT NULL,"
        " min_acks REAL NOT NULL, stage_timeout REAL NOT NULL, state TEXT NOT NULL, reason TEXT,"
        " created_at REAL NOT NULL, updated_at REAL NOT NULL, skipped TEXT NOT NULL DEFAULT '[]',"
        " targets TEXT NOT NULL DEFAULT '[]')"
    )
    old.execute(
        "INSERT INTO rollouts(version, target, canary, max_regression, min_acks, stage_timeout, state,"
        " created_at, updated_at) VALUES('v1', 'all', '0', 1.0, 0.9, 60, 'complete', 1.0, 1.0)"
    )
    old.commit()
    old.close()
    store = RolloutStore(path)
    try:
        (row,) = store.rollouts()
        assert (row.version, row.fallback) == ("v1", False)
        rid = store.create("g-r2", "all", "0", 1.0, 0.9, 60.0, [], ["a"], fallback=True)
        assert store.get(rid).fallback and RolloutParams.of(store.get(rid)).fallback
    finally:
        store.close()


def test_a_fallback_is_refused_where_the_global_adapter_is_no_model_a_device_can_serve(tmp_path):
    """ce-lora's global cores sit in no device's basis (each has its own A and B): `--fallback` with
    a ce-lora round is refused before anything is published; fleet-lora's is sent."""
    from fedclip.coordinator.rollout_store import RolloutError

    broker = MemoryBroker()
    tensors = {"x.lora_A": np.ones((2, 2), np.float32)}

    def source(strategy: str) -> DictSource:
        meta = AdapterMeta("b" * 64, "g-r1", round=1, strategy=strategy)
        own = AdapterMeta("b" * 64, "a-a-r1", round=1, strategy=strategy, agent="a")
        return DictSource({"g-r1": (tensors, meta)}, {("g-r1", "a"): (tensors, own)})

    store = RolloutStore(tmp_path / "rollout.sqlite")
    try:
        params = RolloutParams("g-r1", Target.parse("agents:a"), canary="0", fallback=True)
        ce = RolloutManager(broker.client(), TOPICS, store, generate_key(), source("ce-lora"))
        with pytest.raises(RolloutError, match="ce-lora round's global adapter is no model"):
            ce.start(params, {})
        assert store.rollouts() == []
        fleet = RolloutManager(broker.client(), TOPICS, store, generate_key(), source("fleet-lora"))
        rid = fleet.start(params, {})
        assert store.get(rid).fallback
    finally:
        store.close()


def test_a_fallback_goes_only_to_agents_that_say_they_take_one(tmp_path):
    """An agent whose status names no `fedclip-wire: fallback` (older than fallbacks) would refuse the
    push without an ack: refused up front, naming it. One the coordinator has no status of is sent
    (nothing says it cannot), and so is an older one that gets no fallback (the global adapter)."""
    from fedclip.coordinator.rollout_store import RolloutError
    from fedclip.device_agent.status import software_versions

    tensors = {"x.lora_A": np.ones((2, 2), np.float32)}
    meta = AdapterMeta("b" * 64, "g-r1", round=1, strategy="fleet-lora")

    def mine(a: str) -> AdapterMeta:
        return AdapterMeta("b" * 64, f"a-{a}-r1", round=1, strategy="fleet-lora", agent=a)

    own = {("g-r1", a): (tensors, mine(a)) for a in ("new", "old", "unseen")}
    source = DictSource({"g-r1": (tensors, meta)}, own)
    fleet = {
        "new": AgentInfo("new", info={"versions": software_versions()}),
        "old": AgentInfo("old", info={"versions": {"python": "3.11", "fedclip": "0.1.0"}}),
        "plain": AgentInfo("plain", info={}),  # no own adapter of g-r1: the global one, no fallback
    }
    store = RolloutStore(tmp_path / "rollout.sqlite")
    try:
        manager = RolloutManager(MemoryBroker().client(), TOPICS, store, generate_key(), source)

        def start(to: str) -> int:
            return manager.start(RolloutParams("g-r1", Target.parse(to), canary="0", fallback=True), fleet)

        with pytest.raises(RolloutError, match=r"1 target\(s\) run an agent that cannot take one .*: old;"):
            start("all")
        assert store.rollouts() == []
        assert store.get(start("agents:new,plain,unseen")).fallback
    finally:
        store.close()
