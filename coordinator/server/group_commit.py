"""Group commit of incoming messages: handle a batch, make it durable once, then acknowledge it.

The round loop's `pump` runs here. Messages are handled as they come (`handle`: updates are staged by
`UpdateIntake.stage`, everything else is handled and written as before); the batch is flushed
(`UpdateIntake.flush`: its blobs and one transaction) and only then is each of its messages
acknowledged, in the order they arrived (MQTT 3.1.1 wants PUBACKs in order). A batch closes when the
transport has nothing more queued right now, when it holds `max_messages`, or when its first message
has waited `max_wait` seconds: at a trickle every update is flushed alone, as before, and under load
the batches grow by themselves (the messages that arrive during one flush form the next batch).

The broker must let enough unacknowledged messages through for a batch to fill: mosquitto sends a
3.1.1 client at most `max_inflight_messages` (default 20) before it waits for PUBACKs
(docs/scale.md, "Intake").
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fedclip.coordinator.server.intake import UpdateIntake
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.transport import Transport


class GroupCommit:
    """`pump(timeout)`: handle what is queued in batches, each acknowledged after its flush."""

    def __init__(
        self,
        transport: Transport,
        intake: UpdateIntake,
        handle: Callable[[Incoming], None],
        *,
        max_messages: int = 256,
        max_wait: float = 0.2,
    ):
        self.transport, self.intake, self.handle = transport, intake, handle
        self.max_messages, self.max_wait = max_messages, max_wait

    def pump(self, timeout: float) -> None:
        """Handle queued messages (waiting up to `timeout` for the first); returns with every one
        handled, durable and acknowledged."""
        msg = self.transport.get(timeout)
        batch: list[Incoming] = []
        opened = time.monotonic()
        while msg is not None:
            self.handle(msg)
            batch.append(msg)
            if len(batch) >= self.max_messages or time.monotonic() - opened >= self.max_wait:
                self._commit(batch)
                batch, opened = [], time.monotonic()
            msg = self.transport.get(0)
        self._commit(batch)

    def _commit(self, batch: list[Incoming]) -> None:
        self.intake.flush()  # raises on a failure of the disk: nothing of the batch is acknowledged
        for msg in batch:
            self.transport.ack(msg)
