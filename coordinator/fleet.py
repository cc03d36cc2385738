"""What the coordinator knows of the agents, from their retained status topics.

The one parser of agent status messages: the round loop (`Fleet`), rollouts (target groups, which
agents are online) and the CLI's snapshot (`read_fleet`) all go through `status_from_message`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fedclip.coordinator.trust import Trust
from fedclip.sdk.errors import WireError
from fedclip.sdk.messages import AgentStatus
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import Message, MsgType, Topics, decode

log = logging.getLogger(__name__)

MAX_STATUS_BYTES = 1 << 20


@dataclass(frozen=True)
class AgentInfo:
    """One agent as its last retained status describes it."""

    id: str
    online: bool = True
    groups: tuple[str, ...] = ()  # from the agent's config (site, hardware, ...): rollout targets
    bundle_id: str = ""
    adapter_version: str = ""
    last_round: int = -1
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    seen_at: float = 0.0


def status_from_message(topic_agent: str, msg: Message) -> AgentInfo:
    """Validate a decoded status against the topic it came on; WireError says what is wrong."""
    where = f"status of {topic_agent}"
    if msg.envelope.agent != topic_agent:
        raise WireError(f"status on the topic of {topic_agent!r} claims to be from {msg.envelope.agent!r}")
    status = AgentStatus.parse(msg, where)
    info: dict[str, Any] = {"versions": dict(status.versions), "device": dict(status.device)}
    info["groups"] = list(status.groups)
    if status.notice:
        info["notice"] = status.notice
    return AgentInfo(
        id=topic_agent,
        online=status.state == "online",
        groups=status.groups,
        bundle_id=status.bundle_id,
        adapter_version=status.adapter_version,
        last_round=status.last_round,
        info=info,
        seen_at=time.time(),
    )


def decode_status(topics: Topics, topic_agent: str, payload: bytes, trust: Trust | None = None) -> AgentInfo:
    """Decode and validate the payload of `agents/<topic_agent>/status`; with `trust`, only a status
    the agent signed counts. WireError if it is bad."""
    where = f"status of {topic_agent}"
    msg = decode(payload, fleet=topics.fleet, expect=MsgType.STATUS, max_bytes=MAX_STATUS_BYTES, where=where)
    if trust is not None:
        trust.check(topic_agent, msg, where)
    return status_from_message(topic_agent, msg)


def parse_status(topics: Topics, topic: str, payload: bytes, trust: Trust | None = None) -> AgentInfo | None:
    """An agent's status from any topic: None for other topics, emptied topics and bad statuses."""
    try:
        agent, kind = topics.parse_agent(topic)
        if kind != "status" or not payload:
            return None
        return decode_status(topics, agent, payload, trust)
    except WireError as e:
        log.debug("dropped: %s", e)
        return None


def read_fleet(
    session: Transport, topics: Topics, quiet: float = 0.5, timeout: float = 5.0, trust: Trust | None = None
) -> dict[str, AgentInfo]:
    """Subscribe to every agent's retained status and collect them until `quiet` s pass without one.

    For commands that run apart from `serve` (its `Fleet` keeps the same view while it runs).
    """
    session.subscribe(topics.all_agents("status"), qos=1)
    fleet: dict[str, AgentInfo] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        incoming = session.get(timeout=quiet)
        if incoming is None:
            break
        info = parse_status(topics, incoming.topic, incoming.payload, trust)
        if info is not None:
            fleet[info.id] = info
    return fleet


class Fleet:
    """The agents the round loop knows, kept up to date from their retained statuses."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentInfo] = {}

    def on_status(self, topic_agent: str, info: AgentInfo | None) -> None:
        """Apply one status; None (an emptied retained topic) forgets the agent."""
        if info is None:
            self.agents.pop(topic_agent, None)
        else:
            self.agents[topic_agent] = info

    def compatible_online(self, bundle_id: str) -> list[str]:
        return sorted(a.id for a in self.agents.values() if a.online and a.bundle_id == bundle_id)

    def online_count(self) -> int:
        return sum(a.online for a in self.agents.values())
