"""What the coordinator knows of the agents, from their retained status topics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fedclip.sdk.errors import WireError
from fedclip.sdk.wire import Message, MsgType


@dataclass
class AgentState:
    agent: str
    online: bool
    bundle_id: str = ""
    adapter_version: str = ""
    last_round: int = -1
    info: dict[str, Any] = field(default_factory=dict)
    seen_at: float = 0.0


class Fleet:
    def __init__(self) -> None:
        self.agents: dict[str, AgentState] = {}

    def on_status(self, topic_agent: str, msg: Message | None) -> AgentState | None:
        """Apply one status message; None (an emptied retained topic) forgets the agent."""
        if msg is None:
            self.agents.pop(topic_agent, None)
            return None
        env = msg.envelope
        if env.type is not MsgType.STATUS:
            raise WireError(f"status of {topic_agent}: unexpected message type {env.type.value!r}")
        if env.agent != topic_agent:
            raise WireError(f"status on the topic of {topic_agent!r} claims to be from {env.agent!r}")
        body = env.body
        state = body.get("state")
        if state not in ("online", "offline"):
            raise WireError(
                f"status of {topic_agent}: field 'state' must be online or offline, got {state!r}"
            )
        last_round = body.get("last_round", -1)
        info = {k: body[k] for k in ("versions", "device", "groups", "notice") if k in body}
        a = AgentState(
            agent=topic_agent,
            online=state == "online",
            bundle_id=str(body.get("bundle_id", ""))[:128],
            adapter_version=str(body.get("adapter_version", "") or "")[:128],
            last_round=last_round if isinstance(last_round, int) and not isinstance(last_round, bool) else -1,
            info=info,
            seen_at=time.time(),
        )
        self.agents[topic_agent] = a
        return a

    def compatible_online(self, bundle_id: str) -> list[str]:
        return sorted(a.agent for a in self.agents.values() if a.online and a.bundle_id == bundle_id)

    def online_count(self) -> int:
        return sum(a.online for a in self.agents.values())
