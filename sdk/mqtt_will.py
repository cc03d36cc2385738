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
one of its own recent words by publishing its newest word again, at most once a second so two
clients fighting over one id cannot flood the broker.

Its own words come back to it too, in the order it said them: an echo of an earlier word that
arrives after a newer word went out is not an overwrite (the newer one's echo follows). Were it
taken for one, the repair would add a publish per burst of statuses and, worse, could hand the
broker an older word after a newer one (the coordinator then saw an agent's status go back to the
adapter it had just left). A repair therefore hands over the newest word under the same lock as
every word the session says, so it never overtakes one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from fedclip.sdk.errors import MqttError

log = logging.getLogger("fedclip.sdk.mqtt")

MIN_INTERVAL_S = 1.0
RECENT_WORDS = 32  # own words whose echo may still be on its way (statuses come seconds apart)

T = TypeVar("T")


class _Session(Protocol):
    """What the guard needs of `MqttSession` (which imports this module, so not named here)."""

    client_id: str
    connected: threading.Event

    def hand_over(self, topic: str, payload: bytes, qos: int, retain: bool) -> Any: ...

    def await_ack(self, topic: str, info: Any, timeout: float) -> None: ...


class WillGuard:
    """The session's recent retained words on its will topic, and whether a message seen there
    overwrote them."""

    def __init__(self, topic: str):
        self.topic = topic
        self._said: deque[bytes] = deque(maxlen=RECENT_WORDS)  # newest last
        # Reentrant: a repair hands its word over through `say`, holding the lock already.
        self._lock = threading.RLock()
        self._last_repair = 0.0

    def say(self, topic: str, payload: bytes, retain: bool, hand: Callable[[], T]) -> T:
        """Run `hand` (the hand-over of one publish to the client); a retained one on the will
        topic is the session's word, handed over and recorded under the lock a repair takes."""
        if not (retain and topic == self.topic):
            return hand()
        with self._lock:
            sent = hand()
            if not self._said or self._said[-1] != payload:
                self._said.append(payload)
            return sent

    def overwritten(self, payload: bytes) -> bool:
        """True when `payload`, seen on the will topic, is none of the session's recent words."""
        with self._lock:
            return bool(self._said) and payload not in self._said

    def repair(self, session: _Session) -> None:
        """Publish the session's newest word again (after waiting out the rate limit), if one is
        owed and the session is connected (if not, the next connect's hooks publish the status
        anyway). Runs on the session's hook thread, which may wait."""
        wait = self._last_repair + MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_repair = time.monotonic()
        with self._lock:  # the word read and handed over before any newer word can be
            if not self._said or not session.connected.is_set():
                return
            log.info(
                "MQTT %s: a stale last will replaced the retained %s; publishing it again",
                session.client_id,
                self.topic,
            )
            try:
                sent = session.hand_over(self.topic, self._said[-1], 1, True)
            except MqttError as e:
                log.warning("MQTT %s: status not published again (%s)", session.client_id, e)
                return
        try:  # the acknowledgement awaited outside the lock: a new word need not wait for it
            session.await_ack(self.topic, sent, 30)
        except MqttError as e:
            log.warning("MQTT %s: status not published again (%s)", session.client_id, e)
