"""What the coordinator knows of the agents, from their retained status topics.

The one parser of agent status messages: the round loop (`Fleet`), rollouts (target groups, which
agents are online) and the CLI's snapshot (`read_fleet`) all go through `status_from_message`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
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
    if status.personal:  # inference serves the adapter tuned on the device (device_agent.personal)
        info["personal"] = dict(status.personal)
    if status.tuning is not None:  # a personal tuning of the adapter in use, not finished yet
        info["tuning"] = status.tuning.to_body()
    if status.fallback_version:  # where its open-set gate sends unfamiliar images (rollout --fallback)
        info["fallback"] = status.fallback_version
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


@dataclass
class _Track:
    """What the round loop learns about one agent beyond its status (mutable, one per agent)."""

    heard_at: float = 0.0  # last status or update from it
    last_selected: int = -1  # last round it was given a task in (this coordinator run)
    turn: int = 0  # its place in that round's selection order (fair selection queues by it)
    missed: int = 0  # tasks in a row it did not answer before its round closed
    group: str = ""  # its selection group (see `Fleet.group_by`)


class Fleet:
    """The agents the round loop knows, kept up to date from their retained statuses, and indexed
    so that nothing in the loop costs per agent per iteration.

    Per bundle, the *live* agents (online, not suspended for missed tasks) sit in insertion order of
    when they were last heard from: a status or an update moves an agent to the end, so the ones
    past `max_status_age` are always at the front and leave in amortized O(1). Counting the eligible
    agents of a bundle is therefore O(1); listing them (once per round) is O(live agents).

    - `max_status_age` (s, 0 = off): an agent not heard from for longer is not eligible until it is.
    - `max_missed` (0 = off): an agent that left this many tasks in a row unanswered is not eligible
      until it is heard from again (a straggler still training, or a device whose node lost its will).
    - `group_by`: an agent's selection group is its first group label starting with this prefix
      ("" when it has none); "" = no groups.
    """

    def __init__(self, max_status_age: float = 0.0, max_missed: int = 0, group_by: str = "") -> None:
        self.agents: dict[str, AgentInfo] = {}
        self.max_status_age, self.max_missed, self.group_by = max_status_age, max_missed, group_by
        self._track: dict[str, _Track] = {}
        self._live: dict[str, OrderedDict[str, None]] = {}  # bundle -> live agents, oldest heard first
        self._online = 0

    # ---- what comes in -------------------------------------------------------------------------
    def on_status(self, topic_agent: str, info: AgentInfo | None, now: float | None = None) -> None:
        """Apply one status; None (an emptied retained topic) forgets the agent."""
        old = self.agents.get(topic_agent)
        if old is not None:
            self._online -= old.online
            self._unlist(topic_agent, old.bundle_id)
        if info is None:
            self.agents.pop(topic_agent, None)
            self._track.pop(topic_agent, None)
            return
        self.agents[topic_agent] = info
        self._online += info.online
        track = self._track.setdefault(topic_agent, _Track())
        track.group = self._group_of(info.groups)
        self.heard(topic_agent, info.seen_at if now is None else now)

    def heard(self, agent: str, now: float | None = None) -> None:
        """`agent` spoke (a status or an update): fresh again, and no longer counted as missing."""
        track = self._track.get(agent)
        info = self.agents.get(agent)
        if track is None or info is None:
            return
        track.heard_at = time.time() if now is None else now
        track.missed = 0
        self._unlist(agent, info.bundle_id)
        if info.online:
            self._live.setdefault(info.bundle_id, OrderedDict())[agent] = None

    def tasked(self, round_id: int, agents: Iterable[str]) -> None:
        """These agents, in the order they were chosen, were given a task in `round_id`."""
        for turn, agent in enumerate(agents):
            # setdefault: a resumed round is recorded before its agents' statuses come in
            track = self._track.setdefault(agent, _Track())
            if round_id >= track.last_selected:
                track.last_selected, track.turn = round_id, turn

    def round_closed(self, missing: Iterable[str]) -> None:
        """A round closed without an update from `missing`; past `max_missed` they are suspended."""
        for agent in missing:
            track, info = self._track.get(agent), self.agents.get(agent)
            if track is None or info is None:
                continue
            track.missed += 1
            if self.max_missed and track.missed >= self.max_missed:
                self._unlist(agent, info.bundle_id)

    # ---- what the loop asks ----------------------------------------------------------------------
    def eligible_count(self, bundle_id: str, now: float | None = None) -> int:
        """How many agents could be selected on `bundle_id` now; amortized O(1)."""
        return len(self._fresh(bundle_id, now))

    def eligible(self, bundle_id: str, now: float | None = None) -> list[str]:
        """The agents that could be selected on `bundle_id` now (online, fresh, not suspended), sorted."""
        return sorted(self._fresh(bundle_id, now))

    def participation(self, agents: Iterable[str]) -> tuple[list[int], list[int], list[str]]:
        """Per agent: the last round it took part in (our last task for it, or the last round its
        status reports when later; -1: never), its place in that round's order, its selection group."""
        last, turn, groups = [], [], []
        for agent in agents:
            track, info = self._track[agent], self.agents[agent]
            ours = track.last_selected >= info.last_round
            last.append(track.last_selected if ours else info.last_round)
            turn.append(track.turn if ours else 0)
            groups.append(track.group)
        return last, turn, groups

    def compatible_online(self, bundle_id: str) -> list[str]:
        """Every online agent on `bundle_id`, whatever the eligibility rules (O(N): not for the loop)."""
        return sorted(a.id for a in self.agents.values() if a.online and a.bundle_id == bundle_id)

    def online_count(self) -> int:
        return self._online

    # ---- the index ---------------------------------------------------------------------------------
    def _fresh(self, bundle_id: str, now: float | None) -> OrderedDict[str, None]:
        live = self._live.get(bundle_id)
        if live is None:
            return OrderedDict()
        if self.max_status_age > 0:
            oldest = (time.time() if now is None else now) - self.max_status_age
            while live:
                agent = next(iter(live))
                if self._track[agent].heard_at >= oldest:
                    break
                del live[agent]  # back when it is heard from again
        return live

    def _unlist(self, agent: str, bundle_id: str) -> None:
        live = self._live.get(bundle_id)
        if live is not None:
            live.pop(agent, None)

    def _group_of(self, groups: tuple[str, ...]) -> str:
        if not self.group_by:
            return ""
        return next((g for g in groups if g.startswith(self.group_by)), "")
