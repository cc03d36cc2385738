"""The device's own limits on the work a task may ask of it (`policy:` in agent.yaml).

A signed task comes from the coordinator, but a device still decides what it will do: an operator's
typo (or a stolen coordinator key) must not make a camera train 10,000 epochs at lr 10, or jump its
round counter so far that every later task looks stale. `check_task` refuses such a task with one
line before any work starts; the agent reports the line in its status and never runs the task.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedclip.sdk.errors import ConfigError, WireError
from fedclip.sdk.messages import MAX_EPOCHS, MAX_LR, Task


@dataclass(frozen=True)
class TaskPolicy:
    """Safe defaults for a camera-class device; raise them in agent.yaml for bigger training jobs."""

    max_epochs: int = 20
    max_steps: int = 10_000  # optimizer steps per round (epochs x batches, or the task's max_steps)
    max_seconds: float = 3600.0  # a deadline further than this from now is refused
    min_lr: float = 1e-7
    max_lr: float = 1.0  # fleet-core trains its small cores at ~0.15
    # a task's round may be at most this far past the last round this agent ran (0: no limit)
    max_round_jump: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.max_epochs <= MAX_EPOCHS:
            raise ConfigError(f"policy.max_epochs: must be in [1, {MAX_EPOCHS}], got {self.max_epochs}")
        if self.max_steps < 1:
            raise ConfigError(f"policy.max_steps: must be >= 1, got {self.max_steps}")
        if self.max_seconds <= 0:
            raise ConfigError(f"policy.max_seconds: must be > 0, got {self.max_seconds}")
        if not 0 < self.min_lr <= self.max_lr <= MAX_LR:
            raise ConfigError(f"policy.min_lr, max_lr: need 0 < min_lr <= max_lr <= {MAX_LR:g}")
        if self.max_round_jump < 0:
            raise ConfigError(f"policy.max_round_jump: must be >= 0, got {self.max_round_jump}")


def planned_steps(task: Task, batches_per_epoch: int) -> int:
    """Optimizer steps the task would run on this device's data."""
    hp = task.hyperparameters
    steps = hp.epochs * max(1, batches_per_epoch)
    return min(steps, hp.max_steps) if hp.max_steps else steps


def check_task(
    task: Task, policy: TaskPolicy, *, last_round: int, batches_per_epoch: int, now: float, where: str
) -> None:
    """Raise WireError (one line) when `task` asks for more than `policy` allows."""
    hp = task.hyperparameters
    if hp.epochs > policy.max_epochs:
        raise WireError(f"{where}: {hp.epochs} epochs exceed this device's limit of {policy.max_epochs}")
    steps = planned_steps(task, batches_per_epoch)
    if steps > policy.max_steps:
        raise WireError(f"{where}: {steps} training steps exceed this device's limit of {policy.max_steps}")
    if not policy.min_lr <= hp.lr <= policy.max_lr:
        raise WireError(
            f"{where}: lr {hp.lr:g} is outside this device's range [{policy.min_lr:g}, {policy.max_lr:g}]"
        )
    if task.deadline and task.deadline - now > policy.max_seconds:
        raise WireError(
            f"{where}: deadline {task.deadline - now:.0f}s away exceeds this device's limit of "
            f"{policy.max_seconds:g}s"
        )
    if policy.max_round_jump and last_round >= 0 and task.round_id - last_round > policy.max_round_jump:
        raise WireError(
            f"{where}: round {task.round_id} jumps {task.round_id - last_round} past this agent's last round "
            f"{last_round} (limit {policy.max_round_jump})"
        )
