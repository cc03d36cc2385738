"""The topics a `MqttSession` subscribed to, asked for again whenever the broker may have lost them.

Two moments need that: every (re)connect, since a broker that lost its state (or a cluster node the
session failed over to) knows nothing of them; and a refused SUBACK, which a NATS cluster sends when
JetStream cannot create the consumer in time under a burst of connects, so the refused topics are
asked for again while connected, after a delay that doubles with each refusal in a row (3 s up to
60 s, jittered +-50%): an immediate or fixed-rate retry feeds the very overload that refused it, since
NATS still creates the refused consumer later.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

RESUBSCRIBE_S = 3.0  # a refused subscription is asked for again after this long, doubling per refusal
RESUBSCRIBE_MAX_S = 60.0


def resubscribe_delay(refusals: int) -> float:
    """Seconds to wait before asking again after `refusals` refused SUBACKs in a row (>= 1):
    doubling from RESUBSCRIBE_S up to RESUBSCRIBE_MAX_S, jittered +-50% so a refused crowd spreads."""
    backoff = RESUBSCRIBE_S * 2 ** min(refusals - 1, 8)
    return min(RESUBSCRIBE_MAX_S, backoff) * random.uniform(0.5, 1.5)


class Subscriptions:
    """topic -> QoS, plus the SUBSCRIBE requests in flight (to know which topics a SUBACK refused).

    `where` names the broker node in log lines; `connected` is the session's connection flag.
    """

    def __init__(self, client: paho.Client, where: Callable[[], object], connected: threading.Event):
        self._client = client
        self._where = where
        self._connected = connected
        self._topics: dict[str, int] = {}
        self._lock = threading.Lock()
        self._requests: dict[int, list[tuple[str, int]]] = {}  # SUBSCRIBE mid -> its topics
        # SUBACKs that arrived before `_send` recorded their request: paho's network thread may read
        # the answer while the subscribing thread is still between `subscribe()` and the record.
        self._early: dict[int, list[ReasonCode]] = {}
        self.closed = False  # set by the session's close(): no more retries
        self._refused = 0  # refused SUBACKs in a row (the retry's backoff)

    def add(self, topic: str, qos: int) -> None:
        """Remember `topic` and subscribe now (while disconnected paho refuses; the next connect
        catches up through `resubscribe_all`)."""
        with self._lock:
            self._topics[topic] = qos
        self._send([(topic, qos)])

    def resubscribe_all(self) -> None:
        with self._lock:
            subs = list(self._topics.items())
        if subs:
            self._send(subs)

    def _send(self, subs: list[tuple[str, int]]) -> None:
        rc, mid = self._client.subscribe(subs)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return
        # Never call paho while holding the lock: paho holds its own locks around on_subscribe.
        with self._lock:
            answered = self._early.pop(mid, None)
            if answered is None:
                self._requests[mid] = subs
        if answered is not None:
            self._check(subs, answered)

    def _retry(self, topics: list[str]) -> None:
        if self.closed or not self._connected.is_set():
            return  # the next connect subscribes to everything again
        with self._lock:
            subs = [(t, self._topics[t]) for t in topics if t in self._topics]
        if subs:
            self._send(subs)

    def on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        """paho's SUBACK callback (network thread): a refusal only schedules a retry on a timer."""
        with self._lock:
            subs = self._requests.pop(mid, None)
            if subs is None:
                self._early[mid] = reason_codes  # `_send` checks it once it records the request
                return
        self._check(subs, reason_codes)

    def _check(self, subs: list[tuple[str, int]], reason_codes: list[ReasonCode]) -> None:
        failed = [t for (t, _), rc in zip(subs, reason_codes, strict=False) if rc.is_failure]
        self._refused = self._refused + 1 if failed else 0
        if failed and not self.closed:
            delay = resubscribe_delay(self._refused)
            log.warning(
                "MQTT broker %s refused the subscription to %s (%s); asking again in %.1fs",
                self._where(),
                ", ".join(failed[:3]) + (" ..." if len(failed) > 3 else ""),
                reason_codes[0] if len(reason_codes) == 1 else "see SUBACK",
                delay,
            )
            timer = threading.Timer(delay, self._retry, args=(failed,))
            timer.daemon = True
            timer.start()
