"""`MqttSession`: a paho-mqtt 2.x client with the semantics fedclip relies on (habit 7).

- Fixed client id and, by default, a persistent session (clean session off) so messages published
  while a client was away arrive when it returns.
- Last will (retained `offline` status), automatic reconnect with exponential backoff, and
  re-subscription on every reconnect (a persistent session keeps them on the broker too; doing it
  again costs nothing and covers brokers that lost their state).
- A subscription the broker refuses (SUBACK failure: a NATS cluster whose JetStream cannot create
  the consumer in time under a burst of connects) is retried every few seconds while connected.
- Failover: the URL may be a list (`mqtt://a:1883,mqtt://b:1883`, or a sequence): the nodes of one
  broker cluster. The first reachable one is used; on every lost connection or failed reconnect
  the next one is tried, round robin (docs/scale.md).
- `publish` waits for the PUBACK with a deadline. Publishing while disconnected queues the message in
  paho, which sends it after the reconnect, so the wait completes then.
- A retained will is guarded: a stale will that overwrites the session's retained status (a cluster
  node publishing it late, after a failover) is answered by publishing that status again
  (`mqtt_will`).
- paho's callbacks only enqueue: incoming messages go to a `queue.Queue` read by `get`, connects go to
  a worker thread that runs the `on_connect` hooks. The network thread never blocks on work.

MQTT 3.1.1 by default so it runs on every broker, the embedded amqtt one included.

The parts with a job of their own live next door: broker URLs in `mqtt_address`, the configured paho
client in `mqtt_client`, the subscription bookkeeping in `mqtt_subscriptions`, the will guard in
`mqtt_will`.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedclip.sdk.errors import ConfigError, ConnectRefused, MqttError, PublishTimeout
from fedclip.sdk.mqtt_address import parse_broker_urls
from fedclip.sdk.mqtt_client import MAX_RECONNECT_DELAY, linger_close, new_paho_client
from fedclip.sdk.mqtt_subscriptions import Subscriptions
from fedclip.sdk.mqtt_will import WillGuard

log = logging.getLogger(__name__)

# `publish_many` hands over this many messages before it waits for their PUBACKs: far below paho's
# queue limit (`max_queue`), enough that the round trips overlap.
PIPELINE = 1000
_AUTH_REFUSALS = {"authorized", "password"}  # words of the CONNACK codes that mean "your credentials"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool
    # For `MqttSession.ack` when the session was made with manual_ack=True.
    mid: int = 0
    qos: int = 0


ConnectHook = Callable[["MqttSession"], None]
_REPAIR = object()  # hook-thread event: a stale will overwrote the retained status


class MqttSession:
    """One MQTT connection. Use as a context manager, or call `connect()` and `close()`.

    `on_connect` is a list of hooks `hook(session)` run after every successful CONNACK (the first
    one and every reconnect) on a worker thread, so a hook may `publish` and wait: the usual one
    publishes the retained `online` status again.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        insecure: bool = False,
        clean_session: bool = False,
        will: Will | None = None,
        keepalive: int = 30,
        protocol: str = "3.1.1",
        max_queue: int = 10000,
        manual_ack: bool = False,
    ):
        if protocol not in ("3.1.1", "5"):
            raise ConfigError(f"mqtt protocol: {protocol!r} is not one of '3.1.1', '5'")
        if not client_id:
            raise ConfigError("mqtt client id: must not be empty (a fixed id keeps the session)")
        if (cert_file is None) != (key_file is None):
            raise ConfigError("mqtt tls: cert_file and key_file go together")
        self.addresses = parse_broker_urls(url)
        self._next_address = 0
        self.address = self.addresses[0]  # the node in use (or being tried)
        self.client_id = client_id
        self.clean_session = clean_session
        self.keepalive = keepalive
        self._v5 = protocol == "5"
        # manual_ack: a QoS 1 message is acknowledged only by `ack()`, e.g. after the receiver
        # persisted it; a receiver killed before that gets the message again from the broker.
        self.manual_ack = manual_ack
        self.connected = threading.Event()
        self.on_connect: list[ConnectHook] = []

        self._incoming: queue.Queue[Incoming] = queue.Queue()
        self._connack = threading.Event()
        self._refusal: str | None = None
        self._closed = False
        self._hook_events: queue.Queue[object] = queue.Queue()
        self._hook_thread: threading.Thread | None = None

        client = new_paho_client(
            self.address,
            client_id,
            v5=self._v5,
            clean_session=clean_session,
            manual_ack=manual_ack,
            max_queue=max_queue,
            username=username,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            insecure=insecure,
        )
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        client.on_socket_close = self._on_socket_close
        self._client = client
        self._subs = Subscriptions(client, where=lambda: self.address, connected=self.connected)
        client.on_subscribe = self._subs.on_subscribe
        self._guard: WillGuard | None = None
        if will is not None and will.retain:
            self._guard = WillGuard(will.topic)
            self._subs.add(will.topic, 0)

    # ---- lifecycle -------------------------------------------------------------------------------
    def connect(self, timeout: float = 30) -> MqttSession:
        """Connect and wait for the CONNACK. Retries with backoff while the broker is unreachable."""
        deadline = time.monotonic() + timeout
        props = self._connect_props() if self._v5 else None
        delay = 0.5
        while True:
            try:
                if self._v5:
                    self._client.connect(
                        self.address.host,
                        self.address.port,
                        self.keepalive,
                        clean_start=self.clean_session,
                        properties=props,
                    )
                else:
                    self._client.connect(self.address.host, self.address.port, self.keepalive)
                break
            except ssl.SSLError as e:  # before OSError: it is one, but retrying will not fix it
                raise MqttError(f"{self.address}: TLS handshake failed ({e.reason or e})") from None
            except OSError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MqttError(
                        f"{self.address}: broker unreachable for {timeout:g}s ({e.strerror or e})"
                    ) from None
                failed = self.address
                wrapped = self._rotate()  # the next node of a cluster at once; a pause per full turn
                wait = min(delay, left) if wrapped else 0.0
                log.warning(
                    "MQTT broker %s unreachable (%s); trying %s in %.1fs",
                    failed,
                    e.strerror or e,
                    self.address,
                    wait,
                )
                time.sleep(wait)
                if wrapped:
                    delay = min(delay * 2, MAX_RECONNECT_DELAY)
        self._hook_thread = threading.Thread(
            target=self._run_hooks, name=f"mqtt-hooks-{self.client_id}", daemon=True
        )
        self._hook_thread.start()
        self._client.loop_start()
        if not self._connack.wait(max(0.0, deadline - time.monotonic())):
            self._shutdown_loop()
            raise MqttError(f"{self.address}: no CONNACK within {timeout:g}s")
        if self._refusal is not None:
            self._shutdown_loop()
            reason = self._refusal
            if _AUTH_REFUSALS & set(reason.lower().split()):
                reason += " (check the username and password)"
            raise ConnectRefused(f"{self.address}: broker refused client {self.client_id!r}: {reason}")
        return self

    def _connect_props(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        # A v5 session lives only as long as its expiry interval: "never" unless clean.
        props.SessionExpiryInterval = 0 if self.clean_session else 0xFFFFFFFF
        return props

    def _rotate(self) -> bool:
        """Point the client at the next broker URL; True when that starts a new turn of the list."""
        if len(self.addresses) == 1:
            return True
        self._next_address = (self._next_address + 1) % len(self.addresses)
        self.address = self.addresses[self._next_address]
        # connect_async only records where the next (re)connect goes; paho's network loop makes it.
        # The callbacks that call this run after the socket closed, so nothing open is cut.
        if self._v5:
            self._client.connect_async(
                self.address.host,
                self.address.port,
                self.keepalive,
                clean_start=self.clean_session,
                properties=self._connect_props(),
            )
        else:
            self._client.connect_async(self.address.host, self.address.port, self.keepalive)
        return self._next_address == 0

    def close(self) -> None:
        """Disconnect cleanly (the broker then drops the last will) and stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._subs.closed = True
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()
        self._hook_events.put(None)
        if self._hook_thread is not None and self._hook_thread is not threading.current_thread():
            self._hook_thread.join(timeout=10)

    def __enter__(self) -> MqttSession:
        if not self._connack.is_set():
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- messaging -------------------------------------------------------------------------------
    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._subs.add(topic, qos)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 30
    ) -> None:
        """Publish and, for QoS > 0, wait for the broker's acknowledgement until `timeout`."""
        self.publish_many([(topic, payload)], qos, retain, timeout)

    def publish_many(
        self, messages: Sequence[tuple[str, bytes]], qos: int = 1, retain: bool = False, timeout: float = 30
    ) -> None:
        """Publish (topic, payload) pairs pipelined: up to `PIPELINE` handed to paho at once (it keeps
        its in-flight window full), then their acknowledgements awaited, `timeout` for each window;
        N tasks cost about N / window round trips to the broker instead of N."""
        for start in range(0, len(messages), PIPELINE):
            deadline = time.monotonic() + timeout
            sent = [(t, self.hand_over(t, p, qos, retain)) for t, p in messages[start : start + PIPELINE]]
            if qos == 0:
                continue
            for topic, info in sent:
                self.await_ack(topic, info, timeout, deadline)

    def await_ack(
        self, topic: str, info: paho.MQTTMessageInfo, timeout: float, deadline: float | None = None
    ) -> None:
        """Wait for the broker's acknowledgement of what `hand_over` gave paho, until `deadline`
        (default: `timeout` from now); MqttError when it failed, PublishTimeout when none came."""
        left = (time.monotonic() + timeout if deadline is None else deadline) - time.monotonic()
        try:
            info.wait_for_publish(max(0.0, left))
        except (RuntimeError, ValueError) as e:
            raise MqttError(f"{self.address}: publish to {topic} failed ({e})") from None
        if not info.is_published():
            raise PublishTimeout(f"{self.address}: publish to {topic} not acknowledged within {timeout:g}s")

    def hand_over(self, topic: str, payload: bytes, qos: int, retain: bool) -> paho.MQTTMessageInfo:
        """Give one message to paho (which sends it, and for QoS > 0 resends it until acknowledged);
        the caller awaits the acknowledgement on the returned info."""
        if self._guard is None:
            return self._to_paho(topic, payload, qos, retain)
        return self._guard.say(topic, payload, retain, lambda: self._to_paho(topic, payload, qos, retain))

    def _to_paho(self, topic: str, payload: bytes, qos: int, retain: bool) -> paho.MQTTMessageInfo:
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as e:  # paho: wildcard in the topic, payload over 268 MB, bad qos
            raise MqttError(f"{self.address}: cannot publish to {topic!r} ({e})") from None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise MqttError(f"{self.address}: outgoing queue full, {topic} not published")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            # paho kept the message and sends it after the reconnect; only the flag says "failed".
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(f"{self.address}: publish to {topic} failed ({paho.error_string(info.rc)})")
        return info

    def ack(self, msg: Incoming) -> None:
        """Send the PUBACK for `msg` (manual_ack sessions only; a no-op for QoS 0)."""
        if self.manual_ack and msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)

    def get(self, timeout: float) -> Incoming | None:
        """The next incoming message, or None after `timeout` seconds (0: do not wait)."""
        try:
            if timeout <= 0:
                return self._incoming.get_nowait()
            return self._incoming.get(timeout=timeout)
        except queue.Empty:
            return None

    def waiting(self) -> bool:
        """A message is queued for `get`: work that can pause (personal tuning) yields to it."""
        return not self._incoming.empty()

    # ---- paho callbacks (network thread: enqueue only) -------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refusal = str(reason_code)
            self.connected.clear()
            if not self._connack.is_set():
                self._connack.set()
                client.disconnect()  # connect() raises; stop paho from retrying with bad credentials
            else:  # a reconnect refused (credentials revoked?): paho keeps retrying with backoff
                log.error("MQTT broker %s refused client %r: %s", self.address, self.client_id, reason_code)
            return
        self._refusal = None
        self._subs.resubscribe_all()
        self.connected.set()
        self._connack.set()
        self._hook_events.put(True)
        log.info(
            "MQTT connected to %s as %r (session present: %s)",
            self.address,
            self.client_id,
            flags.session_present,
        )

    def _on_socket_close(self, client, userdata, sock) -> None:
        if self._closed:  # our own DISCONNECT went out: make it reach the broker (no last will)
            linger_close(sock)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._closed and self._refusal is None:
            lost = self.address
            self._rotate()
            log.warning(
                "MQTT connection to %s lost (%s); reconnecting to %s", lost, reason_code, self.address
            )

    def _on_connect_fail(self, client, userdata) -> None:
        failed = self.address
        self._rotate()
        log.warning(
            "MQTT broker %s unreachable; trying %s (backoff up to %ss)",
            failed,
            self.address,
            MAX_RECONNECT_DELAY,
        )

    def _on_message(self, client, userdata, msg) -> None:
        if self._guard is not None and msg.topic == self._guard.topic:
            if self._guard.overwritten(bytes(msg.payload)):
                self._hook_events.put(_REPAIR)
            return  # the session's own status topic: watched for the guard, not for the application
        self._incoming.put(Incoming(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid, msg.qos))

    # ---- worker ----------------------------------------------------------------------------------
    def _run_hooks(self) -> None:
        while True:
            event = self._hook_events.get()
            if event is None:
                return
            if event is _REPAIR and self._guard is not None:
                self._guard.repair(self)
                continue
            for hook in list(self.on_connect):
                try:
                    hook(self)
                except Exception:  # a hook's failure must not end the session; say which one failed
                    log.exception("MQTT on_connect hook %r failed", hook)
