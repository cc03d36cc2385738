"""The device's task policy: each limit refuses with one line, and the defaults let real tasks through."""

from __future__ import annotations

import pytest

from fedclip.device_agent.policy import TaskPolicy, check_task, planned_steps
from fedclip.sdk.errors import ConfigError, WireError
from fedclip.sdk.messages import Hyperparameters, Task

NOW = 1_700_000_000.0


def task(round_id=5, deadline=NOW + 600, **hp) -> Task:
    return Task(round_id, "b", deadline, Hyperparameters(**hp))


def check(t: Task, policy=TaskPolicy(), last_round=4, batches=10) -> None:
    check_task(t, policy, last_round=last_round, batches_per_epoch=batches, now=NOW, where="task")


def test_an_ordinary_task_passes():
    check(task(epochs=2, lr=1e-3, batch_size=32))
    check(task(round_id=1), last_round=-1)  # a new agent accepts any first round within bounds


@pytest.mark.parametrize(
    "t,policy,reason",
    [
        (task(epochs=10_000), TaskPolicy(), "10000 epochs exceed this device's limit of 20"),
        (task(epochs=5), TaskPolicy(max_steps=40), "50 training steps exceed"),
        (task(lr=10.0), TaskPolicy(), "lr 10 is outside this device's range"),
        (task(lr=1e-9), TaskPolicy(), "lr 1e-09 is outside"),
        (task(deadline=NOW + 10**7), TaskPolicy(), "deadline 10000000s away exceeds"),
        (task(round_id=2**31 - 1), TaskPolicy(), "jumps 2147483643 past this agent's last round 4"),
    ],
)
def test_each_limit_refuses_with_one_line(t, policy, reason):
    with pytest.raises(WireError, match=reason) as e:
        check(t, policy)
    assert "\n" not in str(e.value)


def test_max_steps_in_the_task_counts():
    t = task(epochs=20, max_steps=100)
    assert planned_steps(t, 1000) == 100
    check(t, TaskPolicy(max_steps=100), batches=1000)


def test_round_jump_limit_can_be_turned_off():
    check(task(round_id=10**6), TaskPolicy(max_round_jump=0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_epochs": 0},
        {"max_steps": 0},
        {"max_seconds": 0},
        {"min_lr": 1.0, "max_lr": 0.1},
        {"max_round_jump": -1},
    ],
)
def test_bad_policies_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="policy."):
        TaskPolicy(**kwargs)
