"""A retained status that a stale last will overwrote is published again.

A client's last will (its retained `offline` status) is published by the broker when a connection
ends uncleanly, and nothing orders it against what the client publishes on its next connection. On
one broker it is usually first; on a cluster it is not: after a failover (or a keepalive lost under
load) the node that held the old connection publishes the will when it notices, which can be after
the client, already back on another node, said `online` again. The will then stands, retained, and
the coordinator keeps an agent that is connected and working for offline (it is not selected, and
a round that needs it waits for ever). The same holds on one broker when a restarted process takes
over the session of one that died.

MQTT 5's will delay would cover part of it; NATS speaks 3.1.1 only. So the session watches its own
status topic (QoS 0: no broker-side consumer per client on NATS; what is missed while disconnected
the next connect's hooks publish anyway) and, while connected, answers anything there that is not
its own last word by publishing that word again, at most once a second so two clients fighting over
one id cannot flood the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from fedclip.sdk.errors import MqttError

log = logging.getLogger("fedclip.sdk.mqtt")

MIN_INTERVAL_S = 1.0


class _Session(Protocol):
    """What the guard needs of `MqttSession` (which imports this module, so not named here)."""

    client_id: str
    connected: threading.Event

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 30
    ) -> None: ...


class WillGuard:
    """The last retained payload the session published on its will topic, and whether a message
    seen there overwrote it."""

    def __init__(self, topic: str):
        self.topic = topic
        self._mine: bytes | None = None
        self._lock = threading.Lock()
        self._last_repair = 0.0

    def published(self, topic: str, payload: bytes, retain: bool) -> None:
        """Called for every publish; a retained one on the will topic is the session's word."""
        if retain and topic == self.topic:
            with self._lock:
                self._mine = payload

    def overwritten(self, payload: bytes) -> bool:
        """True when `payload`, seen on the will topic, replaced the session's own word."""
        with self._lock:
            return self._mine is not None and payload != self._mine

    def repair(self, session: _Session) -> None:
        """Publish the session's word again (after waiting out the rate limit), if one is owed and
        the session is connected (if not, the next connect's hooks publish the status anyway).
        Runs on the session's hook thread, which may wait."""
        with self._lock:
            mine = self._mine
        if mine is None:
            return
        wait = self._last_repair + MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_repair = time.monotonic()
        if not session.connected.is_set():
            return
        log.info(
            "MQTT %s: a stale last will replaced the retained %s; publishing it again",
            session.client_id,
            self.topic,
        )
        try:
            session.publish(self.topic, mine, qos=1, retain=True, timeout=30)
        except MqttError as e:
            log.warning("MQTT %s: status not published again (%s)", session.client_id, e)
