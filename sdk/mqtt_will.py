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

import threading
import time

MIN_INTERVAL_S = 1.0


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

    def overwritten(self, topic: str, payload: bytes) -> bool:
        """True when `payload`, seen on the will topic, replaced the session's own word."""
        if topic != self.topic:
            return False
        with self._lock:
            return self._mine is not None and payload != self._mine

    def repair(self) -> tuple[str, bytes] | None:
        """What to publish again (after waiting out the rate limit), or None if nothing is owed."""
        with self._lock:
            mine = self._mine
        if mine is None:
            return None
        wait = self._last_repair + MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_repair = time.monotonic()
        return self.topic, mine
