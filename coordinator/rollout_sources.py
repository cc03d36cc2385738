"""Where a rollout's adapters come from: the registry (per-agent versions resolved), or memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedclip.coordinator.registry import Registry, agent_version
from fedclip.coordinator.rollout_store import RolloutError
from fedclip.sdk.adapters import AdapterMeta

Adapter = tuple[dict[str, np.ndarray], AdapterMeta]


class AdapterSource(Protocol):
    def load_for(self, version: str, agent: str) -> Adapter:
        """The adapter `agent` gets when `version` rolls out (its own one for personalized versions)."""
        ...


class RegistrySource:
    """Versions from the registry; a global version of a round whose strategy personalized
    (ce-lora) resolves to each agent's own version of that round."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def load_for(self, version: str, agent: str) -> Adapter:
        row = self.registry.show(version)
        if row.scope != "agent" and row.round > 0:
            own = agent_version(agent, row.round)
            if self.registry.has(own):
                return self.registry.load(own)
        return self.registry.load(version)


@dataclass
class DictSource:
    """Adapters held in memory: version -> (tensors, meta), optionally per agent (tests, benchmarks)."""

    versions: dict[str, Adapter] = field(default_factory=dict)
    per_agent: dict[tuple[str, str], Adapter] = field(default_factory=dict)

    def load_for(self, version: str, agent: str) -> Adapter:
        if (version, agent) in self.per_agent:
            return self.per_agent[(version, agent)]
        if version not in self.versions:
            raise RolloutError(f"adapter version {version!r} is unknown")
        return self.versions[version]
