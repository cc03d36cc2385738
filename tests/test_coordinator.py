"""The round loop over a real mosquitto, with scripted agents playing the device side.

The agents here are stand-ins built on `MqttSession` and `fedclip.sdk.wire`: they read their task and
publish an update of known content, so every aggregate can be checked exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from waiting import eventually, next_message

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.registry import Registry, load_initial_adapter
from fedclip.coordinator.server import Server
from fedclip.coordinator.store import Store
from fedclip.sdk.adapters import encode_tensors
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import FLEET_GAIN, FLEET_GAIN_HELPED, FLEET_GAIN_HURT
from fedclip.sdk.mqtt import MqttSession, Will
from fedclip.sdk.wire import Envelope, Message, MsgType, Topics, decode, encode

FLEET = "t1"
pytestmark = pytest.mark.timeout(180)


def wait_for(pred, timeout=30.0, what="condition"):
    return eventually(pred, timeout, what)


class ScriptedAgent:
    """Plays one device: retained status, reads its tasks, publishes updates it is told to."""

    def __init__(self, url: str, agent_id: str, bundle_id: str):
        self.id = agent_id
        self.bundle_id = bundle_id
        self.topics = Topics(FLEET)
        off = self._status("offline")
        self.session = MqttSession(url, f"agent-{agent_id}", will=Will(self.topics.status(agent_id), off))
        self.session.subscribe(self.topics.task(agent_id), 1)
        self.session.connect()
        self.session.publish(self.topics.status(agent_id), self._status("online"), retain=True)

    def _status(self, state: str) -> bytes:
        body = {"state": state, "bundle_id": self.bundle_id, "adapter_version": "", "last_round": -1}
        return encode(Envelope(MsgType.STATUS, FLEET, self.id, body=body))

    def task(self, round_id: int | None = None, timeout: float = 30.0) -> Message:
        def wanted(msg) -> bool:
            if not msg.payload:  # an emptied retained task: nothing to do
                return False
            return round_id is None or decode(msg.payload, fleet=FLEET).envelope.round == round_id

        msg = next_message(self.session, wanted, timeout, f"{self.id}'s task for round {round_id}")
        return decode(msg.payload, fleet=FLEET, expect=MsgType.TASK)

    def update(
        self,
        task: Message,
        delta: float,
        num_samples: int = 10,
        agent: str | None = None,
        round_id: int | None = None,
        tensors: dict | None = None,
        stats: dict | None = None,
        metrics: dict | None = None,
    ) -> bytes:
        """`metrics`: added to the loss and accuracy `delta` stands for."""
        env = task.envelope
        if tensors is None:
            tensors = {k: (v + np.float32(delta)).astype(v.dtype) for k, v in task.adapter_tensors.items()}
        body = {
            "bundle_id": self.bundle_id,
            "num_samples": num_samples,
            "metrics": {"loss": 1.0 - delta, "accuracy": delta, **(metrics or {})},
        }
        out = Envelope(
            MsgType.UPDATE,
            FLEET,
            agent or self.id,
            round=env.round if round_id is None else round_id,
            base_version=env.base_version,
            body=body,
        )
        return encode(out, {**tensors, **(stats or {})})

    def send(self, payload: bytes, topic_agent: str | None = None) -> None:
        self.session.publish(self.topics.update(topic_agent or self.id), payload, qos=1)

    def close(self) -> None:
        self.session.close()


class Running:
    """A Server.run() on a thread; `join()` re-raises what it raised."""

    def __init__(self, cfg: CoordConfig):
        manifest = Manifest.load(cfg.bundle)
        self.server = Server.from_config(cfg, manifest, load_initial_adapter(cfg.bundle, manifest))
        self.result: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.result.append(self.server.run())
        except BaseException as e:  # surfaced by join()
            self.result.append(e)

    def join(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "coordinator did not finish"
        if isinstance(self.result[0], BaseException):
            raise self.result[0]
        return self.result[0]


def _cfg(url, bundle, state, **kw) -> CoordConfig:
    base = dict(
        broker=url,
        fleet=FLEET,
        bundle=bundle,
        state=state,
        strategy="fedavg",
        rounds=1,
        min_updates=2,
        round_timeout=30.0,
        selection="all",
    )
    base.update(kw)
    return CoordConfig(**base)


def _db(state: Path):
    return Store(state, readonly=True)


@pytest.fixture
def lora_bundle(bundle_factory) -> Path:
    return bundle_factory(adapter="lora", labels=("a", "b", "c"))


def _global(state: Path, version: str) -> dict[str, np.ndarray]:
    with _db(state) as s:
        return Registry(s, "").load(version)[0]


def _retained(url: str, topic: str) -> list[tuple[str, bytes]]:
    """Retained messages a fresh subscriber gets on `topic`. The broker handles one client's packets in
    order, so all of them arrive before a probe the same client publishes after subscribing."""
    s = MqttSession(url, f"probe-{time.monotonic_ns()}", clean_session=True)
    probe = f"probe/{uuid.uuid4().hex}"
    s.subscribe(topic, 1)
    s.subscribe(probe, 1)
    s.connect()
    s.publish(probe, b"probe")
    out: list[tuple[str, bytes]] = []

    def probe_back() -> bool:
        m = s.get(0.2)
        if m is None:
            return False
        if m.topic == probe:
            return True
        if m.retain:
            out.append((m.topic, m.payload))
        return False

    eventually(probe_back, 30, "the probe published after the retained messages", interval=0)
    s.close()
    return out


def test_full_rounds_fedavg(mosquitto, lora_bundle, tmp_path, caplog):
    manifest = Manifest.load(lora_bundle)
    init = load_initial_adapter(lora_bundle, manifest)
    state = tmp_path / "state"
    a, b = (ScriptedAgent(mosquitto.url, n, manifest.bundle_id) for n in ("a", "b"))
    run = Running(_cfg(mosquitto.url, lora_bundle, state, rounds=2))
    try:
        ta, tb = a.task(1), b.task(1)
        assert ta.envelope.base_version == "g-r0"
        assert ta.envelope.body["hyperparameters"]["epochs"] == 1
        for k, v in init.items():
            np.testing.assert_array_equal(ta.tensors[k], v)
        a.send(a.update(ta, 0.1, num_samples=10))
        b.send(b.update(tb, 0.5, num_samples=30))
        ta2 = a.task(2)
        assert ta2.envelope.base_version == "g-r1"
        g1 = _global(state, "g-r1")
        for k, v in init.items():  # np.average with sample weights 10 and 30
            np.testing.assert_allclose(
                g1[k], np.average([v + 0.1, v + 0.5], axis=0, weights=[10, 30]), atol=1e-6
            )
            np.testing.assert_allclose(ta2.tensors[k], g1[k], atol=0)
        tb2 = b.task(2)
        # agents say how the fleet's adapter scored against the one they trained (FLEET_GAIN)
        a.send(a.update(ta2, 0.2, metrics={FLEET_GAIN: -0.05}))
        b.send(b.update(tb2, 0.2, metrics={FLEET_GAIN: -0.01}))
        assert run.join() == 0
    finally:
        a.close()
        b.close()
    with _db(state) as s:
        assert [(r.round, r.state) for r in s.rounds()] == [(1, "aggregated"), (2, "aggregated")]
        assert [u.agent for u in s.updates(2)] == ["a", "b"]
        assert {v.version for v in s.versions()} == {"g-r0", "g-r1", "g-r2"}
        assert s.version("g-r2").parent == "g-r1"
        assert s.metrics(1)[0] == (1, "", "accuracy", pytest.approx(0.4))
    lines = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2] and lines[0]["agents"]["b"]["accuracy"] == 0.5
    # round 1: no agent reported a fleet gain, so no share; round 2: its sample-weighted mean (10
    # samples each) and the shares of agents the fleet's adapter helped (none) and cost (both), which
    # the log says
    assert FLEET_GAIN not in lines[0]["metrics"] and FLEET_GAIN_HELPED not in lines[0]["metrics"]
    assert lines[1]["metrics"][FLEET_GAIN] == pytest.approx(-0.03)
    assert (lines[1]["metrics"][FLEET_GAIN_HELPED], lines[1]["metrics"][FLEET_GAIN_HURT]) == (0.0, 1.0)
    warned = [r.getMessage() for r in caplog.records if "the adapter the fleet sent" in r.getMessage()]
    assert warned == [
        "round 2: the adapter the fleet sent scored 3.0 points below what the agents had trained "
        "themselves (it helped 0% of them and cost 100%); a personalized strategy (fleet-lora, ce-lora) "
        "hands each device back its own fit (docs/aggregation.md)"
    ]
    assert _retained(mosquitto.url, Topics(FLEET).all_agents("task")) == []  # no stale task left
    status = _retained(mosquitto.url, Topics(FLEET).coordinator_status)
    assert json.loads(status[0][1])["body"]["state"] == "offline"


def test_quorum_failure_extends_once_then_fails_and_starts_again(mosquitto, lora_bundle, tmp_path):
    manifest = Manifest.load(lora_bundle)
    state = tmp_path / "state"
    a, b = (ScriptedAgent(mosquitto.url, n, manifest.bundle_id) for n in ("a", "b"))
    # a replies at once, b never does: 3 s leave a loaded machine time to deliver a's update
    run = Running(_cfg(mosquitto.url, lora_bundle, state, round_timeout=3.0))
    try:
        ta, tb = a.task(1), b.task(1)
        a.send(a.update(ta, 0.3))
        # b stays silent: the deadline passes, the round is extended once (b gets its task again) ...
        again = b.task(1)
        assert again.envelope.body["deadline"] > tb.envelope.body["deadline"]
        with _db(state) as s:
            wait_for(lambda: s.get_round(1).extended, what="extension")
        # ... then fails; round 2 starts with both agents
        ta2, tb2 = a.task(2), b.task(2)
        assert ta2.envelope.base_version == "g-r0"  # nothing was aggregated from round 1
        b.send(b.update(tb, 0.9))  # late: round 1 is closed
        a.send(a.update(ta2, 0.1))
        b.send(b.update(tb2, 0.2))
        assert run.join() == 0
    finally:
        a.close()
        b.close()
    with _db(state) as s:
        r1, r2 = s.rounds()
        assert (r1.state, r1.extended, r2.state) == ("failed", True, "aggregated")
        assert "quorum" in r1.reason
        assert [u.agent for u in s.updates(1)] == ["a"]  # b's late update was not stored
        assert any(agent == "b" and rnd == 1 and "late" in reason for _, agent, rnd, reason in s.rejections())
        assert s.head("global") == "g-r2" and s.version("g-r2").parent == "g-r0"
    init = load_initial_adapter(lora_bundle, manifest)
    g2 = _global(state, "g-r2")
    for k, v in init.items():
        np.testing.assert_allclose(g2[k], v + 0.15, atol=1e-6)


def test_hostile_updates_are_rejected_and_change_nothing(mosquitto, lora_bundle, tmp_path):
    manifest = Manifest.load(lora_bundle)
    init = load_initial_adapter(lora_bundle, manifest)
    state = tmp_path / "state"
    a, b = (ScriptedAgent(mosquitto.url, n, manifest.bundle_id) for n in ("a", "b"))
    run = Running(_cfg(mosquitto.url, lora_bundle, state, max_payload_mb=0.5, max_update_norm=100.0))
    attacker = MqttSession(mosquitto.url, "attacker", clean_session=True).connect()
    topics = Topics(FLEET)
    try:
        ta, tb = a.task(1), b.task(1)
        name = sorted(ta.adapter_tensors)[0]
        bad_shape = {**ta.adapter_tensors, name: np.zeros((3, 3), np.float32)}
        nan = {**ta.adapter_tensors, name: np.full(ta.tensors[name].shape, np.nan, np.float32)}
        f64 = {k: v.astype(np.float64) for k, v in ta.adapter_tensors.items()}
        huge_norm = {k: v + 1000 for k, v in ta.adapter_tensors.items()}
        extra = {**ta.adapter_tensors, "evil": np.zeros(2, np.float32)}
        json_env = Envelope(
            MsgType.UPDATE,
            FLEET,
            "a",
            round=1,
            base_version="g-r0",
            body={"bundle_id": manifest.bundle_id, "num_samples": 5, "tensors": {name: [1, 2]}},
        )
        hostile = [
            ("a", b"\x00\x01garbage bytes \xff"),
            ("a", b"{not json"),
            ("a", encode(json_env)),  # JSON where tensors belong
            ("a", a.update(ta, 0, tensors=bad_shape)),
            ("a", encode_tensors({k: v for k, v in nan.items()}, {"fedclip": "{}"})),
            ("a", a.update(ta, 0, tensors=nan)),
            ("a", a.update(ta, 0, tensors=f64)),
            ("a", a.update(ta, 0, tensors=huge_norm)),
            ("a", a.update(ta, 0, tensors=extra)),
            ("a", b"\x00" * (600 * 1024)),  # over the payload limit
            ("b", a.update(ta, 0.7)),  # a's update on b's topic
            ("a", a.update(ta, 0.7, round_id=99)),  # a round that does not exist
            ("zed", a.update(ta, 0.7, agent="zed")),  # not selected
            ("a", a.update(ta, 0.1, stats={"stats/raw_images": np.zeros(4, np.float32)})),
        ]
        for topic_agent, payload in hostile:
            attacker.publish(topics.update(topic_agent), payload, qos=1)
        attacker.publish(topics.agent("a", "status"), b"garbage", qos=1)  # a bad status: recorded too
        with _db(state) as s:
            wait_for(lambda: len(s.rejections()) >= len(hostile) + 1, what="all rejections")
            reasons = [r[3] for r in s.rejections()]
            assert s.updates(1) == []
        for needle in (
            "not a safetensors",
            "not valid JSON",
            "unknown body field 'tensors'",  # JSON where tensors belong: refused before the tensor check
            "shape",
            "non-finite",
            "dtype",
            "norm",
            "unknown tensor",
            "exceeds the limit",
            "envelope names agent 'a', the topic 'b'",
            "not the current round",
            "not selected",
            "unknown statistic",
        ):
            assert any(needle in r for r in reasons), (needle, reasons)
        a.send(a.update(ta, 0.1))
        a.send(a.update(ta, 0.1))  # a QoS 1 redelivery: idempotent
        b.send(b.update(tb, 0.3))
        assert run.join() == 0
    finally:
        attacker.close()
        a.close()
        b.close()
    g1 = _global(state, "g-r1")
    for k, v in init.items():
        np.testing.assert_allclose(g1[k], v + 0.2, atol=1e-6)
    with _db(state) as s:
        assert [u.agent for u in s.updates(1)] == ["a", "b"]


def _serve(url, bundle, state, log: Path, crash_at: str = "") -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "fedclip.coordinator.cli",
        "serve",
        "--broker",
        url,
        "--fleet",
        FLEET,
        "--bundle",
        str(bundle),
        "--state",
        str(state),
        "--strategy",
        "fedavg",
        "--rounds",
        "1",
        "--min-updates",
        "3",
        "--round-timeout",
        "120",
    ]
    env = {**os.environ, "FEDCLIP_COORD_CRASH_AT": crash_at}
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)


def test_kill_9_mid_collection_loses_nothing_counts_nothing_twice(mosquitto, lora_bundle, tmp_path):
    manifest = Manifest.load(lora_bundle)
    init = load_initial_adapter(lora_bundle, manifest)
    state, log = tmp_path / "state", tmp_path / "serve.log"
    agents = {n: ScriptedAgent(mosquitto.url, n, manifest.bundle_id) for n in ("a", "b", "c")}
    proc = _serve(mosquitto.url, lora_bundle, state, log)
    try:
        tasks = {n: ag.task(1, timeout=60) for n, ag in agents.items()}
        payloads = {n: agents[n].update(tasks[n], d) for n, d in (("a", 0.1), ("b", 0.2), ("c", 0.6))}
        agents["a"].send(payloads["a"])
        with _db(state) as s:
            wait_for(lambda: len(s.updates(1)) == 1, what="a's update stored")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # While the coordinator is dead: b's update waits in the broker (persistent session), and a
        # sends its update again as a device that never saw its PUBACK would.
        agents["b"].send(payloads["b"])
        agents["a"].send(payloads["a"])
        proc = _serve(mosquitto.url, lora_bundle, state, log)
        with _db(state) as s:
            wait_for(lambda: len(s.updates(1)) == 2, what="b's update stored after the restart")
        agents["c"].send(payloads["c"])
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        for ag in agents.values():
            ag.close()
    with _db(state) as s:
        ups = s.updates(1)
        assert [u.agent for u in ups] == ["a", "b", "c"]  # each exactly once (primary key round, agent)
        assert s.get_round(1).state == "aggregated"
        assert [r.round for r in s.rounds()] == [1]  # the same round continued
    g1 = _global(state, "g-r1")
    for k, v in init.items():
        np.testing.assert_allclose(g1[k], v + 0.3, atol=1e-6)
    assert "resumed after a restart" in log.read_text()


@pytest.mark.parametrize("point", ["update-received", "update-stored"])
def test_kill_9_between_receive_and_ack(mosquitto, lora_bundle, tmp_path, point):
    """Killed after the update arrived but before its PUBACK: the broker delivers it again.

    "update-received" dies before the commit: without manual acks the update would be lost (paho
    would have acknowledged it when the callback returned). "update-stored" dies after the commit:
    the redelivered copy must be recognized and not counted twice.
    """
    manifest = Manifest.load(lora_bundle)
    init = load_initial_adapter(lora_bundle, manifest)
    state, log = tmp_path / "state", tmp_path / "serve.log"
    agents = {n: ScriptedAgent(mosquitto.url, n, manifest.bundle_id) for n in ("a", "b", "c")}
    proc = _serve(mosquitto.url, lora_bundle, state, log, crash_at=f"{point}:a")
    try:
        tasks = {n: ag.task(1, timeout=60) for n, ag in agents.items()}
        agents["a"].send(agents["a"].update(tasks["a"], 0.3))
        assert proc.wait(60) == -signal.SIGKILL
        with _db(state) as s:
            assert len(s.updates(1)) == (1 if point == "update-stored" else 0)
        proc = _serve(mosquitto.url, lora_bundle, state, log)
        with _db(state) as s:
            wait_for(lambda: len(s.updates(1)) == 1, what="a's update after the restart")
        agents["b"].send(agents["b"].update(tasks["b"], 0.3))
        agents["c"].send(agents["c"].update(tasks["c"], 0.3))
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        for ag in agents.values():
            ag.close()
    with _db(state) as s:
        assert [u.agent for u in s.updates(1)] == ["a", "b", "c"]
    g1 = _global(state, "g-r1")
    for k, v in init.items():
        np.testing.assert_allclose(g1[k], v + 0.3, atol=1e-6)
    if point == "update-stored":
        assert "duplicate update from a ignored" in log.read_text()


def _stats(labels: int, dim: int, shift: float, hist: list[float]) -> dict[str, np.ndarray]:
    return {
        "stats/label_hist": np.asarray(hist, np.float32),
        "stats/mean": np.full((labels, dim), shift, np.float32),
        "stats/var": np.ones((labels, dim), np.float32),
    }


def test_ce_lora_rounds_personalize_and_restart_from_personal_adapters(mosquitto, bundle_factory, tmp_path):
    from fedclip.coordinator import strategies
    from fedclip.coordinator.strategies import StrategyOptions, Update

    bundle = bundle_factory(adapter="tri-lora", labels=("a", "b", "c"))
    manifest = Manifest.load(bundle)
    labels, dim = len(manifest.task.labels), manifest.base_model.embed_dim
    state = tmp_path / "state"
    names = ("a", "b", "c")
    agents = {n: ScriptedAgent(mosquitto.url, n, manifest.bundle_id) for n in names}
    run = Running(
        _cfg(mosquitto.url, bundle, state, strategy="ce-lora", rounds=2, min_updates=3, lam=0.5, tau=0.1)
    )
    plan = {"a": (0.1, 0.0, [10, 0, 0]), "b": (0.12, 0.1, [9, 1, 0]), "c": (-0.2, 3.0, [0, 0, 10])}
    sent = {}
    try:
        for n, ag in agents.items():
            task = ag.task(1)
            assert task.envelope.body["stats"] == ["histogram", "gaussian"]
            assert task.envelope.base_version == "g-r0"
            delta, shift, hist = plan[n]
            st = _stats(labels, dim, shift, hist)
            tensors = {k: (v + np.float32(delta)).astype(v.dtype) for k, v in task.adapter_tensors.items()}
            sent[n] = Update(n, 10, tensors, task.adapter_tensors, st)
            ag.send(ag.update(task, delta, stats=st))
        # a missing statistic is a rejection, not a crash (ce-lora needs the gaussian stats)
        second = {n: ag.task(2) for n, ag in agents.items()}
        for n, task in second.items():
            assert task.envelope.base_version == f"a-{n}-r1"  # each starts from its personalized C
        bad = agents["a"].update(second["a"], 0.0, stats={"stats/label_hist": np.ones(labels, np.float32)})
        agents["a"].send(bad)
        for n, ag in agents.items():
            ag.send(ag.update(second[n], 0.0, stats=_stats(labels, dim, 0.0, [1, 1, 1])))
        assert run.join() == 0
    finally:
        for ag in agents.values():
            ag.close()
    expect = strategies.create("ce-lora", StrategyOptions(lam=0.5, tau=0.1)).aggregate(1, list(sent.values()))
    with _db(state) as s:
        reg = Registry(s, "")
        for n in names:
            got = reg.load(f"a-{n}-r1")[0]
            for k in got:
                np.testing.assert_allclose(got[k], expect.per_agent[n][k], atol=1e-6)
            np.testing.assert_array_equal(second[n].tensors[sorted(got)[0]], got[sorted(got)[0]])
        for k, v in reg.load("g-r1")[0].items():
            np.testing.assert_allclose(v, expect.global_tensors[k], atol=1e-6)
        assert any("statistic 'stats/mean' is missing" in r[3] for r in s.rejections())
        assert {v.version for v in s.versions("agent")} >= {"a-a-r2", "a-b-r2", "a-c-r2"}
        assert s.version("a-a-r2").parent == "a-a-r1"
    # a and b are alike, c is not: a's personalized C stays close to a and b, far from c
    ca = expect.per_agent["a"]
    k0 = sorted(ca)[0]
    assert abs(float((ca[k0] - sent["a"].tensors[k0]).mean())) < 0.05


@pytest.mark.parametrize("http", [True, False])
def test_bundle_server_and_rollouts_are_set_up_next_to_the_rounds(lora_bundle, tmp_path, http):
    from fedclip.sdk.signing import PUBLIC_KEY_NAME

    manifest = Manifest.load(lora_bundle)
    state = tmp_path / "state"
    cfg = _cfg("mqtt://127.0.0.1:1", lora_bundle, state, http=http)  # never connected here
    server = Server.from_config(cfg, manifest, load_initial_adapter(lora_bundle, manifest))
    services = server.services.start()
    try:
        assert (state / "keys" / PUBLIC_KEY_NAME).is_file() and (state / "rollout.sqlite").is_file()
        body = decode(server.status_payload("online"), fleet=FLEET).envelope.body
        if http:
            assert body["bundle_url"] == services.bundles.url == services.rollouts.url_base
            assert services.rollouts.url_root == lora_bundle
        else:
            assert services.bundles is None and services.rollouts.url_base is None
            assert "bundle_url" not in body
    finally:
        services.stop()
        server.store.close()
