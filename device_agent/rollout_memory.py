"""What the rollout client remembers between messages and restarts, besides the adapters themselves:
the version it is pinned to, the rollouts rolled back here (so their retained adapter is never taken
again), the last acks it sent (so a retained copy seen again after a reconnect is answered the same
way), and the newest adapter time it applied (so an older replay is ignored).

It lives in the `rollout` section of the agent's state record (`AgentState.rollout_memory`), written
atomically with the rest of `state.json`. The adapters themselves, and the order a rollback goes back
in, are the ledger's (`sdk.ledger`).
"""

from __future__ import annotations

from typing import Any

from fedclip.device_agent.state import AgentState
from fedclip.sdk.errors import WireError
from fedclip.sdk.messages import Ack
from fedclip.sdk.wire import Envelope, Message, MsgType

KEEP_ACKS = 20  # enough to answer any retained copy still on the broker, without growing forever
KEEP_ROLLED_BACK = 100


class RolloutMemory:
    """The rollout section of one agent's state record; every change is saved at once."""

    def __init__(self, state: AgentState) -> None:
        self.state = state
        raw = state.rollout_memory()
        self.pinned: str | None = raw.get("pinned") or None
        self.rolled_back: list[int] = [int(r) for r in raw.get("rolled_back", [])]
        self.acks: dict[str, dict[str, Any]] = dict(raw.get("acks", {}))
        self.last_sent_at = float(raw.get("last_sent_at", 0.0))

    def save(self) -> None:
        self.state.save_rollout_memory(
            {
                "pinned": self.pinned,
                "rolled_back": self.rolled_back,
                "acks": self.acks,
                "last_sent_at": self.last_sent_at,
            }
        )

    def pin(self, version: str | None) -> bool:
        """Pin to `version` (None: unpin); True when that changed anything."""
        if self.pinned == version:
            return False
        self.pinned = version
        self.save()
        return True

    def was_rolled_back(self, rollout: int) -> bool:
        return rollout in self.rolled_back

    def note_rolled_back(self, rollout: int) -> None:
        self.rolled_back = sorted(set(self.rolled_back) | {rollout})[-KEEP_ROLLED_BACK:]
        self.save()

    def applied(self, sent_at: float) -> None:
        """An adapter sent at `sent_at` was applied: older ones are replays from now on."""
        if sent_at > self.last_sent_at:
            self.last_sent_at = sent_at
            self.save()

    def keep_ack(self, ack: Ack) -> None:
        self.acks[str(ack.rollout)] = ack.to_body()
        for old in sorted(self.acks, key=int)[:-KEEP_ACKS]:
            del self.acks[old]
        self.save()

    def stored_ack(self, rollout: int) -> Ack | None:
        """The ack sent for `rollout`, as it was sent (None: none kept, or unreadable)."""
        body = self.acks.get(str(rollout))
        if body is None:
            return None
        try:  # the typed parser checks a record that may have been edited by hand
            return Ack.parse(Message(Envelope(MsgType.ACK, "", "", body=body)), "stored ack")
        except WireError:
            return None
