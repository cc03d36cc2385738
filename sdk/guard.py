"""The guard every message handler runs under: a message that breaks its handler is recorded as
rejected with one line and then acknowledged, so a poison message is never redelivered forever.

Bad input is normally refused inside the handlers with a `FedclipError`; the guard catches what no
check foresaw (a `KeyError` from an odd shape, an `OverflowError` from a huge number). Failures of
the machine itself (the disk, the database, memory) are not the message's fault: they pass through,
the message stays unacknowledged, the process stops, and the broker redelivers it after a restart.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fedclip.sdk.mqtt import Incoming

log = logging.getLogger(__name__)

# the machine's failures, not the message's: never swallowed
PASS_THROUGH: tuple[type[BaseException], ...] = (OSError, MemoryError, sqlite3.OperationalError)

Reject = Callable[[Incoming, str], None]


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


@contextmanager
def guard(msg: Incoming, reject: Reject) -> Iterator[None]:
    """Run a handler of `msg`; on an unforeseen error, log one line and `reject(msg, reason)`."""
    try:
        yield
    except PASS_THROUGH:
        raise
    except Exception as e:  # noqa: BLE001 - the point of the guard: no message may crash the process
        reason = f"{msg.topic}: message broke its handler ({one_line(e)})"
        log.error("rejected: %s", reason)
        reject(msg, reason)
