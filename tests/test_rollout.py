"""Rollouts end to end: a real mosquitto, the coordinator's RolloutManager, and small real agents
(a real MqttSession + RolloutClient + ONNX Runtime evaluation of the tiny bundle on Fashion-MNIST).

The agents' "current" adapter is trained here for a few epochs on their held-out images so it is
well above chance; the deliberately bad adapter keeps its A and replaces B with large random values.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from fixtures_rollout import FLEET, HarnessAgent
from waiting import eventually

from fedclip.coordinator.fleet import read_fleet
from fedclip.coordinator.rollout import RolloutManager
from fedclip.coordinator.rollout_policy import RolloutParams, Target
from fedclip.coordinator.rollout_store import COMPLETE, ROLLED_BACK, RolloutStore
from fedclip.sdk.adapters import save_adapter
from fedclip.sdk.ledger import Ledger
from fedclip.sdk.mqtt import MqttSession
from fedclip.sdk.signing import ensure_keypair, generate_key, sign_envelope
from fedclip.sdk.wire import Envelope, MsgType, Topics, decode, encode

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

WAIT_S = 120  # generous: the suite shares 2 cores
_SENTINEL_IDS = itertools.count(90_000)  # rollout ids no test starts


@pytest.fixture
def fleet(mosquitto, tmp_path, world):
    """(manager, agents dict, pubkey path, start_agent)."""
    ev, source = world
    key, pub = ensure_keypair(tmp_path / "keys")
    session = MqttSession(mosquitto.url, "coord-test", clean_session=False).connect(timeout=30)
    store = RolloutStore(tmp_path / "rollout.sqlite")
    manager = RolloutManager(session, Topics(FLEET), store, key, source)
    manager.subscribe()
    agents: dict[str, HarnessAgent] = {}

    def add(agent_id: str, groups=("site1",), start: bool = True, older: bool = False) -> HarnessAgent:
        a = HarnessAgent(
            mosquitto.url, agent_id, tmp_path / "agents" / agent_id, pub, ev, groups, older=older
        )
        agents[agent_id] = a
        return a.start() if start else a

    yield manager, agents, add
    for a in agents.values():
        if a.running:
            a.stop()
    session.close()
    store.close()


def _fleet_view(manager, n: int):
    view = {}

    def seen_all() -> bool:
        view.update(read_fleet(manager.transport, manager.topics, quiet=0.3, timeout=3))
        return len(view) >= n

    eventually(seen_all, WAIT_S, lambda: f"{n} agents in the fleet view, saw {sorted(view)}", interval=0)
    return view


def pump(manager) -> None:
    """Hand every message waiting in the manager's session to the manager."""
    while (msg := manager.transport.get(timeout=0.1)) is not None:
        manager.handle(msg)


def ack_of(manager, agent_id: str, rid: int, seen: list[dict] | None = None) -> dict:
    """The ack `agent_id` sends for rollout `rid`; every message before it goes to the manager, and
    `agent_id`'s earlier acks are appended to `seen`."""
    topic = manager.topics.ack(agent_id)

    def arrived() -> dict | None:
        msg = manager.transport.get(timeout=0.2)
        if msg is None:
            return None
        manager.handle(msg)
        if msg.topic != topic or not msg.payload:
            return None
        body = decode(msg.payload, fleet=FLEET).envelope.body
        if body.get("rollout") == rid:
            return body
        if seen is not None:
            seen.append(body)
        return None

    return eventually(arrived, WAIT_S, f"{agent_id}'s ack of rollout {rid}", interval=0)


def send_sentinel(session: MqttSession, key, agent_id: str) -> int:
    """Publish a signed rollback of a rollout that never existed to `agent_id`; its id (the agent acks
    it, and keeps that ack in its rollout state)."""
    rid = next(_SENTINEL_IDS)
    body = {"command": "rollback", "rollout": rid, "reason": "test sentinel"}
    env = sign_envelope(key, Envelope(MsgType.COMMAND, FLEET, agent_id, body=body))
    session.publish(Topics(FLEET).agent(agent_id, "command"), encode(env), qos=1)
    return rid


def acks_before_sentinel(manager, agent_id: str) -> list[dict]:
    """Send `agent_id` a signed rollback of a rollout that never existed and wait for its ack. The
    agent handles its messages in order, so whatever was published to it before has been handled
    by then: what it did NOT do (install, evaluate, ack) is known not to be merely late. Returns
    the agent's acks that arrived before the sentinel's."""
    rid = send_sentinel(manager.transport, manager.key, agent_id)
    seen: list[dict] = []
    ack_of(manager, agent_id, rid, seen)
    return seen


def signed_adapter(manager, source, agent_id: str, version: str, rid: int) -> bytes:
    """A rollout adapter message as the coordinator signs it."""
    tensors, meta = source.load_for(version, agent_id)
    body = {"rollout": rid, "stage": "rest", "version": version, "bundle_id": meta.bundle_id}
    env = Envelope(MsgType.ADAPTER, FLEET, agent_id, body=body)
    return encode(sign_envelope(manager.key, env, tensors), tensors)


# ---- tests ---------------------------------------------------------------------------------------
def test_canary_passes_and_promotes_to_the_group(fleet):
    manager, agents, add = fleet
    for name in ("a", "b", "c"):
        add(name, groups=("site1", "cpu"))
    add("d", groups=("site2",))
    view = _fleet_view(manager, 4)
    assert view["d"].groups == ("site2",) and view["a"].online

    rid = manager.start(
        RolloutParams(
            "good",
            Target.parse("group:site1"),
            canary="1",
            max_regression=1.0,
            min_acks=1.0,
            stage_timeout=WAIT_S,
        ),
        view,
    )
    row = manager.wait(rid, timeout=WAIT_S)
    assert row.state == COMPLETE, row.reason
    stages = {s.name: s for s in manager.store.stages(rid)}
    assert len(stages["canary"].agents) == 1 and stages["canary"].state == "passed"
    assert stages["canary"].mean_regression < 0  # the trained adapter is better than the base one
    assert sorted(stages["rest"].agents + stages["canary"].agents) == ["a", "b", "c"]
    acks = {a.agent: a for a in manager.store.acks(rid)}
    assert sorted(acks) == ["a", "b", "c"]
    for ack in acks.values():
        assert ack.status == "installed" and ack.version == "good"
        assert ack.new_accuracy > ack.current_accuracy and ack.num_samples > 0
    for name in ("a", "b", "c"):
        assert agents[name].version == "good" and agents[name].changes == ["good"]
    assert agents["d"].version is None  # not in the group


def test_canary_regression_rolls_back_automatically(fleet):
    manager, agents, add = fleet
    for name in ("a", "b", "c"):
        add(name)
    view = _fleet_view(manager, 3)
    first = manager.start(RolloutParams("good", Target.parse("all"), canary="0", stage_timeout=WAIT_S), view)
    assert manager.wait(first, timeout=WAIT_S).state == COMPLETE

    rid = manager.start(
        RolloutParams("bad", Target.parse("all"), canary="1", max_regression=1.0, stage_timeout=WAIT_S), view
    )
    row = manager.wait(rid, timeout=WAIT_S)
    assert row.state == ROLLED_BACK
    assert "regression" in row.reason and "exceeds --max-regression 1" in row.reason
    canary = manager.store.stages(rid)[0]
    assert canary.name == "canary" and canary.state == "failed" and canary.mean_regression > 1.0
    assert [s.name for s in manager.store.stages(rid)] == ["canary"]  # never promoted
    (victim,) = canary.agents
    eventually(lambda: agents[victim].version == "good", WAIT_S, "the canary agent to roll back")
    eventually(
        lambda: (pump(manager), any(a.status == "rolled_back" for a in manager.store.acks(rid)))[1],
        WAIT_S,
        "the rollback ack",
    )
    ack = manager.store.acks(rid)[0]
    assert ack.status == "rolled_back" and ack.new_accuracy is not None  # metrics of the canary kept
    assert agents[victim].changes == ["good", "bad", "good"]
    for name in set(agents) - {victim}:
        assert agents[name].changes == ["good"]
    # the ledger records the rollback under the rollout's id, the rolled-back adapter is never used
    # again, and a restarted agent does not take the retained copy again
    ledger = Ledger.read(agents[victim].state)
    (bad,) = ledger.of_rollout(rid)
    assert bad.version == "bad" and bad.source == "rollout" and bad.rolled_back_at > 0
    assert not bad.usable and ledger.in_use().rollout == first
    agents[victim].stop()
    agents[victim].changes.clear()
    agents[victim].start()
    acks_before_sentinel(manager, victim)  # the retained adapter and rollback were handled before it
    assert agents[victim].version == "good" and agents[victim].changes == []


def test_offline_agent_catches_up_on_reconnect(fleet):
    manager, agents, add = fleet
    for name in ("a", "b", "c"):
        add(name)
    view = _fleet_view(manager, 3)
    agents["c"].stop()
    view = {k: v for k, v in view.items()}

    def c_offline() -> bool:
        view.update(read_fleet(manager.transport, manager.topics, quiet=0.3, timeout=3))
        return not view["c"].online

    eventually(c_offline, WAIT_S, "c's offline status", interval=0)

    rid = manager.start(RolloutParams("good", Target.parse("all"), canary="1", stage_timeout=5), view)
    assert "c" not in manager.store.stages(rid)[0].agents  # canaries are chosen among online agents
    row = manager.wait(rid, timeout=WAIT_S)
    assert row.state == COMPLETE and "1 pending" in row.reason
    assert agents["c"].version is None

    agents["c"].start()  # same state dir, same client id: the retained adapter is waiting
    eventually(lambda: agents["c"].version == "good", WAIT_S, "the offline agent to catch up")
    eventually(
        lambda: (pump(manager), {a.agent for a in manager.store.acks(rid)} == {"a", "b", "c"})[1],
        WAIT_S,
        "the late ack to be recorded",
    )


def test_pinned_agent_stays_put(fleet, world):
    manager, agents, add = fleet
    _, source = world
    for name in ("a", "b", "c"):
        add(name)
    view = _fleet_view(manager, 3)
    manager.pin("c", "good")
    c = agents["c"]
    eventually(lambda: c.version == "good" and c.client.pinned == "good", WAIT_S, "the pin")

    rid = manager.start(RolloutParams("good2", Target.parse("all"), canary="0", stage_timeout=WAIT_S), view)
    assert manager.store.get(rid).skipped == ("c",)
    assert manager.wait(rid, timeout=WAIT_S).state == COMPLETE
    assert agents["a"].version == agents["b"].version == "good2"
    assert agents["c"].version == "good"
    # even a signed adapter that reaches a pinned agent is not installed
    pushed = signed_adapter(manager, source, "c", "good2", rid)
    manager.transport.publish(manager.topics.adapter("c"), pushed, qos=1, retain=True)
    assert ack_of(manager, "c", rid)["status"] == "pinned"
    assert agents["c"].version == "good"

    manager.unpin("c")
    eventually(lambda: agents["c"].client.pinned is None, WAIT_S, "the unpin")
    rid2 = manager.start(
        RolloutParams("good2", Target.parse("agents:c"), canary="0", stage_timeout=WAIT_S), view
    )
    assert manager.wait(rid2, timeout=WAIT_S).state == COMPLETE
    assert agents["c"].version == "good2"


def test_tampered_unsigned_and_wrongly_signed_adapters_are_refused(fleet, world, caplog):
    # an in-process command run earlier in the session (the demo) may have quieted fedclip's loggers
    caplog.set_level(logging.INFO, logger="fedclip")
    manager, agents, add = fleet
    ev, source = world
    a = add("a")
    topics = manager.topics
    tensors, meta = source.load_for("good", "a")
    body = {"rollout": 7, "stage": "rest", "version": "good", "bundle_id": meta.bundle_id}
    env = Envelope(MsgType.ADAPTER, FLEET, "a", body=body)

    good = encode(sign_envelope(manager.key, env, tensors), tensors)
    flipped = bytearray(good)
    flipped[-100] ^= 0x01  # one byte of one tensor
    wrong_key = encode(sign_envelope(generate_key(), env, tensors), tensors)
    unsigned = encode(env, tensors)
    other_agent = Envelope(MsgType.ADAPTER, FLEET, "b", body=body)
    for_b = encode(sign_envelope(manager.key, other_agent, tensors), tensors)
    evil_tensors = {k: v * 100 for k, v in tensors.items()}
    resigned_tensors = encode(decode(good, fleet=FLEET).envelope, evil_tensors)  # old signature, new tensors

    calls = ev.calls
    forged = {  # payload -> why the agent must refuse it
        bytes(flipped): "corrupt|sha256|signature",
        wrong_key: "signature does not verify",
        unsigned: "unsigned message",
        for_b: "signed for agent 'b'",
        resigned_tensors: "signature does not verify",
    }
    for payload in forged:
        manager.transport.publish(topics.adapter("a"), payload, retain=True)
    acks = acks_before_sentinel(manager, "a")  # all five were handled before the sentinel
    # None of the five was installed, or even evaluated; each was refused for its own reason.
    assert a.version is None and a.changes == [] and ev.calls == calls
    refusals = [
        r.getMessage()
        for r in caplog.records
        if r.name == "fedclip.device_agent.rollout_client" and r.getMessage().startswith("refused:")
    ]
    assert len(refusals) == len(forged), refusals
    for refusal, why in zip(refusals, forged.values(), strict=True):
        assert re.search(why, refusal), (why, refusal)
    # The coordinator hears of the ones it can attribute: a rollout id in a decodable message for
    # this agent. A corrupt payload has no trustworthy id; one signed for b is not a's to answer.
    assert [b["status"] for b in acks] == ["rejected"] * 3
    assert [b["rollout"] for b in acks] == [7] * 3
    manager.transport.publish(topics.adapter("a"), good, retain=True)
    eventually(lambda: a.version == "good", WAIT_S, "the genuine adapter")


@pytest.mark.slow
def test_rollout_cli_wait_status_pin(mosquitto, tmp_path, world):
    """`fedclip-coord rollout start FILE --wait` in a subprocess drives the state machine to the end."""
    ev, source = world
    state = tmp_path / "coord"
    _, pub = ensure_keypair(state / "keys")
    tensors, meta = source.load_for("good", "x")
    adapter_file = save_adapter(tmp_path / "good.safetensors", tensors, meta)
    # agent a had an adapter of its own before any rollout: a rollback returns it there
    agents = [
        HarnessAgent(mosquitto.url, n, tmp_path / "agents" / n, pub, ev, baseline=b).start()
        for n, b in (("a", ("own-r3", ev.base)), ("b", None), ("c", None))
    ]
    env = dict(os.environ, COLUMNS="200")
    common = ["--state", str(state), "--broker", mosquitto.url, "--fleet", FLEET]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fedclip.coordinator.cli", "rollout", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT_S * 2,
        )

    try:
        eventually(lambda: all(a.session.connected.is_set() for a in agents), WAIT_S, "agents to connect")
        t0 = time.monotonic()
        r = cli(
            "start",
            str(adapter_file),
            "--to",
            "all",
            "--canary",
            "1",
            "--wait",
            "--stage-timeout",
            str(WAIT_S),
            *common,
        )
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr + r.stdout
        assert "complete" in r.stdout and "canary passed" in r.stdout
        assert all(a.version == "good" for a in agents)
        print(f"rollout to 3 agents via the CLI: {elapsed:.2f}s")

        r = cli("status", "--state", str(state))
        assert r.returncode == 0 and "good" in r.stdout and "complete" in r.stdout
        r = cli("status", "1", "--state", str(state))
        assert r.returncode == 0 and r.stdout.count("installed") == 3 and "canary" in r.stdout

        r = cli("pin", "c", str(adapter_file), *common)
        assert r.returncode == 0, r.stderr
        eventually(lambda: agents[2].client.pinned == "good", WAIT_S, "the pin over the CLI")
        r = cli("status", "--state", str(state))
        assert "c=good" in r.stdout

        r = cli("rollback", "1", *common)
        assert r.returncode == 0, r.stderr
        eventually(
            lambda: agents[0].version == "own-r3" and agents[1].version is None, WAIT_S, "the manual rollback"
        )
        assert agents[0].changes == ["good", "own-r3"]
        # Pinned: c stays put. A sentinel sent after the rollback shows c has handled whatever the
        # rollback sent it by the time it answers.
        key, _ = ensure_keypair(state / "keys")
        with MqttSession(mosquitto.url, "sentinel", clean_session=True) as s:
            rid = send_sentinel(s, key, "c")
        eventually(lambda: str(rid) in agents[2].client.memory.acks, WAIT_S, "c's answer to the sentinel")
        assert agents[2].version == "good"

        r = cli("start", "not-a-version!", "--to", "all", *common)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "VERSION" in r.stderr
        r = cli("start", str(adapter_file), "--to", "groups:x", *common)
        assert r.returncode == 2 and "--to" in r.stderr
        r = cli("status", "99", "--state", str(state))
        assert r.returncode == 2 and "does not exist" in r.stderr
    finally:
        for a in agents:
            a.stop()


def test_large_adapter_travels_by_url_and_is_checked(fleet, tmp_path):
    """Past the inline limit the signed message carries a URL + sha256; the bundle server serves it."""
    from fedclip.coordinator.bundle_server import BundleServer

    manager, agents, add = fleet
    a = add("a")
    served = tmp_path / "served"
    served.mkdir()
    with BundleServer(served) as server:
        manager.inline_limit, manager.url_root, manager.url_base = 1024, served, server.url
        rid = manager.start(
            RolloutParams("good", Target.parse("agents:a"), canary="0", stage_timeout=WAIT_S), {}
        )
        assert manager.wait(rid, timeout=WAIT_S).state == COMPLETE
        assert a.version == "good"
        # A corrupt file on the server is refused by its sha256: the agent keeps what it has. The
        # manager writes good2 where the server does not look; the server has a corrupted copy.
        from fedclip.sdk.adapters import adapter_bytes
        from fedclip.sdk.hashing import sha256_bytes

        manager.url_root = tmp_path / "unserved"
        blob = adapter_bytes(*manager.adapters.load_for("good2", "a"))
        bad = bytearray(blob)
        bad[-5] ^= 0x01
        (served / "adapters" / f"{sha256_bytes(blob)}.safetensors").write_bytes(bytes(bad))
        rid2 = manager.start(
            RolloutParams("good2", Target.parse("agents:a"), canary="0", stage_timeout=WAIT_S), {}
        )
        row = manager.wait(rid2, timeout=WAIT_S)
        assert row.state == COMPLETE and "0 of 1" in row.reason
        (ack,) = manager.store.acks(rid2)
        assert ack.status == "rejected" and "sha256" in ack.reason
        assert a.version == "good"


def test_a_personalized_rollout_with_fallback_sends_the_global_beside_own_adapters(fleet, world, tmp_path):
    """`rollout start --fallback`: an agent with its own adapter of the round gets the round's global
    one beside it (inline, then by URL past the inline limit); an agent without gets the global one
    alone; both kept in the ledger where the device's Classifier finds them."""
    import numpy as np

    from fedclip.coordinator.bundle_server import BundleServer
    from fedclip.coordinator.rollout_sources import DictSource
    from fedclip.coordinator.rollout_store import RolloutError
    from fedclip.sdk.adapters import AdapterMeta, load_adapter
    from fedclip.sdk.ledger import installed

    manager, agents, add = fleet
    _, shared = world
    good, good_meta = shared.versions["good"]
    personal = {k: v + np.float32(0.01) for k, v in good.items()}
    bid = good_meta.bundle_id

    def meta(v: str, rnd: int) -> AdapterMeta:
        return AdapterMeta(bid, v, "", rnd, "fleet-lora", "lora")

    manager.adapters = DictSource(
        {"g-r1": (good, meta("g-r1", 1)), "g-r2": (dict(good), meta("g-r2", 2))},
        {(f"g-r{r}", x): (personal, meta(f"a-{x}-r{r}", r)) for r in (1, 2) for x in ("a", "c")},
    )
    a, b = add("a"), add("b", older=True)  # b gets the global adapter alone: its age does not matter
    with pytest.raises(RolloutError, match="no target gets its own adapter"):
        manager.start(RolloutParams("g-r1", Target.parse("agents:b"), canary="0", fallback=True), {})
    # An agent whose status says it is older than fallbacks (no wire features) would refuse the push
    # without an ack: refused before anything is published, naming it; without --fallback it goes.
    add("c", groups=("site2",), older=True)
    view = _fleet_view(manager, 3)
    params = RolloutParams("g-r1", Target.parse("all"), canary="0", stage_timeout=WAIT_S, fallback=True)
    with pytest.raises(RolloutError, match=r"1 target\(s\) run an agent that cannot take one .*: c;"):
        manager.start(params, view)
    assert manager.store.rollouts(limit=5) == []
    params = replace(params, target=Target.parse("group:site1"))
    rid = manager.start(params, view)
    assert manager.wait(rid, timeout=WAIT_S).state == COMPLETE
    assert manager.store.get(rid).fallback
    assert any("fallback: 1 of 2 agent(s)" in text for _, text in manager.store.events(rid))
    now_a, now_b = installed(a.state), installed(b.state)
    assert (now_a.version, now_b.version, now_b.fallback) == ("a-a-r1", "g-r1", None)
    fb, fb_meta = load_adapter(now_a.fallback)
    assert fb_meta.version == "g-r1" and all(np.array_equal(fb[k], good[k]) for k in good)
    assert all(np.array_equal(load_adapter(now_a.file)[0][k], personal[k]) for k in personal)

    served = tmp_path / "served"
    served.mkdir()
    with BundleServer(served) as server:  # past the inline limit: one file holds both, by URL
        manager.inline_limit, manager.url_root, manager.url_base = 1024, served, server.url
        params = RolloutParams(
            "g-r2", Target.parse("agents:a"), canary="0", stage_timeout=WAIT_S, fallback=True
        )
        rid = manager.start(params, {})
        assert manager.wait(rid, timeout=WAIT_S).state == COMPLETE
    assert len(list((served / "adapters").iterdir())) == 1
    now_a = installed(a.state)
    assert now_a.version == "a-a-r2" and load_adapter(now_a.fallback)[1].version == "g-r2"
