"""The guard records and drops what breaks a handler, and lets the machine's own failures through."""

from __future__ import annotations

import sqlite3

import pytest

from fedclip.sdk.guard import guard
from fedclip.sdk.mqtt import Incoming

MSG = Incoming("fedclip/f/agents/a/update", b"x", False)


@pytest.mark.parametrize(
    "exc", [KeyError("body"), OverflowError("int too big"), ValueError("a\nb"), RecursionError()]
)
def test_unforeseen_errors_are_rejected_with_one_line(exc):
    seen = []
    with guard(MSG, lambda m, reason: seen.append((m, reason))):
        raise exc
    assert len(seen) == 1 and seen[0][0] is MSG
    reason = seen[0][1]
    assert "\n" not in reason and reason.startswith("fedclip/f/agents/a/update: message broke its handler")
    assert type(exc).__name__ in reason


@pytest.mark.parametrize(
    "exc", [OSError(28, "No space left on device"), sqlite3.OperationalError("disk I/O error")]
)
def test_the_machines_failures_pass_through_unacknowledged(exc):
    seen = []
    with pytest.raises(type(exc)), guard(MSG, lambda m, reason: seen.append(reason)):
        raise exc
    assert seen == []


def test_a_handler_that_works_is_not_rejected():
    seen = []
    with guard(MSG, lambda m, reason: seen.append(reason)):
        pass
    assert seen == []
