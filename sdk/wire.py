"""The wire protocol: topics, envelopes and their validation (DESIGN.md, "Wire protocol").

A message that carries tensors is one safetensors blob; its `__metadata__["fedclip"]` holds the
envelope as JSON. A message without tensors is the envelope itself as JSON. A tensor message goes
zlib-compressed behind the 4-byte magic `FCZ1` when that saves bytes: its safetensors header (every
tensor's name, dtype, shape) and the envelope are most of a small update. Either way `decode`
validates before anyone acts on it and raises `WireError` with a one-line reason; callers log and
drop. Only the envelope's `body` is free-form, and each message type checks its own body keys.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import json
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np

from fedclip.sdk.adapters import decode_tensors, encode_tensors
from fedclip.sdk.errors import AdapterError, WireError
from fedclip.sdk.ids import ID_PATTERN

SCHEMA_VERSION = 1
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
_META_KEY = "fedclip"
# A safetensors blob starts with its header length (u64 LE): "FCZ1" would announce an 800 MB header,
# so the magic cannot be mistaken for a plain tensor message.
COMPRESSED_MAGIC = b"FCZ1"
# Longest data digest a task (`stats_digest`) or an update (`data_digest`) may carry.
MAX_DIGEST_CHARS = 128
# Highest round id any message may name: rounds reach SQLite (a signed 64-bit INTEGER) and the agents'
# round counters, so a bigger number is refused at parse time rather than overflowing there.
MAX_ROUND = 2**31 - 1

# Data statistics ride along in updates as tensors with these names (never raw data).
STATS_PREFIX = "stats/"
STAT_LABEL_HIST = "stats/label_hist"  # [L] float32 sample counts per label
STAT_MEAN = "stats/mean"  # [L, D] float32 per-label mean of image embeddings
STAT_VAR = "stats/var"  # [L, D] float32 per-label diagonal variance


class MsgType(str, Enum):
    STATUS = "status"
    TASK = "task"
    UPDATE = "update"
    ADAPTER = "adapter"  # an adapter pushed for inference / rollout
    ACK = "ack"
    COMMAND = "command"


class Topics:
    """All topic names of one fleet, in one place."""

    def __init__(self, fleet: str):
        if not ID_PATTERN.match(fleet or ""):
            raise WireError(f"fleet {fleet!r} is not a valid id")
        self.fleet = fleet
        self.root = f"fedclip/{fleet}/"

    @property
    def coordinator_status(self) -> str:
        return self.root + "coordinator/status"

    def agent(self, agent_id: str, kind: str) -> str:
        return f"{self.root}agents/{agent_id}/{kind}"

    def status(self, agent_id: str) -> str:
        return self.agent(agent_id, "status")

    def task(self, agent_id: str) -> str:
        return self.agent(agent_id, "task")

    def update(self, agent_id: str) -> str:
        return self.agent(agent_id, "update")

    def adapter(self, agent_id: str) -> str:
        return self.agent(agent_id, "adapter")

    def ack(self, agent_id: str) -> str:
        return self.agent(agent_id, "ack")

    def all_agents(self, kind: str) -> str:
        return f"{self.root}agents/+/{kind}"

    def rollout(self, *parts: str) -> str:
        return self.root + "/".join(("rollout",) + parts)

    def parse_agent(self, topic: str) -> tuple[str, str]:
        """`fedclip/<fleet>/agents/<id>/<kind>` -> (id, kind); WireError for anything else."""
        if not topic.startswith(self.root + "agents/"):
            raise WireError(f"topic {topic!r} is not an agent topic of fleet {self.fleet}")
        rest = topic[len(self.root) + len("agents/") :].split("/")
        if len(rest) != 2 or not ID_PATTERN.match(rest[0]):
            raise WireError(f"topic {topic!r} has no valid agent id")
        return rest[0], rest[1]


@dataclass(frozen=True)
class Envelope:
    type: MsgType
    fleet: str
    agent: str  # the agent a task/adapter is for, or the agent an update/status/ack is from
    round: int = -1
    base_version: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    sent_at: float = 0.0
    schema: int = SCHEMA_VERSION

    def fields(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "type": self.type.value,
            "fleet": self.fleet,
            "agent": self.agent,
            "round": self.round,
            "base_version": self.base_version,
            "sent_at": self.sent_at,
            "body": self.body,
        }


@dataclass(frozen=True)
class Message:
    envelope: Envelope
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    # sha256 of the tensors (`tensors_digest`), as `decode` checked it: signatures reuse it
    digest: str = ""

    @property
    def adapter_tensors(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.tensors.items() if not k.startswith(STATS_PREFIX)}

    @property
    def stats(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.tensors.items() if k.startswith(STATS_PREFIX)}


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes, independent of the container's metadata."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _sign(key: bytes, fields: Mapping[str, Any], digest: str) -> str:
    msg = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"|" + digest.encode()
    return _hmac.new(key, msg, hashlib.sha256).hexdigest()


def encode(
    envelope: Envelope,
    tensors: Mapping[str, np.ndarray] | None = None,
    hmac_key: bytes | None = None,
    compress: bool = True,
    digest: str | None = None,
) -> bytes:
    """Serialize a message: safetensors when it has tensors (zlib-compressed when that is smaller,
    unless `compress` is False), JSON otherwise. `digest`: the tensors' `tensors_digest` when the
    caller already has it (a signer does)."""
    if not envelope.sent_at:
        envelope = replace(envelope, sent_at=time.time())
    fields = envelope.fields()
    tensors = dict(tensors or {})
    if digest is None:
        digest = tensors_digest(tensors) if tensors else ""
    header = dict(fields, tensors_sha256=digest)
    try:
        if hmac_key:
            header["hmac"] = _sign(hmac_key, fields, digest)
        text = json.dumps(header, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:  # e.g. a NaN loss in metrics: the sender's bug, not a crash
        what = f"{envelope.type.value} envelope"
        raise WireError(f"{what}: body is not JSON-serializable or not finite ({e})") from None
    if not tensors:
        return text.encode()  # JSON stays JSON: readable with any MQTT client
    blob = encode_tensors(tensors, {_META_KEY: text})
    if not compress:
        return blob
    # Float tensors barely compress (a few % from their exponents): below 10% saved, the receiver's
    # inflate costs more than the bytes are worth, and the message stays plain.
    packed = COMPRESSED_MAGIC + zlib.compress(blob, 6)
    return packed if len(packed) <= 0.9 * len(blob) else blob


def _inflate(payload: bytes, max_bytes: int, where: str) -> bytes:
    """The message inside a compressed payload, never more than `max_bytes` of it (no zip bombs)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload[len(COMPRESSED_MAGIC) :], max_bytes + 1)
    except zlib.error as e:
        raise WireError(f"{where}: compressed payload is corrupt ({e})") from None
    if len(out) > max_bytes:
        raise WireError(f"{where}: decompressed payload exceeds the limit of {max_bytes} bytes")
    if not d.eof or d.unused_data:
        raise WireError(f"{where}: compressed payload is truncated or has trailing bytes")
    return out


def decode(
    payload: bytes,
    *,
    fleet: str,
    expect: MsgType | tuple[MsgType, ...] | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD,
    hmac_key: bytes | None = None,
    where: str = "message",
) -> Message:
    """Parse and validate the envelope and tensor integrity. Raises WireError with the reason."""
    if len(payload) > max_bytes:
        raise WireError(f"{where}: payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if not payload:
        raise WireError(f"{where}: empty payload")
    if payload[: len(COMPRESSED_MAGIC)] == COMPRESSED_MAGIC:
        payload = _inflate(payload, max_bytes, where)
        if payload[:1] == b"{":  # only tensor messages are ever compressed
            raise WireError(f"{where}: compressed payload holds no tensors")
    tensors: dict[str, np.ndarray] = {}
    if payload[:1] == b"{":
        try:
            header = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting must not crash us
            raise WireError(f"{where}: not valid JSON") from None
    else:
        try:
            tensors, meta = decode_tensors(payload, where)
        except AdapterError as e:
            raise WireError(str(e)) from None
        if _META_KEY not in meta:
            raise WireError(f"{where}: safetensors payload has no fedclip envelope")
        try:
            header = json.loads(meta[_META_KEY])
        except (ValueError, RecursionError):
            raise WireError(f"{where}: envelope metadata is not valid JSON") from None
    if not isinstance(header, dict):
        raise WireError(f"{where}: envelope must be a JSON object")
    env = _parse_envelope(header, where)
    if env.fleet != fleet:
        raise WireError(f"{where}: message for fleet {env.fleet!r}, this is fleet {fleet!r}")
    if expect is not None:
        allowed = expect if isinstance(expect, tuple) else (expect,)
        if env.type not in allowed:
            raise WireError(f"{where}: unexpected message type {env.type.value!r}")
    digest = header.get("tensors_sha256", "")
    if not isinstance(digest, str):
        raise WireError(f"{where}: field 'tensors_sha256' must be a string")
    if tensors:
        for name, arr in tensors.items():
            if arr.dtype.kind not in "fiu":
                raise WireError(f"{where}: tensor {name!r} has unsupported dtype {arr.dtype}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise WireError(f"{where}: tensor {name!r} has non-finite values")
        if digest != tensors_digest(tensors):
            raise WireError(f"{where}: tensors do not match their sha256")
    elif digest:
        raise WireError(f"{where}: envelope names tensors but the payload carries none")
    if hmac_key is not None:
        given = header.get("hmac")
        if not isinstance(given, str) or not _hmac.compare_digest(
            given, _sign(hmac_key, env.fields(), digest)
        ):
            raise WireError(f"{where}: HMAC missing or wrong")
    return Message(env, tensors, digest if tensors else "")


def _parse_envelope(h: dict[str, Any], where: str) -> Envelope:
    schema = h.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:  # `true == 1` in Python: compare the type too
        raise WireError(f"{where}: schema version {schema!r} is not supported (expected {SCHEMA_VERSION})")
    try:
        mtype = MsgType(h.get("type"))
    except ValueError:
        raise WireError(f"{where}: unknown message type {h.get('type')!r}") from None
    for key in ("fleet", "agent"):
        value = h.get(key)
        if not isinstance(value, str) or not ID_PATTERN.match(value):
            raise WireError(f"{where}: field {key!r} is not a valid id: {value!r}")
    rnd = h.get("round", -1)
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not -1 <= rnd <= MAX_ROUND:
        shown = repr(rnd) if len(repr(rnd)) <= 40 else repr(rnd)[:37] + "..."
        raise WireError(f"{where}: field 'round' must be an integer in [-1, {MAX_ROUND}], got {shown}")
    base = h.get("base_version", "")
    if not isinstance(base, str) or len(base) > 128:
        raise WireError(f"{where}: field 'base_version' must be a short string")
    body = h.get("body", {})
    if not isinstance(body, dict):
        raise WireError(f"{where}: field 'body' must be an object")
    sent_at = h.get("sent_at", 0.0)
    if isinstance(sent_at, bool) or not isinstance(sent_at, (int, float)) or not math.isfinite(sent_at):
        raise WireError(f"{where}: field 'sent_at' must be a number")
    if not 0 <= sent_at <= 1e11:  # float(2**1000) is finite too; a timestamp is compared, so bound it
        raise WireError(f"{where}: field 'sent_at' is not a plausible unix time")
    return Envelope(mtype, h["fleet"], h["agent"], rnd, base, body, float(sent_at))
