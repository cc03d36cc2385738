"""The in-memory transport keeps the MQTT semantics the unit tests of rounds and rollouts rely on."""

from __future__ import annotations

from fedclip.sdk.mqtt import MqttSession
from fedclip.sdk.transport import MemoryBroker, MemoryTransport, Transport


def test_retained_messages_reach_late_subscribers_and_empty_payload_clears():
    broker = MemoryBroker()
    pub = broker.client().connect()
    pub.publish("f/agents/a/status", b"online", retain=True)
    pub.publish("f/agents/b/status", b"online", retain=True)
    pub.publish("f/agents/b/status", b"", retain=True)  # cleared
    sub = broker.client().connect()
    sub.subscribe("f/agents/+/status")
    got = sub.get(1)
    assert got is not None and (got.topic, got.payload, got.retain) == ("f/agents/a/status", b"online", True)
    assert sub.get(0) is None


def test_wildcards_and_order():
    broker = MemoryBroker()
    sub = broker.client().connect()
    sub.subscribe("f/#")
    pub = broker.client().connect()
    for i in range(5):
        pub.publish(f"f/x/{i}", str(i).encode())
    pub.publish("g/x", b"other")
    assert [sub.get(1).payload for _ in range(5)] == [b"0", b"1", b"2", b"3", b"4"]
    assert sub.get(0) is None


def test_unacked_qos1_messages_are_redelivered_after_reconnect():
    broker = MemoryBroker()
    coord = broker.client(manual_ack=True)
    coord.subscribe("f/agents/+/update")
    coord.connect()
    agent = broker.client().connect()
    agent.publish("f/agents/a/update", b"u1")
    agent.publish("f/agents/b/update", b"u2")
    first, second = coord.get(1), coord.get(1)
    coord.ack(first)
    assert coord.unacked == 1
    coord.reconnect()
    again = coord.get(1)
    assert again is not None and again.payload == second.payload == b"u2"
    assert coord.get(0) is None


def test_on_connect_hooks_run_on_every_connect():
    broker = MemoryBroker()
    client = broker.client()
    seen: list[Transport] = []
    client.on_connect.append(seen.append)
    client.connect()
    client.reconnect()
    assert seen == [client, client]


def test_mqtt_session_and_memory_transport_share_the_protocol_surface():
    for name in ("connect", "close", "subscribe", "publish", "ack", "get"):
        assert callable(getattr(MqttSession, name)) and callable(getattr(MemoryTransport, name))
