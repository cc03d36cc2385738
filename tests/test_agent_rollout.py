"""Signed rollouts reaching a real `fedclip-agent start` process: the retained status follows every
switch at once, and rolling back a rollout returns inference to the adapter it replaced.

Real parts: mosquitto, the agent subprocess (ONNX Runtime, Fashion-MNIST PNGs, its state dir),
Ed25519-signed adapters and rollback commands as the coordinator sends them.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_fleet import FLEET

from fedclip.device_agent.state import current_adapter_path, read_record
from fedclip.sdk.adapters import load_adapter
from fedclip.sdk.ledger import Ledger
from fedclip.sdk.messages import DEVICE_FALLBACK, FEATURE_FALLBACK, wire_features
from fedclip.sdk.messages.rollout import FALLBACK_PREFIX
from fedclip.sdk.signing import ensure_keypair, sign_envelope
from fedclip.sdk.wire import Envelope, MsgType, encode

pytestmark = [pytest.mark.broker, pytest.mark.timeout(600)]


def test_rollout_switches_status_and_rollback_restores_the_previous_adapter(
    mosquitto,
    coordinator_factory,
    agent_factory,
    tmp_path,
):
    key, pub = ensure_keypair(tmp_path / "keys")
    coord = coordinator_factory(mosquitto.url)
    agent = agent_factory(mosquitto.url, extra=("--coordinator-key", str(pub)))
    coord.wait_status(agent, lambda b: b["state"] == "online" and b["adapter_version"] == "", "online")
    bundle_id = coord.manifest.bundle_id

    def push(rid: int, version: str, tensors: dict, fallback: tuple[str, dict] | None = None) -> None:
        body = {"rollout": rid, "stage": "rest", "version": version, "bundle_id": bundle_id}
        if fallback is not None:  # the fleet's adapter beside it, as `rollout start --fallback` sends
            body["fallback_version"] = fallback[0]
            tensors = {**tensors, **{FALLBACK_PREFIX + k: v for k, v in fallback[1].items()}}
        env = Envelope(MsgType.ADAPTER, FLEET, agent.id, base_version=version, body=body)
        coord.publish(coord.topics.adapter(agent.id), encode(sign_envelope(key, env, tensors), tensors), True)

    def rollback(rid: int, version: str) -> None:
        body = {"command": "rollback", "rollout": rid, "version": version, "reason": "test"}
        env = sign_envelope(key, Envelope(MsgType.COMMAND, FLEET, agent.id, body=body))
        coord.publish(coord.topics.agent(agent.id, "command"), encode(env), True)

    def on(version: str | None, what: str) -> None:
        # The retained status is republished by the agent itself: no reconnect happens in this test.
        coord.wait_status(agent, lambda b: b["adapter_version"] == (version or ""), what)
        assert read_record(agent.state)["current_adapter"] == version, f"{what}:\n{agent.tail()}"

    # A first rollout onto an agent that never had an adapter, then its rollback.
    push(1, "r1", coord.starting_adapter(11))
    on("r1", "status naming rollout 1's adapter")
    # A hostile body, signed all the same, is refused in one line that the retained status carries.
    hostile = {"rollout": 9, "stage": "rest", "version": "../../evil", "bundle_id": bundle_id}
    env = Envelope(MsgType.ADAPTER, FLEET, agent.id, body=hostile)
    tensors = coord.starting_adapter(99)
    coord.publish(coord.topics.adapter(agent.id), encode(sign_envelope(key, env, tensors), tensors), True)
    coord.wait_status(
        agent,
        lambda b: "refused" in b.get("notice", "") and "version" in b["notice"] and "\n" not in b["notice"],
        "the refusal",
    )
    assert read_record(agent.state)["current_adapter"] == "r1"
    rollback(1, "r1")
    on(None, "status after rolling back the first rollout")
    assert current_adapter_path(agent.state) is None  # inference is on the bundle's own adapter again

    # A round never changes what inference uses (its task's adapter goes to the ledger only); a
    # rollout does, and its rollback brings back the one before it.
    push(2, "r2", coord.starting_adapter(22))
    on("r2", "status naming rollout 2's adapter")
    coord.send_task(agent.id, 1, key=key)  # an agent with the coordinator's key runs signed tasks only
    coord.wait_update(agent, 1)
    on("r2", "status after round 1: still rollout 2's adapter")
    push(3, "r3", coord.starting_adapter(33))
    on("r3", "status naming rollout 3's adapter")
    rollback(3, "r3")
    on("r2", "status after rolling back rollout 3")
    tensors, meta = load_adapter(current_adapter_path(agent.state))
    assert meta.version == "r2"
    for name, value in coord.starting_adapter(22).items():
        np.testing.assert_array_equal(tensors[name], value)
    assert "rolled back: r3 -> r2" in agent.text()
    ledger = Ledger.read(agent.state)
    task_entries = [e for e in ledger.entries if e.source == "task"]
    assert [(e.version, e.round_id) for e in task_entries] == [("start-1", 1)]
    # the ledger is the rollout history: every install under its rollout id, rollbacks marked on it
    rollouts = [(e.version, e.rollout, e.rolled_back_at > 0) for e in ledger.entries if e.source == "rollout"]
    assert rollouts == [("r1", 1, True), ("r2", 2, False), ("r3", 3, True)]
    assert not (agent.state / "rollout").exists()  # no second history beside the ledger

    # The agent says it takes fallbacks; one delivered with an adapter is named in its retained
    # status (the device map, which every coordinator reads) until a rollback leaves that adapter.
    status = coord.wait_status(agent, lambda b: True, "a status").envelope.body
    assert FEATURE_FALLBACK in wire_features(status["versions"]) and DEVICE_FALLBACK not in status["device"]
    push(4, "a-r4", coord.starting_adapter(44), fallback=("g-r4", coord.starting_adapter(45)))
    coord.wait_status(
        agent, lambda b: b["device"].get(DEVICE_FALLBACK) == "g-r4", "status naming the fallback"
    )
    assert read_record(agent.state)["current_adapter"] == "a-r4"
    rollback(4, "a-r4")
    on("r2", "status after rolling back rollout 4")
    coord.wait_status(agent, lambda b: DEVICE_FALLBACK not in b["device"], "status without a fallback")
    assert agent.terminate() == 0
