"""Rollout policy, pure: who is targeted, who is the canary, and what a stage's acks decide.

Functions of records only (agents' statuses, rollout and stage rows, acks, pins, the time): nothing
here publishes or touches a database, so every rule is unit-tested alone. `RolloutManager`
(`rollout`) carries out what `next_step` says.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from hashlib import sha256
from typing import Literal

import numpy as np

from fedclip.coordinator.fleet import AgentInfo
from fedclip.coordinator.rollout_store import (
    CANARY,
    INSTALLED,
    PINNED,
    REJECTED,
    REST,
    Ack,
    RolloutRow,
    StageRow,
)
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.ids import check_id


@dataclass(frozen=True)
class Target:
    """`all`, `group:NAME` or `agents:a,b`."""

    kind: str
    names: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Target:
        text = (text or "").strip()
        if text == "all":
            return cls("all")
        kind, _, rest = text.partition(":")
        names = tuple(n.strip() for n in rest.split(",") if n.strip())
        if kind not in ("group", "agents") or not names:
            raise ConfigError(f"--to: {text!r} is not all, group:NAME or agents:a,b")
        if kind == "group" and len(names) != 1:
            raise ConfigError(f"--to: {text!r} names more than one group")
        for n in names:
            check_id(n, "--to")
        return cls(kind, names)

    def __str__(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{','.join(self.names)}"

    def resolve(self, fleet: Mapping[str, AgentInfo]) -> list[str]:
        if self.kind == "all":
            return sorted(fleet)
        if self.kind == "group":
            return sorted(a for a, info in fleet.items() if self.names[0] in info.groups)
        # Named agents need not have reported yet: their retained adapter waits for them.
        return sorted(set(self.names))


def parse_canary(text: str | int | float) -> tuple[str, float]:
    """`10%` -> ("fraction", 0.1); `3` -> ("count", 3). Zero means no canary stage."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            value = float(s[:-1]) / 100.0
            if not 0.0 <= value <= 1.0:
                raise ValueError
            return "fraction", value
        value = int(s)
        if value < 0:
            raise ValueError
        return "count", float(value)
    except ValueError:
        raise ConfigError(f"--canary: {text!r} is not a percentage (10%) or a count (3)") from None


def select_canary(targets: Sequence[str], fleet: Mapping[str, AgentInfo], spec: str, salt: str) -> list[str]:
    """Canary agents: online ones first (they can answer now), spread by a per-rollout hash."""
    kind, value = parse_canary(spec)
    n = math.ceil(value * len(targets)) if kind == "fraction" else int(value)
    if value > 0:
        n = max(1, n)
    n = min(n, len(targets))

    def order(agent: str) -> tuple[int, str]:
        online = fleet.get(agent, AgentInfo(agent, online=False)).online
        return (0 if online else 1, sha256(f"{salt}/{agent}".encode()).hexdigest())

    return sorted(sorted(targets, key=order)[:n])


@dataclass(frozen=True)
class RolloutParams:
    version: str
    target: Target
    canary: str = "10%"
    max_regression: float = 1.0
    min_acks: float = 0.9
    stage_timeout: float = 300.0
    # Send an agent that gets its own adapter of a personalized round the round's global one too,
    # for its open-set gate (`AdapterSource.fallback_for`, docs/rollout.md "Fallback").
    fallback: bool = False

    def __post_init__(self) -> None:
        check_id(self.version, "version")
        parse_canary(self.canary)
        if not 0.0 <= self.min_acks <= 1.0:
            raise ConfigError(f"--min-acks: must be between 0 and 1, got {self.min_acks}")
        if not math.isfinite(self.max_regression):
            raise ConfigError("--max-regression: must be a finite number of points")
        if self.stage_timeout <= 0:
            raise ConfigError(f"--stage-timeout: must be > 0, got {self.stage_timeout}")

    @classmethod
    def of(cls, row: RolloutRow) -> RolloutParams:
        """The parameters a recorded rollout was started with."""
        return cls(
            row.version,
            Target.parse(row.target),
            row.canary,
            row.max_regression,
            row.min_acks,
            row.stage_timeout,
            row.fallback,
        )


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    acked: int
    expected: int
    mean_regression: float | None


def decide(acks: Iterable[Ack], expected: Sequence[str], max_regression: float, min_acks: float) -> Decision:
    """Promote a stage when enough agents installed it and the mean regression is within bounds."""
    by_agent = {a.agent: a for a in acks if a.agent in set(expected)}
    installed = [a for a in by_agent.values() if a.status == INSTALLED]
    regressions = [r for r in (a.regression for a in installed) if r is not None]
    mean = float(np.mean(regressions)) if regressions else None
    n = len(expected)
    rejected = sorted(a.agent for a in by_agent.values() if a.status == REJECTED)
    if n and len(installed) < min_acks * n:
        why = f"only {len(installed)} of {n} canary agents acknowledged (need {min_acks:.0%})"
        if rejected:
            why += f"; rejected by {', '.join(rejected[:5])}: {by_agent[rejected[0]].reason}"
        return Decision(False, why, len(installed), n, mean)
    if mean is not None and mean > max_regression:
        return Decision(
            False,
            f"mean accuracy regression {mean:.2f} points exceeds --max-regression {max_regression:g}",
            len(installed),
            n,
            mean,
        )
    if mean is None:
        return Decision(True, f"{len(installed)} of {n} acknowledged (no metrics)", len(installed), n, None)
    return Decision(
        True,
        f"{len(installed)} of {n} acknowledged, mean regression {mean:.2f} points",
        len(installed),
        n,
        mean,
    )


def current_stage(stages: Iterable[StageRow]) -> StageRow | None:
    """The stage a rollout is in: `rest` once it exists, else `canary`."""
    by_name = {s.name: s for s in stages}
    return by_name.get(REST) or by_name.get(CANARY)


def rest_targets(row: RolloutRow, canary: Sequence[str], pins: Mapping[str, str]) -> list[str]:
    """Every target past the canary; agents pinned since the start are left out too."""
    return sorted(a for a in row.targets if a not in canary and a not in pins)


@dataclass(frozen=True)
class Step:
    """What a rollout's current stage calls for now.

    `wait`: not every agent answered and the deadline has not passed (or the stage is not running);
    `promote`: the canary passed, send `rest` (none: the rollout is complete); `rollback`: the canary
    failed; `complete`: the rest stage is done (`summary` says how many acknowledged)."""

    action: Literal["wait", "promote", "rollback", "complete"]
    stage: str = ""
    decision: Decision | None = None
    rest: tuple[str, ...] = ()
    summary: str = ""


def next_step(
    row: RolloutRow, stage: StageRow | None, acks: Sequence[Ack], pins: Mapping[str, str], now: float
) -> Step:
    """Decide rollout `row` at time `now` from its current `stage`, that stage's `acks` and the pins."""
    if stage is None or stage.state != "running":
        return Step("wait")
    answered = {a.agent for a in acks if a.status in (INSTALLED, REJECTED, PINNED)}
    if not set(stage.agents) <= answered and now < (stage.deadline or 0):
        return Step("wait", stage.name)
    decision = decide(acks, stage.agents, row.max_regression, row.min_acks)
    if stage.name == CANARY:
        if not decision.promote:
            return Step("rollback", CANARY, decision)
        return Step("promote", CANARY, decision, tuple(rest_targets(row, stage.agents, pins)))
    # The rest stage does not gate: agents that were offline get the retained adapter later.
    pending = len(stage.agents) - decision.acked
    summary = f"{decision.acked} of {decision.expected} acknowledged" + (
        f", {pending} pending (retained for when they reconnect)" if pending else ""
    )
    return Step("complete", REST, decision, summary=summary)
