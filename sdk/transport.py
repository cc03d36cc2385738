"""The transport every fedclip process talks through, as a Protocol, and an in-memory twin for tests.

`MqttSession` (fedclip.sdk.mqtt) is the real transport. Server, Agent, RolloutManager and RolloutClient
take any object with this shape, so round logic, update intake and rollout stages can be unit-tested
against `MemoryBroker` in milliseconds while the mosquitto tests stay as integration tests.

The in-memory broker keeps MQTT's semantics that fedclip relies on: retained messages (an empty
retained payload clears the topic), `+`/`#` subscriptions, QoS 1 redelivery of messages a client
never acknowledged (manual-ack sessions, after `reconnect()`), and delivery to every matching
subscriber in publish order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from paho.mqtt.client import topic_matches_sub

from fedclip.sdk.mqtt import Incoming

__all__ = ["MemoryBroker", "MemoryTransport", "Transport"]


class Transport(Protocol):
    """What fedclip needs from a broker connection (MqttSession has exactly this surface)."""

    # Hooks run after every (re)connect with the transport itself; read-only here so that each
    # implementation may type the argument as its own class (a list is invariant in its items).
    @property
    def on_connect(self) -> list[Callable[[Any], None]]: ...

    @property
    def connected(self) -> threading.Event: ...  # set while the connection is up

    def connect(self, timeout: float = 30) -> Transport: ...

    def close(self) -> None: ...

    def subscribe(self, topic: str, qos: int = 1) -> None: ...

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 30
    ) -> None: ...

    def publish_many(
        self, messages: Sequence[tuple[str, bytes]], qos: int = 1, retain: bool = False, timeout: float = 30
    ) -> None: ...

    def ack(self, msg: Incoming) -> None: ...

    def get(self, timeout: float) -> Incoming | None: ...

    def waiting(self) -> bool: ...  # a message is queued for `get` (long work yields to it)


class MemoryBroker:
    """A broker in one process: retained messages and subscriptions, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self._clients: list[MemoryTransport] = []
        self.published: list[tuple[str, bytes, bool]] = []  # every publish, for assertions

    def client(self, manual_ack: bool = False) -> MemoryTransport:
        return MemoryTransport(self, manual_ack=manual_ack)

    def retained(self, topic: str) -> bytes | None:
        with self._lock:
            return self._retained.get(topic)

    def _attach(self, client: MemoryTransport) -> None:
        with self._lock:
            if client not in self._clients:
                self._clients.append(client)

    def _detach(self, client: MemoryTransport) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def _subscribed(self, client: MemoryTransport, pattern: str, qos: int) -> None:
        with self._lock:
            hits = [(t, p) for t, p in sorted(self._retained.items()) if topic_matches_sub(pattern, t)]
        for topic, payload in hits:
            client._deliver(Incoming(topic, payload, retain=True, qos=qos))

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._lock:
            self.published.append((topic, payload, retain))
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            targets = list(self._clients)
        for client in targets:
            sub_qos = client._matching_qos(topic)
            if sub_qos is not None:
                client._deliver(Incoming(topic, payload, retain=False, qos=min(qos, sub_qos)))


class MemoryTransport:
    """One client of a MemoryBroker, with MqttSession's methods."""

    def __init__(self, broker: MemoryBroker, manual_ack: bool = False) -> None:
        self.broker = broker
        self.manual_ack = manual_ack
        self.on_connect: list[Callable[[Transport], None]] = []
        self._subs: dict[str, int] = {}
        self._queue: queue.Queue[Incoming] = queue.Queue()
        self._unacked: dict[int, Incoming] = {}
        self._next_mid = 1
        self._lock = threading.Lock()
        self.connected = threading.Event()

    def connect(self, timeout: float = 30) -> MemoryTransport:
        self.broker._attach(self)
        self.connected.set()
        for pattern, qos in list(self._subs.items()):
            self.broker._subscribed(self, pattern, qos)
        for hook in self.on_connect:
            hook(self)
        return self

    def reconnect(self) -> None:
        """Drop the connection and come back: unacknowledged QoS 1 messages arrive again, as MQTT
        redelivers them to a persistent session."""
        with self._lock:
            pending = sorted(self._unacked.items())
            self._unacked.clear()
        self.close()
        self.connect()
        for _, msg in pending:
            self._deliver(Incoming(msg.topic, msg.payload, msg.retain, qos=msg.qos))

    def close(self) -> None:
        self.connected.clear()
        self.broker._detach(self)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subs[topic] = qos
        if self.connected.is_set():
            self.broker._subscribed(self, topic, qos)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 30
    ) -> None:
        self.broker._publish(topic, bytes(payload), qos, retain)

    def publish_many(
        self, messages: Sequence[tuple[str, bytes]], qos: int = 1, retain: bool = False, timeout: float = 30
    ) -> None:
        for topic, payload in messages:
            self.publish(topic, payload, qos, retain, timeout)

    def ack(self, msg: Incoming) -> None:
        if self.manual_ack:
            with self._lock:
                self._unacked.pop(msg.mid, None)

    def get(self, timeout: float) -> Incoming | None:
        try:
            if timeout <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def waiting(self) -> bool:
        return not self._queue.empty()

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self._unacked)

    def _matching_qos(self, topic: str) -> int | None:
        qos = [q for pattern, q in list(self._subs.items()) if topic_matches_sub(pattern, topic)]
        return max(qos) if qos else None

    def _deliver(self, msg: Incoming) -> None:
        with self._lock:
            mid = self._next_mid
            self._next_mid += 1
            msg = Incoming(msg.topic, msg.payload, msg.retain, mid=mid, qos=msg.qos)
            if self.manual_ack and msg.qos > 0:
                self._unacked[mid] = msg
        self._queue.put(msg)
