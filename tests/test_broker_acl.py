"""The generated broker logins and ACL, on real brokers: mosquitto running the config
`provision broker` wrote, and the embedded amqtt broker given the same registry.

Negative checks never sleep: the attacker's forbidden messages are followed by one it may send (or
the coordinator's), and the test waits for that sentinel; whatever was refused had to arrive before it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures_broker import need_mosquitto

from fedclip.coordinator.provision import KIT_PASSWORD, Provisioner
from fedclip.sdk.broker_acl import COORDINATOR_USER, covers, mosquitto_verify
from fedclip.sdk.broker_embedded import EmbeddedBroker
from fedclip.sdk.broker_mosquitto import MosquittoBroker
from fedclip.sdk.broker_ports import free_port, wait_for_port
from fedclip.sdk.errors import ConnectRefused, MqttError
from fedclip.sdk.mqtt import MqttSession
from fedclip.sdk.wire import Topics

pytestmark = pytest.mark.broker
FLEET = "acl-fleet"
T = Topics(FLEET)
DEADLINE = 15


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("acl")
    prov = Provisioner.init(root / "state", FLEET)
    kits = {a: prov.add(a, out=root / "kits" / a).path for a in ("devA", "devB")}
    return SimpleNamespace(prov=prov, root=root, kits=kits)


class _Broker:
    """One broker kind behind one face: `url`, `apply()` (make the registry's logins take effect)."""

    def __init__(self, kind: str, fleet):
        self.kind, self.fleet = kind, fleet
        self.port = free_port()
        if kind == "mosquitto":
            need_mosquitto()
            out = fleet.root / f"broker-{self.port}"
            fleet.prov.write_broker("mosquitto", out, port=self.port)
            self.impl = MosquittoBroker(port=self.port, include_dir=out / "conf.d")
        else:
            self.impl = EmbeddedBroker(self.port, acl=fleet.prov.registry.broker_acl())
        self.impl.start()
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def apply(self) -> None:
        """mosquitto rereads the rewritten files on SIGHUP; the embedded broker takes the registry."""
        if self.kind == "mosquitto":
            self.impl.reload()
        else:
            self.impl.reload(self.fleet.prov.registry.broker_acl())

    def stop(self) -> None:
        if self.kind == "mosquitto":
            self.impl.cleanup()
        else:
            self.impl.stop()


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request, fleet):
    b = _Broker(request.param, fleet)
    try:
        yield b
    finally:
        b.stop()


def _password(kit: Path) -> str:
    return (kit / KIT_PASSWORD).read_text().strip()


def _device(broker, fleet, agent: str) -> MqttSession:
    pw = _password(fleet.kits[agent])
    return MqttSession(broker.url, agent, username=agent, password=pw, clean_session=True).connect(DEADLINE)


def _coordinator(broker, fleet) -> MqttSession:
    pw = fleet.prov.coordinator_password_file.read_text().strip()
    cid = f"coord-{uuid.uuid4().hex[:8]}"
    return MqttSession(broker.url, cid, username=COORDINATOR_USER, password=pw, clean_session=True).connect(
        DEADLINE
    )


def _until(sub: MqttSession, payload: bytes, seen: list) -> None:
    """Collect `sub`'s messages into `seen` until one carries `payload` (or fail at the deadline)."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        m = sub.get(0.2)
        if m is not None:
            seen.append(m)
            if m.payload == payload:
                return
    pytest.fail(f"{payload!r} never arrived; got {[m.payload for m in seen]}")


def _barrier(sub: MqttSession, pub: MqttSession, topic: str) -> list:
    """Probe `topic` until `sub` receives it: every subscription `sub` made before is in place."""
    seen: list = []
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        probe = f"probe-{uuid.uuid4().hex}".encode()
        pub.publish(topic, probe)
        m = sub.get(0.3)
        while m is not None:
            seen.append(m)
            if m.payload == probe:
                return seen
            m = sub.get(0.05)
    pytest.fail(f"subscriptions never became active (no probe on {topic})")


def test_device_cannot_publish_on_another_devices_or_coordinator_topics(broker, fleet):
    with _coordinator(broker, fleet) as coord:
        coord.subscribe(T.root + "#")
        seen = _barrier(coord, coord, T.root + "probe")
        with _device(broker, fleet, "devA") as a:
            forged = [
                T.update("devB"),
                T.status("devB"),
                T.ack("devB"),
                T.task("devB"),
                T.adapter("devB"),
                T.agent("devA", "task"),  # its own task: only the coordinator publishes tasks
                T.agent("devA", "adapter"),
                T.coordinator_status,
                T.rollout("r1", "ack"),
            ]
            for topic in forged:
                a.publish(topic, b"forged:" + topic.encode(), retain=topic.endswith("status"))
            a.publish(T.update("devA"), b"sentinel")  # allowed, and after every forged one
            _until(coord, b"sentinel", seen)
    got = [m.topic for m in seen if m.payload.startswith(b"forged:")]
    assert got == [], f"the broker let devA publish on {got}"


def test_device_cannot_read_another_devices_tasks_or_adapters(broker, fleet):
    with _coordinator(broker, fleet) as coord, _device(broker, fleet, "devA") as a:
        for topic in (T.task("devB"), T.adapter("devB"), T.all_agents("task"), T.root + "agents/devB/#"):
            a.subscribe(topic)
        a.subscribe(T.coordinator_status)  # readable by every device: subscribed last, the barrier
        seen = _barrier(a, coord, T.coordinator_status)
        coord.publish(T.task("devB"), b"secret-task")
        coord.publish(T.adapter("devB"), b"secret-adapter")
        coord.publish(T.task("devA"), b"own-task")  # devA may read its own, through agents/+/task
        coord.publish(T.coordinator_status, b"sentinel")
        _until(a, b"sentinel", seen)
    leaked = [m.payload for m in seen if m.payload.startswith(b"secret")]
    assert leaked == []


def test_anonymous_and_wrong_password_are_refused(broker, fleet):
    with pytest.raises(ConnectRefused):
        MqttSession(broker.url, "anon", clean_session=True).connect(DEADLINE)
    with pytest.raises(ConnectRefused):
        MqttSession(broker.url, "devA", username="devA", password="not-it", clean_session=True).connect(
            DEADLINE
        )
    # devB's password is not devA's
    with pytest.raises(ConnectRefused):
        MqttSession(
            broker.url, "devA", username="devA", password=_password(fleet.kits["devB"]), clean_session=True
        ).connect(DEADLINE)


def test_a_revoked_kit_no_longer_logs_in(broker, fleet):
    agent = f"devR-{broker.kind}"
    fleet.kits[agent] = fleet.prov.add(agent, out=fleet.root / "kits" / agent).path
    broker.apply()  # a new device logs in once the broker rereads its files
    live = _device(broker, fleet, agent)
    try:
        with _coordinator(broker, fleet) as coord:
            coord.subscribe(T.root + "#")
            seen = _barrier(coord, coord, T.root + "probe")
            fleet.prov.revoke(agent, "stolen")
            broker.apply()
            if broker.kind == "mosquitto":
                # mosquitto re-checks connected logins on reload: the open connection is cut
                end = time.monotonic() + DEADLINE
                while live.connected.is_set():
                    assert time.monotonic() < end, "the revoked device's connection survived the reload"
                    time.sleep(0.05)
            else:
                # the embedded broker keeps the connection but drops what it publishes from now on;
                # the PUBACK says the broker handled it, so devA's sentinel comes after it
                live.publish(T.update(agent), b"from-revoked")
                with _device(broker, fleet, "devA") as a:
                    a.publish(T.update("devA"), b"sentinel")
                _until(coord, b"sentinel", seen)
                assert b"from-revoked" not in [m.payload for m in seen]
    finally:
        live.close()
    with pytest.raises(ConnectRefused):
        _device(broker, fleet, agent)
    _device(broker, fleet, "devA").close()  # the others are untouched


def test_mosquitto_tls_listener_requires_the_fleets_client_certificate(tmp_path):
    need_mosquitto()
    tls_port = free_port()
    prov = Provisioner.init(tmp_path / "state", FLEET, broker=f"mqtts://127.0.0.1:{tls_port}")
    kit = prov.add("devT", tls=True, out=tmp_path / "devT").path
    out = tmp_path / "broker"
    prov.write_broker("mosquitto", out, port=0, tls_port=tls_port, require_client_cert=True)
    broker = MosquittoBroker(port=tls_port, include_dir=out / "conf.d", tls=True)
    broker.start()
    try:
        creds = dict(username="devT", password=_password(kit), clean_session=True)
        with MqttSession(
            broker.url,
            "devT",
            ca_file=str(kit / "ca.crt"),
            cert_file=str(kit / "client.crt"),
            key_file=str(kit / "client.key"),
            **creds,
        ).connect(DEADLINE) as s:
            s.publish(T.status("devT"), b"online")
        with pytest.raises(MqttError):  # the right password, but no client certificate
            MqttSession(broker.url, "devT", ca_file=str(kit / "ca.crt"), **creds).connect(5)
    finally:
        broker.cleanup()


def test_the_provisioned_embedded_broker_admits_the_coordinator_and_the_kits(fleet):
    with fleet.prov.embedded_broker() as broker:
        assert f"{COORDINATOR_USER}:" in broker.url  # the coordinator's own login rides in the URL
        with MqttSession(broker.url, "coord-url", clean_session=True).connect(DEADLINE) as coord:
            coord.subscribe(T.update("devA"))
            with _device(SimpleNamespace(url=broker.plain_url), fleet, "devA") as a:
                _barrier(coord, a, T.update("devA"))
        with pytest.raises(ConnectRefused):
            MqttSession(broker.plain_url, "anon", clean_session=True).connect(DEADLINE)


def test_a_device_cannot_take_over_another_devices_session(broker, fleet):
    """devA's login under devB's client id must not receive what the broker queued for devB."""
    b = MqttSession(broker.url, "devB", username="devB", password=_password(fleet.kits["devB"]))
    b.subscribe(T.task("devB"))
    with _coordinator(broker, fleet) as coord:
        with b.connect(DEADLINE):
            _barrier(b, coord, T.task("devB"))  # devB's persistent session holds the subscription
        coord.publish(T.task("devB"), b"secret-queued-task")  # queued for devB while it is away
        thief = MqttSession(broker.url, "devB", username="devA", password=_password(fleet.kits["devA"]))
        thief.subscribe(T.coordinator_status)
        if broker.kind == "amqtt":  # the embedded broker refuses a device login under another id
            with pytest.raises(ConnectRefused):
                thief.connect(DEADLINE)
            return
        with thief.connect(DEADLINE):  # mosquitto gives it a fresh session of its own
            # a resumed session gets its queued messages first: the barrier comes after them
            seen = _barrier(thief, coord, T.coordinator_status)
    assert [m.payload for m in seen if m.payload.startswith(b"secret")] == []


def test_a_standalone_amqtt_runs_the_generated_config(fleet, tmp_path):
    """`provision broker --kind amqtt` output, run by amqtt's own command in its own process."""
    amqtt = Path(sys.executable).with_name("amqtt")
    if not amqtt.exists():
        pytest.skip("amqtt's command is not installed next to this Python")
    port = free_port()
    conf, _ = fleet.prov.write_broker("amqtt", tmp_path / "amqtt", port=port)
    with open(tmp_path / "amqtt.log", "wb") as log:
        proc = subprocess.Popen([str(amqtt), "-c", str(conf)], stdout=log, stderr=log, start_new_session=True)
    try:
        assert wait_for_port("127.0.0.1", port, DEADLINE, alive=lambda: proc.poll() is None), (
            tmp_path / "amqtt.log"
        ).read_text()[-2000:]
        url = f"mqtt://127.0.0.1:{port}"
        with pytest.raises(ConnectRefused):
            MqttSession(url, "anon", clean_session=True).connect(DEADLINE)
        with _coordinator(SimpleNamespace(url=url), fleet) as coord:
            coord.subscribe(T.root + "#")
            seen = _barrier(coord, coord, T.root + "probe")
            with _device(SimpleNamespace(url=url), fleet, "devA") as a:
                a.publish(T.update("devB"), b"forged")
                a.publish(T.update("devA"), b"sentinel")
            _until(coord, b"sentinel", seen)
        assert b"forged" not in [m.payload for m in seen]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.mark.parametrize(
    ("rule", "requested", "covered"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b/x", False),
        ("a/b/c", "a/b", False),
        ("a/b/c", "a/b/c/d", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/+/c", True),
        ("a/b/c", "a/+/c", False),  # a subscription wider than the rule
        ("a/+/c", "a/#", False),
        ("a/#", "a", True),  # '#' matches the parent level too (MQTT)
        ("a/#", "a/b/c", True),
        ("a/#", "a/+/c", True),
        ("a/#", "b/c", False),
    ],
)
def test_topic_rule_matching(rule, requested, covered):
    assert covers(rule, requested) is covered


def test_a_corrupt_password_hash_never_verifies():
    for bad in (
        "",
        "$7$",
        "$6$x$y$z",
        "$7$abc$c2FsdA==$aGFzaA==",
        "$7$101$!!!$aGFzaA==",
        "$7$99999999$c2FsdA==$eA==",
    ):
        assert not mosquitto_verify("pw", bad)
