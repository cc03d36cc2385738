"""The agent side of rollouts: verify, evaluate, install, acknowledge, roll back, stay pinned.

`RolloutClient.handle(incoming)` takes the agent's `adapter`, `command` and `pin` topics (retained,
signed by the coordinator) and returns False for anything else, so the agent loop can offer it every
message. For an adapter it:

1. decodes it, checks the Ed25519 signature against the coordinator's public key (from the agent's
   config) and that the message is addressed to this agent (a signed message for another agent,
   replayed on our topic, is refused), then reads the body with `messages.AdapterPush.parse`;
   unsigned, tampered, wrongly signed and malformed adapters never reach step 2;
2. evaluates the new adapter and the current one on the local held-out data (`evaluate_fn`);
3. installs it in the agent's adapter ledger under its rollout id (`rollout_history`), which
   switches inference, with its fallback when the push carries one (`rollout start --fallback`:
   the fleet's global adapter, checked and completed like the adapter itself), and
4. acknowledges with both metrics on `agents/<id>/ack` (`rollout_acks`).

Commands are read with `messages.RolloutCommand.parse`. Bad input is refused with one line ("refused:
...", in the log and, in the agent, its retained status) and dropped; the coordinator also gets a
`rejected` ack when the push names its rollout readably.
Every step is idempotent: a retained message seen again after a reconnect re-sends the kept ack and
changes nothing. Rolled-back rollouts are remembered (`rollout_memory`), so their retained adapter is
never installed again. Everything lives in the agent's state dir (`AgentState`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedclip.device_agent import rollout_history, rollout_legacy
from fedclip.device_agent.rollout_acks import AckSender
from fedclip.device_agent.rollout_memory import RolloutMemory
from fedclip.device_agent.state import AgentState
from fedclip.sdk.adapters import AdapterMeta, adapter_from_bytes, load_adapter
from fedclip.sdk.errors import FedclipError, WireError
from fedclip.sdk.fetch import fetch_bytes
from fedclip.sdk.messages import AdapterPush, RolloutCommand
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.signing import Ed25519PrivateKey, Ed25519PublicKey, load_public_key, verify_message
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import DEFAULT_MAX_PAYLOAD, Message, MsgType, Topics, decode

log = logging.getLogger(__name__)

Tensors = Mapping[str, np.ndarray]
EvaluateFn = Callable[[Tensors | None], Mapping[str, float]]


class RolloutClient:
    """One agent's rollout handling over its state dir `state`.

    `evaluate_fn(tensors or None) -> {loss, accuracy, num_samples}` evaluates an adapter (None: the
    bundle's own); `check_fn(tensors, where)` refuses tensors that do not fit the bundle;
    `complete_fn(tensors)` turns the pushed (exchanged) tensors into the adapter kept in the ledger
    (the agent adds its own local tensors; default: kept as pushed); `refuse(why)` records a refused
    message (the agent's puts it in its retained status, as for tasks; default: one log line)."""

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        agent_id: str,
        state: AgentState,
        public_key: Ed25519PublicKey | str | Path,
        evaluate_fn: EvaluateFn | None,
        *,
        bundle_id: str | None = None,
        check_fn: Callable[[Tensors, str], Tensors] | None = None,
        complete_fn: Callable[[Tensors], Tensors] | None = None,
        refuse: Callable[[str], None] | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        publish_timeout: float = 30.0,
        device_key: Ed25519PrivateKey | None = None,
    ):
        self.transport = transport
        self.topics = topics
        self.agent_id = agent_id
        self.state = state
        self.public_key = (
            public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
        )
        self.evaluate_fn = evaluate_fn
        self.bundle_id = bundle_id
        self.check_fn = check_fn
        self.complete_fn = complete_fn
        self.refuse = refuse or _log_refusal
        self.max_payload = max_payload
        self.memory = RolloutMemory(state)
        rollout_legacy.migrate(state, self.memory)
        self.acks = AckSender(
            transport,
            topics,
            agent_id,
            self.memory,
            device_key=device_key,
            publish_timeout=publish_timeout,
        )

    # ---- topics --------------------------------------------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        return ("adapter", "command", "pin")

    def subscriptions(self) -> list[str]:
        return [self.topics.agent(self.agent_id, k) for k in self.kinds]

    def subscribe(self) -> None:
        for topic in self.subscriptions():
            self.transport.subscribe(topic, qos=1)

    # ---- views ---------------------------------------------------------------------------------
    @property
    def current_version(self) -> str | None:
        """The adapter inference uses (None: the bundle's own)."""
        return self.state.current_adapter

    @property
    def pinned(self) -> str | None:
        return self.memory.pinned

    def current_tensors(self) -> dict[str, np.ndarray] | None:
        """The adapter inference uses, as kept in the ledger (None: the bundle's own)."""
        used = self.state.ledger().in_use()
        return load_adapter(used.file)[0] if used is not None else None

    # ---- dispatch ------------------------------------------------------------------------------
    def handle(self, incoming: Incoming) -> bool:
        """Act on a rollout message; False when the topic is not one of ours. Never raises for bad input."""
        try:
            agent, kind = self.topics.parse_agent(incoming.topic)
        except WireError:
            return False
        if agent != self.agent_id or kind not in self.kinds:
            return False
        if not incoming.payload:
            return True  # a cleared retained message
        where = f"{kind} on {incoming.topic}"
        try:
            if kind == "adapter":
                self._on_adapter(incoming.payload, where)
            else:
                self._on_command(incoming.payload, where, kind)
        except FedclipError as e:
            self.refuse(str(e))
        return True

    def _verified(self, payload: bytes, expect: MsgType, where: str) -> Message:
        """Decoded, signed by the coordinator and addressed to this agent; WireError otherwise."""
        msg = decode(payload, fleet=self.topics.fleet, expect=expect, max_bytes=self.max_payload, where=where)
        try:
            verify_message(self.public_key, msg, where)
        except WireError as e:
            push = _unverified_push(msg, where) if expect == MsgType.ADAPTER else None
            if push is not None:  # tell the coordinator, when the body names its rollout readably
                self.acks.send(push.rollout, "rejected", push.version, reason=str(e), keep=False)
            raise
        if msg.envelope.agent != self.agent_id:
            raise WireError(f"{where}: signed for agent {msg.envelope.agent!r}, not this one")
        return msg

    # ---- adapters ------------------------------------------------------------------------------
    def _on_adapter(self, payload: bytes, where: str) -> None:
        msg = self._verified(payload, MsgType.ADAPTER, where)
        push = AdapterPush.parse(msg, where)
        rid, version = push.rollout, push.version
        if rid and self.acks.resend(rid):
            return  # duplicate or retained copy after a reconnect
        if self.memory.was_rolled_back(rid):
            log.info("rollout %s was rolled back; its adapter %s is not installed again", rid, version)
            return
        if msg.envelope.sent_at < self.memory.last_sent_at:
            log.info(
                "%s: older than the adapter already applied (replay or stale retained copy); ignored", where
            )
            return
        if self.pinned and version != self.pinned:
            self.acks.send(rid, "pinned", version, reason=f"pinned to {self.pinned}")
            return
        if self.bundle_id and push.bundle_id != self.bundle_id:
            self.acks.send(rid, "rejected", version, reason=f"adapter is for bundle {push.bundle_id[:12]}")
            return
        try:
            push = self._fetched(push, where)
            tensors = self._checked(push.adapter, where)
            fallback = self._checked(push.fallback, f"{where}: fallback") if push.fallback else None
        except FedclipError as e:
            self.acks.send(rid, "rejected", version, reason=str(e), keep=False)  # a later copy may fetch fine
            raise
        metrics: dict[str, Any] = {}
        if self.evaluate_fn is not None:
            try:
                metrics["current"] = dict(self.evaluate_fn(self.current_tensors()))
                metrics["new"] = dict(self.evaluate_fn(tensors))
            except FedclipError as e:
                self.acks.send(rid, "rejected", version, reason=f"evaluation failed: {e}")
                return
        previous = self.current_version
        extra = (self._completed(fallback), _fallback_meta(push)) if fallback is not None else None
        if version != previous:
            kept = self._completed(tensors)
            rollout_history.install(self.state, kept, _meta(push, self.agent_id), rid, extra)
        elif extra is not None:  # the version in use, now with its fallback (`--fallback` again)
            self.state.keep_fallback(version, *extra)
        self.memory.applied(msg.envelope.sent_at)
        self.acks.send(rid, "installed", version, previous_version=previous or "", metrics=metrics)
        log.info("adapter %s installed (rollout %s, previous %s)%s", version, rid, previous, _fmt(metrics))

    def _fetched(self, push: AdapterPush, where: str) -> AdapterPush:
        if not push.url:
            return push
        # The signature covers url and sha256, so the fetched bytes are as trusted as the message.
        blob = fetch_bytes(push.url, push.sha256, max_bytes=self.max_payload)
        return push.with_fetched(adapter_from_bytes(blob, push.url)[0], where)

    def _checked(self, tensors: Tensors, where: str) -> Tensors:
        return self.check_fn(tensors, where) if self.check_fn is not None else tensors

    def _completed(self, tensors: Tensors) -> Tensors:
        return self.complete_fn(tensors) if self.complete_fn is not None else tensors

    # ---- commands ------------------------------------------------------------------------------
    def _on_command(self, payload: bytes, where: str, kind: str) -> None:
        command = RolloutCommand.parse(self._verified(payload, MsgType.COMMAND, where), where)
        if kind == "pin":
            if command.command == "rollback":
                raise WireError(f"{where}: a rollback belongs on the command topic, not the pin topic")
            version = command.version if command.command == "pin" else None
            if self.memory.pin(version):
                log.info("pin: %s", f"adapter {version}" if version else "none (unpinned)")
            return
        if command.command != "rollback":
            raise WireError(f"{where}: a {command.command!r} belongs on the pin topic")
        self._rollback(command)

    def _rollback(self, command: RolloutCommand) -> None:
        rid = command.rollout
        if self.memory.was_rolled_back(rid):
            return  # already done; the retained copy after a reconnect
        switched = rollout_history.roll_back(self.state, rid, self.pinned)
        self.memory.note_rolled_back(rid)  # after the switch: a crash between repeats the rollback
        if switched is not None:
            log.warning("rollout %s rolled back: %s -> %s (%s)", rid, *switched, command.reason)
        self.acks.send(
            rid,
            "rolled_back",
            self.current_version or "",
            reason=command.reason[:200],
            previous_version=command.version,
        )


def _log_refusal(why: str) -> None:
    log.warning("refused: %s", why)


def _unverified_push(msg: Message, where: str) -> AdapterPush | None:
    """The body of a push whose signature failed, read by its own parser only to name its rollout
    in the rejection (None: unreadable)."""
    try:
        return AdapterPush.parse(msg, where)
    except WireError:
        return None


def _meta(push: AdapterPush, agent_id: str) -> AdapterMeta:
    return AdapterMeta(
        bundle_id=push.bundle_id,
        version=push.version,
        parent_version=push.parent_version,
        round=push.round_id,
        strategy=push.strategy,
        kind=push.kind,
        agent=agent_id,
    )


def _fallback_meta(push: AdapterPush) -> AdapterMeta:
    """The fallback is the round's global adapter: no agent of its own, no label prior."""
    return AdapterMeta(
        bundle_id=push.bundle_id, version=push.fallback_version, round=push.round_id, strategy=push.strategy
    )


def _fmt(metrics: Mapping[str, Any]) -> str:
    try:
        return f": accuracy {metrics['current']['accuracy']:.3f} -> {metrics['new']['accuracy']:.3f}"
    except (KeyError, TypeError, ValueError):
        return ""
