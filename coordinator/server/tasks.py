"""Task building: the open round's in-memory state, and the task message each selected agent gets.

A task is stored as a blob (the exact payload published) before anything is sent, so a restarted
coordinator re-sends the same bytes; an extension re-issues the same task with a later deadline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedclip.coordinator.server.context import RoundContext
from fedclip.sdk import messages
from fedclip.sdk.messages import Task


@dataclass
class RoundState:
    """The round being collected (fields mirror its rows in the store)."""

    round: int
    deadline: float
    extended: bool
    selected: dict[str, str]  # agent -> base version of its task
    task_blobs: dict[str, str]  # agent -> blob sha of its task message
    received: set[str] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        # O(1), it is asked on every loop iteration: intake only ever adds selected agents
        return len(self.received) >= len(self.selected)

    @property
    def missing(self) -> list[str]:
        return sorted(set(self.selected) - self.received)


@dataclass(frozen=True)
class TaskSpec:
    """What one agent is asked to do in one round (the tensors it starts from travel beside it)."""

    round_id: int
    agent: str
    base_version: str
    stats: tuple[str, ...]  # statistic kinds the strategy wants ("histogram", "gaussian")
    deadline: float
    stats_digest: str = ""  # the agent may leave out the statistics it computed for this digest
    train: bool = True  # False: statistics only (epochs 0, a newcomer's first task)


class Tasks:
    """Builds, stores and re-issues task messages for one coordinator."""

    def __init__(self, ctx: RoundContext):
        self.cfg, self.manifest, self.store, self.key = ctx.cfg, ctx.manifest, ctx.store, ctx.key

    def build(self, specs: Iterable[tuple[TaskSpec, Mapping[str, np.ndarray]]]) -> list[str]:
        """Store the (signed) task message of each (spec, starting tensors), made durable in batches
        (`Blobs.put_all`: one wave of fsyncs per batch, not two fsyncs per task); their blob shas."""
        return self.store.blobs.put_all(self._encode(spec, tensors) for spec, tensors in specs)

    def _encode(self, spec: TaskSpec, tensors: Mapping[str, np.ndarray]) -> bytes:
        hp = self.cfg.hyperparameters()
        task = Task(
            round_id=spec.round_id,
            bundle_id=self.manifest.bundle_id,
            deadline=spec.deadline,
            hyperparameters=hp if spec.train else dataclasses.replace(hp, epochs=0),
            stats=spec.stats,
            noise_std=self.cfg.noise_std,
            reset_optimizer=self.cfg.reset_optimizer,
            stats_digest=spec.stats_digest,
            base_version=spec.base_version,
            adapter=tensors,
        )
        return messages.encode(task, self.cfg.fleet, spec.agent, key=self.key)

    def held_digest(self, agent: str, round_id: int, stats: tuple[str, ...]) -> str:
        """The data digest of the statistics held for `agent`, so it need not send them again; ""
        (send them) when the strategy needs none, none are held, or they are due for a refresh."""
        if "gaussian" not in stats:
            return ""
        held = self.store.agent_stats(agent)
        if held is None or not self.store.blobs.has(held.blob):
            return ""
        refresh = self.cfg.stats_refresh_rounds
        if refresh and round_id - held.round >= refresh:
            return ""
        return held.data_digest

    def payload(self, st: RoundState, agent: str) -> bytes:
        return self.store.blobs.get(st.task_blobs[agent])

    def reissue(self, st: RoundState, agents: list[str], deadline: float) -> dict[str, str]:
        """The same tasks with a later `deadline`, so an agent that has not started still may;
        agent -> new blob sha (stored, not yet recorded as the round's)."""

        def specs() -> Iterator[tuple[TaskSpec, Mapping[str, np.ndarray]]]:
            for agent in agents:
                old = messages.decode(
                    Task, self.payload(st, agent), fleet=self.cfg.fleet, max_bytes=self.cfg.max_payload_bytes
                )
                yield (
                    TaskSpec(
                        st.round,
                        agent,
                        st.selected[agent],
                        old.stats,
                        deadline,
                        old.stats_digest,
                        train=old.hyperparameters.epochs > 0,
                    ),
                    old.adapter,
                )

        return dict(zip(agents, self.build(specs()), strict=True))
