"""The strategy interface (after Flower's `Strategy`): select and configure a round, aggregate it.

The round loop lives once, in `fedclip.coordinator.server`; a strategy only decides who trains on
what and how updates become adapters. Math lives in `aggregate.py` as pure numpy functions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from fedclip.sdk.errors import ConfigError


@dataclass(frozen=True)
class StrategyOptions:
    """Knobs every strategy may read; each strategy documents the ones it uses."""

    clients_per_round: int = 0  # 0 = every compatible online agent
    selection: str = "random"  # "random" (seeded) or "all"
    seed: int = 0
    lam: float = 0.5  # ce-lora: weight of the data distance vs the parameter distance
    tau: float = 0.1  # ce-lora: softmax temperature over distances
    trim_fraction: float = 0.1  # trimmed-mean: fraction dropped at each end, per coordinate
    neighbours: int = 32  # ce-lora: weights over each agent's k nearest agents; 0 = all agents

    def __post_init__(self) -> None:
        if self.clients_per_round < 0:
            raise ConfigError(f"clients_per_round: must be >= 0, got {self.clients_per_round}")
        if self.selection not in ("random", "all"):
            raise ConfigError(f"selection: {self.selection!r} is not one of 'random', 'all'")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"lam: must be in [0, 1], got {self.lam}")
        if not self.tau > 0:
            raise ConfigError(f"tau: must be > 0, got {self.tau}")
        if self.neighbours < 0:
            raise ConfigError(f"neighbours: must be >= 0 (0 = all agents), got {self.neighbours}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction: must be in [0, 0.5), got {self.trim_fraction}")


@dataclass(frozen=True)
class AdapterRef:
    version: str
    tensors: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class TaskPlan:
    """What one selected agent is asked to do: start from `start`, send these statistics, and train
    (`train=False`: statistics only, the task's epochs are 0)."""

    agent: str
    start: AdapterRef
    stats: tuple[str, ...] = ()
    train: bool = True


@dataclass(frozen=True)
class Update:
    """One validated update. `tensors` may be a lazy mapping (read from disk on access)."""

    agent: str
    num_samples: int
    tensors: Mapping[str, np.ndarray]  # exchanged tensors after local training
    base: Mapping[str, np.ndarray]  # the tensors the agent started from (its task's adapter)
    stats: Mapping[str, np.ndarray] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregateResult:
    global_tensors: dict[str, np.ndarray]
    per_agent: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class AdapterBook(Protocol):
    """The current adapters, as the registry knows them."""

    def global_adapter(self) -> AdapterRef: ...

    def agent_adapter(self, agent: str) -> AdapterRef | None: ...


class Strategy(ABC):
    name: ClassVar[str] = ""
    # Data statistics the agents must send with their updates (task body `stats`).
    stats: ClassVar[tuple[str, ...]] = ()
    personalized: ClassVar[bool] = False
    # Its global adapter is a model any device can serve, so a personalized round's global one can
    # travel beside each device's own as the open-set gate's fallback (`rollout start --fallback`).
    # Not for ce-lora: each device's A and B are its own, and a mean of cores means nothing there.
    shared_global: ClassVar[bool] = True

    def __init__(self, options: StrategyOptions | None = None):
        self.options = options or StrategyOptions()

    def select(self, round_id: int, candidates: Sequence[str]) -> list[str]:
        """Up to K of the candidates; random with a seed that depends on the round, or all."""
        pool = sorted(candidates)
        k = self.options.clients_per_round
        if self.options.selection == "all" or k == 0 or k >= len(pool):
            return pool
        rng = np.random.default_rng([self.options.seed, round_id])
        return sorted(rng.choice(pool, size=k, replace=False).tolist())

    @property
    def mixes_newcomers(self) -> bool:
        """True when a newcomer's first task is statistics only and the round gives it the adapters
        of the agents whose data looks like its own (`FleetCore.aggregate`)."""
        return False

    def configure_round(
        self, round_id: int, selected: Sequence[str], book: AdapterBook
    ) -> dict[str, TaskPlan]:
        """Each agent starts from its personalized adapter when the strategy keeps one, else the global.

        Under a strategy that mixes for newcomers, an agent without an adapter of its own is asked
        for statistics only while agents with their own adapters train beside it (so the round has
        adapters to mix for it); without any such agent (a fleet's first round) everyone trains."""
        personal = {a: book.agent_adapter(a) for a in selected} if self.personalized else {}
        members = self.mixes_newcomers and any(p is not None for p in personal.values())
        plans = {}
        for agent in selected:
            start = personal.get(agent)
            train = start is not None or not members
            plans[agent] = TaskPlan(agent, start or book.global_adapter(), self.stats, train)
        return plans

    @abstractmethod
    def aggregate(self, round_id: int, updates: Sequence[Update]) -> AggregateResult:
        """Turn the round's validated updates into a global adapter and optional per-agent ones."""
