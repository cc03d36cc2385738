"""MqttSession against real brokers: mosquitto processes (plain, auth, TLS) and the embedded amqtt."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest
from waiting import eventually, next_message

from fedclip.sdk.broker_acl import COORDINATOR_USER, FleetAcl, Login, mosquitto_hash, new_password
from fedclip.sdk.broker_embedded import EmbeddedBroker
from fedclip.sdk.broker_ports import free_port
from fedclip.sdk.errors import (
    BrokerError,
    ConfigError,
    ConnectRefused,
    FedclipError,
    MqttError,
    PublishTimeout,
)
from fedclip.sdk.mqtt import PIPELINE, Incoming, MqttSession, Will
from fedclip.sdk.wire import Topics

pytestmark = pytest.mark.timeout(120)


def collect(session: MqttSession, n: int, timeout: float = 15, topic: str | None = None) -> list[Incoming]:
    """The next `n` messages (of `topic`, if given); fails after `timeout` seconds with fewer."""
    out: list[Incoming] = []

    def enough() -> bool:
        msg = session.get(timeout=0.2)
        if msg is not None and (topic is None or msg.topic == topic):
            out.append(msg)
        return len(out) >= n

    eventually(
        enough, timeout, lambda: f"{n} messages on {topic or 'any topic'} (got {len(out)})", interval=0
    )
    return out


def subscribed(session: MqttSession, topic: str) -> None:
    """Subscribe and make sure the broker has it: the broker handles one client's packets in order, so
    once a probe published after a second SUBSCRIBE comes back, the first one is in place too."""
    session.subscribe(topic)
    probe = f"probe/{uuid.uuid4().hex}"
    session.subscribe(probe)
    session.publish(probe, b"probe")
    next_message(session, lambda m: m.topic == probe, 15, "the subscription probe")


# ---- basic pub/sub ---------------------------------------------------------------------------------
def test_publish_subscribe_qos1_in_order(mosquitto):
    with MqttSession(mosquitto.url, "sub") as sub, MqttSession(mosquitto.url, "pub") as pub:
        subscribed(sub, "t/data/#")
        for i in range(20):
            pub.publish("t/data/x", f"m{i}".encode(), qos=1)
        got = collect(sub, 20, topic="t/data/x")
        assert [m.payload for m in got] == [f"m{i}".encode() for i in range(20)]
        assert not any(m.retain for m in got)


def test_publish_many_pipelines_windows_in_order(mosquitto):
    """More messages than one pipelined window (`PIPELINE`): all acknowledged, all delivered, in order."""
    n = PIPELINE * 2 + 17
    with MqttSession(mosquitto.url, "sub") as sub, MqttSession(mosquitto.url, "pub") as pub:
        subscribed(sub, "t/many/#")
        pub.publish_many([(f"t/many/{i % 7}", f"m{i}".encode()) for i in range(n)], qos=1, timeout=60)
        got = collect(sub, n, timeout=60)
        assert [m.payload for m in got] == [f"m{i}".encode() for i in range(n)]
        with pytest.raises(MqttError, match="cannot publish"):
            pub.publish_many([("t/ok", b"x"), ("t/+/bad", b"y")])


def test_retained_message_reaches_late_subscriber(mosquitto):
    with MqttSession(mosquitto.url, "pub") as pub:
        pub.publish("t/status", b"online", retain=True)
    with MqttSession(mosquitto.url, "late", clean_session=True) as late:
        late.subscribe("t/status")
        msg = next_message(late, lambda m: m.topic == "t/status", timeout=15)
        assert msg.payload == b"online" and msg.retain


def test_on_connect_hook_runs_on_worker_and_can_publish(mosquitto):
    seen: list[str] = []

    def hook(session: MqttSession) -> None:
        seen.append(threading.current_thread().name)
        session.publish("t/hook", b"hello", retain=True, timeout=10)  # waits: must not be on paho's thread

    with MqttSession(mosquitto.url, "obs") as obs:
        obs.subscribe("t/hook")
        s = MqttSession(mosquitto.url, "hooked")
        s.on_connect.append(hook)
        with s.connect():
            next_message(obs, lambda m: m.topic == "t/hook" and m.payload == b"hello", timeout=15)
        assert seen and all(not name.startswith("paho") for name in seen)


# ---- last will ---------------------------------------------------------------------------------------
_CLIENT = textwrap.dedent(
    """
    import sys, time
    from fedclip.sdk.mqtt import MqttSession, Will
    url, topic = sys.argv[1], sys.argv[2]
    s = MqttSession(url, "doomed", will=Will(topic, b"offline"))
    s.connect(timeout=20)
    s.publish(topic, b"online", retain=True)
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_last_will_on_sigkill_is_retained(mosquitto):
    topic = "fedclip/f/agents/doomed/status"
    with MqttSession(mosquitto.url, "coord") as coord:
        subscribed(coord, "fedclip/f/agents/+/status")
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, mosquitto.url, topic], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
            next_message(coord, lambda m: m.topic == topic and m.payload == b"online", timeout=15)
            os.kill(proc.pid, signal.SIGKILL)
            msg = next_message(coord, lambda m: m.topic == topic and m.payload == b"offline", timeout=30)
        finally:
            proc.kill()
            proc.wait(10)
    with MqttSession(mosquitto.url, "late", clean_session=True) as late:
        late.subscribe(topic)
        msg = next_message(late, lambda m: m.topic == topic, timeout=15)
        assert msg.payload == b"offline" and msg.retain


def test_clean_close_sends_no_will(mosquitto):
    topic = "t/will"
    with MqttSession(mosquitto.url, "watcher") as watcher:
        subscribed(watcher, topic)
        with MqttSession(mosquitto.url, "polite", will=Will(topic, b"offline", retain=False)) as s:
            s.publish(topic, b"online")
        with MqttSession(mosquitto.url, "marker") as marker:
            marker.publish(topic, b"marker")  # arrives after a will would have
        got = collect(watcher, 2, topic=topic)
        assert [m.payload for m in got] == [b"online", b"marker"]


def test_a_stale_will_over_the_status_is_answered_with_the_status_again(mosquitto):
    """A cluster node that lost the agent's old connection publishes its will late, after the agent
    said `online` through another node; the session puts its status back, retained."""
    topic = "fedclip/f/agents/a7/status"
    with MqttSession(mosquitto.url, "watch") as watch:
        subscribed(watch, topic)
        with MqttSession(mosquitto.url, "a7", will=Will(topic, b"offline")) as agent:
            agent.publish(topic, b"online", retain=True)
            next_message(watch, lambda m: m.topic == topic and m.payload == b"online", 15, "online")
            with MqttSession(mosquitto.url, "old-node") as node:  # the stale will, as a node sends it
                node.publish(topic, b"offline (an earlier connection)", retain=True)
            got = collect(watch, 2, topic=topic)
            assert [m.payload for m in got] == [b"offline (an earlier connection)", b"online"]
    with MqttSession(mosquitto.url, "late", clean_session=True) as late:
        late.subscribe(topic)
        msg = next_message(late, lambda m: m.topic == topic, timeout=15)
        assert msg.payload == b"online" and msg.retain  # the agent closed cleanly: no will since


def test_the_sessions_own_burst_of_statuses_is_never_taken_for_a_stale_will(mosquitto):
    """Echoes of the session's earlier words arrive after it said newer ones; they are not overwrites.
    Taken for one, each would add a publish and could put an older status back over a newer one."""
    topic = "fedclip/f/agents/a8/status"
    words = [f"status {i}".encode() for i in range(20)]
    with MqttSession(mosquitto.url, "watch") as watch:
        subscribed(watch, topic)
        with MqttSession(mosquitto.url, "a8", will=Will(topic, b"offline")) as agent:
            assert agent.connected.wait(15)
            agent.publish_many([(topic, w) for w in words], retain=True)  # all handed over, then acked
            assert [m.payload for m in collect(watch, len(words), topic=topic)] == words
            # A foreign word afterwards is answered once, with the newest word; nothing came between.
            with MqttSession(mosquitto.url, "old-node") as node:
                node.publish(topic, b"offline (an earlier connection)", retain=True)
            got = [m.payload for m in collect(watch, 2, topic=topic)]
            assert got == [b"offline (an earlier connection)", words[-1]]


# ---- persistent sessions -----------------------------------------------------------------------------
def _persistent_session_roundtrip(url: str, **creds) -> None:
    topic = "fedclip/f/agents/a1/task"
    with MqttSession(url, "a1", **creds) as agent:
        agent.subscribe(topic)
        assert agent.connected.wait(5)
    # the agent is away: its session keeps the subscription and queues QoS 1 messages
    with MqttSession(url, "coordinator", **creds) as coord:
        for i in range(3):
            coord.publish(topic, f"task{i}".encode())
    with MqttSession(url, "a1", **creds) as agent:  # same id, no subscribe: the broker kept it
        got = collect(agent, 3, topic=topic)
        assert [m.payload for m in got] == [b"task0", b"task1", b"task2"]


def test_persistent_session_receives_messages_sent_while_away(mosquitto):
    _persistent_session_roundtrip(mosquitto.url)


def test_clean_session_forgets_messages_sent_while_away(mosquitto):
    topic = "t/forgotten"
    with MqttSession(mosquitto.url, "c1", clean_session=True) as s:
        s.subscribe(topic)
    with MqttSession(mosquitto.url, "pub") as pub:
        pub.publish(topic, b"lost")
    with MqttSession(mosquitto.url, "c1", clean_session=True) as s:
        s.subscribe(topic)
        with MqttSession(mosquitto.url, "pub") as pub:
            pub.publish(topic, b"fresh")
        got = collect(s, 1, topic=topic)
        assert [m.payload for m in got] == [b"fresh"]


def test_persistent_session_mqtt5(mosquitto):
    _persistent_session_roundtrip(mosquitto.url, protocol="5")


def test_broker_restart_mid_session_publish_completes(mosquitto):
    connects: list[int] = []
    topic = "t/outage"
    sub = MqttSession(mosquitto.url, "receiver")
    pub = MqttSession(mosquitto.url, "sender")
    pub.on_connect.append(lambda s: connects.append(1))
    with sub.connect(), pub.connect():
        subscribed(sub, topic)
        mosquitto.stop()
        done = threading.Event()
        errors: list[BaseException] = []

        calling = threading.Event()

        def publish_during_outage() -> None:
            try:
                calling.set()
                pub.publish(topic, b"sent-during-outage", timeout=60)
                done.set()
            except BaseException as e:  # surfaced by the assertion below
                errors.append(e)

        eventually(lambda: not pub.connected.is_set(), 30, "the sender to see the broker go")
        t = threading.Thread(target=publish_during_outage)
        t.start()
        eventually(calling.is_set, 30, "the publish to be made")
        assert not done.is_set()  # the broker is down: the publish waits for it
        mosquitto.start()
        t.join(70)
        assert not errors, errors
        assert done.is_set()
        assert pub.connected.wait(30) and sub.connected.wait(30)
        next_message(sub, lambda m: m.topic == topic and m.payload == b"sent-during-outage", timeout=30)
        # the on_connect hook runs again after the reconnect, on the session's hook thread (by
        # design after `connected` is set, so a hook may publish): wait for it, do not race it
        eventually(lambda: len(connects) >= 2, 30, "the on_connect hook to run after the reconnect")


def test_publish_times_out_while_broker_down(mosquitto):
    with MqttSession(mosquitto.url, "lonely") as s:
        mosquitto.stop()
        with pytest.raises(PublishTimeout, match="not acknowledged"):
            s.publish("t/x", b"x", timeout=1)


# ---- auth and TLS ------------------------------------------------------------------------------------
def test_password_auth_accepts_valid_credentials(mosquitto_auth):
    creds = {"username": mosquitto_auth.username, "password": mosquitto_auth.password}
    _persistent_session_roundtrip(mosquitto_auth.url, **creds)


def test_wrong_password_is_a_clear_error(mosquitto_auth):
    s = MqttSession(mosquitto_auth.url, "intruder", username=mosquitto_auth.username, password="wrong")
    with pytest.raises(ConnectRefused, match="refused client .intruder.: .*username and password"):
        s.connect(timeout=10)
    assert not s.connected.is_set()


def test_missing_credentials_are_refused(mosquitto_auth):
    with pytest.raises(ConnectRefused):
        MqttSession(mosquitto_auth.url, "anon").connect(timeout=10)


def test_tls_with_ca_file(mosquitto_tls):
    ca = str(mosquitto_tls.certs["ca.crt"])
    assert mosquitto_tls.url.startswith("mqtts://")
    with (
        MqttSession(mosquitto_tls.url, "tls-sub", ca_file=ca) as sub,
        MqttSession(mosquitto_tls.url, "tls-pub", ca_file=ca) as pub,
    ):
        subscribed(sub, "t/tls")
        pub.publish("t/tls", b"secret")
        next_message(sub, lambda m: m.payload == b"secret", timeout=15)


def test_tls_with_client_certificate(mosquitto_tls):
    certs = mosquitto_tls.certs
    with MqttSession(
        mosquitto_tls.url,
        "tls-cert",
        ca_file=str(certs["ca.crt"]),
        cert_file=str(certs["client.crt"]),
        key_file=str(certs["client.key"]),
    ) as s:
        s.publish("t/tls", b"x")


def test_tls_without_the_ca_is_refused(mosquitto_tls):
    with pytest.raises(MqttError, match="TLS"):
        MqttSession(mosquitto_tls.url, "tls-bad").connect(timeout=10)


# ---- errors ------------------------------------------------------------------------------------------
def test_unreachable_broker_times_out_with_clear_error():
    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(MqttError, match="unreachable"):
        MqttSession(url, "nobody").connect(timeout=1.5)


@pytest.mark.parametrize("url", ["http://x:1", "mqtt://", "mqtt://host:notaport", "tcp://h"])
def test_bad_url_is_a_config_error(url):
    with pytest.raises(ConfigError):
        MqttSession(url, "x")


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError):
        MqttSession("mqtt://h:1", "")
    with pytest.raises(ConfigError):
        MqttSession("mqtt://h:1", "x", protocol="4")
    with pytest.raises(ConfigError, match="not mqtts"):
        MqttSession("mqtt://h:1", "x", ca_file="/nonexistent")
    assert issubclass(MqttError, FedclipError)


# ---- embedded broker -----------------------------------------------------------------------------------
def test_embedded_broker_pub_sub(embedded_broker):
    with MqttSession(embedded_broker.url, "e-sub") as sub, MqttSession(embedded_broker.url, "e-pub") as pub:
        subscribed(sub, "t/e")
        for i in range(5):
            pub.publish("t/e", bytes([i]))
        got = collect(sub, 5, topic="t/e")
        assert [m.payload for m in got] == [bytes([i]) for i in range(5)]


def test_embedded_broker_persistent_session(embedded_broker):
    _persistent_session_roundtrip(embedded_broker.url)


def test_publish_to_wildcard_topic_is_an_mqtt_error(mosquitto):
    with MqttSession(mosquitto.url, "p") as s, pytest.raises(MqttError, match="cannot publish"):
        s.publish("t/+/x", b"x")


def test_transport_errors_are_one_family_in_sdk_errors():
    # Callers catch FedclipError for "a clear one-line error"; MqttError for anything the session raises.
    assert issubclass(MqttError, FedclipError) and issubclass(BrokerError, FedclipError)
    assert issubclass(ConnectRefused, MqttError) and issubclass(PublishTimeout, MqttError)


def test_a_refused_subscription_is_asked_for_again_until_the_broker_grants_it(caplog):
    """A SUBACK failure (a NATS cluster sends one when JetStream cannot make the consumer in time) is
    retried while connected, with no reconnect. Here the embedded broker's fleet ACL refuses the topic,
    then a new ACL grants it: the retained message arrives only if the session asked again."""
    fleet, pw, coord_pw = "retry-fleet", new_password(), new_password()
    topics = Topics(fleet)

    def acl(reads_as: str) -> FleetAcl:
        # A device login's topic rules follow its device id: reading as devZ, devA's task is not its own.
        device = Login("devA", mosquitto_hash(pw), agent=reads_as)
        return FleetAcl(fleet, (device, Login(COORDINATOR_USER, mosquitto_hash(coord_pw))))

    caplog.set_level(logging.WARNING, logger="fedclip.sdk.mqtt_subscriptions")
    refused = lambda: [r for r in caplog.records if "refused the subscription" in r.getMessage()]  # noqa: E731
    with EmbeddedBroker(username=COORDINATOR_USER, password=coord_pw, acl=acl("devZ")) as broker:
        with (
            MqttSession(broker.url, "coord", clean_session=True) as coord,
            MqttSession(broker.plain_url, "devA", username="devA", password=pw, clean_session=True) as dev,
        ):
            coord.publish(topics.task("devA"), b"task", retain=True)
            dev.subscribe(topics.task("devA"))
            eventually(refused, 30, "the broker's refusal of the subscription")
            assert dev.get(timeout=0) is None
            broker.reload(acl("devA"))
            msg = next_message(dev, lambda m: m.topic == topics.task("devA"), 30, "the retained task")
            assert msg.payload == b"task" and dev.connected.is_set()


def test_a_refused_subscription_backs_off_doubling_to_a_cap_with_jitter():
    from fedclip.sdk.mqtt_subscriptions import RESUBSCRIBE_MAX_S, RESUBSCRIBE_S, resubscribe_delay

    for refusals, base in [(1, RESUBSCRIBE_S), (2, 2 * RESUBSCRIBE_S), (3, 4 * RESUBSCRIBE_S)]:
        delays = [resubscribe_delay(refusals) for _ in range(200)]
        assert all(0.5 * base <= d <= 1.5 * base for d in delays)
        assert max(delays) - min(delays) > 0.2 * base  # jittered: a refused crowd spreads out
    assert all(resubscribe_delay(50) <= 1.5 * RESUBSCRIBE_MAX_S for _ in range(200))  # capped
