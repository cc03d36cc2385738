"""Status messages: an agent's retained status, and the coordinator's."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedclip.sdk.errors import WireError
from fedclip.sdk.ids import ID_PATTERN
from fedclip.sdk.messages.base import (  # the package's own field checks
    MAX_DEVICE_FIELDS,
    MAX_EPOCHS,
    MAX_NAME,
    MAX_SAMPLES,
    MAX_TEXT,
    MAX_URL,
    MAX_VERSION,
    WireBody,
    _bool,
    _choice,
    _envelope_type,
    _int,
    _known_fields,
    _metrics,
    _show,
    _str,
)
from fedclip.sdk.wire import (
    MAX_ROUND,
    Message,
    MsgType,
)

# Wire features an agent takes beyond schema 1, comma-separated in its status's `versions` under
# this key. A new body field would make every coordinator older than it refuse the whole status; an
# entry of `versions` reaches them all. `fallback`: an AdapterPush carrying the fleet's adapter beside
# the agent's own (`sdk.messages.rollout`), which agents before it refuse without an ack.
FEATURES_KEY = "fedclip-wire"
FEATURE_FALLBACK = "fallback"
AGENT_FEATURES = (FEATURE_FALLBACK,)  # what this version's agents take
# Every coordinator cuts `versions` values to MAX_NAME characters: the joined list must fit
assert len(",".join(AGENT_FEATURES)) <= MAX_NAME, "wire features: the list outgrew a versions value"

# The status's `device` entry naming the fleet's adapter kept beside the adapter in use, for the
# fleet view (`AgentStatus.fallback_version`). In `device` for the same reason as the features: a
# body field would make coordinators from before it (which can already send fallbacks) refuse the
# whole status of every device that keeps one.
DEVICE_FALLBACK = "open_set_fallback"


def wire_features(versions: Mapping[str, str]) -> frozenset[str]:
    """The wire features a status's `versions` names (empty: an agent before there were any)."""
    raw = versions.get(FEATURES_KEY, "")
    if not isinstance(raw, str):
        return frozenset()
    return frozenset(f.strip() for f in raw.split(",") if f.strip())


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
class TuningProgress:
    """A personal tuning the device has not finished (device_agent.personalize): of `adapter`, in
    epoch `epoch` (from 1) of `epochs`, under way or paused for a message."""

    adapter: str
    epoch: int
    epochs: int

    def to_body(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "epoch": self.epoch, "epochs": self.epochs}

    @classmethod
    def parse(cls, raw: Any, where: str) -> TuningProgress:
        if not isinstance(raw, dict):
            raise WireError(f"{where}: body field 'tuning' must be an object")
        where = f"{where}: tuning"
        _known_fields(raw, frozenset({"adapter", "epoch", "epochs"}), where)
        epochs = _int(raw, "epochs", 1, MAX_EPOCHS, where)
        return cls(
            adapter=_str(raw, "adapter", MAX_VERSION, where),
            epoch=_int(raw, "epoch", 1, epochs, where),  # never past the tuning's last epoch
            epochs=epochs,
        )


def _tuning(body: dict[str, Any], where: str) -> TuningProgress | None:
    """The status's tuning, which is of the adapter it says it uses (a device tunes that one only)."""
    if "tuning" not in body:
        return None
    tuning = TuningProgress.parse(body["tuning"], where)
    if tuning.adapter != body.get("adapter_version"):
        raise WireError(f"{where}: tuning is of {_show(tuning.adapter)}, not the adapter in use")
    return tuning


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
            "personal",
            "tuning",
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
    notice: str = ""  # why the last task was refused, a state-dir error, a failed personal tuning
    # Personal tuning (device_agent.personal): inference serves `adapter_version` tuned on the device;
    # its held-out accuracy (`accuracy`), the adapter's own (`accuracy_fleet`), `mu`. Empty: it does not.
    personal: Mapping[str, float] = field(default_factory=dict)
    # A personal tuning of `adapter_version` not finished yet (inference serves the adapter itself
    # meanwhile, so `personal` is empty); None: none.
    tuning: TuningProgress | None = None

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
        if self.personal:
            body["personal"] = dict(self.personal)
        if self.tuning is not None:
            body["tuning"] = self.tuning.to_body()
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
            personal=_metrics(body.get("personal", {}), "personal", where),
            tuning=_tuning(body, where),
        )

    @property
    def fallback_version(self) -> str:
        """The fleet's adapter the device keeps beside `adapter_version` (`rollout start --fallback`),
        where its open-set gate sends the images unlike its own; "": none (`DEVICE_FALLBACK`)."""
        v = self.device.get(DEVICE_FALLBACK)
        return v if isinstance(v, str) and ID_PATTERN.match(v) else ""  # an id: at most 64 characters


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
