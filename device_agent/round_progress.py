"""`RoundProgress`: the round in progress as the agent's state dir records it (`in_progress` in
state.json), a read-only view; `device_agent.state.AgentState` owns the record and changes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RoundProgress:
    """The round in progress as state.json records it (`in_progress`): a read-only view; the state
    dir changes it through `AgentState.save_progress`."""

    round: int
    epochs_done: int = 0
    steps_done: int = 0
    checkpoint: str | None = None  # relative to the state dir: the last epoch's checkpoint
    metrics_before: dict[str, float] | None = None  # held-out metrics before training, once measured
    train_seconds: float = 0.0
    train_metrics: dict[str, float] = field(default_factory=dict)  # of the last epoch trained
    task_sha256: str = ""
    started_at: float = 0.0

    @classmethod
    def from_record(cls, entry: Mapping[str, Any]) -> RoundProgress:
        return cls(
            round=int(entry["round"]),
            epochs_done=int(entry.get("epochs_done", 0)),
            steps_done=int(entry.get("steps_done", 0)),
            checkpoint=entry.get("checkpoint") or None,
            metrics_before=dict(entry["metrics_before"]) if entry.get("metrics_before") is not None else None,
            train_seconds=float(entry.get("train_seconds", 0.0)),
            train_metrics=dict(entry.get("train_metrics") or {}),
            task_sha256=str(entry.get("task_sha256", "")),
            started_at=float(entry.get("started_at", 0.0)),
        )
