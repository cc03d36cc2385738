"""The acks a device sends for rollouts (`messages.Ack` on `agents/<id>/ack`): what became of an
adapter or a command, with the evaluation of the new adapter against the current one.

Acks of installs, pins and rollbacks are kept in the rollout memory, so a retained message seen again
after a reconnect is answered with the same ack; rejections of a copy that failed to verify or fetch
are not (a later copy may succeed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fedclip.device_agent.rollout_memory import RolloutMemory
from fedclip.sdk import messages
from fedclip.sdk.errors import FedclipError
from fedclip.sdk.messages import Ack, AckMetrics
from fedclip.sdk.signing import Ed25519PrivateKey
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import Topics

log = logging.getLogger(__name__)

Metrics = Mapping[str, Mapping[str, Any]]  # {"current": evaluation, "new": evaluation}


class AckSender:
    """Builds, keeps and publishes one agent's rollout acks."""

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        agent_id: str,
        memory: RolloutMemory,
        *,
        device_key: Ed25519PrivateKey | None,
        publish_timeout: float,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.agent_id = agent_id
        self.memory = memory
        self.device_key = device_key  # a provisioned fleet counts only acks its agents signed
        self.publish_timeout = publish_timeout

    def send(
        self,
        rollout: int,
        status: str,
        version: str,
        *,
        reason: str = "",
        previous_version: str = "",
        metrics: Metrics | None = None,
        keep: bool = True,
    ) -> None:
        """Ack `rollout` (nothing for 0: pins and plain pushes are not part of a rollout)."""
        if not rollout:
            return
        metrics = metrics or {}
        ack = Ack(
            rollout=rollout,
            status=status,
            version=version,
            reason=reason,
            previous_version=previous_version,
            new=_ack_metrics(metrics.get("new")),
            current=_ack_metrics(metrics.get("current")),
        )
        if keep:
            self.memory.keep_ack(ack)
        self.publish(ack)

    def resend(self, rollout: int) -> bool:
        """Send the kept ack of `rollout` again; False when none is kept."""
        ack = self.memory.stored_ack(rollout)
        if ack is None:
            return False
        self.publish(ack)
        return True

    def publish(self, ack: Ack) -> None:
        payload = messages.encode(ack, self.topics.fleet, self.agent_id, key=self.device_key)
        try:
            self.transport.publish(
                self.topics.ack(self.agent_id), payload, qos=1, retain=False, timeout=self.publish_timeout
            )
        except FedclipError as e:  # the broker has it queued or the next retained copy re-sends it
            log.warning("ack for rollout %s not acknowledged by the broker (%s)", ack.rollout, e)


def _ack_metrics(raw: Any) -> AckMetrics:
    """An evaluation (`evaluate_fn`'s {loss, accuracy, num_samples}) as an ack carries it."""
    raw = raw if isinstance(raw, Mapping) else {}

    def number(key: str) -> float | None:
        value = raw.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    return AckMetrics(number("accuracy"), number("loss"), int(number("num_samples") or 0))
