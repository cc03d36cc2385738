"""The agent side of rollouts: verify, evaluate, install atomically, acknowledge, roll back, stay pinned.

`RolloutClient.handle(incoming)` takes the agent's `adapter`, `command` and `pin` topics (retained,
signed by the coordinator) and returns False for anything else, so the agent loop can offer it every
message. For an adapter it:

1. checks the Ed25519 signature against the coordinator's public key (from the agent's config) and
   that the message is addressed to this agent (a signed message for another agent, replayed on our
   topic, is refused); unsigned, tampered and wrongly signed adapters never reach step 2;
2. evaluates the new adapter and the current one on the local held-out data (`evaluate_fn`);
3. installs it atomically, keeping the previous version, switches inference (`on_change`), and
4. acknowledges with both metrics on `agents/<id>/ack`.

Every step is idempotent: a retained message seen again after a reconnect re-sends the stored
acknowledgement and changes nothing. Rolled-back rollouts are remembered, so their retained adapter
is never installed again. State lives in `<state_dir>/rollout/` (files replaced atomically).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from fedclip.sdk import messages
from fedclip.sdk.adapters import AdapterMeta, adapter_bytes, adapter_from_bytes
from fedclip.sdk.errors import FedclipError, WireError
from fedclip.sdk.fetch import fetch_bytes
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.ids import ID_PATTERN
from fedclip.sdk.mqtt import Incoming
from fedclip.sdk.signing import Ed25519PrivateKey, Ed25519PublicKey, load_public_key, verify_message
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import DEFAULT_MAX_PAYLOAD, Message, MsgType, Topics, decode

log = logging.getLogger(__name__)

STATE_NAME = "rollout.json"
KEEP_VERSIONS = 3  # current + previous + one more, so a rollback always has something to go to

EvaluateFn = Callable[[Mapping[str, np.ndarray] | None], Mapping[str, float]]
ChangeFn = Callable[[str | None, Mapping[str, np.ndarray] | None], None]


class RolloutClient:
    """One agent's rollout handling. `evaluate_fn(tensors or None) -> {loss, accuracy, num_samples}`
    evaluates an adapter (None: the agent's current one when nothing was installed by a rollout)."""

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        agent_id: str,
        state_dir: str | Path,
        public_key: Ed25519PublicKey | str | Path,
        evaluate_fn: EvaluateFn | None,
        *,
        bundle_id: str | None = None,
        check_fn: Callable[[Mapping[str, np.ndarray], str], Mapping[str, np.ndarray]] | None = None,
        on_change: ChangeFn | None = None,
        baseline_fn: Callable[[], tuple[str, Mapping[str, np.ndarray]] | None] | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        publish_timeout: float = 30.0,
        device_key: Ed25519PrivateKey | None = None,
    ):
        self.transport = transport
        self.topics = topics
        self.agent_id = agent_id
        self.root = Path(state_dir) / "rollout"
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_key = (
            public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
        )
        self.evaluate_fn = evaluate_fn
        self.bundle_id = bundle_id
        self.check_fn = check_fn  # e.g. lambda t, where: check_adapter(t, manifest, where)
        self.on_change = on_change
        # The agent's own adapter (version, exchanged tensors) before any rollout: kept as the oldest
        # entry, so rolling back the first rollout returns inference to it rather than to nothing.
        self.baseline_fn = baseline_fn
        self.max_payload = max_payload
        self.publish_timeout = publish_timeout
        self.device_key = device_key  # signs this agent's acks (a provisioned fleet counts only signed ones)
        self.state = self._load()

    # ---- topics --------------------------------------------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        return ("adapter", "command", "pin")

    def subscriptions(self) -> list[str]:
        return [self.topics.agent(self.agent_id, k) for k in self.kinds]

    def subscribe(self) -> None:
        for topic in self.subscriptions():
            self.transport.subscribe(topic, qos=1)

    # ---- state ---------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        path = self.root / STATE_NAME
        empty: dict[str, Any] = {
            "history": [],
            "pinned": None,
            "rolled_back": [],
            "acks": {},
            "last_sent_at": 0.0,
        }
        if not path.is_file():
            return empty
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.error("%s unreadable (%s); starting the rollout state over", path, e)
            return empty
        return {**empty, **data}

    def _save(self) -> None:
        atomic_write(self.root / STATE_NAME, json.dumps(self.state, sort_keys=True, indent=1).encode())

    @property
    def current_version(self) -> str | None:
        return self.state["history"][-1]["version"] if self.state["history"] else None

    @property
    def previous_version(self) -> str | None:
        return self.state["history"][-2]["version"] if len(self.state["history"]) > 1 else None

    @property
    def pinned(self) -> str | None:
        return self.state["pinned"]

    def current_adapter(self) -> tuple[dict[str, np.ndarray], AdapterMeta] | None:
        """What inference should use, as installed by rollouts (None: the agent's own adapter)."""
        if not self.state["history"]:
            return None
        return self._read(self.state["history"][-1]["file"])

    def _read(self, rel: str) -> tuple[dict[str, np.ndarray], AdapterMeta]:
        return adapter_from_bytes((self.root / rel).read_bytes(), str(self.root / rel))

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
            log.warning("refused: %s", e)
        return True

    def _verified(self, payload: bytes, expect: MsgType, where: str) -> Message:
        msg = decode(payload, fleet=self.topics.fleet, expect=expect, max_bytes=self.max_payload, where=where)
        try:
            verify_message(self.public_key, msg, where)
        except WireError as e:
            rid = msg.envelope.body.get("rollout")
            if expect == MsgType.ADAPTER and _is_rollout_id(rid):
                self._ack(
                    rid, "rejected", str(msg.envelope.body.get("version", "")), reason=str(e), store=False
                )
            raise
        if msg.envelope.agent != self.agent_id:
            raise WireError(f"{where}: signed for agent {msg.envelope.agent!r}, not this one")
        return msg

    # ---- adapters ------------------------------------------------------------------------------
    def _on_adapter(self, payload: bytes, where: str) -> None:
        msg = self._verified(payload, MsgType.ADAPTER, where)
        env, body = msg.envelope, msg.envelope.body
        rid = body.get("rollout", 0)
        if not _is_rollout_id(rid) and rid != 0:
            raise WireError(f"{where}: body field 'rollout' is not a rollout id")
        version = body.get("version")
        if not isinstance(version, str) or not ID_PATTERN.match(version):
            raise WireError(f"{where}: adapter version {version!r} is not a valid id")
        key = str(rid)
        if rid and key in self.state["acks"]:
            self._resend(key)  # duplicate or retained copy after a reconnect
            return
        if rid in self.state["rolled_back"]:
            log.info("rollout %s was rolled back; its adapter %s is not installed again", rid, version)
            return
        if env.sent_at < self.state["last_sent_at"]:
            log.info(
                "%s: older than the adapter already applied (replay or stale retained copy); ignored", where
            )
            return
        if self.pinned and version != self.pinned:
            self._ack(rid, "pinned", version, reason=f"pinned to {self.pinned}")
            return
        if self.bundle_id and body.get("bundle_id") != self.bundle_id:
            self._ack(
                rid, "rejected", version, reason=f"adapter is for bundle {str(body.get('bundle_id'))[:12]}"
            )
            return
        try:
            tensors = self._tensors(msg, where)
            if self.check_fn is not None:
                tensors = dict(self.check_fn(tensors, where))
        except FedclipError as e:
            self._ack(rid, "rejected", version, reason=str(e), store=False)  # a later copy may fetch fine
            raise
        metrics: dict[str, Any] = {}
        if self.evaluate_fn is not None:
            current = self.current_adapter()
            try:
                metrics["current"] = dict(self.evaluate_fn(current[0] if current else None))
                metrics["new"] = dict(self.evaluate_fn(tensors))
            except FedclipError as e:
                self._ack(rid, "rejected", version, reason=f"evaluation failed: {e}")
                return
        previous = self.current_version
        if version != previous:
            meta = AdapterMeta(
                bundle_id=str(body.get("bundle_id", "")),
                version=version,
                parent_version=str(body.get("parent_version", "")),
                round=env.round,
                strategy=str(body.get("strategy", "")),
                kind=str(body.get("kind", "")),
                agent=self.agent_id,
            )
            self._install(version, tensors, meta, rid, env.sent_at)
        self.state["last_sent_at"] = max(self.state["last_sent_at"], env.sent_at)
        self._ack(rid, "installed", version, previous_version=previous or "", metrics=metrics)
        log.info("adapter %s installed (rollout %s, previous %s)%s", version, rid, previous, _fmt(metrics))

    def _tensors(self, msg: Message, where: str) -> dict[str, np.ndarray]:
        body = msg.envelope.body
        if msg.tensors:
            return msg.adapter_tensors
        url, digest = body.get("url"), body.get("sha256")
        if not isinstance(url, str) or not isinstance(digest, str):
            raise WireError(f"{where}: adapter carries neither tensors nor a url with its sha256")
        # The signature covers url and sha256, so the fetched bytes are as trusted as the message.
        tensors, _ = adapter_from_bytes(fetch_bytes(url, digest, max_bytes=self.max_payload), url)
        return tensors

    def _install(
        self, version: str, tensors: Mapping[str, np.ndarray], meta: AdapterMeta, rid: int, sent_at: float
    ) -> None:
        if not self.state["history"] and self.baseline_fn is not None:
            base = self.baseline_fn()
            if base is not None and base[0] != version and ID_PATTERN.match(base[0] or ""):
                base_rel = f"adapters/{base[0]}.safetensors"
                base_meta = AdapterMeta(bundle_id=meta.bundle_id, version=base[0], agent=self.agent_id)
                atomic_write(self.root / base_rel, adapter_bytes(base[1], base_meta))
                self.state["history"].append(
                    {"version": base[0], "rollout": 0, "file": base_rel, "sent_at": 0.0}
                )
        rel = f"adapters/{version}.safetensors"
        atomic_write(self.root / rel, adapter_bytes(tensors, meta))  # the file first, then the record
        history = [h for h in self.state["history"] if h["version"] != version]
        history.append({"version": version, "rollout": rid, "file": rel, "sent_at": sent_at})
        dropped, self.state["history"] = history[:-KEEP_VERSIONS], history[-KEEP_VERSIONS:]
        self._save()
        for h in dropped:
            (self.root / h["file"]).unlink(missing_ok=True)
        self._switch()

    def _switch(self) -> None:
        if self.on_change is None:
            return
        current = self.current_adapter()
        self.on_change(self.current_version, current[0] if current else None)

    # ---- commands ------------------------------------------------------------------------------
    def _on_command(self, payload: bytes, where: str, kind: str) -> None:
        msg = self._verified(payload, MsgType.COMMAND, where)
        body = msg.envelope.body
        command = body.get("command")
        if kind == "pin":
            if command == "pin":
                version = body.get("version")
                if not isinstance(version, str) or not ID_PATTERN.match(version):
                    raise WireError(f"{where}: pin version {version!r} is not a valid id")
                if self.state["pinned"] != version:
                    self.state["pinned"] = version
                    self._save()
                    log.info("pinned to adapter %s", version)
            elif command == "unpin":
                if self.state["pinned"] is not None:
                    self.state["pinned"] = None
                    self._save()
                    log.info("unpinned")
            else:
                raise WireError(f"{where}: unknown pin command {command!r}")
            return
        if command != "rollback":
            raise WireError(f"{where}: unknown command {command!r}")
        rid = body.get("rollout")
        if not _is_rollout_id(rid):
            raise WireError(f"{where}: body field 'rollout' is not a rollout id")
        if rid in self.state["rolled_back"]:
            return  # already done; the retained copy after a reconnect
        self.state["rolled_back"] = sorted(set(self.state["rolled_back"]) | {rid})[-100:]
        history = self.state["history"]
        installed = bool(history) and history[-1]["rollout"] == rid
        if installed and self.pinned == history[-1]["version"]:
            installed = False  # pinned: this agent stays on its version whatever happens to the rollout
        if installed:
            bad = history.pop()
            self._save()
            (self.root / bad["file"]).unlink(missing_ok=True)
            self._switch()
            log.warning(
                "rollout %s rolled back: %s -> %s (%s)",
                rid,
                bad["version"],
                self.current_version,
                body.get("reason", ""),
            )
        else:
            self._save()
        self._ack(
            rid,
            "rolled_back",
            self.current_version or "",
            reason=str(body.get("reason", ""))[:200],
            previous_version=str(body.get("version", "")),
        )

    # ---- acks ----------------------------------------------------------------------------------
    def _ack(
        self,
        rid: int,
        status: str,
        version: str,
        *,
        reason: str = "",
        previous_version: str = "",
        metrics: Mapping[str, Any] | None = None,
        store: bool = True,
    ) -> None:
        if not rid:
            return  # pins and plain pushes are not part of a rollout
        body = {
            "rollout": rid,
            "status": status,
            "version": version,
            "reason": reason,
            "previous_version": previous_version,
            "metrics": dict(metrics or {}),
        }
        if store:
            self.state["acks"][str(rid)] = body
            # Keep the last few so a retained copy is answered the same way, without growing forever.
            for old in sorted(self.state["acks"], key=int)[:-20]:
                del self.state["acks"][old]
            self._save()
        self._publish_ack(body)

    def _resend(self, key: str) -> None:
        self._publish_ack(self.state["acks"][key])

    def _publish_ack(self, body: Mapping[str, Any]) -> None:
        metrics = body.get("metrics") or {}
        ack = messages.Ack(
            rollout=int(body["rollout"]),
            status=str(body["status"]),
            version=str(body.get("version", "")),
            reason=str(body.get("reason", "")),
            previous_version=str(body.get("previous_version", "")),
            new=_ack_metrics(metrics.get("new")),
            current=_ack_metrics(metrics.get("current")),
        )
        payload = messages.encode(ack, self.topics.fleet, self.agent_id, key=self.device_key)
        try:
            self.transport.publish(
                self.topics.ack(self.agent_id), payload, qos=1, retain=False, timeout=self.publish_timeout
            )
        except FedclipError as e:  # the broker has it queued or the next retained copy re-sends it
            log.warning("ack for rollout %s not acknowledged by the broker (%s)", body.get("rollout"), e)


def _ack_metrics(raw: Any) -> messages.AckMetrics:
    """An evaluation (`evaluate_fn`'s {loss, accuracy, num_samples}) as an ack carries it."""
    raw = raw if isinstance(raw, Mapping) else {}

    def number(key: str) -> float | None:
        value = raw.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    return messages.AckMetrics(number("accuracy"), number("loss"), int(number("num_samples") or 0))


def _is_rollout_id(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _fmt(metrics: Mapping[str, Any]) -> str:
    try:
        return f": accuracy {metrics['current']['accuracy']:.3f} -> {metrics['new']['accuracy']:.3f}"
    except (KeyError, TypeError, ValueError):
        return ""
