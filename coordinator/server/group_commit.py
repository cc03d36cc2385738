"""Group commit of incoming messages: handle a batch, make it durable once, then acknowledge it.

The round loop's `pump` runs here. A batch is what is queued when it is taken (up to `max_messages`,
taken within `max_wait` seconds): at a trickle every update is a batch of its own, as before, and
under load the batches grow by themselves (what arrives while one is handled forms the next). Its
messages are handled in order (`handle`: updates are staged by `UpdateIntake.stage`, everything else
is handled and written as before); the batch is flushed (`UpdateIntake.flush`: its blobs and one
transaction) and only then is each of its messages acknowledged, in the order they arrived (MQTT
3.1.1 wants PUBACKs in order).

Batches overlap by one: a batch's updates start decoding in the intake's worker processes
(`intake_decode`) when it is taken, and the loop handles and flushes the batch before it meanwhile.
Nothing of a batch is staged, written or acknowledged before the batch ahead of it is done.

The broker must let enough unacknowledged messages through for a batch to fill: mosquitto sends a
3.1.1 client at most `max_inflight_messages` (default 20) before it waits for PUBACKs
(docs/scale.md, "Intake").
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fedclip.coordinator.server.intake import Decoding, UpdateIntake
from fedclip.coordinator.server.tasks import RoundState
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.transport import Transport


class GroupCommit:
    """`pump(timeout)`: handle what is queued in batches, each acknowledged after its flush."""

    def __init__(
        self,
        transport: Transport,
        intake: UpdateIntake,
        handle: Callable[[Incoming], None],
        current: Callable[[], RoundState | None],
        *,
        max_messages: int = 256,
        max_wait: float = 0.2,
    ):
        self.transport, self.intake, self.handle, self.current = transport, intake, handle, current
        self.max_messages, self.max_wait = max_messages, max_wait

    def pump(self, timeout: float) -> None:
        """Handle queued messages (waiting up to `timeout` for the first); returns with every one
        handled, durable and acknowledged. Each batch's updates start decoding in the intake's
        worker pool when the batch is taken, while the batch before it is handled and flushed."""
        msg = self.transport.get(timeout)
        ahead: tuple[list[Incoming], Decoding] | None = None
        while msg is not None or ahead is not None:
            batch = self._take(msg) if msg is not None else []
            decoding = self.intake.decode_ahead(batch, self.current()) if batch else None
            if ahead is not None:
                self._run(*ahead)
            ahead = (batch, decoding) if decoding is not None else None
            msg = self.transport.get(0)

    def _take(self, first: Incoming) -> list[Incoming]:
        """`first` and what is queued behind it, up to `max_messages` or `max_wait` seconds."""
        batch, opened = [first], time.monotonic()
        while len(batch) < self.max_messages and time.monotonic() - opened < self.max_wait:
            msg = self.transport.get(0)
            if msg is None:
                break
            batch.append(msg)
        return batch

    def _run(self, batch: list[Incoming], decoding: Decoding) -> None:
        self.intake.take_decoded(decoding)
        for msg in batch:
            self.handle(msg)
        self._commit(batch)

    def _commit(self, batch: list[Incoming]) -> None:
        self.intake.flush()  # raises on a failure of the disk: nothing of the batch is acknowledged
        for msg in batch:
            self.transport.ack(msg)
