"""Rollout messages: the signed adapter push and rollout command the coordinator sends, and the
ack an agent returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from fedclip.sdk.errors import WireError
from fedclip.sdk.ids import ID_PATTERN
from fedclip.sdk.messages.base import (  # the package's own field checks
    ACK_STATUSES,
    COMMANDS,
    MAX_NAME,
    MAX_ROLLOUT_ID,
    MAX_SAMPLES,
    MAX_TEXT,
    MAX_URL,
    MAX_VERSION,
    WireBody,
    _choice,
    _envelope_type,
    _float,
    _id,
    _int,
    _known_fields,
    _show,
    _str,
)
from fedclip.sdk.wire import (
    Message,
    MsgType,
)

# An adapter push's fallback travels beside its adapter in the same signed tensor set (inline, or
# in the one file its URL names), each tensor's name behind this prefix.
FALLBACK_PREFIX = "fallback/"


@dataclass(frozen=True)
class AckMetrics:
    """An agent's evaluation of one adapter on its held-out data (canary decisions read these)."""

    accuracy: float | None = None
    loss: float | None = None
    num_samples: int = 0

    def to_body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_samples": self.num_samples}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        if self.loss is not None:
            out["loss"] = self.loss
        return out

    @classmethod
    def parse(cls, raw: Any, key: str, where: str) -> AckMetrics:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise WireError(f"{where}: ack metrics {key!r} must be an object")
        w = f"{where}: metrics.{key}"
        _known_fields(raw, frozenset({"accuracy", "loss", "num_samples"}), w)
        acc = _float(raw, "accuracy", 0.0, 1.0, w, None) if raw.get("accuracy") is not None else None
        loss = _float(raw, "loss", 0.0, 1e9, w, None) if raw.get("loss") is not None else None
        # agents before the typed messages sent the count as a float (43.0): an integral one is taken
        count = _float(raw, "num_samples", 0.0, MAX_SAMPLES, w, 0)
        if count != int(count):
            raise WireError(f"{w}: body field 'num_samples' must be a whole number, got {count!r}")
        return cls(acc, loss, int(count))


@dataclass(frozen=True)
class Ack(WireBody):
    """agent -> coordinator: what became of a rollout's adapter or command on this agent."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    BODY_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"rollout", "status", "version", "reason", "previous_version", "metrics"}
    )

    rollout: int
    status: str
    version: str = ""
    reason: str = ""
    previous_version: str = ""
    new: AckMetrics = AckMetrics()
    current: AckMetrics = AckMetrics()

    def envelope_base_version(self) -> str:
        return self.version

    def to_body(self) -> dict[str, Any]:
        metrics = {}
        if self.new != AckMetrics():
            metrics["new"] = self.new.to_body()
        if self.current != AckMetrics():
            metrics["current"] = self.current.to_body()
        return {
            "rollout": self.rollout,
            "status": self.status,
            "version": self.version,
            "reason": self.reason[:MAX_TEXT],
            "previous_version": self.previous_version,
            "metrics": metrics,
        }

    @classmethod
    def parse(cls, msg: Message, where: str) -> Ack:
        body = _envelope_type(msg, MsgType.ACK, where).body
        _known_fields(body, cls.BODY_KEYS, where)
        metrics = body.get("metrics", {})
        if not isinstance(metrics, dict) or set(metrics) - {"new", "current"}:
            raise WireError(f"{where}: body field 'metrics' must be an object with 'new' and 'current'")
        return cls(
            rollout=_int(body, "rollout", 1, MAX_ROLLOUT_ID, where),
            status=_choice(body, "status", ACK_STATUSES, where),
            version=_str(body, "version", MAX_VERSION, where, ""),
            reason=_str(body, "reason", 4 * MAX_TEXT, where, "")[:MAX_TEXT],
            previous_version=_str(body, "previous_version", MAX_VERSION, where, ""),
            new=AckMetrics.parse(metrics.get("new"), "new", where),
            current=AckMetrics.parse(metrics.get("current"), "current", where),
        )


@dataclass(frozen=True)
class AdapterPush(WireBody):
    """coordinator -> agent (retained, signed): install this adapter for inference. Large adapters go
    by `url` (+ `sha256`, `size`) instead of inline tensors.

    `fallback` (with `fallback_version`, a rollout's `--fallback`): the fleet's global adapter of
    the round whose personalized adapter this is; the device's open-set gate sends it the images
    that do not look like its own (`device_agent.open_set`). Sent as `fallback/<name>` tensors, so
    the signature covers it; `fallback_version` is in the body only when there is one, so pushes
    without it read as before to agents that predate it."""

    TYPE: ClassVar[MsgType] = MsgType.ADAPTER
    BODY_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "rollout",
            "stage",
            "version",
            "rollout_version",
            "bundle_id",
            "parent_version",
            "strategy",
            "kind",
            "url",
            "sha256",
            "size",
            "round",
            "fallback_version",
        }
    )

    version: str
    bundle_id: str
    rollout: int = 0  # 0: a plain push, not part of a rollout
    stage: str = ""
    rollout_version: str = ""
    parent_version: str = ""
    strategy: str = ""
    kind: str = ""
    round_id: int = -1
    url: str = ""
    sha256: str = ""
    size: int = 0
    adapter: Mapping[str, np.ndarray] = field(default_factory=dict)
    fallback_version: str = ""
    fallback: Mapping[str, np.ndarray] = field(default_factory=dict)

    def envelope_round(self) -> int:
        return self.round_id

    def envelope_base_version(self) -> str:
        return self.version

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "rollout": self.rollout,
            "stage": self.stage,
            "version": self.version,
            "rollout_version": self.rollout_version,
            "bundle_id": self.bundle_id,
            "parent_version": self.parent_version,
            "strategy": self.strategy,
            "kind": self.kind,
        }
        if self.url:
            body.update(url=self.url, sha256=self.sha256, size=self.size)
        if self.fallback_version:
            body["fallback_version"] = self.fallback_version
        return body

    def tensors(self) -> dict[str, np.ndarray]:
        """Everything the push carries inline, or in the one file its URL names."""
        return {**self.adapter, **{FALLBACK_PREFIX + k: v for k, v in self.fallback.items()}}

    def with_fetched(self, tensors: Mapping[str, np.ndarray], where: str) -> AdapterPush:
        """The push with the tensors of the file its URL names (already checked against its sha256),
        split into the adapter and its fallback as inline ones are."""
        adapter, fallback = split_fallback(tensors, self.fallback_version, where)
        if not adapter:
            raise WireError(f"{where}: the adapter file holds no adapter tensors")
        return replace(self, adapter=adapter, fallback=fallback)

    @classmethod
    def parse(cls, msg: Message, where: str) -> AdapterPush:
        env = _envelope_type(msg, MsgType.ADAPTER, where)
        body = env.body
        _known_fields(body, cls.BODY_KEYS, where)
        version = body.get("version") or env.base_version
        if not isinstance(version, str) or not ID_PATTERN.match(version):
            raise WireError(f"{where}: adapter version {_show(version)} is not a valid id")
        url = _str(body, "url", MAX_URL, where, "")
        sha = _str(body, "sha256", 64, where, "")
        if url and (not url.startswith(("http://", "https://")) or len(sha) != 64):
            raise WireError(f"{where}: an adapter by URL needs an http(s) url and a sha256")
        fallback_version = _id(body, "fallback_version", where, "", empty_ok=True)
        adapter: dict[str, np.ndarray] = {}
        fallback: dict[str, np.ndarray] = {}
        if url and msg.adapter_tensors:  # its tensors (fallback too) are in the file: `with_fetched`
            raise WireError(f"{where}: an adapter push by URL carries no tensors")
        if not url:
            adapter, fallback = split_fallback(msg.adapter_tensors, fallback_version, where)
            if not adapter:
                raise WireError(f"{where}: adapter push carries neither tensors nor a url")
        if msg.stats:
            raise WireError(f"{where}: an adapter push carries no statistics")
        return cls(
            version=version,
            bundle_id=_str(body, "bundle_id", MAX_VERSION, where),
            rollout=_int(body, "rollout", 0, MAX_ROLLOUT_ID, where, 0),
            stage=_str(body, "stage", MAX_NAME, where, ""),
            rollout_version=_str(body, "rollout_version", MAX_VERSION, where, ""),
            parent_version=_str(body, "parent_version", MAX_VERSION, where, ""),
            strategy=_str(body, "strategy", MAX_NAME, where, ""),
            kind=_str(body, "kind", MAX_NAME, where, ""),
            round_id=env.round,
            url=url,
            sha256=sha,
            size=_int(body, "size", 0, 1 << 40, where, 0),
            adapter=adapter,
            fallback_version=fallback_version,
            fallback=fallback,
        )


def split_fallback(
    tensors: Mapping[str, np.ndarray], fallback_version: str, where: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the adapter's tensors, its fallback's without the prefix); a fallback needs its version and a
    version its fallback, so neither half ever arrives alone."""
    adapter = {k: v for k, v in tensors.items() if not k.startswith(FALLBACK_PREFIX)}
    fallback = {k[len(FALLBACK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(FALLBACK_PREFIX)}
    if fallback and not fallback_version:
        raise WireError(f"{where}: fallback tensors without a 'fallback_version'")
    if fallback_version and not fallback:
        raise WireError(f"{where}: 'fallback_version' {fallback_version!r} without its tensors")
    return adapter, fallback


@dataclass(frozen=True)
class RolloutCommand(WireBody):
    """coordinator -> agent (retained, signed): `rollback` a rollout (on `command`), or `pin`/`unpin`
    a version (on `pin`)."""

    TYPE: ClassVar[MsgType] = MsgType.COMMAND
    BODY_KEYS: ClassVar[frozenset[str]] = frozenset({"command", "rollout", "version", "reason"})

    command: str
    rollout: int = 0
    version: str = ""
    reason: str = ""

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"command": self.command}
        if self.rollout:
            body["rollout"] = self.rollout
        if self.version:
            body["version"] = self.version
        if self.reason:
            body["reason"] = self.reason[:MAX_TEXT]
        return body

    @classmethod
    def parse(cls, msg: Message, where: str) -> RolloutCommand:
        body = _envelope_type(msg, MsgType.COMMAND, where).body
        _known_fields(body, cls.BODY_KEYS, where)
        command = _choice(body, "command", COMMANDS, where)
        rollout = _int(
            body,
            "rollout",
            1 if command == "rollback" else 0,
            MAX_ROLLOUT_ID,
            where,
            ... if command == "rollback" else 0,
        )
        version = _id(body, "version", where, ... if command == "pin" else "", empty_ok=command != "pin")
        return cls(command, rollout, version, _str(body, "reason", 4 * MAX_TEXT, where, "")[:MAX_TEXT])
