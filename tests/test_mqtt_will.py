"""The will guard's bookkeeping, without a broker: which words on the status topic are the session's
own, and that a repair hands over the newest word before any newer one can be said (test_mqtt.py
has both against mosquitto)."""

from __future__ import annotations

import threading

from fedclip.sdk.mqtt_will import RECENT_WORDS, WillGuard

TOPIC = "fedclip/f/agents/a1/status"


class Session:
    """Hands over to a list; `before` runs as a hand-over starts (to say something meanwhile)."""

    client_id = "a1"

    def __init__(self, guard: WillGuard) -> None:
        self.guard = guard
        self.connected = threading.Event()
        self.connected.set()
        self.wire: list[bytes] = []
        self.acked: list[bytes] = []  # what the repair waited for the broker to acknowledge
        self.before = lambda: None

    def hand_over(self, topic: str, payload: bytes, qos: int, retain: bool) -> bytes:
        self.before()
        return self.guard.say(topic, payload, retain, lambda: self._send(payload))

    def await_ack(self, topic: str, info: bytes, timeout: float) -> None:
        self.acked.append(info)

    def _send(self, payload: bytes) -> bytes:
        self.wire.append(payload)
        return payload


def test_own_earlier_words_are_not_overwrites_and_a_foreign_word_is():
    guard = WillGuard(TOPIC)
    session = Session(guard)
    assert not guard.overwritten(b"anything")  # nothing said yet: nothing to defend
    for i in range(3):
        session.hand_over(TOPIC, f"w{i}".encode(), 1, True)
    session.hand_over("other/topic", b"x", 1, True)  # not the will topic: not a word
    session.hand_over(TOPIC, b"not retained", 1, False)
    assert not any(guard.overwritten(w) for w in (b"w0", b"w1", b"w2"))
    assert guard.overwritten(b"offline") and guard.overwritten(b"x") and guard.overwritten(b"not retained")
    for i in range(3, 3 + RECENT_WORDS):
        session.hand_over(TOPIC, f"w{i}".encode(), 1, True)
    assert guard.overwritten(b"w0")  # long gone: a broker holding it has lost the newer ones


def test_a_repair_sends_the_newest_word_and_a_word_said_meanwhile_waits_for_it():
    guard = WillGuard(TOPIC)
    session = Session(guard)
    session.hand_over(TOPIC, b"w0", 1, True)
    session.hand_over(TOPIC, b"w1", 1, True)
    meanwhile = threading.Thread(target=session.hand_over, args=(TOPIC, b"w2", 1, True))

    def say_w2_now() -> None:  # the main thread says a newer word once the repair has read its own
        session.before = lambda: None  # once: not again for that newer word
        probe: list[bool] = []  # whether another thread could take the lock every word is said under
        taker = threading.Thread(target=lambda: probe.append(guard._lock.acquire(blocking=False)))
        taker.start()
        taker.join()
        assert probe == [False], "the repair read its word without holding the guard's lock"
        meanwhile.start()  # it waits for the lock, so its word goes out after the repair's

    session.before = say_w2_now
    guard.repair(session)
    meanwhile.join(5)
    assert session.wire == [b"w0", b"w1", b"w1", b"w2"]  # the repair's word never follows a newer one
    assert session.acked == [b"w1"]  # and it waited for the acknowledgement of what it sent
    assert not guard.overwritten(b"w1") and not guard.overwritten(b"w2")


def test_no_repair_while_disconnected_or_before_any_word():
    guard = WillGuard(TOPIC)
    session = Session(guard)
    guard.repair(session)
    assert session.wire == []
    session.hand_over(TOPIC, b"w0", 1, True)
    session.connected.clear()
    guard._last_repair = 0.0  # the rate limit is not what this checks
    guard.repair(session)
    assert session.wire == [b"w0"]
