"""One typed, frozen class per wire message: the only way either side builds or reads a message body.

Every class has `to_body()` (and `tensors()` where the message carries tensors) to build, and
`parse(msg, where)` to read a decoded `wire.Message`: each field is checked for type, range, length
and finiteness, integers that reach SQLite or a round counter are bounded here, and unknown body
fields are refused. Anything wrong raises `WireError` with one line naming the field. Defaults and
bounds of the training hyperparameters and the vocabulary of data statistics live here, once.

`encode(obj, fleet, agent, key)` and `decode(cls, payload, ...)` wrap `fedclip.sdk.wire` (envelope,
size limits, tensor integrity) and `fedclip.sdk.signing` (Ed25519 over the canonical envelope plus
the tensors' sha256) around these classes.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fedclip.sdk.errors import WireError
from fedclip.sdk.messages.base import (
    ACK_INSTALLED,
    ACK_PINNED,
    ACK_REJECTED,
    ACK_ROLLED_BACK,
    ACK_STATUSES,
    COMMANDS,
    KNOWN_STATS,
    MAX_BATCH,
    MAX_DEADLINE,
    MAX_EPOCHS,
    MAX_LR,
    MAX_METRICS,
    MAX_PROX_MU,
    MAX_ROLLOUT_ID,
    MAX_SAMPLES,
    MAX_STEPS,
    MAX_TEXT,
    SIGNATURE_FIELD,
    STAT_KINDS,
    STATS_TENSORS,
    WireBody,
)
from fedclip.sdk.messages.rollout import Ack, AckMetrics, AdapterPush, RolloutCommand
from fedclip.sdk.messages.rounds import (
    FLEET_GAIN,
    FLEET_GAIN_HELPED,
    FLEET_GAIN_HURT,
    Hyperparameters,
    Task,
    Update,
)
from fedclip.sdk.messages.status import (
    AGENT_FEATURES,
    DEVICE_FALLBACK,
    FEATURE_FALLBACK,
    FEATURES_KEY,
    AgentStatus,
    CoordinatorStatus,
    TuningProgress,
    wire_features,
)
from fedclip.sdk.wire import DEFAULT_MAX_PAYLOAD, STATS_PREFIX, Envelope, tensors_digest
from fedclip.sdk.wire import decode as wire_decode
from fedclip.sdk.wire import encode as wire_encode

T = TypeVar("T", bound=WireBody)


# ---- encode / decode ----------------------------------------------------------------------------
def envelope(obj: WireBody, fleet: str, agent: str, sent_at: float = 0.0) -> Envelope:
    """The envelope `obj` travels in: `agent` is the agent it is for (task, push, command) or from;
    `sent_at` 0 means now (stamped when encoded)."""
    return Envelope(
        obj.TYPE,
        fleet,
        agent,
        round=obj.envelope_round(),
        base_version=obj.envelope_base_version(),
        body=obj.to_body(),
        sent_at=sent_at,
    )


def encode(
    obj: WireBody, fleet: str, agent: str, key: Any = None, compress: bool = True, sent_at: float = 0.0
) -> bytes:
    """The payload of `obj`, signed with `key` (an Ed25519 private key) when given."""
    env = envelope(obj, fleet, agent, sent_at)
    tensors = obj.tensors()
    digest = tensors_digest(tensors) if tensors else ""  # once, for the signature and the header
    if key is not None:
        from fedclip.sdk.signing import sign_envelope  # signing imports wire, never messages

        env = sign_envelope(key, env, tensors, digest)
    return wire_encode(env, tensors, compress=compress, digest=digest)


def decode(
    cls: type[T],
    payload: bytes,
    *,
    fleet: str,
    agent: str | None = None,
    public_key: Any = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD,
    where: str = "message",
) -> T:
    """Decode, check the envelope names `agent` (the topic's agent) and, with `public_key`, that the
    sender signed it; then parse the body. WireError with one line otherwise."""
    msg = wire_decode(payload, fleet=fleet, expect=cls.TYPE, max_bytes=max_bytes, where=where)
    if agent is not None and msg.envelope.agent != agent:
        raise WireError(f"{where}: envelope names agent {msg.envelope.agent!r}, the topic {agent!r}")
    if public_key is not None:
        from fedclip.sdk.signing import verify_message

        verify_message(public_key, msg, where)
    return cls.parse(msg, where)


__all__ = [
    "AGENT_FEATURES",
    "DEVICE_FALLBACK",
    "FEATURE_FALLBACK",
    "FEATURES_KEY",
    "FLEET_GAIN",
    "FLEET_GAIN_HELPED",
    "FLEET_GAIN_HURT",
    "wire_features",
    "ACK_INSTALLED",
    "ACK_PINNED",
    "ACK_REJECTED",
    "ACK_ROLLED_BACK",
    "MAX_BATCH",
    "MAX_DEADLINE",
    "MAX_EPOCHS",
    "MAX_LR",
    "MAX_METRICS",
    "MAX_PROX_MU",
    "MAX_ROLLOUT_ID",
    "MAX_SAMPLES",
    "MAX_STEPS",
    "MAX_TEXT",
    "SIGNATURE_FIELD",
    "ACK_STATUSES",
    "COMMANDS",
    "KNOWN_STATS",
    "STATS_PREFIX",
    "STATS_TENSORS",
    "STAT_KINDS",
    "Ack",
    "AckMetrics",
    "AdapterPush",
    "AgentStatus",
    "CoordinatorStatus",
    "Hyperparameters",
    "RolloutCommand",
    "Task",
    "TuningProgress",
    "Update",
    "WireBody",
    "decode",
    "encode",
    "envelope",
]
