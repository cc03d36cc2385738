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

    def fallback_for(self, version: str, agent: str) -> Adapter | None:
        """What `agent`'s open-set gate falls back to when `version` rolls out with `--fallback`: the
        round's global adapter when `load_for` gave the agent its own one (None: it got the global
        one itself, which needs no fallback)."""
        ...


class RegistrySource:
    """Versions from the registry; a global version of a round whose strategy personalized
    (ce-lora) resolves to each agent's own version of that round."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._global: tuple[str, Adapter] | None = None  # the last fallback: the same for every agent

    def load_for(self, version: str, agent: str) -> Adapter:
        own = self._own(version, agent)
        return self.registry.load(own or version)

    def fallback_for(self, version: str, agent: str) -> Adapter | None:
        if not self._own(version, agent):
            return None
        if self._global is None or self._global[0] != version:  # read once, not once per agent
            self._global = (version, self.registry.load(version))
        return self._global[1]

    def _own(self, version: str, agent: str) -> str | None:
        """`agent`'s own version of the round `version` is the global version of, if it has one."""
        row = self.registry.show(version)
        if row.scope != "agent" and row.round > 0:
            own = agent_version(agent, row.round)
            if self.registry.has(own):
                return own
        return None


@dataclass
class DictSource:
    """Adapters held in memory: version -> (tensors, meta), optionally per agent (tests, benchmarks)."""

    versions: dict[str, Adapter] = field(default_factory=dict)
    per_agent: dict[tuple[str, str], Adapter] = field(default_factory=dict)

    def load_for(self, version: str, agent: str) -> Adapter:
        if (version, agent) in self.per_agent:
            return self.per_agent[(version, agent)]
        return self._global(version)

    def fallback_for(self, version: str, agent: str) -> Adapter | None:
        return self._global(version) if (version, agent) in self.per_agent else None

    def _global(self, version: str) -> Adapter:
        if version not in self.versions:
            raise RolloutError(f"adapter version {version!r} is unknown")
        return self.versions[version]
