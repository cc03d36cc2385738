"""The brokers fedclip starts itself: embedded amqtt and the mosquitto wrapper used by tests and users."""

from __future__ import annotations

import socket

import pytest
from fixtures_broker import need_mosquitto

from fedclip.sdk.broker_embedded import EmbeddedBroker
from fedclip.sdk.broker_mosquitto import MosquittoBroker
from fedclip.sdk.broker_ports import free_port
from fedclip.sdk.errors import BrokerError, ConfigError, ConnectRefused
from fedclip.sdk.mqtt import MqttSession

pytestmark = pytest.mark.timeout(120)


def port_is_free(port: int) -> bool:
    """Nobody listens there: a server (which sets SO_REUSEADDR, as brokers do) could bind it now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def test_free_port_is_bindable():
    port = free_port()
    assert 0 < port < 65536 and port_is_free(port)


def test_embedded_broker_survives_many_cycles_and_frees_its_port():
    broker = EmbeddedBroker()
    for i in range(3):
        url = broker.start()
        assert url.startswith("mqtt://fedclip:") and url.endswith(f"@127.0.0.1:{broker.port}")
        with MqttSession(url, f"cycle{i}") as s:  # a client still connected when the broker stops
            s.publish("t/x", b"x")
            broker.stop()
        assert port_is_free(broker.port)


def test_embedded_broker_many_client_cycles(embedded_broker):
    for i in range(15):
        with MqttSession(embedded_broker.url, f"c{i % 3}") as s:
            s.publish("t/cycle", str(i).encode())


def test_embedded_broker_binds_localhost_only(embedded_broker):
    with pytest.raises(OSError):
        # The loopback alias 127.0.0.2 reaches a 0.0.0.0 listener but not one bound to 127.0.0.1.
        socket.create_connection(("127.0.0.2", embedded_broker.port), timeout=2).close()


def test_embedded_broker_refuses_wrong_password(embedded_broker):
    url = f"mqtt://{embedded_broker.username}:wrong@127.0.0.1:{embedded_broker.port}"
    with pytest.raises(ConnectRefused):
        MqttSession(url, "intruder").connect(timeout=10)
    with pytest.raises(ConnectRefused):
        MqttSession(embedded_broker.plain_url, "anonymous").connect(timeout=10)


def test_embedded_broker_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError, match="failed to start"):
            EmbeddedBroker(port=port).start()


def test_mosquitto_restart_keeps_retained_messages_and_port(mosquitto):
    port = mosquitto.port
    with MqttSession(mosquitto.url, "pub") as pub:
        pub.publish("t/kept", b"retained", retain=True)
    mosquitto.restart()
    assert mosquitto.port == port and mosquitto.running
    with MqttSession(mosquitto.url, "late", clean_session=True) as s:
        s.subscribe("t/kept")
        msg = s.get(timeout=10)
        assert msg is not None and msg.payload == b"retained" and msg.retain


def test_mosquitto_kill_and_stop(mosquitto):
    mosquitto.kill()
    assert not mosquitto.running and port_is_free(mosquitto.port)
    mosquitto.start()
    assert mosquitto.running
    mosquitto.stop()
    assert not mosquitto.running
    mosquitto.stop()  # idempotent


def test_mosquitto_bad_arguments():
    need_mosquitto()
    with pytest.raises(ConfigError, match="together"):
        MosquittoBroker(username="only-user")


def test_mosquitto_start_failure_is_a_clear_error(mosquitto):
    other = MosquittoBroker(port=mosquitto.port)  # the port is taken by the running one
    try:
        with pytest.raises(BrokerError, match="did not start"):
            other.start(timeout=5)
    finally:
        other.cleanup()
