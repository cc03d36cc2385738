"""The one way a test waits: `eventually(predicate, timeout, what)`.

Tests wait on the event they expect (an ack, a row, a file, a status) with a deadline, never with a
sleep followed by an assertion: a sleep either wastes time or, on a loaded machine, passes without
the event having happened. To show that something did NOT happen, wait for a sentinel that is known
to arrive after it would have (the receiver handles its messages in order).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.transport import Transport

T = TypeVar("T")

WAIT_S = 180.0  # generous default deadline: the suite shares 2 cores with other jobs


def eventually(
    predicate: Callable[[], T],
    timeout: float = WAIT_S,
    what: str | Callable[[], str] = "the condition",
    *,
    interval: float = 0.05,
) -> T:
    """Call `predicate` until it returns something truthy and return that; fail the test with `what`
    (a string, or a callable for a description of the state at the deadline) after `timeout` seconds.
    `predicate` may itself block briefly (reading a queue) and may call `pytest.fail` to stop early."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}")
        if interval > 0:
            time.sleep(interval)


def next_message(
    transport: Transport,
    match: Callable[[Incoming], object] = lambda m: True,
    timeout: float = WAIT_S,
    what: str = "a message",
) -> Incoming:
    """The next message on `transport` for which `match` is truthy (others are consumed)."""

    def received() -> Incoming | None:
        msg = transport.get(timeout=0.2)
        return msg if msg is not None and match(msg) else None

    return eventually(received, timeout, what, interval=0)
