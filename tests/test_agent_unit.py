"""The agent's task handling in process, over the in-memory transport: real bundle, real ONNX Runtime,
real state dir, no broker. The mosquitto tests (test_agent_fleet.py) cover the same paths end to end."""

from __future__ import annotations

import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import synthetic_images

from fedclip.device_agent.agent import Agent
from fedclip.device_agent.config import AgentConfig
from fedclip.device_agent.rounds import RoundRunner
from fedclip.device_agent.state_rounds import DONE
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import Hyperparameters, Task
from fedclip.sdk.transport import MemoryBroker, MemoryTransport
from fedclip.sdk.wire import Envelope, Message, MsgType, Topics, decode, encode

FLEET = "unit"
AGENT = "u1"
LABELS = ("a", "b", "c")
TOPICS = Topics(FLEET)


@pytest.fixture(scope="module")
def step_bundle(bundle_factory) -> Path:
    # The step format trains with plain onnxruntime: the backend every device venv has.
    return bundle_factory(labels=LABELS, formats=("step",))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Four small images per label (the agent keeps a quarter for evaluation)."""
    return synthetic_images(tmp_path_factory.mktemp("images"), LABELS, dict.fromkeys(LABELS, 4), seed=0)


class Harness:
    """An Agent on a MemoryBroker, and the coordinator's side of the same broker."""

    def __init__(self, bundle: Path, data: Path, state: Path, **config) -> None:
        self.manifest = Manifest.load(bundle)
        self.broker = MemoryBroker()
        cfg = AgentConfig(
            broker="mqtt://127.0.0.1:1",  # never dialled: the transport is injected
            fleet=FLEET,
            id=AGENT,
            bundle=bundle,
            data=data,
            state=state,
            backend="step",
            threads=1,
            holdout=0.25,
            **config,
        )
        self.agent = Agent(cfg, self.broker.client(), RoundRunner.open(cfg, threading.Event()))
        self.coordinator: MemoryTransport = self.broker.client()
        self.coordinator.connect()
        assert self.agent.start()

    def adapter(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            s.name: (0.01 * rng.standard_normal(s.shape)).astype(s.dtype) for s in self.manifest.exchanged
        }

    def task(self, rnd: int, **body) -> bytes:
        tensors = self.adapter(rnd)
        body = {
            "bundle_id": self.manifest.bundle_id,
            "deadline": time.time() + 3600,
            "hyperparameters": {"epochs": 1, "lr": 1e-3, "batch_size": 4},
            "stats": ["histogram"],
        } | body
        env = Envelope(MsgType.TASK, FLEET, AGENT, round=rnd, base_version=f"start-{rnd}", body=body)
        return encode(env, tensors)

    def send(self, blob: bytes, topic: str = TOPICS.task(AGENT)) -> None:
        """Publish a message and let the agent handle it (the memory broker delivers on publish)."""
        self.coordinator.publish(topic, blob, qos=1, retain=True)
        assert self.agent.poll(timeout=5), "the task never reached the agent"

    def updates(self) -> list[Message]:
        return self.sent(TOPICS.update(AGENT))

    def sent(self, topic: str) -> list[Message]:
        return [decode(p, fleet=FLEET) for t, p, _ in self.broker.published if t == topic]

    def status(self) -> dict:
        blob = self.broker.retained(TOPICS.status(AGENT))
        assert blob is not None, "no retained status"
        return decode(blob, fleet=FLEET, expect=MsgType.STATUS).envelope.body

    def close(self) -> None:
        self.agent.shutdown()
        self.coordinator.close()


@pytest.fixture
def harness(step_bundle, image_dir, tmp_path):
    h = Harness(step_bundle, image_dir, tmp_path / "state")
    yield h
    h.close()


def test_the_status_is_resent_at_5_10_20_s_after_a_connect_until_a_task_arrives(
    step_bundle, image_dir, tmp_path
):
    h = Harness(step_bundle, image_dir, tmp_path / "state", status_interval=30)
    try:
        status, topic = h.agent.status, TOPICS.status(AGENT)
        t0 = status._sent_at  # the connect's status
        due = [t for t in (4.9, 5.0, 14.9, 15.0, 34.9, 35.0, 64.9, 65.0, 94.9, 95.0) if status.tick(t0 + t)]
        assert due == [5.0, 15.0, 35.0, 65.0, 95.0]  # gaps 5, 10, 20, then 30 (status_interval)
        assert len(h.sent(topic)) == 1 + len(due)
        h.agent.status.publish()  # any other publish restarts the wait
        t1 = status._sent_at
        assert not status.tick(t1 + 29.9) and status.tick(t1 + 30.0)
        # A task reached the agent: the coordinator knows it; no resends until the next connect
        # (a straggler does not undo its max_missed rest by speaking).
        h.send(h.task(0))
        assert not status.tick(status._sent_at + 1e6)
        status.on_connect(h.agent.transport)
        assert status.tick(status._sent_at + 5.0)
    finally:
        h.close()
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="status_interval: must be >= 0 seconds and finite"):
            Harness(step_bundle, image_dir, tmp_path / "state-bad", status_interval=bad)
    off = Harness(step_bundle, image_dir, tmp_path / "state-off", status_interval=0)
    try:
        assert not off.agent.status.tick(off.agent.status._sent_at + 1e6)  # 0: only on change
    finally:
        off.close()


def test_a_reconnect_during_a_status_publish_sends_the_newest_status_after_it(harness):
    """The hook thread's on-connect status waits for a publish in flight on the main thread, so the
    broker never gets an older status after a newer one (it once showed a rolled-back adapter)."""
    status, transport, topic = harness.agent.status, harness.agent.transport, TOPICS.status(AGENT)
    publish, held, release = transport.publish, threading.Event(), threading.Event()

    def slow_publish(t, payload, qos=1, retain=False, timeout=30):
        if t == topic and not held.is_set():  # the main thread's publish, waiting for its PUBACK
            held.set()
            assert release.wait(10)
        publish(t, payload, qos=qos, retain=retain, timeout=timeout)

    class Watched:
        """The reporter's lock, telling when a second thread has to wait for it."""

        def __init__(self) -> None:
            self.lock, self.waiting = threading.Lock(), threading.Event()

        def __enter__(self) -> None:
            if not self.lock.acquire(blocking=False):
                self.waiting.set()
                self.lock.acquire()

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    transport.publish = slow_publish
    status._saying = watched = Watched()
    before = len(harness.sent(topic))
    main = threading.Thread(target=status.publish)
    main.start()
    assert held.wait(10)
    hook = threading.Thread(target=status.on_connect, args=(transport,))
    hook.start()
    try:
        assert watched.waiting.wait(10), "the on-connect status did not wait for the one in flight"
        assert len(harness.sent(topic)) == before  # nothing went out meanwhile
    finally:
        release.set()
        main.join(10)
        hook.join(10)
    sent = [p for t, p, _ in harness.broker.published if t == topic][before:]
    assert len(sent) == 2 and sent[1] == status._online == harness.broker.retained(topic)


def test_the_scoring_digest_names_what_held_out_scores_depend_on(step_bundle, image_dir, tmp_path):
    """Two rounds' held-out scores compare (the fleet gain) only under the same digest: it changes
    with the held-out files and the loss, and stays put across restarts on the same data."""
    data = tmp_path / "data"
    shutil.copytree(image_dir, data)

    def scoring(loss: str = "ce") -> str:
        cfg = AgentConfig(broker="mqtt://127.0.0.1:1", fleet=FLEET, id=AGENT, bundle=step_bundle, data=data,
                          state=tmp_path / "state", backend="step", threads=1, holdout=0.25)  # fmt: skip
        runner = RoundRunner.open(cfg, threading.Event())
        try:
            task = Task(
                1, runner.manifest.bundle_id, time.time() + 60, hyperparameters=Hyperparameters(loss=loss)
            )
            held_out = runner.held_out.samples[0].path
            return runner.scoring(task), held_out
        finally:
            runner.close()

    first, held_out = scoring()
    assert scoring()[0] == first  # the same files and loss after a restart
    assert scoring("balanced-softmax")[0] != first
    with open(held_out, "ab") as f:  # a held-out image rewritten
        f.write(b"\0")
    assert scoring()[0] != first


def test_a_valid_task_publishes_one_update(harness):
    harness.send(harness.task(0))
    (update,) = harness.updates()
    env = update.envelope
    assert env.type == MsgType.UPDATE and env.round == 0 and env.base_version == "start-0"
    assert env.body["bundle_id"] == harness.manifest.bundle_id
    assert env.body["num_samples"] == 9  # 12 images, a quarter held out
    assert {s.name for s in harness.manifest.exchanged} <= set(update.adapter_tensors)
    assert harness.agent.runner.state.round_status(0) == DONE
    assert harness.status()["last_round"] == 0


def test_a_duplicate_task_publishes_nothing_new(harness):
    blob = harness.task(0)
    harness.send(blob)
    harness.send(blob)  # at-least-once delivery: the same task again
    assert len(harness.updates()) == 1


def test_a_task_for_another_bundle_is_refused_with_the_reason_in_the_status(harness):
    harness.send(harness.task(0, bundle_id="f" * 64))
    assert harness.updates() == []
    assert harness.status()["notice"].startswith("refused: task is for bundle ffffffffffff")
    assert harness.agent.runner.state.round_status(0) is None


def test_a_task_with_out_of_range_hyperparameters_is_dropped(harness):
    harness.send(harness.task(0, hyperparameters={"epochs": 10**12, "lr": 1e-3, "batch_size": 4}))
    assert harness.updates() == []
    assert harness.agent.runner.state.in_progress() is None
    # The agent still serves: the next good task trains.
    harness.send(harness.task(1))
    assert [u.envelope.round for u in harness.updates()] == [1]


def test_an_allowed_unsigned_adapter_push_is_installed_and_acknowledged(step_bundle, image_dir, tmp_path):
    h = Harness(step_bundle, image_dir, tmp_path / "state", accept_unsigned_adapters=True)
    try:
        body = {"bundle_id": h.manifest.bundle_id, "version": "pushed-1"}
        env = Envelope(MsgType.ADAPTER, FLEET, AGENT, round=3, body=body)
        h.send(encode(env, h.adapter(7)), topic=TOPICS.adapter(AGENT))
        (ack,) = h.sent(TOPICS.ack(AGENT))
        assert ack.envelope.body == {"adapter_version": "pushed-1", "installed": True}
        assert h.agent.runner.state.current_adapter == "pushed-1"
        assert h.status()["adapter_version"] == "pushed-1"
    finally:
        h.close()


def test_with_a_coordinator_key_only_signed_tasks_within_policy_run_and_updates_are_signed(
    step_bundle, image_dir, tmp_path
):
    """The device's trust: a task signed by another key (forged, or a rotated coordinator key) is
    refused with a notice; a signed task past the device's policy too; a signed task within it runs,
    and the update it publishes verifies under the device's own key."""
    from fedclip.device_agent.policy import TaskPolicy
    from fedclip.sdk import messages
    from fedclip.sdk.signing import generate_key, save_private_key, save_public_key, verify_message

    coordinator, other, device = generate_key(), generate_key(), generate_key()
    pub = save_public_key(coordinator, tmp_path / "coordinator.pub.pem")
    dev = save_private_key(device, tmp_path / "device.pem")
    h = Harness(
        step_bundle, image_dir, tmp_path / "state", coordinator_key=pub, device_key=dev,
        policy=TaskPolicy(max_epochs=2),
    )  # fmt: skip
    try:

        def task(rnd: int, key, epochs: int = 1) -> bytes:
            t = messages.Task(
                rnd, h.manifest.bundle_id, time.time() + 3600, messages.Hyperparameters(epochs, 1e-3, 4),
                base_version=f"start-{rnd}", adapter=h.adapter(rnd),
            )  # fmt: skip
            return messages.encode(t, FLEET, AGENT, key=key)

        h.send(task(1, other))
        assert "signature does not verify" in h.status()["notice"] and "rotated" in h.status()["notice"]
        h.send(task(1, coordinator, epochs=50))
        assert "50 epochs exceed this device's limit of 2" in h.status()["notice"]
        assert h.updates() == []
        h.send(task(1, coordinator))
        (update,) = h.updates()
        verify_message(device.public_key(), update, "update", signer="the device key")
        assert h.status()["adapter_version"] == ""  # the task's adapter never reaches inference
    finally:
        h.close()
