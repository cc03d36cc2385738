"""The will guard's bookkeeping, without a broker: which words on the status topic are the session's
own, and that a repair hands over the newest word before any newer one can be said (test_mqtt.py
has both against mosquitto)."""

from __future__ import annotations

import threading

from fedclip.sdk.mqtt_will import RECENT_WORDS, WillGuard

TOPIC = "fedclip/f/agents/a1/status"


class Sent:
    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None

    def is_published(self) -> bool:
        return True


class Session:
    """Hands over to a list; `during` runs inside the hand-over (to say something meanwhile)."""

    client_id = "a1"

    def __init__(self, guard: WillGuard) -> None:
        self.guard = guard
        self.connected = threading.Event()
        self.connected.set()
        self.wire: list[bytes] = []
        self.during = lambda: None

    def hand_over(self, topic: str, payload: bytes, qos: int, retain: bool) -> Sent:
        return self.guard.say(topic, payload, retain, lambda: self._send(payload))

    def _send(self, payload: bytes) -> Sent:
        self.during()
        self.wire.append(payload)
        return Sent()


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

    def say_w2_now() -> None:  # the main thread says a newer word while the repair hands over
        meanwhile.start()
        meanwhile.join(0.3)
        assert meanwhile.is_alive(), "a new word was handed over in the middle of the repair"

    session.during = say_w2_now
    guard.repair(session)
    session.during = lambda: None
    meanwhile.join(5)
    assert session.wire == [b"w0", b"w1", b"w1", b"w2"]  # the repair's word never follows a newer one
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
