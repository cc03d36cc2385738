"""A provisioned fleet under attack on a broker WITHOUT any ACL: the signatures alone must hold.

A real mosquitto (anonymous, no ACL), a real coordinator, real agents started from their startup
kits. A hostile client with a plain broker connection tries what issue 12 lists: an update on another
agent's topic, invented agents, a forged ack, a task past the device's policy, a forged adapter; then
10,000 generated hostile messages at the coordinator's and two live agents' topics, while the
coordinator waits for its quorum of three (so it serves the whole attack). Then the third agent
starts and two rounds must finish with exactly the three real agents' updates; every hostile message
to the coordinator is recorded as rejected, and the attacked agents served the rounds.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from fixtures_fleet import AgentProc
from hostile import hostile_payloads
from test_coordinator import Running
from waiting import eventually, next_message

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.provision import Provisioner
from fedclip.coordinator.store import Store
from fedclip.sdk import messages as m
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import MqttSession
from fedclip.sdk.signing import generate_key
from fedclip.sdk.wire import Topics

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(900)]
FLEET = "sec-fleet"
AGENTS = ("dev-1", "dev-2", "dev-3")  # dev-3 starts after the attack: the rounds wait for it
N_FUZZ = 10_000
BATCH = 400  # mosquitto queues 1,000 messages per client: let the coordinator keep up


def forged_messages(manifest: Manifest, attacker) -> list[tuple[str, bytes]]:
    """(topic, payload): what a client with broker access would try, each signed with its own key."""
    t = Topics(FLEET)
    zeros = {s.name: np.full(s.shape, 1e3, np.float32) for s in manifest.exchanged}
    big_update = m.Update(1, manifest.bundle_id, 10**9, metrics={"loss": 0.0}, adapter=zeros)
    ghost = m.AgentStatus("online", manifest.bundle_id, last_round=0, num_samples=10**9)
    ack = m.Ack(1, "rolled_back", "g-r1", reason="regression of 100 points")
    task = m.Task(10**6, manifest.bundle_id, 0.0, m.Hyperparameters(epochs=10_000, lr=10.0), adapter=zeros)
    push = m.AdapterPush("evil", manifest.bundle_id, rollout=1, adapter=zeros)
    out = [
        (t.update("dev-1"), m.encode(big_update, FLEET, "dev-1", key=attacker)),  # as another agent
        (t.update("dev-1"), m.encode(big_update, FLEET, "dev-1")),  # unsigned
        (t.status("dev-2"), m.encode(m.AgentStatus("offline"), FLEET, "dev-2", key=attacker)),
        (t.ack("dev-1"), m.encode(ack, FLEET, "dev-1", key=attacker)),
        (t.task("dev-1"), m.encode(task, FLEET, "dev-1", key=attacker)),
        (t.adapter("dev-2"), m.encode(push, FLEET, "dev-2", key=attacker)),
    ]
    out += [(t.status(f"ghost-{i}"), m.encode(ghost, FLEET, f"ghost-{i}", key=attacker)) for i in range(3)]
    return out


def test_signatures_alone_hold_a_fleet_on_a_broker_without_acl(mosquitto, tiny_bundle, fmnist_dir, tmp_path):
    state = tmp_path / "coord"
    prov = Provisioner.init(state, FLEET, broker=mosquitto.url, bundle=str(tiny_bundle))
    kits = [prov.add(a, out=tmp_path / "kits" / a).path for a in AGENTS]
    manifest = Manifest.load(tiny_bundle)
    attacker = generate_key()
    topics = Topics(FLEET)
    agents: list[AgentProc] = []
    hostile = MqttSession(mosquitto.url, "attacker", clean_session=True).connect(timeout=30)

    def start(kit):
        (kit / "data").symlink_to(fmnist_dir)
        args = ["-c", str(kit / "agent.yaml"), "--threads", "1"]
        agents.append(AgentProc(tmp_path / "logs", args, kit.name, kit / "state"))

    try:
        for kit in kits[:2]:  # under attack while the coordinator waits for its quorum of three
            start(kit)
        cfg = CoordConfig(
            broker=mosquitto.url,
            fleet=FLEET,
            bundle=tiny_bundle,
            state=state,
            strategy="fedavg",
            rounds=2,
            min_updates=3,
            selection="all",
            round_timeout=600.0,
        )
        hostile.subscribe(topics.coordinator_status)
        running = Running(cfg)
        # the coordinator's retained status: it is connected and subscribed, so nothing sent is missed
        next_message(
            hostile, lambda msg: msg.topic == topics.coordinator_status, 120, "the coordinator online"
        )
        sent_to_coordinator = 0
        for topic, payload in forged_messages(manifest, attacker):
            hostile.publish(topic, payload, qos=1)
            sent_to_coordinator += topic.rsplit("/", 1)[-1] in ("update", "status", "ack")

        # 10,000 generated messages: mutations of forged and real-shaped messages, over every topic
        valid = [p for _, p in forged_messages(manifest, attacker)]
        coordinator_topics = [topics.update("dev-1"), topics.status("dev-2"), topics.ack("dev-1"),
                              topics.update("ghost-9")]  # fmt: skip
        agent_topics = [topics.task("dev-1"), topics.adapter("dev-2"), topics.agent("dev-1", "command"),
                        topics.agent("dev-2", "pin")]  # fmt: skip
        rng = random.Random(1)
        fuzz = hostile_payloads(valid, N_FUZZ, seed=1)
        with Store(state, readonly=True) as store:
            for batch in iter(lambda: list(itertools.islice(fuzz, BATCH)), []):
                for _kind, payload in batch:
                    to_coordinator = rng.random() < 0.75
                    topic = rng.choice(coordinator_topics if to_coordinator else agent_topics)
                    hostile.publish(topic, payload, qos=1)
                    sent_to_coordinator += to_coordinator
                want = sent_to_coordinator
                eventually(
                    lambda want=want: len(store.rejections()) >= want,
                    300,
                    lambda want=want: f"{len(store.rejections())} of {want} hostile messages recorded",
                )
            rejected = len(store.rejections())
        start(kits[2])  # the quorum: both rounds run now, after the attack, with the attacked agents
        assert running.join(timeout=600) == 0, "\n".join(a.tail() for a in agents)
        for agent in agents:
            assert agent.proc.poll() is None, f"{agent.id} died under the fuzz:\n{agent.tail()}"
            assert agent.terminate() == 0, agent.tail()
    finally:
        hostile.close()
        for agent in agents:
            agent.kill()

    assert rejected >= sent_to_coordinator >= 0.7 * N_FUZZ
    with Store(state, readonly=True) as s:
        assert [(r.round, r.state) for r in s.rounds()] == [(1, "aggregated"), (2, "aggregated")]
        for round_id in (1, 2):  # exactly the three real agents, each with its real sample count
            updates = s.updates(round_id)
            assert sorted(u.agent for u in updates) == list(AGENTS)
            assert all(0 < u.num_samples < 10**6 for u in updates)
        reasons = [r[3] for r in s.rejections()]
        assert any("does not verify with agent dev-1's enrolled key" in r for r in reasons)
        assert any("unsigned message" in r for r in reasons)
        assert any("agent 'ghost-0' is not enrolled" in r for r in reasons)
        assert sorted(a["agent"] for a in s.agents()) == list(AGENTS)  # no invented agent was ever known
    # the forged task (10,000 epochs at lr 10, round 10^6) was refused by its signature, never run
    dev1 = agents[0].text()
    assert "signature does not verify with the coordinator's public key" in dev1
    assert "round 1000000" not in dev1.replace("task on", "")
