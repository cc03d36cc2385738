"""What every message class shares: the bounds receivers apply, the statistics and rollout
vocabularies, the one-line field checks, and the `WireBody` base class."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from fedclip.sdk.errors import WireError
from fedclip.sdk.ids import ID_PATTERN
from fedclip.sdk.wire import (
    STAT_LABEL_HIST,
    STAT_MEAN,
    STAT_VAR,
    Envelope,
    Message,
    MsgType,
)

# ---- bounds every receiver applies ---------------------------------------------------------------
MAX_SAMPLES = 2**31 - 1  # num_samples: weights in an average, stored in SQLite
MAX_ROLLOUT_ID = 2**53  # JSON-safe and far inside SQLite's INTEGER
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_STEPS = 10**9
MAX_LR = 10.0
# a proximal weight (personal tuning: agent.yaml `personal.mu`, `train --prox-mu`, the demo's
# `--personal-mu`); past it the term is the whole loss
MAX_PROX_MU = 1e4
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
