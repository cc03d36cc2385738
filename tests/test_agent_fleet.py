"""`fedclip-agent start` as a real subprocess, driven by a scripted coordinator over a real mosquitto.

Real parts only: mosquitto, ONNX Runtime, a tiny exported bundle, Fashion-MNIST images as PNG files.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from fixtures_bundle import FASHION_MNIST_LABELS
from fixtures_fleet import FLEET, Coordinator
from waiting import WAIT_S, eventually

from fedclip.device_agent.state import current_adapter_path, read_record
from fedclip.sdk.adapters import check_adapter, load_adapter
from fedclip.sdk.broker_mosquitto import MosquittoBroker
from fedclip.sdk.errors import WireError
from fedclip.sdk.ledger import Ledger
from fedclip.sdk.messages import FLEET_GAIN
from fedclip.sdk.wire import (
    STAT_LABEL_HIST,
    STAT_MEAN,
    STAT_VAR,
    Envelope,
    Message,
    MsgType,
    Topics,
    encode,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(600)]


def _check_update(msg: Message, coord: Coordinator, agent: str, rnd: int, noisy: bool = False) -> None:
    env, body = msg.envelope, msg.envelope.body
    assert (env.agent, env.round, env.base_version) == (agent, rnd, f"start-{rnd}")
    assert body["bundle_id"] == coord.manifest.bundle_id
    tensors = check_adapter(msg.adapter_tensors, coord.manifest, "update")  # names, shapes, dtypes, finite
    start = coord.starting_adapter(rnd)
    assert any(not np.array_equal(tensors[k], start[k]) for k in start), "training changed nothing"
    hist = msg.stats[STAT_LABEL_HIST]
    assert hist.shape == (len(coord.manifest.task.labels),)
    n_labels = len(coord.manifest.task.labels)
    if noisy:  # noise for privacy: counts are near, not equal to, the truth
        assert abs(hist.sum() - body["num_samples"]) < 5
    else:
        assert hist.sum() == body["num_samples"] > 0
    if STAT_MEAN in msg.stats:
        dim = coord.manifest.base_model.embed_dim
        assert msg.stats[STAT_MEAN].shape == msg.stats[STAT_VAR].shape == (n_labels, dim)
        assert (msg.stats[STAT_VAR] >= 0).all()
    assert body["skipped_images"] == 1  # the corrupt PNG, skipped and counted
    for key in ("accuracy_before", "accuracy_after", "loss_before", "loss_after", "steps"):
        assert np.isfinite(body["metrics"][key]), key
    assert body["train_seconds"] >= 0


# ---- tests ----------------------------------------------------------------------------------------
def test_agent_serves_rounds_and_survives_hostile_input(
    mosquitto, coordinator_factory, agent_factory, tmp_path
):
    coord = coordinator_factory(mosquitto.url)
    agent = agent_factory(mosquitto.url, config={"max_payload_bytes": 1_000_000, "groups": ["lab"]})
    online = coord.wait_status(agent, lambda b: b["state"] == "online", "online status")
    assert online.envelope.body["groups"] == ["lab"]
    assert online.envelope.body["bundle_id"] == coord.manifest.bundle_id
    assert "python" in online.envelope.body["versions"]

    task1 = coord.send_task(agent.id, 1)
    update1 = coord.wait_update(agent, 1)
    _check_update(update1, coord, agent.id, 1)

    # Hostile or wrong messages: each is dropped with a log line and the agent keeps serving.
    topic = coord.topics.task(agent.id)
    good = coord.starting_adapter()
    bad_shape = dict(good)
    name = next(iter(bad_shape))
    bad_shape[name] = np.zeros((3, 3), np.float32)
    nan = {k: v.copy() for k, v in good.items()}
    nan[name].flat[0] = np.nan
    hostile = [
        b"\x00garbage that is neither JSON nor safetensors",
        b'{"schema": 99, "type": "task"}',
        json.dumps(
            {"schema": 1, "type": "task", "fleet": FLEET, "agent": agent.id, "round": "seven"}
        ).encode(),
        coord.task_blob(agent.id, 7, fleet="otherfleet"),
        coord.task_blob("someone-else", 7),
        coord.task_blob(agent.id, 7, tensors=bad_shape),
        coord.task_blob(agent.id, 7, tensors=nan),
        coord.task_blob(agent.id, 7, hyperparameters={"epochs": -1, "lr": 1e-3, "batch_size": 8}),
        coord.task_blob(agent.id, 7, hyperparameters={"epochs": 1, "lr": "fast", "batch_size": 8}),
        coord.task_blob(agent.id, 7, stats=["raw-images-please"]),
        coord.task_blob(agent.id, 7, tensors={"not.in.bundle": np.ones(2, np.float32)}),
        b"{" + b" " * 1_200_000 + b"}",  # over max_payload_bytes
    ]
    for payload in hostile:
        coord.publish(topic, payload)
    coord.publish(topic, task1)  # duplicate of a published round
    coord.publish(topic, coord.task_blob(agent.id, 0))  # stale
    coord.publish(topic, b"", retain=True)  # the coordinator clears the retained task

    coord.send_task(agent.id, 9, bundle_id="f" * 64)  # another bundle: refused, and the status says why
    refused = coord.wait_status(agent, lambda b: "bundle" in b.get("notice", ""), "refusal notice")
    assert "refused" in refused.envelope.body["notice"]

    # Without a coordinator key an unsigned adapter push is ignored: a broker publisher cannot
    # change the model the device runs.
    coord.publish(coord.topics.adapter(agent.id), _adapter_push(coord, agent.id, "pers-1"))

    coord.send_task(agent.id, 2)  # the agent still serves
    update2 = coord.wait_update(agent, 2)
    _check_update(update2, coord, agent.id, 2)
    # The fleet gain: round 2's adapter from the "fleet" against the one this agent trained in
    # round 1, on the same held-out images; round 1 had nothing of its own to compare with.
    m1, m2 = (u.envelope.body["metrics"] for u in (update1, update2))
    assert FLEET_GAIN not in m1
    assert m2[FLEET_GAIN] == pytest.approx(m2["accuracy_before"] - m1["accuracy_after"], abs=1e-9)
    assert sorted(r for a, r, _ in coord.updates) == [1, 2]  # nothing for duplicate, stale, hostile
    log = agent.text()
    assert log.count("dropped:") >= len(hostile), agent.tail(80)
    assert "duplicate task ignored" in log and "stale task ignored" in log
    assert "Traceback" not in log
    assert "no coordinator_key: adapter rollouts are ignored" in log

    assert agent.terminate() == 0
    coord.wait_status(agent, lambda b: b["state"] == "offline", "offline status")

    # Round 2's task adapter is in the ledger for the record but never used for inference (only signed
    # rollouts change what a device answers); the unsigned push left no trace.
    ledger = Ledger.read(agent.state)
    assert ledger.in_use() is None and current_adapter_path(agent.state) is None
    kept = [e for e in ledger.entries if e.source == "task"]
    assert [e.version for e in kept][-1] == "start-2" and (kept[-1].round_id, kept[-1].rollout) == (2, 0)
    tensors, meta = load_adapter(kept[-1].file)
    assert meta.version == "start-2"
    assert not (agent.state / "adapters" / "pers-1.safetensors").exists()
    assert not [a for a in coord.acks if a.envelope.body.get("adapter_version") == "pers-1"]

    out = subprocess.run(
        [sys.executable, "-m", "fedclip.device_agent.cli", "status", "--state", str(agent.state), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["agent_id"], info["rounds_done"], info["last_round"]) == (agent.id, 2, 2)
    assert not info["adapter_version"] and "accuracy_after" in info["last_metrics"]


def _adapter_push(coord, agent_id: str, version: str, seed: int = 42) -> bytes:
    env = Envelope(
        MsgType.ADAPTER,
        FLEET,
        agent_id,
        round=1,
        base_version=version,
        body={"bundle_id": coord.manifest.bundle_id, "version": version},
    )
    return encode(env, coord.starting_adapter(seed=seed))


def test_unsigned_adapters_only_with_flag(mosquitto, coordinator_factory, agent_factory):
    """--accept-unsigned-adapters (closed test setups): a pushed adapter is validated, kept, acked."""
    coord = coordinator_factory(mosquitto.url)
    agent = agent_factory(mosquitto.url, extra=("--accept-unsigned-adapters",))
    coord.wait_status(agent, lambda b: b["state"] == "online", "online status")
    coord.publish(coord.topics.adapter(agent.id), b"\x01\x02 broken adapter")
    coord.publish(coord.topics.adapter(agent.id), _adapter_push(coord, agent.id, "pers-1"))
    coord.wait(
        lambda: [a for a in coord.acks if a.envelope.body.get("adapter_version") == "pers-1"], "ack", agent
    )
    assert agent.terminate() == 0
    log = agent.text()
    assert "dropped:" in log and "accepting unsigned adapters" in log
    assert "Traceback" not in log
    path = current_adapter_path(agent.state)
    assert path == agent.state / "adapters" / "pers-1.safetensors"
    kept, meta = load_adapter(path)
    assert meta.version == "pers-1"
    pushed = coord.starting_adapter(seed=42)
    assert all(np.array_equal(kept[k], v) for k, v in pushed.items())


@pytest.mark.slow
def test_broker_restart_mid_round_update_arrives_once(mosquitto, coordinator_factory, agent_factory):
    coord = coordinator_factory(mosquitto.url)
    agent = agent_factory(mosquitto.url)
    coord.wait_status(agent, lambda b: b["state"] == "online", "online status")
    coord.send_task(agent.id, 1, epochs=12)
    coord.wait(lambda: (agent.progress() or {}).get("epochs_done", 0) >= 1, "training under way", agent)
    mosquitto.restart()
    msg = coord.wait_update(agent, 1)
    _check_update(msg, coord, agent.id, 1)
    coord.send_task(agent.id, 2)  # a later round flushes anything still in flight for round 1
    coord.wait_update(agent, 2)
    blobs = coord.update_blobs(agent.id, 1)
    assert len(set(blobs)) == 1, "two different updates for one round"
    assert "connection to" in agent.text() and "lost" in agent.text()  # the restart did hit the agent
    assert agent.terminate() == 0


@pytest.mark.slow
def test_kill_9_mid_round_resumes_and_publishes_one_update(mosquitto, coordinator_factory, agent_factory):
    coord = coordinator_factory(mosquitto.url)
    agent = agent_factory(mosquitto.url)
    coord.wait_status(agent, lambda b: b["state"] == "online", "online status")
    epochs = 10
    coord.send_task(agent.id, 1, epochs=epochs)
    coord.wait(lambda: (agent.progress() or {}).get("epochs_done", 0) >= 2, "two epochs done", agent)
    agent.kill()  # SIGKILL: no offline status from the agent, the broker's last will says it
    coord.wait_status(agent, lambda b: b["state"] == "offline", "last will")
    assert not coord.update_blobs(agent.id, 1)
    # Epochs are short: more than two may be done by the time the kill lands; read what is on disk.
    done = agent.progress()["epochs_done"]
    assert 2 <= done < epochs

    # Restarted, it resumes from its epoch checkpoint; SIGTERM mid-round stops it cleanly (exit 0).
    again = agent_factory(mosquitto.url, state=agent.state)
    coord.wait(lambda: (again.progress() or {}).get("epochs_done", 0) >= done + 1, "one more epoch", again)
    assert again.terminate() == 0
    coord.wait_status(again, lambda b: b["state"] == "offline", "offline after SIGTERM")
    assert f"resuming after epoch {done} " in again.text(), again.tail()
    assert "stopped in epoch" in again.text(), again.tail()
    assert not coord.update_blobs(agent.id, 1)

    third = agent_factory(mosquitto.url, state=agent.state)
    msg = coord.wait_update(third, 1)
    _check_update(msg, coord, agent.id, 1)
    # Resumed twice, neither redone nor cut short: every epoch's steps counted once.
    per_epoch = -(-msg.envelope.body["num_samples"] // 8)
    assert msg.envelope.body["metrics"]["steps"] == epochs * per_epoch
    assert third.terminate() == 0

    # As if killed after building the update but before the broker acknowledged it: the next start
    # republishes exactly the kept bytes and never builds a second update for the round.
    path = agent.state / "state.json"
    record = json.loads(path.read_text())
    record["rounds"]["1"]["status"] = "built"
    path.write_text(json.dumps(record))
    fourth = agent_factory(mosquitto.url, state=agent.state)
    coord.wait(lambda: len(coord.update_blobs(agent.id, 1)) >= 2, "republished update", fourth)
    coord.send_task(agent.id, 1, epochs=epochs)  # the coordinator re-sends round 1: a duplicate
    coord.send_task(agent.id, 2)
    coord.wait_update(fourth, 2)
    assert len(set(coord.update_blobs(agent.id, 1))) == 1, "two different updates for one round"
    assert fourth.terminate() == 0
    assert read_record(agent.state)["rounds"]["1"]["status"] == "done"


@pytest.mark.slow
def test_unreachable_broker_and_failing_state_dir(tmp_path, coordinator_factory, agent_factory):
    broker = MosquittoBroker()
    try:
        agent = agent_factory(broker.url)

        def said_unreachable() -> bool:
            assert agent.proc.poll() is None, agent.tail()
            return "unreachable" in agent.text()

        eventually(said_unreachable, WAIT_S, lambda: f"'unreachable' in the log:\n{agent.tail()}")
        broker.start()
        coord = coordinator_factory(broker.url)
        coord.wait_status(agent, lambda b: b["state"] == "online", "online status after the broker came up")

        # A state dir that cannot be written (a file where the rounds folder goes): logged, not published.
        rounds = agent.state / "rounds"
        assert not rounds.exists()
        rounds.write_text("in the way")
        coord.send_task(agent.id, 1)
        coord.wait_status(agent, lambda b: "state dir" in b.get("notice", ""), "state error notice")
        assert not coord.update_blobs(agent.id, 1)
        assert read_record(agent.state)["in_progress"] is None  # nothing half-recorded

        rounds.unlink()  # space freed: the agent carries on with the next round
        coord.send_task(agent.id, 2)
        _check_update(coord.wait_update(agent, 2), coord, agent.id, 2)
        assert agent.terminate() == 0
    finally:
        broker.cleanup()


def test_bad_config_is_a_one_line_error(tmp_path, tiny_bundle, fmnist_dir):
    args = [
        sys.executable,
        "-m",
        "fedclip.device_agent.cli",
        "start",
        "--broker",
        "http://nope",
        "--fleet",
        FLEET,
        "--id",
        "dev-1",
        "--bundle",
        str(tiny_bundle),
        "--data",
        str(fmnist_dir),
        "--state",
        str(tmp_path / "s"),
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "mqtt:// or mqtts://" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(WireError):
        Topics("bad/fleet")


@pytest.mark.slow
def test_auth_and_signed_adapters(mosquitto_auth, coordinator_factory, agent_factory, tmp_path):
    from fedclip.sdk.signing import generate_key, save_public_key, sign_envelope

    key = generate_key()
    pub = save_public_key(key, tmp_path / "coordinator.pub")
    pw = tmp_path / "broker-password"
    pw.write_text(mosquitto_auth.password + "\n")
    coord = coordinator_factory(
        mosquitto_auth.url, username=mosquitto_auth.username, password=mosquitto_auth.password
    )
    agent = agent_factory(
        mosquitto_auth.url,
        extra=(
            "--username",
            mosquitto_auth.username,
            "--password-file",
            str(pw),
            "--coordinator-key",
            str(pub),
        ),
    )
    coord.wait_status(agent, lambda b: b["state"] == "online", "online status with credentials")

    topic = coord.topics.adapter(agent.id)
    body = {"bundle_id": coord.manifest.bundle_id, "version": "roll-1", "rollout": 1}
    env = Envelope(MsgType.ADAPTER, FLEET, agent.id, round=3, base_version="roll-1", body=body)
    forged = coord.starting_adapter(seed=7)
    coord.publish(topic, encode(env, forged))  # unsigned: refused by the rollout client
    tensors = coord.starting_adapter(seed=8)
    coord.publish(topic, encode(sign_envelope(key, env, tensors), tensors))
    coord.wait(
        lambda: [a for a in coord.acks if a.envelope.body.get("status") == "installed"], "install ack", agent
    )
    assert agent.terminate() == 0
    path = current_adapter_path(agent.state)
    kept, meta = load_adapter(path)
    assert meta.version == "roll-1"
    assert all(np.array_equal(kept[k], v) for k, v in tensors.items())
    assert "unsigned" in agent.text()


@pytest.mark.slow
def test_tls_broker_ce_lora_round(mosquitto_tls, coordinator_factory, agent_factory, bundle_factory):
    """mqtts:// with a CA file, and a tri-lora (CE-LoRA) round: only C travels, with noisy Gaussian stats."""
    bundle = bundle_factory(adapter="tri-lora", labels=FASHION_MNIST_LABELS)
    ca = str(mosquitto_tls.certs["ca.crt"])
    coord = coordinator_factory(mosquitto_tls.url, bundle=bundle, ca_file=ca)
    assert all(s.name.endswith("lora_C") for s in coord.manifest.exchanged)
    agent = agent_factory(mosquitto_tls.url, extra=("--ca-file", ca), bundle=bundle)
    coord.wait_status(agent, lambda b: b["state"] == "online", "online status over TLS")
    coord.send_task(agent.id, 1, stats=["histogram", "gaussian"], noise_std=0.01)
    _check_update(coord.wait_update(agent, 1), coord, agent.id, 1, noisy=True)
    assert agent.terminate() == 0
    # The adapter kept in the ledger holds this device's own A and B next to the received C.
    kept, _ = load_adapter(Ledger.read(agent.state).entries[-1].file)
    assert {s.name for s in coord.manifest.trainable} == set(kept)


def test_the_agent_resends_its_status_so_a_lost_one_heals(mosquitto, coordinator_factory, agent_factory):
    """A broker may lose an agent's retained status without anyone seeing it (the embedded amqtt
    broker did, under many connects at once): the coordinator would not know the agent exists. The
    agent resends it unchanged (5, 10, 20, ... s after connecting, capped at `status_interval`) with
    a fresh `sent_at`; nothing else happens here, so every status after the first is a resend."""
    coord = coordinator_factory(mosquitto.url)
    agent = agent_factory(mosquitto.url, "dev-hb", config={"status_interval": 1})
    coord.wait_status(agent, lambda b: b.get("state") == "online", "online status")

    def resent():
        mine = [m for m in coord.statuses if m.envelope.agent == "dev-hb"]
        return mine if len(mine) >= 3 else None

    mine = coord.wait(resent, "two resends of the status", agent)
    sent = [m.envelope.sent_at for m in mine]
    assert sent == sorted(sent) and len(set(sent)) == len(sent)  # fresh each time, never a replay
    assert all(m.envelope.body == mine[0].envelope.body for m in mine), "nothing changed but the time"


def test_a_statistics_only_task_returns_its_start_unchanged(mosquitto, coordinator_factory, agent_factory):
    """epochs 0 (a newcomer's first task under fleet-core/fleet-lora): no training step, the start
    adapter back bit for bit (the coordinator tells such updates apart by that), the statistics the
    task asks for, and the before-training score as the after score."""
    coord = coordinator_factory(mosquitto.url)
    agent = agent_factory(mosquitto.url)
    coord.wait_status(agent, lambda b: b["state"] == "online", "online status")
    coord.send_task(agent.id, 1, epochs=0, stats=["histogram", "gaussian"])
    msg = coord.wait_update(agent, 1)
    start = coord.starting_adapter(1)
    assert set(msg.adapter_tensors) == set(start)
    assert all(np.array_equal(msg.adapter_tensors[k], start[k]) for k in start)
    metrics = msg.envelope.body["metrics"]
    assert metrics["steps"] == 0 and metrics["accuracy_after"] == metrics["accuracy_before"]
    assert {STAT_LABEL_HIST, STAT_MEAN, STAT_VAR} <= set(msg.stats)
    assert msg.stats[STAT_LABEL_HIST].sum() == msg.envelope.body["num_samples"] > 0
    assert "statistics only" in agent.text()
    coord.send_task(agent.id, 2)  # and the next task trains as usual
    _check_update(coord.wait_update(agent, 2), coord, agent.id, 2)
    assert agent.terminate() == 0
