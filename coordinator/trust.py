"""Who may speak for an agent: the coordinator's check of every message an agent sends.

In a provisioned fleet (`fedclip-coord provision`, an enrolment registry in the state dir) a status,
update or ack counts only when the agent the topic names is enrolled and not revoked, and the message
carries that agent's Ed25519 signature over the canonical envelope and the tensors' sha256
(`fedclip.sdk.signing`). Identity never comes from a topic name alone: a client that can publish on
the broker, even on another agent's topic, cannot be counted as that agent.

Replays: updates are bound to (agent, round) and a round accepts one update per agent; acks to a
rollout and a stage. Statuses carry `sent_at` inside the signature, and one older than the newest
accepted from that agent is refused, except an `offline` status: the broker publishes the agent's
last will, which was signed when the agent connected and so is always older than its later statuses.
An unprovisioned fleet (closed test setups) has no registry, and `Trust(None)` checks nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedclip.sdk.errors import WireError
from fedclip.sdk.signing import verify_message
from fedclip.sdk.wire import Message, MsgType


class Senders(Protocol):
    """The enrolment registry as the coordinator reads it (`coordinator.enrolment.Enrolment`)."""

    def verify_key(self, agent_id: str) -> Ed25519PublicKey | None: ...

    def is_revoked(self, agent_id: str) -> bool: ...


class Trust:
    """`check(agent, msg, where)` raises WireError unless `msg` really comes from `agent`."""

    def __init__(self, senders: Senders | None):
        self.senders = senders
        self._newest_status: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_state(cls, state_dir: str | Path) -> Trust:
        """The trust of a coordinator state dir: its enrolment registry when the fleet is provisioned
        (`fedclip-coord provision init`), else none (closed test setups)."""
        from fedclip.coordinator.enrolment import Enrolment

        return cls(Enrolment.load(state_dir) if Enrolment.exists(state_dir) else None)

    @property
    def required(self) -> bool:
        return self.senders is not None

    def sender_key(self, agent: str) -> bytes:
        """The raw Ed25519 key `agent` signs with (b"": none enrolled, or an unprovisioned fleet), for
        checking a signature ahead in a worker (`intake_decode`)."""
        key = self.senders.verify_key(agent) if self.senders is not None else None
        return key.public_bytes_raw() if key is not None else b""

    @staticmethod
    def signer(agent: str) -> str:
        return f"agent {agent}'s enrolled key"

    def check(self, agent: str, msg: Message, where: str, verified: tuple[bytes, str] | None = None) -> None:
        """`verified`: (raw key, error) of a signature check made ahead with the key `sender_key`
        gave ("" : it verified); it stands for the check here while that is still the agent's key."""
        if msg.envelope.agent != agent:
            raise WireError(f"{where}: envelope names agent {msg.envelope.agent!r}, the topic {agent!r}")
        if self.senders is None:
            return
        key = self.senders.verify_key(agent)
        if key is None:
            state = "revoked" if self.senders.is_revoked(agent) else "not enrolled in this fleet"
            raise WireError(f"{where}: agent {agent!r} is {state}")
        if verified is not None and verified[0] == key.public_bytes_raw():
            if verified[1]:
                raise WireError(verified[1])
        else:
            verify_message(key, msg, where, signer=self.signer(agent))
        if msg.envelope.type is MsgType.STATUS:
            self._status_is_new(agent, msg, where)

    def _status_is_new(self, agent: str, msg: Message, where: str) -> None:
        sent_at = msg.envelope.sent_at
        with self._lock:
            newest = self._newest_status.get(agent, 0.0)
            if sent_at < newest and msg.envelope.body.get("state") != "offline":
                raise WireError(
                    f"{where}: status sent at {sent_at:.3f} is older than the newest accepted from {agent} "
                    f"({newest:.3f}): a replay"
                )
            self._newest_status[agent] = max(newest, sent_at)
