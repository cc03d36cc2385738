"""Adapter rollouts: canary first, then the rest, or an automatic rollback that says why.

A rollout sends one adapter version (or, for personalized strategies, each agent's own version of
that round) to a target set of agents, in stages:

1. `canary`: a subset of the online targets gets the signed adapter on its retained
   `agents/<id>/adapter` topic; each one verifies it, evaluates it against its current adapter on
   its held-out data, installs it and acknowledges with both metrics.
2. When every canary agent answered or the stage deadline passed, `decide` promotes if enough of
   them acknowledged (`min_acks`) and the mean accuracy regression is within `max_regression`
   points; otherwise every agent that got the adapter is sent a signed, retained rollback command.
3. `rest`: every other target (offline ones included: the retained message waits for them).

Pinned agents are never sent anything by a rollout. Everything (rollouts, stages, acks, pins) is in
the rollout database (`rollout.sqlite` next to the coordinator's store), so `rollout status` shows it
and a restarted coordinator continues the state machine (`RolloutManager.tick`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedclip.coordinator.bundle_server import publish_file
from fedclip.coordinator.fleet import AgentInfo, parse_status, read_fleet
from fedclip.coordinator.rollout_store import (
    ACK_STATUSES,
    CANARY,
    COMPLETE,
    DB_NAME,
    FINAL_STATES,
    INSTALLED,
    PIN,
    PINNED,
    PROMOTED,
    REJECTED,
    REST,
    ROLLED_BACK,
    ROLLED_BACK_ACK,
    RUNNING_CANARY,
    Ack,
    RolloutError,
    RolloutRow,
    RolloutStore,
    StageRow,
)
from fedclip.sdk.adapters import AdapterMeta, adapter_bytes
from fedclip.sdk.errors import ConfigError, FedclipError, WireError
from fedclip.sdk.hashing import sha256_bytes
from fedclip.sdk.ids import check_id
from fedclip.sdk.signing import Ed25519PrivateKey, sign_envelope
from fedclip.sdk.wire import DEFAULT_MAX_PAYLOAD, Envelope, MsgType, Topics, decode, encode

log = logging.getLogger(__name__)

KEY_DIR = "keys"  # <state>/keys: the coordinator's Ed25519 key pair (`ensure_keypair`)

# The database part and the fleet view live in their own modules; these names stay importable here.
__all__ = [
    "ACK_STATUSES", "CANARY", "COMPLETE", "DB_NAME", "FINAL_STATES", "INSTALLED", "KEY_DIR", "PIN", "PINNED",
    "PROMOTED", "REJECTED", "REST", "ROLLED_BACK", "ROLLED_BACK_ACK", "RUNNING_CANARY", "Ack",
    "AdapterSource", "AgentInfo", "Decision", "DictSource", "RegistrySource", "RolloutError",
    "RolloutManager", "RolloutParams", "RolloutRow", "RolloutStore", "StageRow", "Target", "decide",
    "parse_canary", "parse_status", "read_fleet", "select_canary",
]  # fmt: skip


# ---- targets and canaries ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """`all`, `group:NAME` or `agents:a,b`."""

    kind: str
    names: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Target:
        text = (text or "").strip()
        if text == "all":
            return cls("all")
        kind, _, rest = text.partition(":")
        names = tuple(n.strip() for n in rest.split(",") if n.strip())
        if kind not in ("group", "agents") or not names:
            raise ConfigError(f"--to: {text!r} is not all, group:NAME or agents:a,b")
        if kind == "group" and len(names) != 1:
            raise ConfigError(f"--to: {text!r} names more than one group")
        for n in names:
            check_id(n, "--to")
        return cls(kind, names)

    def __str__(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{','.join(self.names)}"

    def resolve(self, fleet: Mapping[str, AgentInfo]) -> list[str]:
        if self.kind == "all":
            return sorted(fleet)
        if self.kind == "group":
            return sorted(a for a, info in fleet.items() if self.names[0] in info.groups)
        # Named agents need not have reported yet: their retained adapter waits for them.
        return sorted(set(self.names))


def parse_canary(text: str | int | float) -> tuple[str, float]:
    """`10%` -> ("fraction", 0.1); `3` -> ("count", 3). Zero means no canary stage."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            value = float(s[:-1]) / 100.0
            if not 0.0 <= value <= 1.0:
                raise ValueError
            return "fraction", value
        value = int(s)
        if value < 0:
            raise ValueError
        return "count", float(value)
    except ValueError:
        raise ConfigError(f"--canary: {text!r} is not a percentage (10%) or a count (3)") from None


def select_canary(targets: Sequence[str], fleet: Mapping[str, AgentInfo], spec: str, salt: str) -> list[str]:
    """Canary agents: online ones first (they can answer now), spread by a per-rollout hash."""
    kind, value = parse_canary(spec)
    n = math.ceil(value * len(targets)) if kind == "fraction" else int(value)
    if value > 0:
        n = max(1, n)
    n = min(n, len(targets))

    def order(agent: str) -> tuple[int, str]:
        online = fleet.get(agent, AgentInfo(agent, online=False)).online
        return (0 if online else 1, sha256(f"{salt}/{agent}".encode()).hexdigest())

    return sorted(sorted(targets, key=order)[:n])


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    acked: int
    expected: int
    mean_regression: float | None


def decide(acks: Iterable[Ack], expected: Sequence[str], max_regression: float, min_acks: float) -> Decision:
    """Promote a stage when enough agents installed it and the mean regression is within bounds."""
    by_agent = {a.agent: a for a in acks if a.agent in set(expected)}
    installed = [a for a in by_agent.values() if a.status == INSTALLED]
    regressions = [r for r in (a.regression for a in installed) if r is not None]
    mean = float(np.mean(regressions)) if regressions else None
    n = len(expected)
    rejected = sorted(a.agent for a in by_agent.values() if a.status == REJECTED)
    if n and len(installed) < min_acks * n:
        why = f"only {len(installed)} of {n} canary agents acknowledged (need {min_acks:.0%})"
        if rejected:
            why += f"; rejected by {', '.join(rejected[:5])}: {by_agent[rejected[0]].reason}"
        return Decision(False, why, len(installed), n, mean)
    if mean is not None and mean > max_regression:
        return Decision(
            False,
            f"mean accuracy regression {mean:.2f} points exceeds --max-regression {max_regression:g}",
            len(installed),
            n,
            mean,
        )
    if mean is None:
        return Decision(True, f"{len(installed)} of {n} acknowledged (no metrics)", len(installed), n, None)
    return Decision(
        True,
        f"{len(installed)} of {n} acknowledged, mean regression {mean:.2f} points",
        len(installed),
        n,
        mean,
    )


# ---- adapters to send ----------------------------------------------------------------------------


class AdapterSource(Protocol):
    def load_for(self, version: str, agent: str) -> tuple[dict[str, np.ndarray], AdapterMeta]:
        """The adapter `agent` gets when `version` rolls out (its own one for personalized versions)."""


class RegistrySource:
    """Versions from `fedclip.coordinator.registry.Registry`; a global version of a round whose
    strategy personalized (ce-lora) resolves to each agent's own version of that round."""

    def __init__(self, registry: Any):
        self.registry = registry

    def load_for(self, version: str, agent: str) -> tuple[dict[str, np.ndarray], AdapterMeta]:
        from fedclip.coordinator.registry import agent_version

        row = self.registry.show(version)
        if row.scope != "agent" and row.round > 0:
            own = agent_version(agent, row.round)
            if self.registry.has(own):
                return self.registry.load(own)
        return self.registry.load(version)


@dataclass
class DictSource:
    """Adapters held in memory: version -> (tensors, meta), optionally per agent (tests, benchmarks)."""

    versions: dict[str, tuple[dict[str, np.ndarray], AdapterMeta]] = field(default_factory=dict)
    per_agent: dict[tuple[str, str], tuple[dict[str, np.ndarray], AdapterMeta]] = field(default_factory=dict)

    def load_for(self, version: str, agent: str) -> tuple[dict[str, np.ndarray], AdapterMeta]:
        if (version, agent) in self.per_agent:
            return self.per_agent[(version, agent)]
        if version not in self.versions:
            raise RolloutError(f"adapter version {version!r} is unknown")
        return self.versions[version]


# ---- the state machine ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutParams:
    version: str
    target: Target
    canary: str = "10%"
    max_regression: float = 1.0
    min_acks: float = 0.9
    stage_timeout: float = 300.0

    def __post_init__(self) -> None:
        check_id(self.version, "version")
        parse_canary(self.canary)
        if not 0.0 <= self.min_acks <= 1.0:
            raise ConfigError(f"--min-acks: must be between 0 and 1, got {self.min_acks}")
        if not math.isfinite(self.max_regression):
            raise ConfigError("--max-regression: must be a finite number of points")
        if self.stage_timeout <= 0:
            raise ConfigError(f"--stage-timeout: must be > 0, got {self.stage_timeout}")


class RolloutManager:
    """Drives rollouts over MQTT: publishes signed adapters and commands, records acks, decides.

    The caller owns the loop: feed every incoming message to `handle` (it takes the `agents/+/ack`
    ones) and call `tick` now and then; `wait` does both until a rollout reaches a final state.
    """

    def __init__(
        self,
        session: Any,
        topics: Topics,
        store: RolloutStore,
        key: Ed25519PrivateKey,
        adapters: AdapterSource,
        *,
        publish_timeout: float = 30.0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        inline_limit: int = 4 * 1024 * 1024,
        url_root: str | Path | None = None,
        url_base: str | None = None,
        on_event: Callable[[int, str], None] | None = None,
    ):
        self.session = session
        self.topics = topics
        self.store = store
        self.key = key
        self.adapters = adapters
        self.publish_timeout = publish_timeout
        self.max_payload = max_payload
        # Adapters past `inline_limit` bytes are written under `url_root` (served by the bundle
        # server at `url_base`) and the signed message carries their URL and sha256 instead.
        self.inline_limit = inline_limit
        self.url_root = Path(url_root) if url_root is not None else None
        self.url_base = url_base.rstrip("/") if url_base else None
        self._membership: dict[int, tuple[tuple[str, ...], dict[str, str]]] = {}
        self.on_event = on_event or (lambda rid, text: log.info("rollout %d: %s", rid, text))

    def subscribe(self) -> None:
        self.session.subscribe(self.topics.all_agents("ack"), qos=1)

    # ---- publishing --------------------------------------------------------------------------
    def _publish(self, topic: str, env: Envelope, tensors: Mapping[str, np.ndarray] | None = None) -> None:
        signed = sign_envelope(self.key, env, tensors)
        payload = encode(signed, tensors)
        if len(payload) > self.max_payload:
            raise RolloutError(
                f"{topic}: signed message of {len(payload)} bytes exceeds the limit of {self.max_payload}"
            )
        self.session.publish(topic, payload, qos=1, retain=True, timeout=self.publish_timeout)

    def _send_adapter(self, rid: int, stage: str, version: str, agent: str) -> None:
        tensors, meta = self.adapters.load_for(version, agent)
        body = {
            "rollout": rid,
            "stage": stage,
            "version": meta.version,
            "rollout_version": version,
            "bundle_id": meta.bundle_id,
            "parent_version": meta.parent_version,
            "strategy": meta.strategy,
            "kind": meta.kind,
        }
        blob = adapter_bytes(tensors, meta)
        if len(blob) > self.inline_limit:
            if self.url_root is None or self.url_base is None:
                raise RolloutError(
                    f"adapter {meta.version} is {len(blob)} bytes, over the MQTT limit of "
                    f"{self.inline_limit}; serve the bundle directory to send it by URL"
                )
            digest = sha256_bytes(blob)
            publish_file(self.url_root, f"adapters/{digest}.safetensors", blob)
            body.update(url=f"{self.url_base}/adapters/{digest}.safetensors", sha256=digest, size=len(blob))
            tensors = None
        env = Envelope(
            MsgType.ADAPTER, self.topics.fleet, agent, round=meta.round, base_version=meta.version, body=body
        )
        self._publish(self.topics.adapter(agent), env, tensors)

    def _send_command(self, agent: str, command: str, kind: str = "command", **body: Any) -> None:
        env = Envelope(MsgType.COMMAND, self.topics.fleet, agent, body={"command": command, **body})
        self._publish(self.topics.agent(agent, kind), env)

    def _say(self, rid: int, text: str) -> None:
        self.store.event(rid, text)
        self.on_event(rid, text)

    # ---- commands ----------------------------------------------------------------------------
    def start(self, params: RolloutParams, fleet: Mapping[str, AgentInfo]) -> int:
        targets = params.target.resolve(fleet)
        pins = self.store.pins()
        skipped = [a for a in targets if a in pins]
        targets = [a for a in targets if a not in pins]
        if not targets:
            raise RolloutError(
                f"no agent to roll out to: target {params.target} matches "
                f"{len(skipped)} pinned and no other known agent"
            )
        for agent in targets:  # fail before anything is published if an adapter is missing
            self.adapters.load_for(params.version, agent)
        rid = self.store.create(
            params.version,
            str(params.target),
            params.canary,
            params.max_regression,
            params.min_acks,
            params.stage_timeout,
            skipped,
            targets,
        )
        if skipped:
            self._say(rid, f"pinned, left out: {', '.join(skipped)}")
        canary = select_canary(targets, fleet, params.canary, salt=str(rid))
        if canary:  # even when it is every target: the gate (and automatic rollback) still applies
            self._begin_stage(rid, CANARY, canary, params)
        else:
            self.store.set_state(rid, PROMOTED, "no canary stage")
            self._begin_stage(rid, REST, targets, params)
        return rid

    def _begin_stage(self, rid: int, stage: str, agents: Sequence[str], params: RolloutParams) -> None:
        self.store.add_stage(rid, stage, agents, time.time() + params.stage_timeout)
        for agent in agents:
            self._send_adapter(rid, stage, params.version, agent)
        self._say(rid, f"{stage}: sent {params.version} to {len(agents)} agent(s)")

    def rollback(self, rid: int, reason: str = "rolled back by operator") -> None:
        row = self.store.get(rid)
        if row is None:
            raise RolloutError(f"rollout {rid} does not exist")
        if row.state == ROLLED_BACK:
            raise RolloutError(f"rollout {rid} is already rolled back")
        pins = self.store.pins()  # a pinned agent stays on its pinned version, rollback or not
        sent = sorted({a for s in self.store.stages(rid) for a in s.agents} - set(pins))
        for agent in sent:
            self._send_command(agent, "rollback", rollout=rid, version=row.version, reason=reason)
        for s in self.store.stages(rid):
            if s.state == "running":
                self.store.finish_stage(rid, s.name, "failed", reason, s.mean_regression)
        self.store.set_state(rid, ROLLED_BACK, reason)
        self._say(rid, f"rollback sent to {len(sent)} agent(s): {reason}")

    def pin(self, agent: str, version: str) -> None:
        """Keep `agent` on `version`: send it that version (signed) and a retained pin."""
        check_id(agent, "agent")
        check_id(version, "version")
        self._send_adapter(0, PIN, version, agent)
        self._send_command(agent, "pin", kind="pin", version=version)
        self.store.pin(agent, version)
        self.store.event(None, f"pinned {agent} to {version}")

    def unpin(self, agent: str) -> None:
        check_id(agent, "agent")
        if not self.store.unpin(agent):
            raise RolloutError(f"agent {agent!r} is not pinned")
        self._send_command(agent, "unpin", kind="pin")
        self.store.event(None, f"unpinned {agent}")

    # ---- acks and decisions ------------------------------------------------------------------
    def handle(self, incoming: Any) -> bool:
        """Take an `agents/<id>/ack` message; False for any other topic. Bad acks are dropped."""
        try:
            agent, kind = self.topics.parse_agent(incoming.topic)
        except WireError:
            return False
        if kind != "ack":
            return False
        if not incoming.payload:
            return True
        try:
            self._on_ack(agent, incoming.payload, f"ack on {incoming.topic}")
        except WireError as e:
            log.warning("dropped: %s", e)
        return True

    def _on_ack(self, agent: str, payload: bytes, where: str) -> None:
        msg = decode(payload, fleet=self.topics.fleet, expect=MsgType.ACK, max_bytes=1 << 20, where=where)
        body = msg.envelope.body
        if msg.envelope.agent != agent:
            raise WireError(f"{where}: ack claims to be from {msg.envelope.agent!r}")
        rid = body.get("rollout")
        if isinstance(rid, bool) or not isinstance(rid, int) or rid <= 0:
            return  # not a rollout ack (e.g. a pin or a plain adapter install): nothing to record
        status = body.get("status")
        if status not in ACK_STATUSES:
            raise WireError(f"{where}: ack status {status!r} is not one of {', '.join(ACK_STATUSES)}")
        stage = self._stage_of(rid).get(agent)
        if stage is None:
            raise WireError(f"{where}: agent {agent} is not part of rollout {rid}")
        metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
        new, cur = _metric_dict(metrics.get("new")), _metric_dict(metrics.get("current"))
        ack = Ack(
            agent=agent,
            status=status,
            version=str(body.get("version", ""))[:128],
            new_accuracy=_num(new.get("accuracy")),
            current_accuracy=_num(cur.get("accuracy")),
            new_loss=_num(new.get("loss")),
            current_loss=_num(cur.get("loss")),
            num_samples=int(_num(new.get("num_samples")) or 0),
            reason=str(body.get("reason", ""))[:300],
        )
        self.store.record_ack(rid, stage, ack)

    def _stage_of(self, rid: int) -> dict[str, str]:
        """agent -> stage of rollout `rid`, cached per stage count (1,000 acks must not parse 1,000 lists)."""
        stages = self.store.stage_names(rid)
        cached = self._membership.get(rid)
        if cached is None or cached[0] != stages:
            cached = (stages, {a: s.name for s in self.store.stages(rid) for a in s.agents})
            self._membership[rid] = cached
        return cached[1]

    def tick(self, now: float | None = None) -> None:
        """Advance every active rollout whose current stage is complete or past its deadline."""
        now = time.time() if now is None else now
        for row in self.store.active():
            self._advance(row, now)

    def _advance(self, row: RolloutRow, now: float) -> None:
        stages = {s.name: s for s in self.store.stages(row.id)}
        current = stages.get(REST) or stages.get(CANARY)
        if current is None or current.state != "running":
            return
        acks = self.store.acks(row.id, current.name)
        answered = {a.agent for a in acks if a.status in (INSTALLED, REJECTED, PINNED)}
        if not set(current.agents) <= answered and now < (current.deadline or 0):
            return
        params = RolloutParams(
            row.version,
            Target.parse(row.target),
            row.canary,
            row.max_regression,
            row.min_acks,
            row.stage_timeout,
        )
        decision = decide(acks, current.agents, row.max_regression, row.min_acks)
        if current.name == CANARY:
            if decision.promote:
                rest = self._rest_targets(row, current.agents)
                if rest and not self._can_send(row.version, rest[0]):
                    return  # started from a file this process does not have: its own command promotes
                if not self.store.finish_stage(
                    row.id, CANARY, "passed", decision.reason, decision.mean_regression
                ):
                    return  # another process (serve, watch, start --wait) decided it first
                self.store.set_state(row.id, PROMOTED, decision.reason)
                self._say(row.id, f"canary passed: {decision.reason}; promoting")
                if rest:
                    self._begin_stage(row.id, REST, rest, params)
                else:
                    self.store.set_state(row.id, COMPLETE, decision.reason)
            elif self.store.finish_stage(row.id, CANARY, "failed", decision.reason, decision.mean_regression):
                self._say(row.id, f"canary failed: {decision.reason}")
                self.rollback(row.id, f"automatic: {decision.reason}")
            return
        # The rest stage does not gate: agents that were offline get the retained adapter later.
        pending = len(current.agents) - decision.acked
        summary = f"{decision.acked} of {decision.expected} acknowledged" + (
            f", {pending} pending (retained for when they reconnect)" if pending else ""
        )
        if not self.store.finish_stage(row.id, REST, "done", summary, decision.mean_regression):
            return
        self.store.set_state(row.id, COMPLETE, summary)
        self._say(row.id, f"complete: {summary}")

    def _can_send(self, version: str, agent: str) -> bool:
        try:
            self.adapters.load_for(version, agent)
        except FedclipError as e:
            log.debug("rollout of %s: not promoting here (%s)", version, e)
            return False
        return True

    def _rest_targets(self, row: RolloutRow, canary: Sequence[str]) -> list[str]:
        pins = self.store.pins()  # agents pinned since the start are left out too
        return sorted(a for a in row.targets if a not in canary and a not in pins)

    def wait(self, rid: int, timeout: float, poll: float = 0.2) -> RolloutRow:
        """Handle acks and tick until rollout `rid` is final or `timeout` s pass; return its row."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.store.get(rid)
            if row is None:
                raise RolloutError(f"rollout {rid} does not exist")
            if row.state in FINAL_STATES or time.monotonic() >= deadline:
                return row
            incoming = self.session.get(timeout=poll)
            while incoming is not None:
                self.handle(incoming)
                incoming = self.session.get(timeout=0)
            self.tick()


def _metric_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
