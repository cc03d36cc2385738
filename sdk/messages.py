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

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from fedclip.sdk.errors import WireError
from fedclip.sdk.ids import ID_PATTERN
from fedclip.sdk.wire import (
    DEFAULT_MAX_PAYLOAD,
    MAX_DIGEST_CHARS,
    MAX_ROUND,
    STAT_LABEL_HIST,
    STAT_MEAN,
    STAT_VAR,
    STATS_PREFIX,
    Envelope,
    Message,
    MsgType,
    tensors_digest,
)
from fedclip.sdk.wire import decode as wire_decode
from fedclip.sdk.wire import encode as wire_encode

# ---- bounds every receiver applies ---------------------------------------------------------------
MAX_SAMPLES = 2**31 - 1  # num_samples: weights in an average, stored in SQLite
MAX_ROLLOUT_ID = 2**53  # JSON-safe and far inside SQLite's INTEGER
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_STEPS = 10**9
MAX_LR = 10.0
MAX_METRICS = 64
MAX_NAME = 64  # metric names, groups, version keys
MAX_TEXT = 300  # reasons, notices
MAX_VERSION = 128  # adapter versions, bundle ids, urls are longer: MAX_URL
MAX_URL = 2048
MAX_DEADLINE = 1e11  # unix seconds, year ~5138: bounds a float that is only compared
MAX_DEVICE_FIELDS = 32

# ---- the statistics vocabulary -------------------------------------------------------------------
STAT_KINDS = ("histogram", "gaussian")
# which tensors each statistic kind a task asks for means on the wire
STATS_TENSORS: dict[str, tuple[str, ...]] = {
    "histogram": (STAT_LABEL_HIST,),
    "gaussian": (STAT_MEAN, STAT_VAR),
}
KNOWN_STATS = frozenset(n for names in STATS_TENSORS.values() for n in names)

# ---- rollout vocabulary --------------------------------------------------------------------------
ACK_INSTALLED, ACK_REJECTED, ACK_ROLLED_BACK, ACK_PINNED = "installed", "rejected", "rolled_back", "pinned"
ACK_STATUSES = (ACK_INSTALLED, ACK_REJECTED, ACK_ROLLED_BACK, ACK_PINNED)
COMMANDS = ("rollback", "pin", "unpin")
SIGNATURE_FIELD = "signature"  # the body key sdk.signing writes; allowed in every body

T = TypeVar("T", bound="WireBody")


# ---- field checks (one line each, naming the field) ----------------------------------------------
def _int(body: Mapping[str, Any], key: str, lo: int, hi: int, where: str, default: Any = ...) -> int:
    value = body.get(key, default)
    if value is ...:
        raise WireError(f"{where}: body field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WireError(f"{where}: body field {key!r} must be an integer in [{lo}, {hi}], got {_show(value)}")
    return value


def _float(body: Mapping[str, Any], key: str, lo: float, hi: float, where: str, default: Any = ...) -> float:
    value = body.get(key, default)
    if value is ...:
        raise WireError(f"{where}: body field {key!r} is missing")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not lo <= value <= hi:
        raise WireError(
            f"{where}: body field {key!r} must be a number in [{lo:g}, {hi:g}], got {_show(value)}"
        )
    return float(value)


def _str(body: Mapping[str, Any], key: str, max_len: int, where: str, default: Any = ...) -> str:
    value = body.get(key, default)
    if value is ...:
        raise WireError(f"{where}: body field {key!r} is missing")
    if not isinstance(value, str) or len(value) > max_len:
        raise WireError(f"{where}: body field {key!r} must be a string of at most {max_len} chars")
    return value


def _id(body: Mapping[str, Any], key: str, where: str, default: Any = ..., empty_ok: bool = False) -> str:
    value = _str(body, key, MAX_VERSION, where, default)
    if (value or not empty_ok) and not ID_PATTERN.match(value):
        raise WireError(f"{where}: body field {key!r} is not a valid id: {_show(value)}")
    return value


def _bool(body: Mapping[str, Any], key: str, where: str, default: Any = ...) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise WireError(f"{where}: body field {key!r} must be true or false")
    return value


def _choice(
    body: Mapping[str, Any], key: str, allowed: tuple[str, ...], where: str, default: Any = ...
) -> str:
    value = body.get(key, default)
    if value not in allowed or not isinstance(value, str):
        raise WireError(
            f"{where}: body field {key!r} must be one of {', '.join(allowed)}, got {_show(value)}"
        )
    return value


def _metrics(raw: Any, key: str, where: str) -> dict[str, float]:
    """At most 64 finite numbers with short string names."""
    if not isinstance(raw, dict) or len(raw) > MAX_METRICS:
        raise WireError(f"{where}: body field {key!r} must be an object of at most {MAX_METRICS} numbers")
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or len(k) > MAX_NAME:
            raise WireError(f"{where}: {key} name {_show(k)} is not a short string")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise WireError(f"{where}: {key} {k!r} is not a finite number")
        out[k] = float(v)
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _known_fields(body: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = sorted(set(body) - allowed - {SIGNATURE_FIELD})
    if extra:
        raise WireError(f"{where}: unknown body field {_show(extra[0])}")


def _envelope_type(msg: Message, expected: MsgType, where: str) -> Envelope:
    if msg.envelope.type is not expected:
        raise WireError(f"{where}: expected a {expected.value} message, got {msg.envelope.type.value!r}")
    return msg.envelope


# ---- the messages -------------------------------------------------------------------------------
class WireBody:
    """Shared shape: the message type, its envelope round and base version, body and tensors."""

    TYPE: ClassVar[MsgType]
    BODY_KEYS: ClassVar[frozenset[str]]

    def envelope_round(self) -> int:
        return -1

    def envelope_base_version(self) -> str:
        return ""

    def to_body(self) -> dict[str, Any]:
        raise NotImplementedError

    def tensors(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def parse(cls: type[T], msg: Message, where: str) -> T:
        raise NotImplementedError


@dataclass(frozen=True)
class Hyperparameters:
    """Local training settings a task carries; the defaults are the coordinator's defaults too."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    max_steps: int | None = None

    def __post_init__(self) -> None:
        _check_hyperparameters(self.to_body(), "hyperparameters")  # builders get the receivers' bounds

    def to_body(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_steps": self.max_steps,
        }

    @classmethod
    def parse(cls, raw: Any, where: str) -> Hyperparameters:
        return cls(*_check_hyperparameters(raw, where))


def _check_hyperparameters(raw: Any, where: str) -> tuple[int, float, int, int | None]:
    if not isinstance(raw, dict):
        raise WireError(f"{where}: body field 'hyperparameters' must be an object")
    _known_fields(raw, frozenset({"epochs", "lr", "batch_size", "max_steps"}), where)
    w = f"{where}: hyperparameters"
    epochs = _int(raw, "epochs", 1, MAX_EPOCHS, w, 1)
    lr = _float(raw, "lr", 0.0, MAX_LR, w, 1e-3)
    if lr <= 0:
        raise WireError(f"{w}: body field 'lr' must be > 0")
    batch = _int(raw, "batch_size", 1, MAX_BATCH, w, 32)
    steps = raw.get("max_steps")
    if steps is not None:
        steps = _int(raw, "max_steps", 1, MAX_STEPS, w)
    return epochs, lr, batch, steps


@dataclass(frozen=True)
class Task(WireBody):
    """coordinator -> agent: train round `round_id` from the starting adapter `adapter`."""

    TYPE: ClassVar[MsgType] = MsgType.TASK
    BODY_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"bundle_id", "deadline", "hyperparameters", "stats", "noise_std", "reset_optimizer", "stats_digest"}
    )

    round_id: int
    bundle_id: str
    deadline: float
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    stats: tuple[str, ...] = ("histogram",)
    noise_std: float = 0.0
    reset_optimizer: bool = False
    # the data digest of the statistics the coordinator holds for this agent ("": none held)
    stats_digest: str = ""
    base_version: str = ""
    adapter: Mapping[str, np.ndarray] = field(default_factory=dict)

    def envelope_round(self) -> int:
        return self.round_id

    def envelope_base_version(self) -> str:
        return self.base_version

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "bundle_id": self.bundle_id,
            "deadline": self.deadline,
            "hyperparameters": self.hyperparameters.to_body(),
            "stats": list(self.stats),
            "noise_std": self.noise_std,
            "reset_optimizer": self.reset_optimizer,
        }
        if self.stats_digest:
            body["stats_digest"] = self.stats_digest
        return body

    def tensors(self) -> dict[str, np.ndarray]:
        return dict(self.adapter)

    @classmethod
    def parse(cls, msg: Message, where: str) -> Task:
        env = _envelope_type(msg, MsgType.TASK, where)
        body = env.body
        _known_fields(body, cls.BODY_KEYS, where)
        if env.round < 0:
            raise WireError(f"{where}: task has no round id")
        stats = body.get("stats", ["histogram"])
        if (
            not isinstance(stats, list)
            or len(stats) > len(STAT_KINDS)
            or any(s not in STAT_KINDS for s in stats)
        ):
            raise WireError(f"{where}: body field 'stats' must be a list of {', '.join(STAT_KINDS)}")
        if msg.stats:
            raise WireError(f"{where}: a task carries no statistics")
        return cls(
            round_id=env.round,
            bundle_id=_str(body, "bundle_id", MAX_VERSION, where),
            deadline=_float(body, "deadline", 0.0, MAX_DEADLINE, where, 0.0),
            hyperparameters=Hyperparameters.parse(body.get("hyperparameters", {}), where),
            stats=tuple(dict.fromkeys(["histogram", *stats])),
            noise_std=_float(body, "noise_std", 0.0, 1e6, where, 0.0),
            reset_optimizer=_bool(body, "reset_optimizer", where, False),
            stats_digest=_str(body, "stats_digest", MAX_DIGEST_CHARS, where, ""),
            base_version=env.base_version,
            adapter=msg.adapter_tensors,
        )


@dataclass(frozen=True)
class Update(WireBody):
    """agent -> coordinator: the adapter after local training, its metrics and data statistics."""

    TYPE: ClassVar[MsgType] = MsgType.UPDATE
    BODY_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"bundle_id", "num_samples", "metrics", "train_seconds", "skipped_images", "data_digest"}
    )

    round_id: int
    bundle_id: str
    num_samples: int
    base_version: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    skipped_images: int = 0
    data_digest: str = ""  # what the statistics describe (sent or held by the coordinator)
    adapter: Mapping[str, np.ndarray] = field(default_factory=dict)
    stats: Mapping[str, np.ndarray] = field(default_factory=dict)  # `stats/*` tensors

    def envelope_round(self) -> int:
        return self.round_id

    def envelope_base_version(self) -> str:
        return self.base_version

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "bundle_id": self.bundle_id,
            "num_samples": self.num_samples,
            "metrics": dict(self.metrics),
            "train_seconds": round(float(self.train_seconds), 3),
            "skipped_images": self.skipped_images,
        }
        if self.data_digest:
            body["data_digest"] = self.data_digest
        return body

    def tensors(self) -> dict[str, np.ndarray]:
        return {**self.adapter, **self.stats}

    @classmethod
    def parse(cls, msg: Message, where: str) -> Update:
        env = _envelope_type(msg, MsgType.UPDATE, where)
        body = env.body
        _known_fields(body, cls.BODY_KEYS, where)
        if env.round < 0:
            raise WireError(f"{where}: update has no round id")
        unknown = sorted(set(msg.stats) - KNOWN_STATS)
        if unknown:
            raise WireError(f"{where}: unknown statistic {unknown[0]!r}")
        return cls(
            round_id=env.round,
            bundle_id=_str(body, "bundle_id", MAX_VERSION, where),
            num_samples=_int(body, "num_samples", 0, MAX_SAMPLES, where),
            base_version=env.base_version,
            metrics=_metrics(body.get("metrics", {}), "metrics", where),
            train_seconds=_float(body, "train_seconds", 0.0, 1e9, where, 0.0),
            skipped_images=_int(body, "skipped_images", 0, MAX_SAMPLES, where, 0),
            data_digest=_str(body, "data_digest", MAX_DIGEST_CHARS, where, ""),
            adapter=msg.adapter_tensors,
            stats=msg.stats,
        )


def _device(raw: Any, where: str) -> dict[str, str | int | float | None]:
    if not isinstance(raw, dict) or len(raw) > MAX_DEVICE_FIELDS:
        raise WireError(
            f"{where}: body field 'device' must be an object of at most {MAX_DEVICE_FIELDS} fields"
        )
    out: dict[str, str | int | float | None] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or len(k) > MAX_NAME:
            raise WireError(f"{where}: device field name {_show(k)} is not a short string")
        if isinstance(v, str):
            v = v[:MAX_TEXT]
        elif isinstance(v, bool) or (v is not None and not isinstance(v, (int, float))):
            raise WireError(f"{where}: device field {k!r} must be a string, a number or null")
        elif isinstance(v, float) and not math.isfinite(v):
            raise WireError(f"{where}: device field {k!r} is not finite")
        elif isinstance(v, int) and abs(v) > MAX_SAMPLES:
            raise WireError(f"{where}: device field {k!r} is out of range")
        out[k] = v
    return out


def _str_map(raw: Any, key: str, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or len(raw) > MAX_DEVICE_FIELDS:
        raise WireError(
            f"{where}: body field {key!r} must be an object of at most {MAX_DEVICE_FIELDS} strings"
        )
    if any(not isinstance(k, str) or len(k) > MAX_NAME or not isinstance(v, str) for k, v in raw.items()):
        raise WireError(f"{where}: body field {key!r} must map short names to strings")
    return {k: v[:MAX_NAME] for k, v in raw.items()}


def _groups(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_DEVICE_FIELDS:
        raise WireError(f"{where}: body field 'groups' must be a list of at most {MAX_DEVICE_FIELDS} ids")
    for g in raw:
        if not isinstance(g, str) or not ID_PATTERN.match(g):
            raise WireError(f"{where}: group {_show(g)} is not a valid id")
    return tuple(raw)


@dataclass(frozen=True)
class AgentStatus(WireBody):
    """agent -> all (retained): online or offline, its bundle, the adapter it uses, its last round."""

    TYPE: ClassVar[MsgType] = MsgType.STATUS
    BODY_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "state",
            "bundle_id",
            "adapter_version",
            "last_round",
            "versions",
            "device",
            "groups",
            "num_samples",
            "notice",
        }
    )

    state: str  # "online" | "offline"
    bundle_id: str = ""
    adapter_version: str = ""
    last_round: int = -1
    versions: Mapping[str, str] = field(default_factory=dict)
    device: Mapping[str, str | int | float | None] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    num_samples: int = 0
    notice: str = ""  # why the last task was refused, or a state-dir error

    def envelope_round(self) -> int:
        return self.last_round

    def envelope_base_version(self) -> str:
        return self.adapter_version

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "state": self.state,
            "bundle_id": self.bundle_id,
            "adapter_version": self.adapter_version,
            "last_round": self.last_round,
            "versions": dict(self.versions),
            "device": dict(self.device),
            "groups": list(self.groups),
            "num_samples": self.num_samples,
        }
        if self.notice:
            body["notice"] = self.notice
        return body

    @classmethod
    def parse(cls, msg: Message, where: str) -> AgentStatus:
        body = _envelope_type(msg, MsgType.STATUS, where).body
        _known_fields(body, cls.BODY_KEYS, where)
        return cls(
            state=_choice(body, "state", ("online", "offline"), where),
            bundle_id=_str(body, "bundle_id", MAX_VERSION, where, ""),
            adapter_version=_str(body, "adapter_version", MAX_VERSION, where, ""),
            last_round=_int(body, "last_round", -1, MAX_ROUND, where, -1),
            versions=_str_map(body.get("versions", {}), "versions", where),
            device=_device(body.get("device", {}), where),
            groups=_groups(body.get("groups", []), where),
            num_samples=_int(body, "num_samples", 0, MAX_SAMPLES, where, 0),
            notice=_str(body, "notice", 4 * MAX_TEXT, where, "")[:MAX_TEXT],
        )


@dataclass(frozen=True)
class CoordinatorStatus(WireBody):
    """coordinator -> all (retained on `coordinator/status`, last will offline)."""

    TYPE: ClassVar[MsgType] = MsgType.STATUS
    BODY_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"state", "bundle_id", "round", "strategy", "bundle_url", "finished"}
    )

    state: str
    bundle_id: str
    round_id: int = 0
    strategy: str = ""
    bundle_url: str = ""
    finished: bool = False  # the run is over (offline for good, not a crash)

    def envelope_round(self) -> int:
        return self.round_id

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "state": self.state,
            "bundle_id": self.bundle_id,
            "round": self.round_id,
            "strategy": self.strategy,
        }
        if self.bundle_url:
            body["bundle_url"] = self.bundle_url
        if self.finished:
            body["finished"] = True
        return body

    @classmethod
    def parse(cls, msg: Message, where: str) -> CoordinatorStatus:
        body = _envelope_type(msg, MsgType.STATUS, where).body
        _known_fields(body, cls.BODY_KEYS, where)
        url = _str(body, "bundle_url", MAX_URL, where, "")
        if url and not url.startswith(("http://", "https://")):
            raise WireError(f"{where}: body field 'bundle_url' must be an http(s) URL")
        return cls(
            state=_choice(body, "state", ("online", "offline"), where),
            bundle_id=_str(body, "bundle_id", MAX_VERSION, where),
            round_id=_int(body, "round", 0, MAX_ROUND, where, 0),
            strategy=_str(body, "strategy", MAX_NAME, where, ""),
            bundle_url=url,
            finished=_bool(body, "finished", where, False),
        )


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
    by `url` (+ `sha256`, `size`) instead of inline tensors."""

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
        return body

    def tensors(self) -> dict[str, np.ndarray]:
        return dict(self.adapter)

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
        if not url and not msg.adapter_tensors:
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
            adapter=msg.adapter_tensors,
        )


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
    "Update",
    "WireBody",
    "decode",
    "encode",
    "envelope",
]
