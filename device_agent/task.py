"""A round's task as the agent accepts it: parsed from the wire and checked against this agent and
its bundle before any work starts, so a bad task is refused with one line and never half-runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedclip.sdk.adapters import check_adapter
from fedclip.sdk.errors import WireError
from fedclip.sdk.ids import ID_PATTERN
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.wire import Message, digest_field

STAT_KINDS = ("histogram", "gaussian")
_MAX_EPOCHS = 10_000
_MAX_BATCH = 65_536


class WrongBundle(WireError):
    """A task or adapter for another bundle: refused, and the coordinator is told why."""


@dataclass(frozen=True)
class RoundTask:
    round: int
    base_version: str
    bundle_id: str
    deadline: float
    epochs: int
    lr: float
    batch_size: int
    max_steps: int | None
    stats: tuple[str, ...]
    noise_std: float
    reset_optimizer: bool
    adapter: dict[str, np.ndarray]  # validated exchanged tensors; empty: keep the current ones
    # data digest of the statistics the coordinator holds for this agent ("": none); when it equals
    # the agent's current `statistics.data_digest`, the gaussian statistics need not travel again
    stats_digest: str = ""


def parse_task(msg: Message, manifest: Manifest, agent_id: str, where: str) -> RoundTask:
    """Validate a decoded task against this agent and its bundle; WireError/AdapterError say why not."""
    env = msg.envelope
    if env.agent != agent_id:
        raise WireError(f"{where}: task is for agent {env.agent!r}, this is {agent_id!r}")
    if env.round < 0:
        raise WireError(f"{where}: task has no round id")
    body = env.body
    bundle_id = body.get("bundle_id")
    if not isinstance(bundle_id, str):
        raise WireError(f"{where}: body field 'bundle_id' is missing")
    if bundle_id != manifest.bundle_id:
        raise WrongBundle(
            f"task is for bundle {bundle_id[:12]}, this agent runs bundle {manifest.bundle_id[:12]}"
        )
    hp = body.get("hyperparameters", {})
    if not isinstance(hp, dict):
        raise WireError(f"{where}: body field 'hyperparameters' must be an object")
    epochs = _number(hp.get("epochs", 1), int, 1, _MAX_EPOCHS, "hyperparameters.epochs", where)
    lr = _number(hp.get("lr", 1e-3), float, 0.0, 10.0, "hyperparameters.lr", where)
    if lr <= 0:
        raise WireError(f"{where}: hyperparameters.lr must be > 0")
    batch_size = _number(hp.get("batch_size", 32), int, 1, _MAX_BATCH, "hyperparameters.batch_size", where)
    max_steps = hp.get("max_steps")
    if max_steps is not None:
        max_steps = _number(max_steps, int, 1, 10**9, "hyperparameters.max_steps", where)
    stats = body.get("stats", ["histogram"])
    if not isinstance(stats, list) or any(s not in STAT_KINDS for s in stats):
        raise WireError(f"{where}: body field 'stats' must be a list of {', '.join(STAT_KINDS)}")
    noise_std = _number(body.get("noise_std", 0.0), float, 0.0, 1e6, "noise_std", where)
    deadline = _number(body.get("deadline", 0.0), float, 0.0, 1e12, "deadline", where)
    reset = body.get("reset_optimizer", False)
    if not isinstance(reset, bool):
        raise WireError(f"{where}: body field 'reset_optimizer' must be true or false")
    stats_digest = digest_field(msg, "stats_digest", where)
    if msg.stats:
        raise WireError(f"{where}: a task carries no statistics")
    adapter = check_adapter(msg.adapter_tensors, manifest, where) if msg.adapter_tensors else {}
    return RoundTask(
        env.round,
        env.base_version,
        bundle_id,
        deadline,
        epochs,
        lr,
        batch_size,
        max_steps,
        tuple(dict.fromkeys(["histogram", *stats])),
        noise_std,
        reset,
        adapter,
        stats_digest,
    )


def parse_adapter(
    msg: Message, manifest: Manifest, agent_id: str, where: str
) -> tuple[str, dict[str, np.ndarray]]:
    """Validate an unsigned adapter push (agents without a coordinator key): (version, tensors)."""
    env = msg.envelope
    if env.agent != agent_id:
        raise WireError(f"{where}: adapter is for agent {env.agent!r}")
    bundle_id = env.body.get("bundle_id")
    if bundle_id != manifest.bundle_id:
        raise WrongBundle(
            f"adapter is for bundle {str(bundle_id)[:12]}, this agent runs bundle {manifest.bundle_id[:12]}"
        )
    version = env.body.get("version") or env.base_version
    if not isinstance(version, str) or not ID_PATTERN.match(version):
        raise WireError(f"{where}: adapter version {version!r} is not a valid id")
    return version, check_adapter(msg.adapter_tensors, manifest, where)


def _number(value: Any, kind: type, lo: float, hi: float, name: str, where: str) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int:
        ok = isinstance(value, int)
    if not ok or not (lo <= value <= hi):
        raise WireError(f"{where}: {name} must be a {kind.__name__} in [{lo:g}, {hi:g}], got {value!r}")
    return kind(value)
