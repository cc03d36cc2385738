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

This module is the manager: it publishes and records. What to do (targets, canaries, whether a
stage passed) is the pure policy of `rollout_policy`; where adapters come from, `rollout_sources`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from fedclip.coordinator import strategies
from fedclip.coordinator.bundle_server import publish_file
from fedclip.coordinator.fleet import AgentInfo
from fedclip.coordinator.rollout_policy import (
    RolloutParams,
    Step,
    current_stage,
    next_step,
    select_canary,
)
from fedclip.coordinator.rollout_sources import AdapterSource
from fedclip.coordinator.rollout_store import (
    CANARY,
    COMPLETE,
    FINAL_STATES,
    PIN,
    PROMOTED,
    REST,
    ROLLED_BACK,
    Ack,
    RolloutError,
    RolloutRow,
    RolloutStore,
)
from fedclip.coordinator.trust import Trust
from fedclip.sdk import messages
from fedclip.sdk.adapters import AdapterMeta, adapter_bytes
from fedclip.sdk.errors import FedclipError, WireError
from fedclip.sdk.hashing import sha256_bytes
from fedclip.sdk.ids import check_id
from fedclip.sdk.messages import (
    FEATURE_FALLBACK,
    FEATURES_KEY,
    AdapterPush,
    RolloutCommand,
    WireBody,
    wire_features,
)
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.signing import Ed25519PrivateKey
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import DEFAULT_MAX_PAYLOAD, MsgType, Topics, decode

log = logging.getLogger(__name__)

KEY_DIR = "keys"  # <state>/keys: the coordinator's Ed25519 key pair (`ensure_keypair`)


class RolloutManager:
    """Drives rollouts over MQTT: publishes signed adapters and commands, records acks, decides.

    The caller owns the loop: feed every incoming message to `handle` (it takes the `agents/+/ack`
    ones) and call `tick` now and then; `wait` does both until a rollout reaches a final state.
    """

    def __init__(
        self,
        transport: Transport,
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
        trust: Trust | None = None,
        on_reject: Callable[[str, str, str], None] | None = None,
    ):
        self.transport = transport
        # (topic, agent, reason) of every ack refused; the server records them with its rejections
        self.on_reject = on_reject or (lambda topic, agent, reason: None)
        self.trust = trust or Trust(None)  # whose acks count (a provisioned fleet: signed by the agent)
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
        self.transport.subscribe(self.topics.all_agents("ack"), qos=1)

    # ---- publishing --------------------------------------------------------------------------
    def _publish(self, topic: str, agent: str, obj: WireBody) -> None:
        payload = messages.encode(obj, self.topics.fleet, agent, key=self.key)
        if len(payload) > self.max_payload:
            raise RolloutError(
                f"{topic}: signed message of {len(payload)} bytes exceeds the limit of {self.max_payload}"
            )
        self.transport.publish(topic, payload, qos=1, retain=True, timeout=self.publish_timeout)

    def _send_adapter(self, rid: int, stage: str, version: str, agent: str, fallback: bool = False) -> None:
        tensors, meta = self.adapters.load_for(version, agent)
        extra = self.adapters.fallback_for(version, agent) if fallback else None
        push = AdapterPush(
            version=meta.version,
            bundle_id=meta.bundle_id,
            rollout=rid,
            stage=stage,
            rollout_version=version,
            parent_version=meta.parent_version,
            strategy=meta.strategy,
            kind=meta.kind,
            round_id=meta.round,
            adapter=tensors,
            fallback_version=(extra[1].version or version) if extra is not None else "",
            fallback=extra[0] if extra is not None else {},
        )
        blob = adapter_bytes(push.tensors(), meta)  # with the fallback: one file, one sha256
        if len(blob) > self.inline_limit:
            if self.url_root is None or self.url_base is None:
                raise RolloutError(
                    f"adapter {meta.version} is {len(blob)} bytes, over the MQTT limit of "
                    f"{self.inline_limit}; serve the bundle directory to send it by URL"
                )
            digest = sha256_bytes(blob)
            publish_file(self.url_root, f"adapters/{digest}.safetensors", blob)
            url = f"{self.url_base}/adapters/{digest}.safetensors"
            push = replace(push, url=url, sha256=digest, size=len(blob), adapter={}, fallback={})
        self._publish(self.topics.adapter(agent), agent, push)

    def _send_command(self, agent: str, command: RolloutCommand, kind: str = "command") -> None:
        self._publish(self.topics.agent(agent, kind), agent, command)

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
        # the round's global adapter for each target that gets its own (the same one for all)
        wanted = [self.adapters.fallback_for(params.version, a) for a in targets] if params.fallback else []
        fallbacks = [f for f in wanted if f is not None]
        if params.fallback and not fallbacks:  # only a personalized round's version has one to send
            raise RolloutError(
                f"--fallback: no target gets its own adapter of {params.version}, so none needs the "
                "global one beside it"
            )
        if fallbacks:
            _check_fallback_strategy(fallbacks[0][1])
            _check_fallback_takers([a for a, f in zip(targets, wanted, strict=True) if f is not None], fleet)
        rid = self.store.create(
            params.version,
            str(params.target),
            params.canary,
            params.max_regression,
            params.min_acks,
            params.stage_timeout,
            skipped,
            targets,
            params.fallback,
        )
        if skipped:
            self._say(rid, f"pinned, left out: {', '.join(skipped)}")
        if params.fallback:
            self._say(rid, f"fallback: {len(fallbacks)} of {len(targets)} agent(s) get {params.version} too")
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
            self._send_adapter(rid, stage, params.version, agent, params.fallback)
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
            self._send_command(agent, RolloutCommand("rollback", rid, row.version, reason))
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
        self._send_command(agent, RolloutCommand("pin", version=version), kind="pin")
        self.store.pin(agent, version)
        self.store.event(None, f"pinned {agent} to {version}")

    def unpin(self, agent: str) -> None:
        check_id(agent, "agent")
        if not self.store.unpin(agent):
            raise RolloutError(f"agent {agent!r} is not pinned")
        self._send_command(agent, RolloutCommand("unpin"), kind="pin")
        self.store.event(None, f"unpinned {agent}")

    # ---- acks and decisions ------------------------------------------------------------------
    def handle(self, incoming: Incoming) -> bool:
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
            self.on_reject(incoming.topic, agent, str(e))
        return True

    def _on_ack(self, agent: str, payload: bytes, where: str) -> None:
        msg = decode(payload, fleet=self.topics.fleet, expect=MsgType.ACK, max_bytes=1 << 20, where=where)
        self.trust.check(agent, msg, where)
        ack = messages.Ack.parse(msg, where)
        stage = self._stage_of(ack.rollout).get(agent)
        if stage is None:
            raise WireError(f"{where}: agent {agent} is not part of rollout {ack.rollout}")
        record = Ack(
            agent=agent,
            status=ack.status,
            version=ack.version,
            new_accuracy=ack.new.accuracy,
            current_accuracy=ack.current.accuracy,
            new_loss=ack.new.loss,
            current_loss=ack.current.loss,
            num_samples=ack.new.num_samples,
            reason=ack.reason,
        )
        self.store.record_ack(ack.rollout, stage, record)

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
        stage = current_stage(self.store.stages(row.id))
        acks = self.store.acks(row.id, stage.name) if stage is not None else []
        step = next_step(row, stage, acks, self.store.pins(), now)
        if step.action != "wait":
            self._apply(row, step)

    def _apply(self, row: RolloutRow, step: Step) -> None:
        """Carry out `step`; every stage close is compare-and-set, so when another process (serve,
        watch, start --wait) decided the stage first, nothing more happens here."""
        decision = step.decision
        assert decision is not None
        if step.action == "rollback":
            if self.store.finish_stage(row.id, CANARY, "failed", decision.reason, decision.mean_regression):
                self._say(row.id, f"canary failed: {decision.reason}")
                self.rollback(row.id, f"automatic: {decision.reason}")
        elif step.action == "promote":
            if step.rest and not self._can_send(row.version, step.rest[0]):
                return  # started from a file this process does not have: its own command promotes
            if not self.store.finish_stage(
                row.id, CANARY, "passed", decision.reason, decision.mean_regression
            ):
                return
            self.store.set_state(row.id, PROMOTED, decision.reason)
            self._say(row.id, f"canary passed: {decision.reason}; promoting")
            if step.rest:
                self._begin_stage(row.id, REST, step.rest, RolloutParams.of(row))
            else:
                self.store.set_state(row.id, COMPLETE, decision.reason)
        elif step.action == "complete":
            if self.store.finish_stage(row.id, REST, "done", step.summary, decision.mean_regression):
                self.store.set_state(row.id, COMPLETE, step.summary)
                self._say(row.id, f"complete: {step.summary}")

    def _can_send(self, version: str, agent: str) -> bool:
        try:
            self.adapters.load_for(version, agent)
        except FedclipError as e:
            log.debug("rollout of %s: not promoting here (%s)", version, e)
            return False
        return True

    def wait(self, rid: int, timeout: float, poll: float = 0.2) -> RolloutRow:
        """Handle acks and tick until rollout `rid` is final or `timeout` s pass; return its row."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.store.get(rid)
            if row is None:
                raise RolloutError(f"rollout {rid} does not exist")
            if row.state in FINAL_STATES or time.monotonic() >= deadline:
                return row
            incoming = self.transport.get(timeout=poll)
            while incoming is not None:
                self.handle(incoming)
                incoming = self.transport.get(timeout=0)
            self.tick()


def _check_fallback_takers(agents: Sequence[str], fleet: Mapping[str, AgentInfo]) -> None:
    """Refuse, before anything is published, a fallback for an agent whose status says it runs a
    fedclip agent older than fallbacks: it would refuse the push without an ack, so its stage would
    time out and roll the rollout back. An agent the coordinator has no status of is not refused."""
    old = [
        a
        for a in agents
        if a in fleet and FEATURE_FALLBACK not in wire_features(fleet[a].info.get("versions") or {})
    ]
    if old:
        shown = ", ".join(old[:5]) + (f" and {len(old) - 5} more" if len(old) > 5 else "")
        raise RolloutError(
            f"--fallback: {len(old)} target(s) run an agent that cannot take one (its status names no "
            f"{FEATURES_KEY} {FEATURE_FALLBACK}): {shown}; upgrade them, leave them out (--to), or roll "
            "out without --fallback"
        )


def _check_fallback_strategy(meta: AdapterMeta) -> None:
    """A round's global adapter goes to devices as a model of their own only where the strategy's
    global adapter is one (`Strategy.shared_global`); RolloutError otherwise."""
    if meta.strategy in strategies.names() and not strategies.get(meta.strategy).shared_global:
        raise RolloutError(
            f"--fallback: a {meta.strategy} round's global adapter is no model a device can serve "
            "(each device's A and B are its own); use it with fleet-lora or fleet-core"
        )
