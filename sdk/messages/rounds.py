"""Round messages: the task the coordinator sends (with its hyperparameters) and the update an agent
returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedclip.sdk.errors import WireError
from fedclip.sdk.label_prior import LOSSES
from fedclip.sdk.messages.base import (  # the package's own field checks
    KNOWN_STATS,
    MAX_BATCH,
    MAX_DEADLINE,
    MAX_EPOCHS,
    MAX_LR,
    MAX_SAMPLES,
    MAX_STEPS,
    MAX_VERSION,
    STAT_KINDS,
    WireBody,
    _bool,
    _envelope_type,
    _float,
    _int,
    _known_fields,
    _metrics,
    _str,
)
from fedclip.sdk.wire import (
    MAX_DIGEST_CHARS,
    Message,
    MsgType,
)


@dataclass(frozen=True)
class Hyperparameters:
    """Local training settings a task carries; the defaults are the coordinator's defaults too."""

    # 0: statistics only (a newcomer's first task under a mixing strategy): the agent evaluates,
    # computes its statistics and returns its start adapter unchanged, so the coordinator can give it
    # the adapters of the agents whose data looks like its own (docs/aggregation.md, "Newcomers").
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    max_steps: int | None = None
    # "ce" or "balanced-softmax" (`sdk.label_prior`); sent only when not "ce", so tasks of fleets
    # that never use it read as before to agents that predate it.
    loss: str = "ce"

    def __post_init__(self) -> None:
        _check_hyperparameters(self.to_body(), "hyperparameters")  # builders get the receivers' bounds

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_steps": self.max_steps,
        }
        if self.loss != "ce":
            body["loss"] = self.loss
        return body

    @classmethod
    def parse(cls, raw: Any, where: str) -> Hyperparameters:
        return cls(*_check_hyperparameters(raw, where))


def _check_hyperparameters(raw: Any, where: str) -> tuple[int, float, int, int | None, str]:
    if not isinstance(raw, dict):
        raise WireError(f"{where}: body field 'hyperparameters' must be an object")
    _known_fields(raw, frozenset({"epochs", "lr", "batch_size", "max_steps", "loss"}), where)
    w = f"{where}: hyperparameters"
    epochs = _int(raw, "epochs", 0, MAX_EPOCHS, w, 1)
    lr = _float(raw, "lr", 0.0, MAX_LR, w, 1e-3)
    if lr <= 0:
        raise WireError(f"{w}: body field 'lr' must be > 0")
    batch = _int(raw, "batch_size", 1, MAX_BATCH, w, 32)
    steps = raw.get("max_steps")
    if steps is not None:
        steps = _int(raw, "max_steps", 1, MAX_STEPS, w)
    loss = raw.get("loss", "ce")
    if loss not in LOSSES:
        raise WireError(f"{w}: body field 'loss' must be one of {', '.join(LOSSES)}")
    return epochs, lr, batch, steps, loss


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


# An update's metric: the held-out accuracy of the adapter the fleet sent for this round minus that of
# the adapter the device trained in its last trained round, on the same held-out files, loss and
# label prior: what the fleet's aggregation added over the device's own training. Agents of earlier
# versions do not send it; the coordinator averages it like every metric and adds FLEET_GAIN_HELPED
# and FLEET_GAIN_HURT, the shares of the round's reporting agents for which it was positive and
# negative (the rest: no held-out answer changed; docs/agent.md, "Fleet gain").
FLEET_GAIN, FLEET_GAIN_HELPED, FLEET_GAIN_HURT = "fleet_gain", "fleet_gain_helped", "fleet_gain_hurt"


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
